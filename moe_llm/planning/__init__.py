"""Planning: what goes where and what to expect, from config.json and the meta model alone.

One module for everything decided before a weight is read, in three parts (import from
``moe_llm.planning``; the parts are not a public surface of their own):

- `slots`: the budget arithmetic: trunk + KV + workspace + the global slot pool
  (`plan_slots`), and `planned_context`, the one definition of the context length the
  KV cache is planned and allocated for, and prompts plus new tokens are held to;
- `sizes`: a model's sizes from config.json and its meta skeleton: the plan that
  `moe-llm plan` prints (`plan_model`, also for the known models shipped with moe-llm) and
  that `moe_llm.load` allocates (`plan_load`), so a budget that cannot fit fails before
  any expert is read;
- `speed`: the decode speed to expect on a machine (PCIe, RAM bandwidth, cores, HBM) for
  each `cpu_experts` road, through the CPU road's cost model in `experts.roads`.
"""

from __future__ import annotations

from .sizes import (
    KnownModel,
    LoadPlan,
    ModelPlan,
    known_model,
    known_models,
    model_kv_bytes,
    plan_for,
    plan_load,
    plan_model,
    trunk_bytes,
)
from .slots import (
    Plan,
    check_cache_per_layer,
    kv_cache_bytes,
    kv_plan_bytes,
    plan_slots,
    planned_context,
    workspace_bytes,
)
from .speed import Machine, RoadProjection, machine, measure_machine, project_decode

__all__ = [
    "KnownModel",
    "LoadPlan",
    "Machine",
    "ModelPlan",
    "Plan",
    "RoadProjection",
    "check_cache_per_layer",
    "known_model",
    "known_models",
    "kv_cache_bytes",
    "kv_plan_bytes",
    "machine",
    "measure_machine",
    "model_kv_bytes",
    "plan_for",
    "plan_load",
    "plan_model",
    "plan_slots",
    "planned_context",
    "project_decode",
    "trunk_bytes",
    "workspace_bytes",
]
