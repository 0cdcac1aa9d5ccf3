"""Pick a family's map and check it against the transformers skeleton.

* `arch_for_type(model_type)`: the family's map from `families.FAMILIES`, else the
  generic map (its paths still unknown). The checkpoint reader needs only its keys.
* `resolve_arch(model, config)`: the map with every path filled in; the generic map reads
  them off the skeleton (the block holding an ``experts`` module, the router with an
  (E, H) weight, the KV argument of the decoder layer). Works on a loaded engine too,
  whose experts are already offloaded.
* `bind(model, config)`: resolve, then check that every MoE layer's experts follow
  transformers' experts contract with the map's expert layout (by default act_fn(gate) * up,
  no biases, concatenated and not transposed; GPT-OSS declares its own). Anything else is one
  `UnsupportedModelError` line saying why: a family must match transformers or refuse.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass

from torch import nn

from ...errors import UnsupportedModelError
from .families import FAMILIES, GENERIC_VERIFIED
from .spec import ArchMap, CheckpointKeys, ExpertLayout

log = logging.getLogger(__name__)

GENERIC = ArchMap(
    "*",
    keys=CheckpointKeys(block_names=("mlp", "block_sparse_moe", "feed_forward", "moe", "mixer")),
    generic=True,
)
_NORMS = ("post_attention_layernorm", "pre_ff_layernorm", "pre_feedforward_layernorm")


@dataclass(frozen=True)
class MoeGeometry:
    layers: list[int]  # indices of decoder layers with routed experts
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int


def arch_for_type(model_type: str | None) -> ArchMap:
    known = FAMILIES.get(model_type or "")
    if known is not None:
        return known
    keys = dataclasses.replace(GENERIC.keys, hf_renames=model_type)
    return dataclasses.replace(
        GENERIC, model_type=model_type or "*", keys=keys, verified=model_type in GENERIC_VERIFIED
    )


def _is_offloaded(mod) -> bool:
    from ...experts.runtime import OffloadedExperts

    return isinstance(mod, OffloadedExperts)


def _find_layers(model: nn.Module, arch: ArchMap) -> str:
    try:
        if isinstance(model.get_submodule(arch.layers), nn.ModuleList):
            return arch.layers
    except AttributeError:
        pass
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, nn.ModuleList) and len(mod):
            return name
    raise UnsupportedModelError(f"{arch.model_type}: no decoder layers ({arch.layers}) in {type(model).__name__}")


def _num_experts(experts: nn.Module) -> int | None:
    if _is_offloaded(experts):
        return experts.num_experts
    for name in ("gate_up_proj", "up_proj", "down_proj"):
        p = getattr(experts, name, None)
        if p is not None and getattr(p, "dim", lambda: 0)() == 3:
            return int(p.shape[0])
    n = getattr(experts, "num_experts", None)
    return n if isinstance(n, int) else None


def _find_router(block: nn.Module, arch: ArchMap, num_experts: int | None, hidden: int) -> tuple[str, str]:
    """(router child name, weight path) of the block child holding an (E, H) parameter."""
    for child_name, child in block.named_children():
        if child_name == arch.experts or child_name.startswith("shared"):
            continue
        for pname, p in child.named_parameters():
            if p.dim() == 2 and p.shape[1] == hidden and (num_experts is None or p.shape[0] == num_experts):
                return child_name, pname
    raise UnsupportedModelError(
        f"{arch.model_type}: the MoE block {type(block).__name__} has no router with an (experts, hidden) weight"
    )


def _discover(model: nn.Module, config, arch: ArchMap) -> ArchMap:
    """The generic map with the paths of this skeleton."""
    layers_path = _find_layers(model, arch)
    layers = model.get_submodule(layers_path)
    for layer in layers:
        for block_name, block in layer.named_children():
            experts = getattr(block, "experts", None)
            if not isinstance(experts, nn.Module):
                continue
            hidden = int(config.hidden_size)
            router, weight = _find_router(block, arch, _num_experts(experts), hidden)
            tensors = [*block.get_submodule(router).named_parameters(), *block.get_submodule(router).named_buffers()]
            bias = next((n for n, _ in tensors if n.endswith("e_score_correction_bias")), None)
            shared = tuple(n for n, _ in block.named_children() if n.startswith("shared"))
            norm = next((n for n in _NORMS if isinstance(getattr(layer, n, None), nn.Module)), None)
            kv_arg = arch.kv_arg_of(layer)
            latent = isinstance(getattr(config, "kv_lora_rank", None), int)
            return dataclasses.replace(
                arch, layers=layers_path, block=block_name, router=router,
                router_spec=dataclasses.replace(arch.router_spec, weight=weight, correction_bias=bias),
                shared=shared, norm=norm, kv_arg=kv_arg, kv_layout="latent" if latent else "heads",
                hf_class=type(model).__name__,
            )  # fmt: skip
    raise UnsupportedModelError(
        f"{arch.model_type} is not a Mixture-of-Experts model (no decoder layer has an `experts` module)"
    )


def resolve_arch(model: nn.Module, config) -> ArchMap:
    """The family's map with every path filled in (see the module docstring)."""
    arch = arch_for_type(getattr(config, "model_type", None))
    return _discover(model, config, arch) if arch.generic else arch


def _default_gate():
    from transformers.integrations.moe import _default_apply_gate

    return _default_apply_gate


def contract_problem(experts: nn.Module, layout: ExpertLayout = ExpertLayout()) -> str | None:
    """Why the engine cannot compute `experts` exactly as transformers does with the map's expert
    `layout` (the default: act_fn(gate) * up, concatenated, no biases), or None. A family whose
    experts differ from the default loads only where its map declares that layout (GPT-OSS)."""
    cls = type(experts).__name__
    if not hasattr(experts, "has_bias"):  # set by transformers' @use_experts_implementation
        return f"the experts module {cls} does not follow transformers' experts contract"
    missing = [n for n in ("gate_up_proj", "down_proj") if getattr(experts, n, None) is None]
    if not getattr(experts, "has_gate", True) or missing:
        return f"experts without {' or '.join(missing) or 'a gate'} ({cls}: up/down only) are not supported"
    if bool(experts.has_bias) != layout.bias or bool(getattr(experts, "is_transposed", False)) != layout.transposed:
        return "biased or transposed experts are not supported without a declared expert layout"
    if bool(getattr(experts, "is_concatenated", True)) != layout.concatenated:
        return "experts with interleaved gate/up rows are not supported without a declared expert layout"
    if getattr(experts, "has_post_expert_norm", False):
        return "experts with a norm after each expert are not supported"
    if layout.activation != "act_fn":  # the map names the activation the engine computes
        from ...experts.compute import ACTIVATIONS

        args = ACTIVATIONS.get(layout.activation, (None, ()))[1]
        if layout.activation not in ACTIVATIONS or not all(_is_number(getattr(experts, a, None)) for a in args):
            return f"the activation {layout.activation!r} of {cls} is not one the engine computes"
    elif getattr(type(experts), "_apply_gate", None) is not _default_gate():
        return f"experts with their own gate activation ({cls}._apply_gate) are not supported"
    elif not callable(getattr(experts, "act_fn", None)):
        return f"the experts module {cls} has no act_fn"
    if experts.gate_up_proj.dim() != 3 or experts.down_proj.dim() != 3:
        return f"the experts module {cls} does not hold 3-D gate_up_proj/down_proj"
    return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bound_layout(layout: ExpertLayout, experts: nn.Module) -> ExpertLayout:
    """`layout` with its named activation's arguments read off transformers' experts module."""
    if layout.activation == "act_fn":
        return layout
    from ...experts.compute import ACTIVATIONS

    args = tuple((a, float(getattr(experts, a))) for a in ACTIVATIONS[layout.activation][1])
    return dataclasses.replace(layout, act_args=args)


def own_cache_class(model: nn.Module) -> str | None:
    """The name of a KV cache class the family's modeling file defines for itself (MiniMax), or None:
    the engine drives transformers' DynamicCache and would be refused by such a model mid-request."""
    from transformers.cache_utils import Cache

    module = sys.modules.get(type(model).__module__)
    for obj in vars(module).values() if module else ():
        if isinstance(obj, type) and issubclass(obj, Cache) and obj.__module__ == module.__name__:
            return obj.__name__
    return None


def bind(model: nn.Module, config) -> tuple[ArchMap, MoeGeometry]:
    """The map and the MoE geometry of a (meta) skeleton, or one line why it cannot load."""
    arch = resolve_arch(model, config)
    name = arch.model_type
    cache_cls = own_cache_class(model)
    if cache_cls is not None:
        raise UnsupportedModelError(f"{name}: a KV cache class of its own ({cache_cls}) is not supported")
    layers, shapes = [], set()
    try:
        decoder = arch.decoder_layers(model)
    except AttributeError:
        raise UnsupportedModelError(f"{name}: no decoder layers at {arch.layers}") from None
    for i, layer in enumerate(decoder):
        experts = arch.experts_of(layer)
        if experts is None:
            continue  # a dense layer (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
        problem = contract_problem(experts, arch.layout)
        if problem is not None:
            raise UnsupportedModelError(f"{name}: {problem}")
        if arch.router_of(layer) is None:
            raise UnsupportedModelError(f"{name}: layer {i} has experts but no router at {arch.block}.{arch.router}")
        try:
            arch.router_weight(layer)
        except AttributeError:
            raise UnsupportedModelError(
                f"{name}: the router {type(arch.router_of(layer)).__name__} has no {arch.router_spec.weight}"
            ) from None
        layers.append(i)
        shapes.add(arch.layout.geometry(experts.gate_up_proj.shape) + tuple(experts.down_proj.shape))
    if not layers:
        raise UnsupportedModelError(f"{name} is not a Mixture-of-Experts model (no routed experts)")
    if len(shapes) != 1:
        raise UnsupportedModelError(f"{name}: MoE layers with different expert shapes are not supported")
    e, two_i, h, *_ = shapes.pop()
    first = decoder[layers[0]]
    arch = dataclasses.replace(arch, layout=_bound_layout(arch.layout, arch.experts_of(first)))
    router = arch.router_of(first)
    top_k = getattr(router, "top_k", None)
    if not isinstance(top_k, int):
        top_k = getattr(config, "num_experts_per_tok", None) or 2
    if not arch.verified:
        log.warning("%s loads through the generic architecture map; it is not verified against transformers", name)
    return arch, MoeGeometry(layers, e, int(top_k), h, two_i // 2)
