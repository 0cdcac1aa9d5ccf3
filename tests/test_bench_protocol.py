"""The benchmark protocol on a tiny synthetic geometry, on CPU: every row carries its repeated
runs and reports the middle one, with that run's counters and TTFT timeline; the CLI rejects
bad repeat counts."""

from __future__ import annotations

import pytest

from moe_llm.bench.protocol import Variant, Workload, _middle, run_protocol
from moe_llm.bench.synthetic import Geometry, SyntheticModel
from moe_llm.cli import main

TINY = Geometry(layers=2, hidden=64, intermediate=128, experts=4, heads=4, kv_heads=2, vocab=128, max_positions=512)


def test_middle_is_a_measured_run():
    assert _middle([3.0, 1.0, 2.0]) == 2.0
    assert _middle([1.0, 2.0]) == 2.0  # upper middle: one of the runs, not their mean
    runs = [{"t": 5, "c": "a"}, {"t": 1, "c": "b"}, {"t": 3, "c": "c"}]
    assert _middle(runs, key=lambda r: r["t"])["c"] == "c"


def test_rows_keep_every_run_and_report_the_middle(one_thread, tmp_path, monkeypatch):
    import json
    import os

    from moe_llm.experts.cpu.build import BuildSettings

    # the run measures this machine's RAM read rate and keeps it in MOE_LLM_HOME/machine.json
    # (the compiled CPU kernel stays where it already is)
    monkeypatch.setenv("MOE_LLM_CACHE_DIR", str(BuildSettings.from_env({**os.environ, "MOE_LLM_HOME": ""}).cache_dir))
    monkeypatch.setenv("MOE_LLM_HOME", str(tmp_path))
    model = SyntheticModel(TINY, "cpu", experts_bits=2, attn_bits=4)
    variants = [Variant("resident", 2, None), Variant("full", 2, None, cache_per_layer=2)]
    run = run_protocol(model, variants, Workload(prompt_tokens=16, new_tokens=6, ttft_prompts=(32,), repeats=3))
    ram = run["ram_read_bandwidth_bytes_s"]
    assert ram > 1e9 and json.loads((tmp_path / "machine.json").read_text())["ram_gbps"] == pytest.approx(ram / 1e9)
    assert [r["name"] for r in run["variants"]] == ["resident", "full"]
    for row in run["variants"]:
        runs = row["decode_tok_s_runs"]
        assert len(runs) == 3 and all(t > 0 for t in runs)
        assert row["decode_tok_s"] == sorted(runs)[1]
        times = row["ttft_s_runs"]["32"]
        assert len(times) == 3 and row["ttft_s"]["32"] == sorted(times)[1]
        # the reported TTFT's timeline: to the first MoE layer's routing, between the two
        # layers', from the last to the token; it adds up to that TTFT
        tl = row["ttft_layers"]["32"]
        assert len(tl["layer_ms"]) == TINY.layers - 1 and min(tl["first_ms"], tl["last_ms"], *tl["layer_ms"]) >= 0
        assert abs(tl["first_ms"] + sum(tl["layer_ms"]) + tl["last_ms"] - 1e3 * row["ttft_s"]["32"]) < 0.1
        assert row["ttft_copy_ms_per_layer"] > 0
        assert row["generated_tokens"] == 6 and "ratio_to_bound" in row
    full = run["variants"][1]
    # 2 slots per layer of 4 experts, in one global pool: decode misses cross the link
    assert full["expert_slots"] == 2 * 2 and full["bytes_per_token"] > 0 and full["zero_copy_bytes_per_token"] > 0


@pytest.mark.parametrize("repeats", ["0", "-1"])
def test_cli_rejects_bad_repeat_counts(repeats, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--tiny", "--device", "cpu", "--repeats", repeats, "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "--repeats must be at least 1" in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()


def test_cli_rows_picks_rows_by_name_and_names_the_known_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--tiny", "--device", "cpu", "--rows", "full,nope", "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "no row named nope" in err and "resident" in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()


def test_decode_profile_traces_only_the_steps_after_the_prompt(one_thread):
    """`profile_decode` leaves the prompt's prefill and first token outside the trace and divides
    by the tokens decoded inside it (so its window is the prompt's, as in the timed rows)."""
    from moe_llm.bench.protocol import profile_decode

    model = SyntheticModel(TINY, "cpu", experts_bits=2, attn_bits=4)
    engine = model.engine(None, cache_per_layer=2)
    prof = profile_decode(engine, model.random_prompt(40, 1), tokens=5)
    assert prof["tokens"] == 5 and prof["wall_s_per_token"] > 0
    assert engine.batcher.active_requests == 0
