"""Budget planner: how many expert slots per MoE layer fit a device memory budget.

The budget covers everything the engine allocates on the device: the trunk
(attention, norms, embeddings, LM head), the KV cache for the planned context,
activations and kernel workspace, and then the expert slot pool.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import format_size
from .errors import BudgetError, ConfigError


@dataclass(frozen=True)
class Plan:
    budget_bytes: int | None
    trunk_bytes: int
    kv_bytes: int
    workspace_bytes: int
    expert_bytes: int
    moe_layers: int
    num_experts: int
    slots_per_layer: int
    host_bytes: int

    @property
    def slot_pool_bytes(self) -> int:
        return self.slots_per_layer * self.moe_layers * self.expert_bytes

    @property
    def device_bytes(self) -> int:
        return self.trunk_bytes + self.kv_bytes + self.workspace_bytes + self.slot_pool_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["slot_pool_bytes"] = self.slot_pool_bytes
        d["device_bytes"] = self.device_bytes
        return d


def planned_context(max_context: int | None, model_max: int | None) -> int:
    """The context the KV cache is planned (and, for graph decode, allocated) for."""
    return min(max_context or 4096, model_max or 4096)


def kv_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, context: int, dtype_bytes: int) -> int:
    return 2 * num_layers * kv_heads * head_dim * context * dtype_bytes


def workspace_bytes(hidden: int, intermediate: int, vocab: int, context: int, dtype_bytes: int) -> int:
    """Activations of a prefill chunk plus logits and dequantization scratch, with headroom."""
    chunk = min(context, 4096)
    act = chunk * (4 * hidden + 2 * intermediate) * dtype_bytes
    dequant = 3 * hidden * intermediate * dtype_bytes  # one expert dequantized for prefill GEMMs
    logits = vocab * 4 * 2
    return int(1.25 * (act + dequant + logits)) + (64 << 20)


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
) -> Plan:
    host = moe_layers * num_experts * expert_bytes
    common = dict(
        budget_bytes=budget, trunk_bytes=trunk_bytes, kv_bytes=kv_bytes, workspace_bytes=workspace,
        expert_bytes=expert_bytes, moe_layers=moe_layers, num_experts=num_experts, host_bytes=host,
    )  # fmt: skip
    if cache_per_layer is not None:
        check_cache_per_layer(cache_per_layer, num_experts)
        return Plan(slots_per_layer=cache_per_layer, **common)
    if budget is None:
        return Plan(slots_per_layer=num_experts, **common)
    left = budget - trunk_bytes - kv_bytes - workspace
    per_slot_row = moe_layers * expert_bytes
    slots = left // per_slot_row if left > 0 else 0
    if slots < 1:
        need = trunk_bytes + kv_bytes + workspace + per_slot_row
        raise BudgetError(
            f"GPU budget {format_size(budget)} is too small: trunk {format_size(trunk_bytes)} + KV "
            f"{format_size(kv_bytes)} + workspace {format_size(workspace)} + one expert slot per layer "
            f"{format_size(per_slot_row)} needs {format_size(need)}"
        )
    return Plan(slots_per_layer=int(min(slots, num_experts)), **common)
