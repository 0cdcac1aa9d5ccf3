"""`moe-llm plan NAME`: the known models' config.json ship with moe-llm, so a plan needs no
download; the shapes are the published ones (total parameters match the model cards); an
unknown name or a family the engine cannot size is one line; a budget that cannot fit names
the leaner settings or the budget that would, and both really fit."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from moe_llm.errors import BudgetError, ModelLoadError, UnsupportedModelError
from moe_llm.planning import known_model, known_models, plan_model

GIB = 2**30

# name -> (decoder layers, MoE layers, routed experts, top-k, hidden, expert intermediate, total params in billions)
PLANNABLE = {
    "mixtral-8x7b": (32, 32, 8, 2, 4096, 14336, 46.7),
    "mixtral-8x22b": (56, 56, 8, 2, 6144, 16384, 140.6),
    "qwen3-30b-a3b": (48, 48, 128, 8, 2048, 768, 30.5),
    "deepseek-v2-lite": (27, 26, 64, 6, 2048, 1408, 15.7),  # first_k_dense_replace 1
    "deepseek-v3": (61, 58, 256, 8, 7168, 2048, 671.1),  # first_k_dense_replace 3
}
# GPT-OSS: (decoder layers = MoE layers, routed experts, total params in billions); top-4, hidden and
# expert intermediate 2880, and each expert also holds its two biases
GPT_OSS = {"gpt-oss-20b": (24, 32, 20.9), "gpt-oss-120b": (36, 128, 116.8)}


def run_cli(argv, capsys):
    from moe_llm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code or 0, capsys.readouterr()


def error_line(err: str) -> str:
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


def test_every_shipped_config_is_named_and_sourced():
    names = {m.name for m in known_models()}
    assert names == set(PLANNABLE) | set(GPT_OSS)
    repos = {m.name: m.repo for m in known_models()}
    assert repos["mixtral-8x7b"] == "mistralai/Mixtral-8x7B-v0.1" and repos["deepseek-v3"] == "deepseek-ai/DeepSeek-V3"
    readme = (known_models()[0].path.parent / "README.md").read_text()
    for m in known_models():
        cfg = json.loads(m.path.read_text())
        assert "model_type" in cfg and "quantization_config" not in cfg and "auto_map" not in cfg
        assert f"https://huggingface.co/{m.repo}" in readme


@pytest.mark.parametrize("name", sorted(PLANNABLE))
def test_a_known_name_plans_with_the_published_shapes(name):
    layers, moe_layers, experts, top_k, hidden, inter, billions = PLANNABLE[name]
    mp = plan_model(name)  # bf16, no budget: every expert gets a slot
    assert (mp.num_layers, mp.moe_layers, mp.num_experts, mp.top_k) == (layers, moe_layers, experts, top_k)
    p = mp.plan
    assert p.expert_bytes == 3 * hidden * inter * 2 and p.host_bytes == moe_layers * experts * p.expert_bytes
    assert (p.trunk_bytes + p.host_bytes) / 2 / 1e9 == pytest.approx(billions, abs=0.1)
    assert mp.known_model == known_model(name).repo


@pytest.mark.parametrize(
    "alias,name",
    [
        ("Mixtral-8x7B-v0.1", "mixtral-8x7b"),
        ("mistralai/Mixtral-8x7B-v0.1", "mixtral-8x7b"),
        ("MIXTRAL_8X7B", "mixtral-8x7b"),
        ("Mixtral-8x22B-v0.1", "mixtral-8x22b"),
        ("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b"),
        ("qwen3-30b-a3b", "qwen3-30b-a3b"),
        ("openai/gpt-oss-20b", "gpt-oss-20b"),
        ("GPT-OSS-120B", "gpt-oss-120b"),
        ("deepseek-ai/DeepSeek-V2-Lite", "deepseek-v2-lite"),
        ("deepseek_v3", "deepseek-v3"),
    ],
)
def test_names_match_in_any_case_with_or_without_the_organisation(alias, name):
    assert known_model(alias).name == name


def test_no_alias_is_ambiguous():
    assert known_model("mixtral") is None and known_model("deepseek") is None and known_model("gpt-oss") is None


def test_a_directory_wins_over_a_known_name(tiny_mixtral, tmp_path, monkeypatch):
    d = tmp_path / "mixtral-8x7b"
    d.mkdir()
    shutil.copy(tiny_mixtral / "config.json", d / "config.json")
    monkeypatch.chdir(tmp_path)
    mp = plan_model("mixtral-8x7b")
    assert mp.known_model is None and mp.plan == plan_model(tiny_mixtral).plan


def test_mixtral_8x7b_by_name_on_12gib_json(capsys):
    code, out = run_cli(["plan", "mixtral-8x7b", "--gpu-budget", "12GiB", "--experts-bits", "2", "--json"], capsys)
    assert code == 0
    d = json.loads(out.out)
    p = d["plan"]
    assert d["known_model"] == "mistralai/Mixtral-8x7B-v0.1" and d["model_type"] == "mixtral"
    assert (d["moe_layers"], d["num_experts"], d["top_k"], p["total_experts"]) == (32, 8, 2, 256)
    assert p["device_bytes"] <= 12 * GIB and 100 < p["slots"] < 256
    # the KV for the default 4096-token context: the static one and the prefill's, handed over
    assert p["kv_bytes"] == 2 * (2 * 32 * 8 * 128 * 4096 * 2)
    code, table = run_cli(["plan", "Mixtral-8x7B-v0.1", "--gpu-budget", "12GiB", "--experts-bits", "2"], capsys)
    assert code == 0 and "mistralai/Mixtral-8x7B-v0.1" in table.out and "fits" in table.out
    assert f"{p['slots']} of 256 experts" in table.out


def test_deepseek_v3_by_name_on_a_budget_it_fits(capsys):
    args = ["plan", "deepseek-v3", "--gpu-budget", "24GiB", "--experts-bits", "2", "--attn-bits", "4",
            "--head-bits", "4", "--json"]  # fmt: skip
    code, out = run_cli(args, capsys)
    assert code == 0
    d = json.loads(out.out)
    assert (d["num_layers"], d["moe_layers"], d["num_experts"], d["top_k"]) == (61, 58, 256, 8)
    assert d["plan"]["device_bytes"] <= 24 * GIB and d["plan"]["slots"] >= 58 and d["head_bits"] == 4


def test_an_unknown_name_lists_the_known_ones(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["plan", "mixtral-9x9b", "--gpu-budget", "12GiB"], capsys)
    assert code == 2 and out.out == "" and out.err.count("\n") == 1
    assert "not found: mixtral-9x9b" in out.err and "not a known model name" in out.err
    for m in known_models():
        assert m.name in out.err
    with pytest.raises(ModelLoadError, match="known model name"):
        plan_model("no-such-model")


@pytest.mark.parametrize("name", sorted(GPT_OSS))
def test_gpt_oss_plans_with_its_expert_biases(name):
    layers, experts, billions = GPT_OSS[name]
    mp = plan_model(name)  # bf16, no budget
    assert (mp.num_layers, mp.moe_layers, mp.num_experts, mp.top_k) == (layers, layers, experts, 4)
    p = mp.plan
    assert p.expert_bytes == 3 * 2880 * 2880 * 2 + (2 * 2880 + 2880) * 2  # bf16 matrices, then the biases
    assert (p.trunk_bytes + p.host_bytes) / 2 / 1e9 == pytest.approx(billions, abs=0.1)


def test_a_family_the_engine_cannot_size_is_one_line(capsys, tmp_path):
    from moe_llm.tiny import tiny_config

    tiny_config("aria_text", 512).save_pretrained(tmp_path / "aria")  # transposed experts, no declared layout
    code, out = run_cli(["plan", str(tmp_path / "aria"), "--gpu-budget", "12GiB", "--experts-bits", "2"], capsys)
    assert code == 2 and out.out == "" and out.err.count("\n") == 1
    assert "aria_text: biased or transposed experts are not supported" in out.err
    with pytest.raises(UnsupportedModelError):
        plan_model(tmp_path / "aria")


def _flags(text: str) -> list[str]:
    return text.replace(",", "").split()


def test_a_budget_that_cannot_fit_names_leaner_settings_and_the_budget_that_fit(capsys):
    base = ["plan", "mixtral-8x22b", "--gpu-budget", "12GiB", "--experts-bits", "2"]
    code, out = run_cli(base, capsys)
    assert code == 2 and out.out == "" and out.err.count("\n") == 1
    line = out.err.strip()
    assert "GPU budget 12.0 GiB is too small" in line
    m = re.search(r"try (.+?) \((\d+) of 448 experts on the GPU\), or --gpu-budget (\d+)GiB$", line)
    assert m, line
    lean, slots, need = _flags(m.group(1)), int(m.group(2)), int(m.group(3))
    assert lean == ["--attn-bits", "4"]  # the least change that fits: 2-bit experts stay, attention goes 4-bit
    code, out = run_cli([*base, *lean, "--json"], capsys)
    p = json.loads(out.out)["plan"]
    assert code == 0 and p["slots"] == slots and p["device_bytes"] <= 12 * GIB
    code, out = run_cli(["plan", "mixtral-8x22b", "--gpu-budget", f"{need}GiB", "--experts-bits", "2"], capsys)
    assert code == 0  # the least budget at the current settings, rounded up to a whole GiB
    code, out = run_cli(["plan", "mixtral-8x22b", "--gpu-budget", f"{need - 1}GiB", "--experts-bits", "2"], capsys)
    assert code == 2 and "too small" in out.err


def test_16_bit_experts_are_told_the_bits_that_fit(capsys):
    code, out = run_cli(["plan", "mixtral-8x7b", "--gpu-budget", "12GiB"], capsys)
    assert code == 2 and out.err.count("\n") == 1
    assert "; try --experts-bits 4 (" in out.err and "or --gpu-budget" in out.err


def test_when_no_leaner_setting_fits_both_budgets_are_named():
    """DeepSeek-V3's 16-bit trunk alone is over 30 GiB: nothing fits 8 GiB, so the hint names the
    budget at the current settings and the one with every lean setting, and both fit."""
    with pytest.raises(BudgetError) as exc:
        plan_model("deepseek-v3", gpu_budget="8GiB", experts_bits=2)
    msg = str(exc.value)
    m = re.search(r"; try --gpu-budget (\d+)GiB, or --gpu-budget (\d+)GiB with (.+)$", msg)
    assert m, msg
    now, lean_budget, lean = int(m.group(1)), int(m.group(2)), _flags(m.group(3))
    assert lean == ["--attn-bits", "4", "--head-bits", "4", "--context", "1024"]
    assert lean_budget < now
    assert plan_model("deepseek-v3", gpu_budget=f"{now}GiB", experts_bits=2).plan.slots >= 1
    leanest = plan_model(
        "deepseek-v3", gpu_budget=f"{lean_budget}GiB", experts_bits=2, attn_bits=4, head_bits=4, max_context=1024
    )
    assert leanest.plan.device_bytes <= lean_budget * GIB
    with pytest.raises(BudgetError):
        plan_model("deepseek-v3", gpu_budget=f"{now - 1}GiB", experts_bits=2)


def test_host_ram_that_cannot_hold_the_experts_names_the_bits_that_fit(capsys):
    code, out = run_cli(["plan", "mixtral-8x7b", "--experts-bits", "4", "--ram", "16GiB"], capsys)
    assert code == 2 and out.err.count("\n") == 1
    m = re.search(
        r"host RAM 16.0 GiB cannot hold .*; try --experts-bits (\d) \(.+\), or --ram (\d+)GiB$", out.err.strip()
    )
    assert m, out.err
    bits, ram = m.group(1), int(m.group(2))
    assert bits == "2"  # 3-bit experts need ~17 GiB
    assert run_cli(["plan", "mixtral-8x7b", "--experts-bits", bits, "--ram", "16GiB"], capsys)[0] == 0
    assert run_cli(["plan", "mixtral-8x7b", "--experts-bits", "4", "--ram", f"{ram}GiB"], capsys)[0] == 0


def test_the_hint_keeps_only_the_changes_that_are_needed(tiny_mixtral):
    """A budget that a 2048-token KV fits at the current bits gets just --context 2048, although
    the ladder lowered the bits first."""

    def least(**kw):  # compact experts: the fixed terms and one slot
        p = plan_model(tiny_mixtral, experts_bits=4, **kw).plan
        return p.trunk_bytes + p.kv_bytes + p.workspace_bytes + p.expert_bytes

    budget = least(max_context=2048)
    assert budget < least()
    with pytest.raises(BudgetError, match=r"; try --context 2048 \(1 of 16 experts on the GPU\), or --gpu-budget"):
        plan_model(tiny_mixtral, experts_bits=4, gpu_budget=budget)
    assert plan_model(tiny_mixtral, experts_bits=4, gpu_budget=budget, max_context=2048).plan.slots == 1
