"""Build the transformers trunk on the meta device and fill it from a checkpoint.

The trunk (embeddings, attention, norms, routers, LM head) stays transformers'
own code and is materialised tensor by tensor. Dense projections inside the
decoder layers are optionally quantized to `QuantLinear`. Expert weights never
enter the trunk: they are encoded one at a time into the `ExpertStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointIntegrityError, ModelLoadError, UnsupportedModelError
from ..experts.format import ExpertFormat
from ..experts.store import ExpertStore
from ..quant import QuantSpec, pick_group_size
from ..runtime.quant_linear import QuantLinear
from .arch import ArchMap, bind, resolve_arch
from .source import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoeInfo:
    layers: list[int]  # indices of decoder layers with routed experts
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    arch: ArchMap  # the family's architecture map, paths filled in


def read_config(ckpt: Checkpoint):
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import AutoConfig

    model_type = ckpt.config_dict.get("model_type")
    if not model_type:
        raise UnsupportedModelError(f"config.json in {ckpt.path} has no model_type")
    try:
        return AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True)
    except StrictDataclassFieldValidationError as exc:  # a field of the wrong type, e.g. "hidden_size": "big"
        cause = " ".join(str(exc.__cause__ or exc).split())  # one line
        raise ModelLoadError(f"invalid config.json in {ckpt.path}: {cause}") from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsupportedModelError(f"unknown or invalid architecture {model_type!r}: {msg}") from None


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise UnsupportedModelError(f"{config.model_type}: not a causal LM transformers can build ({exc})") from None
    return model.eval()


def decoder_layers(model: nn.Module, arch: ArchMap | None = None) -> nn.ModuleList:
    return (arch or resolve_arch(model, model.config)).decoder_layers(model)


def moe_info(model: nn.Module, config) -> MoeInfo:
    """The MoE geometry and architecture map of a (meta) skeleton, or one line why it cannot load."""
    arch, g = bind(model, config)
    return MoeInfo(g.layers, g.num_experts, g.top_k, g.hidden, g.intermediate, arch)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers saved in a checkpoint (e.g. DeepSeek-V3's e_score_correction_bias), not RoPE caches."""
    out = []
    for mod_name, mod in model.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{name}" if mod_name else name, buf))
    return out


def load_trunk(
    model: nn.Module, ckpt: Checkpoint, config, device: torch.device, dtype: torch.dtype, arch: ArchMap | None = None
) -> None:
    """Materialise every non-expert parameter and persistent buffer from the checkpoint."""
    arch = arch or resolve_arch(model, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = [*model.named_parameters(remove_duplicate=False), *persistent_buffers(model)]
    for name, param in tensors:
        if arch.is_expert_param(name):
            continue
        if name not in ckpt.trunk_keys:
            if name == "lm_head.weight" and tied:
                continue
            raise CheckpointIntegrityError(f"tensor {name} is missing from the checkpoint")
        t = ckpt.trunk_tensor(name)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointIntegrityError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        # float32 buffers (router correction biases) keep their precision, as transformers keeps them
        want = param.dtype if not param.is_floating_point() or not isinstance(param, nn.Parameter) else dtype
        _set_tensor(model, name, t.to(device=device, dtype=want))
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    _rebuild_meta_buffers(model, config, device)


def _rebuild_meta_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Non-persistent buffers (RoPE inv_freq) were built on meta: build their modules afresh.
    A module that also holds loaded weights keeps them and takes only the fresh buffers."""
    for name, mod in list(model.named_modules()):
        meta = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        try:
            with torch.device("cpu"):
                fresh = type(mod)(config=config).to(device)
        except TypeError as exc:
            raise ModelLoadError(f"cannot materialise {name} ({type(mod).__name__}): {exc}") from None
        if any(True for _ in mod.parameters(recurse=True)) or len(meta) < len(mod._buffers):
            for b in meta:
                mod._buffers[b] = fresh._buffers[b]
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)


def quantize_dense(
    model: nn.Module, bits: int, dtype: torch.dtype, device: torch.device, arch: ArchMap | None = None
) -> int:
    """Replace nn.Linear modules inside decoder layers with QuantLinear (experts and routers stay
    as they are). Returns the count."""
    arch = arch or resolve_arch(model, model.config)
    count = 0
    for layer in arch.decoder_layers(model):
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear) and not arch.keep_dense(name):
                q = QuantLinear.from_linear(mod.weight.data, mod.bias, bits, dtype, device)
                parent, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, attr, q)
                count += 1
    return count


def head_spec(model: nn.Module, bits: int | None) -> QuantSpec | None:
    """The QuantSpec `quantize_head` would give `model.lm_head`, or None where it keeps the
    head as it is: no bits, no nn.Linear head, or a head tied to the input embeddings
    (quantizing it would keep the 16-bit embedding and add a copy, so the trunk would grow).
    Works on a meta skeleton, so `moe-llm plan` counts the same bytes the loader allocates."""
    head = getattr(model, "lm_head", None)
    if bits is None or not isinstance(head, nn.Linear):
        return None
    emb = model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) or (emb is not None and head.weight is emb.weight):
        return None
    out_f, in_f = head.weight.shape
    return QuantSpec(bits, pick_group_size(bits, in_f), out_f, in_f)


def quantize_head(model: nn.Module, bits: int | None, dtype: torch.dtype, device: torch.device) -> bool:
    """Replace `model.lm_head` with a `bits`-bit QuantLinear (one token: the fused GEMV;
    prefill: row-chunked dequantize + GEMM). Returns whether it did; see `head_spec` for
    when it does not (a tied head is refused with a log line). Call after `load_trunk`."""
    if bits is None:
        return False
    if head_spec(model, bits) is None:
        log.info("head_bits=%d ignored: the LM head is tied to the input embeddings or not a plain Linear", bits)
        return False
    head = model.lm_head
    model.lm_head = QuantLinear.from_linear(head.weight.data, head.bias, bits, dtype, device)
    log.info("quantized the LM head %s to %d-bit", tuple(head.weight.shape), bits)
    return True


def module_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def fill_store(
    ckpt: Checkpoint,
    info: MoeInfo,
    fmt: ExpertFormat,
    pin: bool,
    quant_device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> ExpertStore:
    """Encode every expert from the checkpoint into one pinned host buffer each."""
    ck_layers = ckpt.moe_layers()
    if ck_layers != info.layers:
        raise CheckpointIntegrityError(f"checkpoint has experts for layers {ck_layers}, config expects {info.layers}")
    store = ExpertStore(fmt, info.layers, info.num_experts, pin=pin)
    total, done = len(info.layers) * info.num_experts, 0
    want_gu, want_d = (2 * info.intermediate, info.hidden), (info.hidden, info.intermediate)
    for layer in info.layers:
        if ckpt.num_experts(layer) != info.num_experts:
            raise CheckpointIntegrityError(
                f"layer {layer} has {ckpt.num_experts(layer)} experts, config says {info.num_experts}"
            )
        for e in range(info.num_experts):
            gate_up, down = ckpt.expert(layer, e)
            if tuple(gate_up.shape) != want_gu or tuple(down.shape) != want_d:
                raise CheckpointIntegrityError(
                    f"layer {layer} expert {e}: shapes {tuple(gate_up.shape)}/{tuple(down.shape)}, "
                    f"expected {want_gu}/{want_d}"
                )
            if fmt.bits is not None:
                gate_up, down = gate_up.to(quant_device), down.to(quant_device)
            encoded = fmt.encode(gate_up, down, ckpt.expert_biases(layer, e))
            store.put(layer, e, {k: v.cpu() for k, v in encoded.items()})
            done += 1
            if progress:
                progress(done, total)
    return store
