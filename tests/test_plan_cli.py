"""`moe-llm plan`: sizes from config.json alone agree with what the loader allocates, the
expected bytes per token follow (1 - S/(L*E)) x top_k x expert bytes x L for S global slots,
and a model that cannot fit is refused with one line."""

from __future__ import annotations

import json
import shutil

import pytest

import moe_llm
from moe_llm.errors import BudgetError
from moe_llm.planning import plan_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixtral_8x7b(tmp_path_factory):
    """A directory holding only Mixtral-8x7B's config.json: planning reads no weights."""
    from transformers import MixtralConfig

    d = tmp_path_factory.mktemp("m8x7b")
    MixtralConfig().save_pretrained(d)  # 32 layers, 8 experts, hidden 4096, intermediate 14336
    return d


def run_cli(argv, capsys):
    from moe_llm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code or 0, capsys.readouterr()


@pytest.mark.parametrize("kwargs,slots", [({}, 16), ({"gpu_budget": 7}, 7), ({"cache_per_layer": 3}, 6)])
def test_plan_equals_the_loaders_allocation(tiny_mixtral, kwargs, slots):
    if "gpu_budget" in kwargs:  # a budget with room for 7.5 experts of the global pool
        p = plan_model(tiny_mixtral, dtype="float32").plan
        kwargs = {
            "gpu_budget": p.trunk_bytes + p.kv_bytes + p.workspace_bytes + 7 * p.expert_bytes + p.expert_bytes // 2
        }
    engine = moe_llm.load(tiny_mixtral, dtype="float32", **kwargs)
    planned = plan_model(tiny_mixtral, dtype="float32", **kwargs)
    assert planned.plan == engine.plan
    assert planned.plan.trunk_bytes == engine.plan.trunk_bytes > 0
    assert engine.plan.slots == planned.plan.slots == slots  # 2 MoE layers x 8 experts


def test_plan_needs_only_the_config(tiny_mixtral, tmp_path):
    only = tmp_path / "cfg"
    only.mkdir()
    shutil.copy(tiny_mixtral / "config.json", only / "config.json")
    assert plan_model(only, experts_bits=2).plan == plan_model(tiny_mixtral, experts_bits=2).plan


def test_mixtral_8x7b_on_12gib(mixtral_8x7b, capsys):
    code, out = run_cli(
        ["plan", str(mixtral_8x7b), "--gpu-budget", "12GiB", "--experts-bits", "2", "--attn-bits", "4",
         "--ram", "64GiB", "--json"], capsys,
    )  # fmt: skip
    assert code == 0
    d = json.loads(out.out)
    p = d["plan"]
    assert p["device_bytes"] <= 12 * 2**30 and p["moe_layers"] == 32 and p["num_experts"] == 8
    assert 32 <= p["slots"] < 256 and p["floor"] == 1 and p["total_experts"] == 256
    assert p["expert_bytes"] == pytest.approx(3 * 4096 * 14336 * 2.54 / 8, rel=0.01)
    assert p["host_bytes"] == 32 * 8 * p["expert_bytes"]
    assert p["slot_pool_bytes"] == p["slots"] * p["expert_bytes"]
    fixed = p["trunk_bytes"] + p["kv_bytes"] + p["workspace_bytes"]
    assert p["slots"] == (12 * 2**30 - fixed) // p["expert_bytes"]  # every whole expert the budget has room for
    s = p["slots"]
    assert d["expected_hit_rate"] == p["expected_hit_rate"] == s / 256
    assert d["bytes_per_token"] == pytest.approx((1 - s / 256) * 2 * p["expert_bytes"] * 32)
    code, out = run_cli(["plan", str(mixtral_8x7b), "--gpu-budget", "12GiB", "--experts-bits", "2"], capsys)
    assert code == 0
    for words in ("trunk", "KV cache", "expert slots", "of 256 experts", "pinned experts", "bytes per token", "fits"):
        assert words in out.out


def test_mixtral_8x7b_on_12gib_holds_200_experts_at_1024_context(mixtral_8x7b, capsys):
    """Issue 11: with a 1024-token KV (llama.cpp's comparison setting), 2-bit experts, 4-bit
    attention and a 4-bit LM head, 12 GiB hold at least 200 of the 256 experts."""
    args = ["plan", str(mixtral_8x7b), "--gpu-budget", "12GiB", "--experts-bits", "2", "--attn-bits", "4",
            "--context", "1024", "--json"]  # fmt: skip
    code, out = run_cli([*args, "--head-bits", "4"], capsys)
    assert code == 0
    d = json.loads(out.out)
    p = d["plan"]
    assert p["slots"] >= 200 and p["device_bytes"] <= 12 * 2**30
    # the static KV sized to --context, and the prefill's dynamic KV handed to it when decode starts
    assert p["kv_bytes"] == 2 * (2 * 32 * 8 * 128 * 1024 * 2) and d["context"] == 1024
    assert p["workspace_bytes"] < 420 * 2**20  # one gate_up [2I, H] in bf16 and the activations
    assert p["trunk_bytes"] < 1.2 * 2**30 and d["head_bits"] == 4
    code, out = run_cli(args, capsys)
    q = json.loads(out.out)["plan"]
    head_bf16 = 32000 * 4096 * 2
    assert q["trunk_bytes"] - p["trunk_bytes"] == pytest.approx(head_bf16 * (1 - 4.27 / 16), rel=0.01)
    assert 3 <= p["slots"] - q["slots"] <= 4  # --head-bits 4 buys about 3 expert slots


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--gpu-budget", "1GiB", "--experts-bits", "2"], "GPU budget 1.0 GiB is too small"),
        (["--gpu-budget", "1.5GiB", "--experts-bits", "2", "--attn-bits", "4"], "+ one expert slot of"),
        (["--gpu-budget", "12GiB"], "32 expert slots (1 per MoE layer x 32)"),  # 16-bit experts keep the floor
        (["--gpu-budget", "24GiB", "--experts-bits", "4", "--ram", "16GiB"], "host RAM 16.0 GiB cannot hold"),
        (["--cache-per-layer", "9"], r"between 1 and num_experts (8)"),
    ],
)
def test_refuses_clearly_when_it_cannot_fit(mixtral_8x7b, capsys, args, fragment):
    code, out = run_cli(["plan", str(mixtral_8x7b), *args], capsys)
    assert code == 2 and out.out == ""
    assert out.err.count("\n") == 1 and fragment in out.err


def test_a_budget_is_validated_on_cpu_too(tiny_mixtral):
    with pytest.raises(BudgetError, match="too small"):
        moe_llm.load(tiny_mixtral, device="cpu", gpu_budget="8MiB")


def test_a_hint_names_a_budget_once(mixtral_8x7b, capsys):
    """Where the leanest settings need the same whole-GiB budget as the current ones, the hint
    names that budget alone, not twice."""
    args = ["plan", str(mixtral_8x7b), "--gpu-budget", "1GiB", "--experts-bits", "2", "--attn-bits", "4",
            "--head-bits", "4", "--context", "1152"]  # fmt: skip
    code, out = run_cli(args, capsys)
    assert code == 2 and out.err.count("\n") == 1
    assert out.err.rstrip().endswith("; try --gpu-budget 2GiB"), out.err
    assert run_cli([*args[:3], "2GiB", *args[4:]], capsys)[0] == 0  # and it fits
