"""What goes where, from config.json alone: the numbers behind `moe-llm plan`.

The trunk is built on the meta device (no memory, no weights read), so its bytes
at the chosen precision follow from parameter shapes, with dense projections
counted in the compact format (and the LM head too with ``head_bits``). Experts
are sized by `ExpertFormat`; the global slot count comes from the same
`plan_slots` the loader uses. Under uniform routing with S slots for the L * E
experts, a token's expert finds its slot with probability S / (L * E) however the
slots are spread over layers, so the expected bytes copied per token are
``(1 - S / (L * E)) * top_k * expert_bytes * L``. Random-init weights (synthetic
benchmarks) route near-uniformly, which is the worst case for the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import ConfigOnly
from .config import EngineConfig, format_size, parse_size
from .errors import BudgetError, ConfigError
from .experts.format import ExpertFormat
from .model import build_skeleton, head_spec, moe_info, read_config
from .planner import Plan
from .quant import QuantSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelPlan:
    model_type: str
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    dtype: str
    experts_bits: int | None
    attn_bits: int | None
    head_bits: int | None  # as planned: None also where a tied head stays 16-bit
    expert_bits_per_param: float
    plan: Plan
    ram_bytes: int | None

    @property
    def expected_hit_rate(self) -> float:
        """slots / (moe_layers * num_experts): uniform routing, the worst case."""
        return self.plan.expected_hit_rate

    @property
    def bytes_per_token(self) -> float:
        """Expected expert bytes copied to the device per decoded token (uniform routing)."""
        return (1 - self.expected_hit_rate) * self.top_k * self.plan.expert_bytes * self.moe_layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        d["expected_hit_rate"] = self.expected_hit_rate
        d["bytes_per_token"] = self.bytes_per_token
        return d


def _spec_bytes(spec: QuantSpec) -> int:
    total = 0
    for dtype, shape in spec.tensors("w").values():
        n = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            n *= s
        total += n
    return total


def trunk_bytes(model: nn.Module, dense: dict[str, QuantSpec]) -> int:
    """Device bytes of every non-expert tensor of a (meta) skeleton; `dense` ones compact."""
    skip = {f"{m}.weight" for m in dense}
    total = sum(_spec_bytes(s) for s in dense.values())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # tied weights counted once
        if ".mlp.experts." not in name and name not in skip:
            total += t.numel() * t.element_size()
    return total


def plan_model(model_dir: str | Path, ram: str | int | None = None, **options) -> ModelPlan:
    """Plan `model_dir` without loading weights. Options as in `moe_llm.load`; raises
    `BudgetError` when the model does not fit the GPU budget or `ram`."""
    from .loader import plan_for
    from .qformat import is_quantized_dir, read_manifest, resolve_stored_bits
    from .qformat.writer import dense_modules
    from .settings import resolve_engine_config

    cfg: EngineConfig = resolve_engine_config(options)
    src = ConfigOnly.open(model_dir)
    if is_quantized_dir(src.path):
        cfg = resolve_stored_bits(read_manifest(src.path), cfg, src.path.name)
    dtype = _DTYPES[cfg.dtype or "bfloat16"]  # planning is for the GPU: bf16 unless told otherwise
    hf_config = read_config(src)
    model = build_skeleton(hf_config, dtype)
    info = moe_info(model, hf_config)
    try:
        fmt = ExpertFormat.build(info.hidden, info.intermediate, cfg.experts_bits, dtype, cfg.group_size)
        dense = dense_modules(model, cfg.attn_bits) if cfg.attn_bits else {}
        head = head_spec(model, cfg.head_bits)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if head is not None:
        dense["lm_head"] = head
    plan = plan_for(model, hf_config, cfg, info, fmt, dtype, trunk_bytes=trunk_bytes(model, dense))
    ram_bytes = None
    if ram is not None:
        try:
            ram_bytes = parse_size(ram)
        except ValueError as exc:
            raise ConfigError(f"ram: {exc}") from None
        if plan.host_bytes > ram_bytes:
            raise BudgetError(
                f"host RAM {format_size(ram_bytes)} cannot hold the experts: {len(info.layers)} layers x "
                f"{info.num_experts} experts x {format_size(fmt.nbytes)} = {format_size(plan.host_bytes)}"
            )
    return ModelPlan(
        model_type=hf_config.model_type,
        num_layers=hf_config.num_hidden_layers,
        moe_layers=len(info.layers),
        num_experts=info.num_experts,
        top_k=info.top_k,
        dtype=str(dtype).removeprefix("torch."),
        experts_bits=cfg.experts_bits,
        attn_bits=cfg.attn_bits,
        head_bits=cfg.head_bits if head is not None else None,
        expert_bits_per_param=fmt.bits_per_param,
        plan=plan,
        ram_bytes=ram_bytes,
    )
