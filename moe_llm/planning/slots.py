"""The budget arithmetic: how many expert slots of the one global pool fit a device memory budget.

The budget covers everything the engine allocates on the device: the trunk
(attention, norms, embeddings, LM head), the KV cache for the planned context
(`planned_context`: the one definition of how many positions the engine holds),
activations and kernel workspace, and then the expert slot pool. The pool is
global across MoE layers: any layer may hold any number of slots, but never
fewer than `floor`, so every byte left after the fixed costs holds an expert.

With compact (quantized) experts, whose decode reads a missed expert in place from host RAM
or computes it on the CPU, a budget whose pool holds fewer than `floor` slots per MoE layer
still runs, with the floor lowered to what the pool allows (0 below one slot per layer, the
`--cpu-moe` regime; a prompt recycles the few slots), and only a budget without room for one
slot is refused. 16-bit experts are copied into a slot for every use, so they keep the floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import format_size
from ..errors import BudgetError, ConfigError


@dataclass(frozen=True)
class Plan:
    budget_bytes: int | None
    trunk_bytes: int
    kv_bytes: int
    workspace_bytes: int
    expert_bytes: int
    moe_layers: int
    num_experts: int
    slots: int  # expert slots of the global pool, over all MoE layers
    host_bytes: int
    floor: int = 1  # slots every MoE layer keeps, whatever the policy evicts

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.num_experts

    @property
    def slot_pool_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def device_bytes(self) -> int:
        return self.trunk_bytes + self.kv_bytes + self.workspace_bytes + self.slot_pool_bytes

    @property
    def expected_hit_rate(self) -> float:
        """Hit rate under uniform routing: slots / (moe_layers * num_experts), however the
        slots are spread over layers. Random-init weights route near-uniformly, the worst
        case for a cache; trained routers are skewed and repeat across adjacent tokens."""
        return self.slots / self.total_experts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_experts"] = self.total_experts
        d["slot_pool_bytes"] = self.slot_pool_bytes
        d["device_bytes"] = self.device_bytes
        d["expected_hit_rate"] = self.expected_hit_rate
        return d


def planned_context(max_context: int | None, model_max: int | None) -> int:
    """The context length, in positions: what the KV cache is planned (and, for graph decode,
    allocated) for, and the most a prompt plus its new tokens may hold (`Engine.context_length`).
    `max_context` when given, else 4096, never past the model's own maximum."""
    return min(max_context or 4096, model_max or 4096)


def kv_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, context: int, dtype_bytes: int) -> int:
    return 2 * num_layers * kv_heads * head_dim * context * dtype_bytes


def kv_plan_bytes(kv: int, cuda_graphs: bool) -> int:
    """Device bytes of the KV cache for the planned context. Eager decode keeps one dynamic
    cache; graph decode also has its static one, and when decode starts both hold the prompt
    (the batcher prefills into a dynamic cache, then hands its KV to the static one)."""
    return 2 * kv if cuda_graphs else kv


def workspace_bytes(hidden: int, intermediate: int, vocab: int, chunk: int, dtype_bytes: int) -> int:
    """Device scratch beyond the trunk, KV and slots. It counts

    - activations of one prefill pass of `chunk` tokens (the engine's `prefill_chunk`, at
      most the context):
      4 hidden-sized and 2 intermediate-sized rows per token in the compute dtype, +25%;
    - the prefill dequant workspace of the experts runtime: one whole gate_up [2I, H] in
      the compute dtype (row chunks would save ~160 MiB on Mixtral but doubled the cold
      1024-token TTFT on the H200, so prefill dequantizes each matrix in one piece);
    - one token's logits (fp32, twice: the LM head's output and the sampler's copy);
    - 64 MiB for cuBLAS workspaces and allocator rounding.
    """
    act = chunk * (4 * hidden + 2 * intermediate) * dtype_bytes
    dequant = 2 * intermediate * hidden * dtype_bytes
    logits = vocab * 4 * 2
    return int(1.25 * act) + dequant + logits + (64 << 20)


def check_cache_per_layer(cache_per_layer: int | None, num_experts: int) -> None:
    """A fixed slot count must lie in [1, num_experts] (the lower bound is also checked by EngineConfig)."""
    if cache_per_layer is not None and not 1 <= cache_per_layer <= num_experts:
        raise ConfigError(f"cache_per_layer must be between 1 and num_experts ({num_experts}), got {cache_per_layer}")


def plan_slots(
    *,
    budget: int | None,
    cache_per_layer: int | None,
    trunk_bytes: int,
    kv_bytes: int,
    workspace: int,
    expert_bytes: int,
    moe_layers: int,
    num_experts: int,
    floor: int = 1,
    in_place: bool = False,
) -> Plan:
    """The global slot count: `cache_per_layer` K gives K * moe_layers slots; a budget gives
    what is left after trunk, KV and workspace, in whole experts, capped at every expert;
    neither gives every expert a slot. A budget below `floor` slots per MoE layer raises
    `BudgetError`, unless `in_place` (decode reads misses where they lie): then it lowers the
    plan's floor, and only a budget without room for one slot raises."""
    if not 1 <= floor <= num_experts:
        raise ConfigError(f"the per-layer slot floor must be between 1 and num_experts ({num_experts}), got {floor}")
    total = moe_layers * num_experts
    common = dict(
        budget_bytes=budget, trunk_bytes=trunk_bytes, kv_bytes=kv_bytes, workspace_bytes=workspace,
        expert_bytes=expert_bytes, moe_layers=moe_layers, num_experts=num_experts,
        host_bytes=total * expert_bytes, floor=floor,
    )  # fmt: skip
    if cache_per_layer is not None:
        check_cache_per_layer(cache_per_layer, num_experts)
        if cache_per_layer < floor:
            raise ConfigError(f"cache_per_layer {cache_per_layer} is below the per-layer slot floor {floor}")
        return Plan(slots=cache_per_layer * moe_layers, **common)
    if budget is None:
        return Plan(slots=total, **common)
    fixed = trunk_bytes + kv_bytes + workspace
    left = budget - fixed
    slots = left // expert_bytes if left > 0 else 0
    least = 1 if in_place else moe_layers * floor
    if slots < least:
        what = "one expert slot" if in_place else f"{least} expert slots ({floor} per MoE layer x {moe_layers})"
        raise BudgetError(
            f"GPU budget {format_size(budget)} is too small: trunk {format_size(trunk_bytes)} + KV "
            f"{format_size(kv_bytes)} + workspace {format_size(workspace)} + {what} of "
            f"{format_size(expert_bytes)} needs {format_size(fixed + least * expert_bytes)}"
        )
    common["floor"] = min(floor, slots // moe_layers)  # in place: a pool below the floor lowers it
    return Plan(slots=int(min(slots, total)), **common)
