"""What goes where, from config.json alone: the numbers behind `moe-llm plan` and the
plan `moe_llm.load` allocates, made before it reads any weight (`plan_load`).

A model is a directory holding config.json, or a known model's name (`known_model`):
the config.json of each lives in ``moe_llm/data/known_configs/`` (see its README for
where every file comes from), so a new user can plan before downloading anything.

The trunk is built on the meta device (no memory, no weights read), so its bytes
at the chosen precision follow from parameter shapes, with dense projections
counted in the compact format (and the LM head too with ``head_bits``). Experts
are sized by `ExpertFormat`; the global slot count comes from the same
`plan_slots` the loader uses. Under uniform routing with S slots for the L * E
experts, a token's expert finds its slot with probability S / (L * E) however the
slots are spread over layers, so the expected bytes copied per token are
``(1 - S / (L * E)) * top_k * expert_bytes * L``. Random-init weights (synthetic
benchmarks) route near-uniformly, which is the worst case for the cache.

The loader plans the same way, from the meta skeleton it later fills: a budget that
cannot hold the trunk, the KV and one slot per MoE layer is refused before a single
expert (or a checksum) is read, with the leaner settings that would fit.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.arch import ArchMap
from ..checkpoint.model import MoeInfo, build_skeleton, head_spec, module_bytes, moe_info, read_config
from ..checkpoint.source import ConfigOnly
from ..config import EngineConfig, format_size, parse_size
from ..errors import BudgetError, ConfigError, ModelLoadError, UnsupportedModelError
from ..experts.format import ExpertFormat
from ..quant import QuantSpec
from .slots import Plan, kv_cache_bytes, kv_plan_bytes, plan_slots, planned_context, workspace_bytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

KNOWN_CONFIGS = Path(__file__).parents[1] / "data" / "known_configs"


@dataclass(frozen=True)
class KnownModel:
    """A model whose config.json ships with moe-llm: `name` is the file's stem, `repo` the
    Hugging Face repository the file was taken from (its ``_name_or_path``)."""

    name: str
    repo: str
    path: Path


def _key(name: str) -> str:
    """Case, separators and the organisation prefix do not matter: 'Mixtral-8x7B',
    'mistralai/mixtral_8x7b' and 'mixtral 8x7b' are one name."""
    return re.sub(r"[^a-z0-9.]", "", name.strip().rsplit("/", 1)[-1].lower())


def known_models() -> list[KnownModel]:
    out = []
    for f in sorted(KNOWN_CONFIGS.glob("*.json")):
        repo = json.loads(f.read_text()).get("_name_or_path") or f.stem
        out.append(KnownModel(f.stem, repo, f))
    return out


def known_model(name: str) -> KnownModel | None:
    """The known model `name` names: its file's stem or its repository, with or without the
    organisation ('mixtral-8x7b', 'Mixtral-8x7B-v0.1', 'mistralai/Mixtral-8x7B-v0.1'), any case."""
    key = _key(name)
    for m in known_models():
        if key in (_key(m.name), _key(m.repo)):
            return m
    return None


@contextlib.contextmanager
def _config_source(model: str | Path) -> Iterator[tuple[ConfigOnly, KnownModel | None]]:
    """A directory is read as it is; a name that is no path is looked up among the known
    models, whose config.json is read from a temporary directory (transformers reads
    directories). Anything else is one line naming the known models."""
    path = Path(model).expanduser()
    known = None if path.exists() else known_model(str(model))
    if known is None:
        if not path.exists():
            names = ", ".join(m.name for m in known_models())
            raise ModelLoadError(f"model directory not found: {model}, and not a known model name ({names})")
        yield ConfigOnly.open(path), None
        return
    with tempfile.TemporaryDirectory(prefix="moe-llm-plan-") as tmp:
        shutil.copyfile(known.path, Path(tmp) / "config.json")
        yield ConfigOnly.open(tmp), known


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
    token_trunk_bytes: int  # trunk bytes a decoded token reads: all of it but the input embedding's other rows
    ram_bytes: int | None
    context: int = 4096  # positions the KV is planned for (`planned_context`)
    known_model: str | None = None  # the Hugging Face repository, when planned from a shipped config.json

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


def model_kv_bytes(hf_config, arch: ArchMap, context: int, dtype_bytes: int) -> int:
    """The KV cache of `context` tokens as transformers' attention of this family caches it.
    Multi-head attention keeps K and V of kv_heads x head_dim; MLA (DeepSeek-V2/V3,
    ``kv_layout="latent"``) keeps the compressed latent, kv_lora_rank + qk_rope_head_dim
    per token and layer, whatever the number of heads."""
    layers = hf_config.num_hidden_layers
    if arch.kv_layout == "latent":
        width = hf_config.kv_lora_rank + hf_config.qk_rope_head_dim
        return layers * width * context * dtype_bytes
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return kv_cache_bytes(layers, kv_heads, head_dim, context, dtype_bytes)


def trunk_bytes(model: nn.Module, dense: dict[str, QuantSpec], arch: ArchMap) -> int:
    """Device bytes of every non-expert tensor of a (meta) skeleton; `dense` ones compact."""
    skip = {f"{m}.weight" for m in dense}
    total = sum(_spec_bytes(s) for s in dense.values())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # tied weights counted once
        if not arch.is_expert_param(name) and name not in skip:
            total += t.numel() * t.element_size()
    return total


def plan_for(
    model, hf_config, cfg, info, fmt: ExpertFormat, dtype: torch.dtype, trunk_bytes: int | None = None
) -> Plan:
    """The budget plan (`plan_slots`) at `cfg`'s context: for the trunk as `model` holds it
    (on its device), or of `trunk_bytes` (a meta skeleton's, counted by `trunk_bytes`)."""
    context = planned_context(cfg.max_context, getattr(hf_config, "max_position_embeddings", None))
    dsize = torch.empty((), dtype=dtype).element_size()
    return plan_slots(
        budget=cfg.gpu_budget,
        cache_per_layer=cfg.cache_per_layer,
        trunk_bytes=module_bytes(model) if trunk_bytes is None else trunk_bytes,
        kv_bytes=kv_plan_bytes(model_kv_bytes(hf_config, info.arch, context, dsize), cfg.cuda_graphs),
        workspace=workspace_bytes(
            info.hidden, info.intermediate, hf_config.vocab_size, min(context, cfg.prefill_chunk), dsize
        ),
        expert_bytes=fmt.nbytes,
        moe_layers=len(info.layers),
        num_experts=info.num_experts,
        in_place=fmt.specs is not None,  # compact experts: decode reads a miss where it lies (or recycles slots)
    )


class _Sizer:
    """One meta skeleton, planned at any bits, context and budget (the suggestions re-plan it)."""

    def __init__(self, model: nn.Module, hf_config, info, dtype: torch.dtype):
        self.model, self.hf_config, self.info, self.dtype = model, hf_config, info, dtype
        self._dense: dict[int, dict[str, QuantSpec]] = {}

    def plan(self, cfg: EngineConfig) -> tuple[ExpertFormat, Plan, QuantSpec | None]:
        from ..checkpoint.qformat.writer import dense_modules

        try:
            fmt = ExpertFormat.build(self.info.hidden, self.info.intermediate, cfg.experts_bits, self.dtype,
                                     cfg.group_size, self.info.arch.layout)  # fmt: skip
            dense = {}
            if cfg.attn_bits:
                if cfg.attn_bits not in self._dense:
                    self._dense[cfg.attn_bits] = dense_modules(self.model, cfg.attn_bits, self.info.arch)
                dense = dict(self._dense[cfg.attn_bits])
            head = head_spec(self.model, cfg.head_bits)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if head is not None:
            dense["lm_head"] = head
        trunk = trunk_bytes(self.model, dense, self.info.arch)
        return fmt, plan_for(self.model, self.hf_config, cfg, self.info, fmt, self.dtype, trunk_bytes=trunk), head

    def token_trunk_bytes(self, trunk: int) -> int:
        """Of `trunk` bytes, those a decoded token reads: an input embedding the LM head does
        not share is one row a token (the rest of the table stays in memory, unread)."""
        emb = self.model.get_input_embeddings()
        head = getattr(self.model, "lm_head", None)
        w = getattr(emb, "weight", None)
        if w is None or getattr(self.hf_config, "tie_word_embeddings", False) or getattr(head, "weight", None) is w:
            return trunk
        return trunk - (w.shape[0] - 1) * w[0].numel() * w.element_size()

    def fits(self, cfg: EngineConfig) -> Plan | None:
        try:
            return self.plan(cfg)[1]
        except (BudgetError, ConfigError):
            return None

    def least_budget(self, cfg: EngineConfig) -> int:
        """The smallest budget `cfg` fits: the fixed terms plus one expert slot for compact
        experts (`plan_slots`' in_place), else `floor` slots per MoE layer."""
        fmt, p, _ = self.plan(cfg.model_copy(update={"gpu_budget": None, "cache_per_layer": None}))
        slots = 1 if fmt.specs is not None else p.floor * p.moe_layers
        return p.trunk_bytes + p.kv_bytes + p.workspace_bytes + slots * p.expert_bytes

    def leaner(self, cfg: EngineConfig, quantized: bool) -> Iterator[dict[str, Any]]:
        """Ever leaner settings, one step at a time, each as every change so far: fewer expert
        bits (4, 3, 2), 4-bit attention, a 4-bit head, a shorter context (2048, 1024). A
        quantized directory keeps its stored expert and attention bits."""
        update: dict[str, Any] = {}
        if not quantized:
            for bits in (4, 3, 2):
                if cfg.experts_bits is None or bits < cfg.experts_bits:
                    yield {**update, "experts_bits": bits}
                    update["experts_bits"] = bits
            if cfg.attn_bits is None:
                update["attn_bits"] = 4
                yield dict(update)
        if cfg.head_bits is None and head_spec(self.model, 4) is not None:
            update["head_bits"] = 4
            yield dict(update)
        context = planned_context(cfg.max_context, getattr(self.hf_config, "max_position_embeddings", None))
        for tokens in (2048, 1024):
            if tokens < context:
                update["max_context"] = tokens
                yield dict(update)

    def gpu_hint(self, cfg: EngineConfig, quantized: bool) -> str:
        """What would fit the budget: the first leaner settings that do, less every change
        they fit without, and the least budget that holds the current settings (or, when no
        leaner settings fit, also the least budget that holds the leanest)."""
        need = f"--gpu-budget {_round_up(self.least_budget(cfg))}"
        leanest = None
        for update in self.leaner(cfg, quantized):
            leanest = update
            if self.fits(cfg.model_copy(update=update)) is None:
                continue
            for field in list(update):  # undo the changes it does not need, or some of them, costliest first
                milder = [{k: v for k, v in update.items() if k != field}]
                steps = {"experts_bits": (4, 3), "max_context": (2048,)}.get(field, ())
                milder += [{**update, field: v} for v in steps if v > update[field]]
                for fewer in milder:
                    if fewer and self.fits(cfg.model_copy(update=fewer)) is not None:
                        update = fewer
                        break
            p = self.fits(cfg.model_copy(update=update))
            return f"try {_flags(update)} ({p.slots} of {p.total_experts} experts on the GPU), or {need}"
        if leanest is None:
            return f"try {need}"
        least = _round_up(self.least_budget(cfg.model_copy(update=leanest)))
        if f"--gpu-budget {least}" == need:  # the leanest settings need no less, once rounded
            return f"try {need}"
        return f"try {need}, or --gpu-budget {least} with {_flags(leanest)}"


_FLAGS = {"experts_bits": "--experts-bits", "attn_bits": "--attn-bits", "head_bits": "--head-bits",
          "max_context": "--context"}  # fmt: skip


def _flags(update: dict[str, Any]) -> str:
    return " ".join(f"{_FLAGS[k]} {v}" for k, v in update.items())


def _round_up(nbytes: int) -> str:
    """A budget flag that holds `nbytes`: whole GiB, or whole MiB below 1 GiB."""
    if nbytes >= 1 << 30:
        return f"{math.ceil(nbytes / (1 << 30))}GiB"
    return f"{max(1, math.ceil(nbytes / (1 << 20)))}MiB"


@dataclass(frozen=True)
class LoadPlan:
    """What `moe_llm.load` knows before it reads a weight: the settings (a quantized
    directory's stored bits adopted), the config, the meta skeleton it then fills, the MoE
    geometry, the expert format and the budget plan."""

    cfg: EngineConfig
    hf_config: Any
    model: nn.Module
    info: MoeInfo
    fmt: ExpertFormat
    plan: Plan
    quantized: bool


def _stored_bits(path: Path, cfg: EngineConfig) -> tuple[EngineConfig, bool]:
    """`cfg` with a quantized directory's stored bits (its manifest alone is read)."""
    from ..checkpoint.qformat import is_quantized_dir, read_manifest, resolve_stored_bits

    quantized = is_quantized_dir(path)
    if quantized:
        cfg = resolve_stored_bits(read_manifest(path), cfg, path.name)
    return cfg, quantized


def _skeleton(src: ConfigOnly, dtype: torch.dtype, known: KnownModel | None):
    try:
        hf_config = read_config(src)
        model = build_skeleton(hf_config, dtype)
        return hf_config, model, moe_info(model, hf_config)
    except UnsupportedModelError as exc:
        if known is None:
            raise
        raise UnsupportedModelError(f"{known.name} ({known.repo}) cannot be planned: {exc}") from None


def _fitted(sizer: _Sizer, cfg: EngineConfig, quantized: bool) -> tuple[ExpertFormat, Plan, QuantSpec | None]:
    try:
        return sizer.plan(cfg)
    except BudgetError as exc:
        raise BudgetError(f"{exc}; {sizer.gpu_hint(cfg, quantized)}") from None


def plan_load(model_dir: str | Path, cfg: EngineConfig, dtype: torch.dtype) -> LoadPlan:
    """The loader's plan of directory `model_dir` at `cfg` and compute `dtype`, from config.json
    (and a quantized directory's manifest) alone: a budget that cannot fit raises `BudgetError`
    here, naming the leaner settings or the budget that would, before any weight is read."""
    cfg, quantized = _stored_bits(Path(model_dir).expanduser(), cfg)
    src = ConfigOnly.open(model_dir)
    hf_config, model, info = _skeleton(src, dtype, None)
    fmt, plan, _ = _fitted(_Sizer(model, hf_config, info, dtype), cfg, quantized)
    return LoadPlan(cfg, hf_config, model, info, fmt, plan, quantized)


def plan_model(model_dir: str | Path, ram: str | int | None = None, **options) -> ModelPlan:
    """Plan `model_dir` (a directory, or a known model's name: `known_model`) without loading
    weights. Options as in `moe_llm.load`; raises `BudgetError` when the model does not fit
    the GPU budget or `ram`, with the leaner settings or the budget that would."""
    from ..settings import resolve_engine_config

    cfg: EngineConfig = resolve_engine_config(options)
    with _config_source(model_dir) as (src, known):
        cfg, quantized = _stored_bits(src.path, cfg)
        dtype = _DTYPES[cfg.dtype or "bfloat16"]  # planning is for the GPU: bf16 unless told otherwise
        hf_config, model, info = _skeleton(src, dtype, known)
    sizer = _Sizer(model, hf_config, info, dtype)
    fmt, plan, head = _fitted(sizer, cfg, quantized)
    ram_bytes = None
    if ram is not None:
        try:
            ram_bytes = parse_size(ram)
        except ValueError as exc:
            raise ConfigError(f"ram: {exc}") from None
        if plan.host_bytes > ram_bytes:
            raise BudgetError(
                f"host RAM {format_size(ram_bytes)} cannot hold the experts: {len(info.layers)} layers x "
                f"{info.num_experts} experts x {format_size(fmt.nbytes)} = {format_size(plan.host_bytes)}; "
                f"{_ram_hint(sizer, cfg, quantized, ram_bytes, plan.host_bytes)}"
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
        token_trunk_bytes=sizer.token_trunk_bytes(plan.trunk_bytes),
        ram_bytes=ram_bytes,
        context=planned_context(cfg.max_context, getattr(hf_config, "max_position_embeddings", None)),
        known_model=known.repo if known else None,
    )


def _ram_hint(sizer: _Sizer, cfg: EngineConfig, quantized: bool, ram: int, host: int) -> str:
    """Fewer expert bits that fit `ram` (the GPU budget still has to hold them), and the RAM the current bits need."""
    need = f"--ram {_round_up(host)}"
    if not quantized:
        for bits in (4, 3, 2):
            if cfg.experts_bits is None or bits < cfg.experts_bits:
                p = sizer.fits(cfg.model_copy(update={"experts_bits": bits}))
                if p is not None and p.host_bytes <= ram:
                    return f"try --experts-bits {bits} ({format_size(p.host_bytes)}), or {need}"
    return f"try {need}"
