"""`moe-llm plan` tells the user what to expect (issue 12): for a machine given by its PCIe and
RAM bandwidth, cores and HBM bandwidth, the split of each decode step's missed experts between
PCIe (zero-copy) and the CPU for cpu_experts off/auto/all, and the projected tok/s of each,
from the cost model in `experts.split`. Properties of the projection; bad values are one line."""

from __future__ import annotations

import itertools
import json
import platform

import pytest

from moe_llm.errors import ConfigError
from moe_llm.experts.roads import predicted_layer_s
from moe_llm.planning import Machine, machine, plan_model, project_decode
from moe_llm.planning import speed as speed_mod
from moe_llm.planning.speed import EXPERT_KERNEL_GBPS, HBM_EFFICIENCY, ZERO_COPY_EFFICIENCY

GIB = 2**30
DESKTOP = ["--pcie-gbps", "25", "--ram-gbps", "70", "--cores", "8"]


def run_cli(argv, capsys):
    from moe_llm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code or 0, capsys.readouterr()


@pytest.fixture(scope="module")
def plans():
    """Mixtral-8x7B (shipped config.json), 2-bit experts, 4-bit attention, at 6, 8 and 12 GiB and resident."""
    out = {b: plan_model("mixtral-8x7b", gpu_budget=f"{b}GiB", experts_bits=2, attn_bits=4) for b in (6, 8, 12)}
    out[None] = plan_model("mixtral-8x7b", experts_bits=2, attn_bits=4)
    return out


@pytest.fixture
def no_measurements(tmp_path, monkeypatch):
    """A fresh MOE_LLM_HOME: no machine.json measured here."""
    monkeypatch.setenv("MOE_LLM_HOME", str(tmp_path))
    return tmp_path


def test_plan_prints_the_split_and_the_speed_of_each_road(capsys):
    code, out = run_cli(["plan", "mixtral-8x7b", "--budget", "12GiB", "--experts-bits", "2", *DESKTOP], capsys)
    assert code == 0 and out.err == ""
    text = out.out
    assert "expected hit rate" in text and "of 256 experts" in text  # the plan, as before
    assert "machine: PCIe 25 GB/s (given), RAM 70 GB/s (given), 8 cores (given), HBM" in " ".join(text.split())
    assert "not measured" in text and "uniform routing" in text
    rows = {line.split()[1]: line for line in text.splitlines() if line.split()[1:2] in (["off"], ["auto"], ["all"])}
    assert set(rows) == {"off", "auto", "all"}

    code, out = run_cli(
        ["plan", "mixtral-8x7b", "--budget", "12GiB", "--experts-bits", "2", *DESKTOP, "--json"], capsys
    )
    d = json.loads(out.out)
    proj = d["decode_projection"]
    m = proj["machine"]
    assert (m["pcie_gbps"], m["ram_gbps"], m["cores"]) == (25.0, 70.0, 8)
    assert m["sources"]["pcie_gbps"] == m["sources"]["ram_gbps"] == m["sources"]["cores"] == "given"
    assert m["cpu_threads"] == 7 and m["cpu_gbps"] == pytest.approx(min(70 * 0.55, 7 * 7.0))
    roads = proj["roads"]
    assert set(roads) == {"off", "auto", "all"}
    misses = d["bytes_per_token"] / d["plan"]["expert_bytes"]
    for mode, r in roads.items():
        assert r["misses_per_token"] == pytest.approx(misses)
        assert r["pcie_experts_per_token"] + r["cpu_experts_per_token"] == pytest.approx(misses)
        assert r["tok_s"] == pytest.approx(1 / r["s_per_token"]) and r["tok_s"] > 0
        assert f"{r['tok_s']:.1f}" in rows[mode]  # the table prints what the JSON says
    assert roads["off"]["cpu_experts_per_token"] == 0 and roads["all"]["pcie_experts_per_token"] == 0
    assert 0 < roads["auto"]["cpu_experts_per_token"] < misses  # here both roads carry part of each miss
    assert roads["auto"]["tok_s"] > max(roads["off"]["tok_s"], roads["all"]["tok_s"])


def test_off_is_the_link_bound_of_the_plan(plans):
    """With no CPU share a layer's time is linear in its misses, so the expectation over the
    hypergeometric miss counts is the hits at HBM speed plus the misses over PCIe."""
    mach = Machine(pcie_gbps=25, ram_gbps=70, cores=8, hbm_gbps=500)
    for budget in (6, 8, 12):
        mp = plans[budget]
        off = project_decode(mp, mach)["off"]
        misses = mp.bytes_per_token / mp.plan.expert_bytes
        eb, routed = mp.plan.expert_bytes, mp.top_k * mp.moe_layers
        hbm, link = 500e9 * HBM_EFFICIENCY, 25e9 * ZERO_COPY_EFFICIENCY  # what the kernels reach (500 GB/s: no cap)
        want = mp.token_trunk_bytes / hbm + (routed - misses) * eb / hbm + misses * eb / link
        assert off.s_per_token == pytest.approx(want, rel=1e-9)
        assert off.misses_per_token == pytest.approx(misses, rel=1e-9)
    assert plans[6].plan.slots < plans[8].plan.slots < plans[12].plan.slots


def test_hits_are_read_at_the_expert_kernels_rate():
    """HBM counts at HBM_EFFICIENCY of its bandwidth, but never past the expert kernel's own
    limit (arithmetic-bound on the H200: the engine's measured split rates come out of this)."""
    slow = Machine(pcie_gbps=25, ram_gbps=70, cores=8, hbm_gbps=500).roads()
    h200 = Machine(pcie_gbps=55, ram_gbps=82, cores=16, hbm_gbps=4800).roads()
    assert slow.gpu_hbm == pytest.approx(500e9 * HBM_EFFICIENCY)
    assert h200.gpu_hbm == pytest.approx(EXPERT_KERNEL_GBPS * 1e9) and h200.gpu_hbm < 4800e9 * HBM_EFFICIENCY
    assert h200.zero_copy == pytest.approx(55e9 * ZERO_COPY_EFFICIENCY)


def test_every_expert_resident_has_no_misses_and_one_speed(plans):
    roads = project_decode(plans[None], Machine(pcie_gbps=25, ram_gbps=70, cores=8, hbm_gbps=500))
    assert {r.misses_per_token for r in roads.values()} == {0.0}
    assert roads["off"].s_per_token == roads["auto"].s_per_token == roads["all"].s_per_token


GRID = list(itertools.product((8, 25, 50), (10, 40, 70, 90, 200), (1, 2, 8, 16, 64), (300, 1000)))


@pytest.mark.parametrize("budget", [6, 8, 12])
def test_auto_is_never_slower_than_off_or_all(plans, budget):
    for pcie, ram, cores, hbm in GRID:
        roads = project_decode(plans[budget], Machine(pcie_gbps=pcie, ram_gbps=ram, cores=cores, hbm_gbps=hbm))
        assert roads["auto"].tok_s >= max(roads["off"].tok_s, roads["all"].tok_s), (pcie, ram, cores, hbm)


@pytest.mark.parametrize("budget", [6, 8, 12])
def test_more_ram_bandwidth_never_lowers_the_cpu_roads(plans, budget):
    for pcie, cores, hbm in itertools.product((8, 25, 50), (2, 8, 16, 64), (300, 1000)):
        last, last_ram = None, 0
        for ram in (5, 10, 20, 30, 40, 55, 70, 90, 120, 200, 400):
            roads = project_decode(plans[budget], Machine(pcie_gbps=pcie, ram_gbps=ram, cores=cores, hbm_gbps=hbm))
            now = {mode: roads[mode].tok_s for mode in ("off", "auto", "all")}
            if last is not None:
                assert now["all"] >= last["all"] and now["auto"] >= last["auto"], (pcie, cores, hbm, ram)
                assert now["off"] >= last["off"]  # off reads host RAM over the link only, never the CPU
                if last_ram > pcie:
                    assert now["off"] == last["off"]  # ... so past the link's rate more RAM does nothing
            last, last_ram = now, ram


def test_the_cpu_road_decides_where_misses_go(plans):
    mp = plans[8]
    slow = project_decode(mp, Machine(pcie_gbps=50, ram_gbps=10, cores=2, hbm_gbps=1000))
    fast = project_decode(mp, Machine(pcie_gbps=8, ram_gbps=200, cores=64, hbm_gbps=1000))
    assert slow["all"].tok_s < slow["off"].tok_s and fast["all"].tok_s > fast["off"].tok_s
    assert slow["auto"].cpu_experts_per_token < fast["auto"].cpu_experts_per_token
    more_cores = project_decode(mp, Machine(pcie_gbps=25, ram_gbps=200, cores=16, hbm_gbps=1000))
    few_cores = project_decode(mp, Machine(pcie_gbps=25, ram_gbps=200, cores=4, hbm_gbps=1000))
    assert few_cores["all"].tok_s < more_cores["all"].tok_s  # 3 threads bound the CPU road below RAM speed


def test_the_projection_uses_the_cost_model_of_the_split(plans):
    """A one-layer check against `experts.roads.predicted_layer_s`: one MoE layer's expected
    time over its miss counts is what the projection adds per layer."""
    mp = plans[12]
    mach = Machine(pcie_gbps=25, ram_gbps=70, cores=8, hbm_gbps=500)
    roads = mach.roads()
    q, r = divmod(mp.plan.slots, mp.moe_layers)
    k, e, eb = mp.top_k, mp.num_experts, mp.plan.expert_bytes
    want = mp.token_trunk_bytes / roads.gpu_hbm
    for n, slots in ((mp.moe_layers - r, q), (r, q + 1)):
        probs = speed_mod._miss_counts(e, slots, k)
        assert sum(probs) == pytest.approx(1.0)
        want += n * sum(
            p * predicted_layer_s(m, k, 256 if m else 0, 256, roads, eb, mp.experts_bits) for m, p in enumerate(probs)
        )
    assert project_decode(mp, mach)["all"].s_per_token == pytest.approx(want, rel=1e-12)


def test_both_roads_share_the_hosts_ram(plans):
    """A miss split between the roads is read from host RAM by both: a layer takes at least their
    bytes at the RAM's rate, however fast each road is alone (the H200 hosts' split rows were
    bound by it). Without that limit (RAM far faster) `auto` projects faster."""
    from moe_llm.experts.roads import Roads

    eb = 55_738_368
    roads = Roads(gpu_hbm=1.2e12, zero_copy=36e9, cpu=60e9, handoff_s=0.0, ram=70e9)
    for m in (1, 2):
        for take in (0, 1792, 3584):
            assert predicted_layer_s(m, 2, take, 3584, roads, eb, 2) >= m * eb / 70e9
    mp = plans[12]
    bound = Machine(pcie_gbps=55, ram_gbps=70, cores=16, hbm_gbps=4800, cpu_road_gbps=60)
    free = Machine(pcie_gbps=55, ram_gbps=1e4, cores=16, hbm_gbps=4800, cpu_road_gbps=60)
    auto = project_decode(mp, bound)["auto"]
    assert auto.s_per_token >= auto.resident_s_per_token + auto.misses_per_token * mp.plan.expert_bytes / 70e9
    assert project_decode(mp, free)["auto"].tok_s > auto.tok_s * 1.1
    assert project_decode(mp, free)["off"].tok_s == project_decode(mp, bound)["off"].tok_s  # the link alone


def test_a_measured_cpu_road_rate_replaces_the_model(capsys):
    assert Machine(pcie_gbps=25, ram_gbps=70, cores=8, hbm_gbps=500, cpu_road_gbps=60).cpu_gbps == 60
    assert Machine(pcie_gbps=25, ram_gbps=70, cores=8, hbm_gbps=500).cpu_gbps == pytest.approx(38.5)
    code, out = run_cli(["plan", "mixtral-8x7b", "--budget", "12GiB", "--experts-bits", "2", *DESKTOP,
                         "--cpu-gbps", "45"], capsys)  # fmt: skip
    assert code == 0 and "CPU road 45.0 GB/s (given)" in " ".join(out.out.split())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_cpu_bytes_are_counted_as_the_engine_counts_them(bits):
    """The projection's CPU bytes follow the split's reads (`cpu_read_fraction`): at 2 and 4 bits
    the CPU reads only its share of a missed expert; at 3 bits its share of gate_up and all of
    down_proj, so more bytes than its share."""
    mp = plan_model("mixtral-8x7b", gpu_budget="12GiB", experts_bits=bits, attn_bits=4)
    auto = project_decode(mp, Machine(pcie_gbps=25, ram_gbps=70, cores=8, hbm_gbps=500))["auto"]
    share_bytes = auto.cpu_experts_per_token * mp.plan.expert_bytes
    assert 0 < auto.cpu_experts_per_token < auto.misses_per_token
    if bits == 3:
        assert auto.cpu_bytes_per_token > share_bytes * 1.01
    else:
        assert auto.cpu_bytes_per_token == pytest.approx(share_bytes, rel=1e-9)


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--pcie-gbps", "-25", "pcie_gbps (--pcie-gbps) must be a positive number of GB/s, got -25.0"),
        ("--ram-gbps", "0", "ram_gbps (--ram-gbps) must be a positive number of GB/s, got 0.0"),
        ("--hbm-gbps", "nan", "hbm_gbps (--hbm-gbps) must be a positive number of GB/s"),
        ("--pcie-gbps", "inf", "pcie_gbps (--pcie-gbps) must be a positive number of GB/s"),
        ("--cores", "0", "cores (--cores) must be a whole number of at least 1, got 0"),
        ("--cores", "-4", "cores (--cores) must be a whole number of at least 1, got -4"),
        ("--cpu-gbps", "-1", "cpu_road_gbps (--cpu-gbps) must be a positive number of GB/s, got -1.0"),
    ],
)
def test_bad_machine_values_are_one_line_and_exit_2(capsys, flag, value, fragment):
    code, out = run_cli(["plan", "mixtral-8x7b", "--budget", "12GiB", flag, value], capsys)
    assert code == 2 and out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith("error: ") and fragment in out.err


def test_bad_values_raise_config_error_in_the_api():
    with pytest.raises(ConfigError, match="ram_gbps"):
        Machine(pcie_gbps=25, ram_gbps=-1, cores=8, hbm_gbps=500)
    with pytest.raises(ConfigError, match="cores"):
        machine(cores=2.5)


def test_without_flags_the_values_say_where_they_come_from(no_measurements, monkeypatch):
    monkeypatch.setattr(speed_mod, "_detected_hbm", lambda: None)  # as on a machine without a GPU
    m = machine()
    src = dict(m.sources)
    assert (m.pcie_gbps, m.ram_gbps, m.hbm_gbps) == (25.0, 60.0, 500.0)
    assert src["pcie_gbps"].startswith("default: ") and src["ram_gbps"].startswith("default: ")
    assert src["hbm_gbps"].startswith("default: ") and src["cores"] == "detected on this machine"
    from moe_llm.experts.cpu.kernel import default_threads

    assert m.cores == default_threads()
    monkeypatch.setattr(speed_mod, "_detected_hbm", lambda: (4800.0, "NVIDIA H200"))
    m = machine(pcie_gbps=12)
    assert m.hbm_gbps == 4800.0 and dict(m.sources)["hbm_gbps"] == "detected: NVIDIA H200 peak"
    assert dict(m.sources)["pcie_gbps"] == "given"


def test_measured_values_of_this_host_are_used_and_another_hosts_are_not(no_measurements):
    path = no_measurements / "machine.json"
    path.write_text(json.dumps({"host": platform.node(), "measured_at": "2026-12-01", "ram_gbps": 33.5}))
    m = machine()
    assert m.ram_gbps == 33.5 and dict(m.sources)["ram_gbps"] == "measured 2026-12-01"
    assert dict(m.sources)["pcie_gbps"].startswith("default: ")  # not measured there (no GPU)
    assert machine(ram_gbps=70).ram_gbps == 70
    path.write_text(json.dumps({"host": platform.node() + "-other", "ram_gbps": 33.5}))
    assert dict(machine().sources)["ram_gbps"].startswith("default: ")


def test_measure_keeps_this_machines_ram_bandwidth(no_measurements, monkeypatch, capsys):
    import os

    from moe_llm.experts.cpu.build import BuildSettings

    # keep the compiled CPU kernel where it already is (MOE_LLM_HOME moved for the machine file)
    monkeypatch.setenv("MOE_LLM_CACHE_DIR", str(BuildSettings.from_env({**os.environ, "MOE_LLM_HOME": ""}).cache_dir))
    code, out = run_cli(
        ["plan", "mixtral-8x7b", "--budget", "12GiB", "--experts-bits", "2", "--measure", "--json"], capsys
    )
    assert code == 0, out.err
    saved = json.loads((no_measurements / "machine.json").read_text())
    assert saved["host"] == platform.node() and saved["ram_gbps"] > 0
    m = json.loads(out.out)["decode_projection"]["machine"]
    assert m["ram_gbps"] == saved["ram_gbps"] and m["sources"]["ram_gbps"].startswith("measured ")
