"""The benchmark's summary reports issue 12's bar on its own: `cpu_experts` auto against the better
of off and all at every budget whose three rows ran, the worst of them as a target."""

from __future__ import annotations

import pytest

from moe_llm.bench.report import road_comparison, summarize

GIB = 1 << 30


def _row(name: str, tok_s: float, budget: int | None = 12 * GIB) -> dict:
    return {
        "name": name, "decode_tok_s": tok_s, "gpu_budget_bytes": budget, "peak_gpu_bytes": 0, "ttft_s": {},
        "hit_rate": 0.5, "bytes_per_token": 1.0,
    }  # fmt: skip


def _run(rows: list[dict]) -> dict:
    return {"variants": rows, "pinned_bandwidth_bytes_s": 55e9}


def test_auto_is_compared_with_the_better_road_at_each_budget():
    rows = [
        _row("full", 60.0), _row("full-cpu-off", 30.0), _row("full-cpu-all", 50.0),
        _row("full-4GiB", 17.0, 4 * GIB), _row("full-cpu-off-4GiB", 9.0, 4 * GIB),
        _row("full-cpu-all-4GiB", 18.0, 4 * GIB),
        _row("full-16GiB", 180.0, 16 * GIB),  # its off and all rows did not run: no comparison
        _row("resident", 190.0, None),
    ]  # fmt: skip
    by_budget = {c["budget_bytes"]: c for c in road_comparison(rows)}
    assert set(by_budget) == {12 * GIB, 4 * GIB}
    assert by_budget[12 * GIB]["auto_vs_best"] == pytest.approx(60 / 50)
    assert by_budget[4 * GIB]["auto_vs_best"] == pytest.approx(17 / 18)
    run = summarize(_run(rows))
    assert run["auto_vs_best_road"] == pytest.approx(17 / 18)  # the worst budget decides
    target = next(t for t in run["targets"] if t["key"] == "auto_vs_best_road")
    assert target["met"] is False and target["missed_by"] == pytest.approx(1 - 17 / 18)


def test_a_budget_where_every_expert_is_resident_has_one_road():
    """With every expert resident in the three rows nothing misses, so off, all and auto run the
    same program: that budget's ratio is reported but decides nothing."""
    rows = [_row("full", 60.0), _row("full-cpu-off", 30.0), _row("full-cpu-all", 50.0)]
    same = [_row(n, t, 16 * GIB) | {"hit_rate": 1.0, "cpu_expert_calls_per_token": 0.0}
            for n, t in (("full-16GiB", 308.2), ("full-cpu-off-16GiB", 308.4), ("full-cpu-all-16GiB", 308.3))]  # fmt: skip
    run = summarize(_run(rows + same))
    by_budget = {c["budget_bytes"]: c for c in run["auto_vs_roads"]}
    assert by_budget[16 * GIB]["one_road"] and by_budget[16 * GIB]["auto_vs_best"] == pytest.approx(308.2 / 308.4)
    assert not by_budget[12 * GIB]["one_road"]
    assert run["auto_vs_best_road"] == pytest.approx(60 / 50)
    same[1]["cpu_expert_calls_per_token"] = 0.5  # a row that computed on the CPU: two roads again
    assert summarize(_run(rows + same))["auto_vs_best_road"] == pytest.approx(308.2 / 308.4)


def test_without_the_three_rows_there_is_no_verdict():
    run = summarize(_run([_row("full", 60.0), _row("full-cpu-all", 50.0)]))
    assert run["auto_vs_roads"] == [] and run["auto_vs_best_road"] is None
    target = next(t for t in run["targets"] if t["key"] == "auto_vs_best_road")
    assert target["met"] is None


def test_the_cpu_kernel_is_judged_against_the_runs_ram_read_rate():
    """Issue 12's kernel bar: every miss on the CPU (`full-cpu-all` at the smallest budget, the
    most misses) computed at >= 70% of the RAM read rate measured in the same run."""
    rows = [
        {**_row("full", 60.0), "cpu_expert_gbps": 40.0},
        {**_row("full-cpu-all", 50.0), "cpu_expert_gbps": 75.0},
        {**_row("full-cpu-all-2GiB", 20.0, 2 * GIB), "cpu_expert_gbps": 66.0},
        _row("resident", 190.0, None),
    ]
    run = summarize({**_run(rows), "ram_read_bandwidth_bytes_s": 100e9})
    assert run["variants"][0]["cpu_fraction_of_ram_read"] == pytest.approx(0.40)
    assert run["variants"][3]["cpu_fraction_of_ram_read"] is None
    assert run["cpu_kernel_fraction_of_ram_read"] == pytest.approx(0.66)  # the 2 GiB row
    target = next(t for t in run["targets"] if t["key"] == "cpu_kernel_fraction_of_ram_read")
    assert target["met"] is False and target["missed_by"] == pytest.approx(1 - 0.66 / 0.7)
    no_probe = summarize(_run([_row("full", 60.0), {**_row("full-cpu-all", 50.0), "cpu_expert_gbps": 75.0}]))
    assert no_probe["cpu_kernel_fraction_of_ram_read"] is None
