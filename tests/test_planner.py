"""The budget planner sizes ONE global pool of expert slots: whatever the budget leaves after
trunk, KV and workspace, in whole experts, capped at every expert, refused below a per-layer
floor; `head_bits=4` shrinks the trunk that `moe-llm plan` reports."""

from __future__ import annotations

import json

import pytest

from moe_llm.errors import BudgetError, ConfigError
from moe_llm.planning import Plan, plan_model, plan_slots, planned_context, workspace_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

MIB = 2**20
SIZES = dict(trunk_bytes=300 * MIB, kv_bytes=50 * MIB, workspace=150 * MIB, expert_bytes=10 * MIB)
FIXED = 500 * MIB


def plan(budget=None, cache_per_layer=None, layers=8, experts=8, **kw) -> Plan:
    return plan_slots(
        budget=budget, cache_per_layer=cache_per_layer, moe_layers=layers, num_experts=experts, **SIZES, **kw
    )


def test_a_budget_buys_every_whole_expert_it_has_room_for_not_a_multiple_of_the_layers():
    p = plan(FIXED + 37 * 10 * MIB + 9 * MIB)
    assert p.slots == 37  # 8 layers x 8 experts: 37 is no per-layer count
    assert p.slot_pool_bytes == 37 * 10 * MIB
    assert p.device_bytes == FIXED + 370 * MIB <= p.budget_bytes
    assert p.expected_hit_rate == 37 / 64
    assert p.host_bytes == 64 * 10 * MIB and p.total_experts == 64 and p.floor == 1


def test_slots_are_capped_at_every_expert():
    p = plan(FIXED + 1000 * 10 * MIB)
    assert p.slots == 64 and p.expected_hit_rate == 1.0


def test_no_budget_gives_every_expert_a_slot_and_a_per_layer_count_multiplies_by_the_layers():
    assert plan().slots == 64
    p = plan(cache_per_layer=3)
    assert p.slots == 24 and p.expected_hit_rate == 24 / 64


@pytest.mark.parametrize("k", [0, 9])
def test_a_per_layer_count_outside_one_to_num_experts_is_refused(k):
    with pytest.raises(ConfigError, match=rf"^cache_per_layer must be between 1 and num_experts \(8\), got {k}$"):
        plan(cache_per_layer=k)


def test_the_floor_is_the_least_a_budget_must_buy():
    assert plan(FIXED + 8 * 10 * MIB).slots == 8  # one slot per layer: just enough
    with pytest.raises(BudgetError) as exc:
        plan(FIXED + 8 * 10 * MIB - 1)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("GPU budget ") and "is too small" in msg
    assert "8 expert slots (1 per MoE layer x 8) of 10.0 MiB needs 580.0 MiB" in msg
    assert plan(FIXED + 16 * 10 * MIB, floor=2).slots == 16
    with pytest.raises(BudgetError, match=r"16 expert slots \(2 per MoE layer x 8\)"):
        plan(FIXED + 16 * 10 * MIB - 1, floor=2)
    with pytest.raises(BudgetError, match="is too small"):
        plan(FIXED - 1)  # not even the fixed costs fit


def test_experts_read_in_place_run_below_the_floor_down_to_one_slot():
    """Compact experts (decode reads a miss where it lies): a pool below one slot per layer runs
    with the floor lowered to what it allows; only a budget without room for one slot fails."""
    p = plan(FIXED + 3 * 10 * MIB, in_place=True)
    assert p.slots == 3 and p.floor == 0 and p.device_bytes == FIXED + 30 * MIB
    assert plan(FIXED + 10 * 10 * MIB, in_place=True).floor == 1  # one per layer fits again
    assert plan(FIXED + 20 * 10 * MIB, floor=2, in_place=True).floor == 2
    assert plan(FIXED + 12 * 10 * MIB, floor=2, in_place=True).floor == 1  # lowered to what the pool allows
    assert plan(FIXED + 10 * MIB, in_place=True).slots == 1
    with pytest.raises(BudgetError) as exc:
        plan(FIXED + 10 * MIB - 1, in_place=True)
    assert "+ one expert slot of 10.0 MiB needs 510.0 MiB" in str(exc.value)


def test_a_floor_must_fit_the_layer_and_a_fixed_count():
    with pytest.raises(ConfigError, match="floor must be between 1 and num_experts"):
        plan(floor=0)
    with pytest.raises(ConfigError, match="floor must be between 1 and num_experts"):
        plan(floor=9)
    with pytest.raises(ConfigError, match="cache_per_layer 1 is below the per-layer slot floor 2"):
        plan(cache_per_layer=1, floor=2)


def test_plan_to_dict_carries_the_global_numbers():
    d = plan(FIXED + 20 * 10 * MIB).to_dict()
    assert d["slots"] == 20 and d["floor"] == 1 and d["total_experts"] == 64
    assert d["slot_pool_bytes"] == 200 * MIB and d["expected_hit_rate"] == 20 / 64
    assert "slots_per_layer" not in d


@pytest.mark.parametrize(
    "max_context,model_max,context", [(None, None, 4096), (1024, 131072, 1024), (8192, 4096, 4096), (None, 2048, 2048)]
)
def test_the_kv_is_planned_for_max_context_when_given(max_context, model_max, context):
    assert planned_context(max_context, model_max) == context


def test_the_workspace_holds_one_dequantized_gate_up_and_the_prefill_activations():
    h, i, v = 4096, 14336, 32000
    ws = workspace_bytes(h, i, v, 1024, 2)
    act = 1024 * (4 * h + 2 * i) * 2
    assert ws == int(1.25 * act) + 2 * i * h * 2 + v * 8 + 64 * MIB
    assert ws < 3 * h * i * 2 + int(1.25 * act)  # the old plan reserved a whole expert, with headroom on top
    small = workspace_bytes(64, 128, 512, 4096, 4)
    assert small == int(1.25 * 4096 * (4 * 64 + 2 * 128) * 4) + 2 * 64 * 128 * 4 + 512 * 8 + 64 * MIB


def test_head_bits_shrink_the_planned_trunk_by_the_head(tiny_mixtral):
    base = plan_model(tiny_mixtral, dtype="float32")
    quant = plan_model(tiny_mixtral, dtype="float32", head_bits=4)
    # the tiny head [vocab 512, hidden 64] at 4-bit, group 64: codes, 8-bit scale and zero, fp32 meta per 128 groups
    head_compact = 512 * 32 + 2 * 512 + (512 // 128) * 4 * 4
    assert base.plan.trunk_bytes - quant.plan.trunk_bytes == 512 * 64 * 4 - head_compact
    assert (base.head_bits, quant.head_bits) == (None, 4)


def test_plan_json_reports_head_bits_and_the_smaller_trunk(tiny_mixtral, capsys):
    from moe_llm.cli import main

    def run(*extra):
        with pytest.raises(SystemExit) as exc:
            main(["plan", str(tiny_mixtral), "--dtype", "float32", "--json", *extra])
        assert (exc.value.code or 0) == 0
        return json.loads(capsys.readouterr().out)

    base, quant = run(), run("--head-bits", "4")
    assert quant["head_bits"] == 4 and base["head_bits"] is None
    assert quant["plan"]["trunk_bytes"] < base["plan"]["trunk_bytes"]
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(tiny_mixtral), "--head-bits", "2"])
    assert exc.value.code == 2
    assert "--head-bits must be one of 4 or none" in capsys.readouterr().err


def test_a_tied_head_is_planned_at_16_bit(tmp_path):
    from moe_llm.tiny import tiny_config

    cfg = tiny_config("mixtral", 512)
    cfg.tie_word_embeddings = True
    cfg.save_pretrained(tmp_path)
    base, quant = plan_model(tmp_path, dtype="float32"), plan_model(tmp_path, dtype="float32", head_bits=4)
    assert quant.plan.trunk_bytes == base.plan.trunk_bytes and quant.head_bits is None
