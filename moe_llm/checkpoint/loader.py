"""`moe_llm.load`: checkpoint directory -> ready `Engine`.

config.json -> meta skeleton -> budget plan (`planning.plan_load`: a budget that cannot fit
fails here, before any weight or checksum is read) -> trunk on device (optionally 4-bit
dense layers) -> experts encoded into the pinned `ExpertStore` -> `build_runtime` (global
`ExpertCache`, `PromptPrefetcher`, `ExpertsRuntime`) -> `OffloadedExperts` swapped into
every MoE layer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from ..experts import ExpertCache, ExpertFormat, ExpertsRuntime, OffloadedExperts, PromptPrefetcher
from ..planning import Plan, plan_for, plan_load
from ..retry import allocate_shrinking
from ..runtime.engine import Engine
from ..runtime.quant_linear import share_inputs
from ..runtime.stats import Stats
from ..settings import resolve_engine_config
from .model import decoder_layers, fill_store, load_trunk, module_bytes, quantize_dense, quantize_head
from .qformat import QuantizedCheckpoint
from .source import Checkpoint

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {msg}") from None


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def load(
    model_dir: str | Path,
    device: str | None = None,
    experts_bits: int | str | None = None,
    attn_bits: int | str | None = None,
    cache_per_layer: int | None = None,
    gpu_budget: str | int | None = None,
    prefetch: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **options,
) -> Engine:
    """Load a Mixture-of-Experts checkpoint directory for offloaded inference.

    `None` bits keep the checkpoint's precision. Give `cache_per_layer` (expert
    slots per MoE layer) or `gpu_budget` (e.g. "12GiB"); with neither, every
    expert gets a slot. Extra options: see `EngineConfig`. An argument left as
    `None` falls back to `MOE_LLM_*` variables, then the settings file (see
    `moe_llm.settings`), then the defaults (device "cpu", prefetch on); pass
    bits "none" to force full precision over a setting. A directory written by
    `moe-llm quantize` loads without re-quantization at its stored bits.
    """
    cfg = resolve_engine_config(dict(
        device=device, experts_bits=experts_bits, attn_bits=attn_bits, cache_per_layer=cache_per_layer,
        gpu_budget=gpu_budget, prefetch=prefetch, **options,
    ))  # fmt: skip
    dev = _check_device(cfg.device)
    dtype = _DTYPES[cfg.dtype] if cfg.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    # from config.json (and a quantized directory's manifest) alone: a budget that cannot fit fails here
    lp = plan_load(model_dir, cfg, dtype)
    cfg, hf_config, model, info, fmt, plan = lp.cfg, lp.hf_config, lp.model, lp.info, lp.fmt, lp.plan
    qckpt = QuantizedCheckpoint(model_dir, verify_checksums=cfg.verify_checksums) if lp.quantized else None
    ckpt = qckpt or Checkpoint(model_dir)  # keys: the architecture map of config.json's model_type
    tokenizer = _load_tokenizer(ckpt.path)

    if qckpt is not None:
        qckpt.install_dense(model, dtype, dev)
    load_trunk(model, ckpt, hf_config, dev, dtype, info.arch)
    if cfg.attn_bits is not None and qckpt is None:
        n = quantize_dense(model, cfg.attn_bits, dtype, dev, info.arch)
        log.info("quantized %d dense projections to %d-bit", n, cfg.attn_bits)
    if quantize_head(model, cfg.head_bits, dtype, dev):
        log.info("quantized the LM head to %d-bit", cfg.head_bits)
    share_inputs(model)
    if module_bytes(model) != plan.trunk_bytes:  # the meta count missed something: plan the trunk as it is
        log.warning("trunk holds %d bytes, %d planned; re-planning the slots", module_bytes(model), plan.trunk_bytes)
        plan = plan_for(model, hf_config, cfg, info, fmt, dtype)

    quant_dev = dev if dev.type == "cuda" else torch.device("cpu")
    cb = (lambda done, total: progress("experts", done, total)) if progress else None
    if qckpt is not None:
        store = qckpt.fill_store(info.layers, info.num_experts, fmt, pin=dev.type == "cuda", progress=cb)
    else:
        store = fill_store(ckpt, info, fmt, pin=dev.type == "cuda", quant_device=quant_dev, progress=cb)
    ckpt.close()

    log.info("expert slots: %d of %d", plan.slots, len(info.layers) * info.num_experts)
    return assemble(model, tokenizer, hf_config, cfg, info, fmt, store, plan, dev, str(ckpt.path))


def _norm_ratios(arch, layers, moe_layers: list[int]) -> dict[int, torch.Tensor | None]:
    """Layer L -> w_{next} / w_L of the norms before the MoE blocks (sharpens the prompt prefetch guess)."""
    ratios = {}
    for cur, nxt in zip(moe_layers[:-1], moe_layers[1:], strict=True):
        w_cur = getattr(arch.norm_of(layers[cur]), "weight", None)
        w_nxt = getattr(arch.norm_of(layers[nxt]), "weight", None)
        if isinstance(w_cur, torch.Tensor) and isinstance(w_nxt, torch.Tensor) and w_cur.shape == w_nxt.shape:
            wc = w_cur.float()
            ratio = torch.where(wc.abs() > 1e-6, w_nxt.float() / wc, torch.ones_like(wc))
            ratios[cur] = ratio.to(w_cur.dtype)
        else:
            ratios[cur] = None
    return ratios


def build_runtime(model, cfg, info, fmt: ExpertFormat, store, plan: Plan, dev, retain: bool = True):
    """The experts runtime over `store` with the plan's global slot pool (shrunk on OOM unless the
    user fixed it). Returns (runtime, plan with the slot count actually allocated)."""
    stats = Stats()
    cache, slots = allocate_shrinking(
        lambda n: ExpertCache(
            store, dev, n, stats=stats, retain=retain, policy=cfg.cache_policy, floor=plan.floor,
            max_pending=cfg.admissions_in_flight,
        ),
        plan.slots,
        bytes_per_slot=fmt.nbytes,
        shrink=cfg.cache_per_layer is None,  # a slot count the user fixed is not silently changed
    )  # fmt: skip
    plan = dataclasses.replace(plan, slots=cache.num_slots)
    arch = info.arch
    layers = decoder_layers(model, arch)
    act_fn = getattr(arch.experts_of(layers[info.layers[0]]), "act_fn", None)  # None: a named activation
    prefetcher = None
    if cfg.prefetch and len(info.layers) > 1:
        routers = {i: arch.router_weight(layers[i]) for i in info.layers}
        nxt = dict(zip(info.layers[:-1], info.layers[1:], strict=True))
        guesses = cfg.prefetch_experts or info.top_k
        prefetcher = PromptPrefetcher(cache, routers, _norm_ratios(arch, layers, info.layers), nxt, guesses)
    runtime = ExpertsRuntime(
        cache, fmt, act_fn, info.top_k, prefetcher, evict_on_admit=cfg.prefetch, kernel_tuning=cfg.kernel_tuning,
        cpu_experts=cfg.cpu_experts, max_rows=cfg.max_batch,
    )  # fmt: skip
    return runtime, plan


def assemble(model, tokenizer, hf_config, cfg, info, fmt, store, plan, dev, path, retain: bool = True) -> Engine:
    """Swap the offloaded experts into the trunk and wrap it all in an `Engine`."""
    runtime, plan = build_runtime(model, cfg, info, fmt, store, plan, dev, retain=retain)
    layers = decoder_layers(model, info.arch)
    for i in info.layers:
        info.arch.set_experts(layers[i], OffloadedExperts(i, runtime, info.num_experts))
    return Engine(model, tokenizer, hf_config, cfg, runtime, plan, path)
