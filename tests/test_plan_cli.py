"""`moe-llm plan`: sizes from config.json alone agree with what the loader allocates, the
expected bytes per token follow (1 - K/E) x top_k x expert bytes x MoE layers, and a model
that cannot fit is refused with one line."""

from __future__ import annotations

import json
import shutil

import pytest

import moe_llm
from moe_llm.errors import BudgetError
from moe_llm.sizing import plan_model

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


@pytest.mark.parametrize("kwargs", [{}, {"gpu_budget": 3}, {"cache_per_layer": 3}])
def test_plan_equals_the_loaders_allocation(tiny_mixtral, kwargs):
    if "gpu_budget" in kwargs:  # a budget with room for exactly 3 slot rows
        p = plan_model(tiny_mixtral, dtype="float32").plan
        row = p.moe_layers * p.expert_bytes
        kwargs = {"gpu_budget": p.trunk_bytes + p.kv_bytes + p.workspace_bytes + 3 * row + row // 2}
    engine = moe_llm.load(tiny_mixtral, dtype="float32", **kwargs)
    planned = plan_model(tiny_mixtral, dtype="float32", **kwargs)
    assert planned.plan == engine.plan
    assert planned.plan.trunk_bytes == engine.plan.trunk_bytes > 0
    if kwargs:
        assert engine.cache.slots_per_layer == planned.plan.slots_per_layer == 3


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
    assert 1 <= p["slots_per_layer"] < 8
    assert p["expert_bytes"] == pytest.approx(3 * 4096 * 14336 * 2.54 / 8, rel=0.01)
    assert p["host_bytes"] == 32 * 8 * p["expert_bytes"]
    k = p["slots_per_layer"]
    assert d["expected_hit_rate"] == k / 8
    assert d["bytes_per_token"] == pytest.approx((1 - k / 8) * 2 * p["expert_bytes"] * 32)
    code, out = run_cli(["plan", str(mixtral_8x7b), "--gpu-budget", "12GiB", "--experts-bits", "2"], capsys)
    assert code == 0
    for words in ("trunk", "KV cache", "expert slots", "pinned experts", "bytes per token", "fits"):
        assert words in out.out


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--gpu-budget", "2GiB", "--experts-bits", "2"], "GPU budget 2.0 GiB is too small"),
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
