"""The decode trunk on CUDA: transformers' standard RMSNorm and Mixtral's softmax top-k router
each in one Triton launch (`triton_trunk`), and batched decode rows that each come out as alone
(`rows`).

`install` patches the instances whose class's forward is, by source, transformers' standard
RMSNorm or Mixtral's router (compared with Mixtral's own, the class name aside), so families
with other formulas (GPT-OSS's norms, routers with `norm_topk_prob`, sigmoid routers) keep
theirs. A patched module takes the kernel for decoded positions on CUDA (one row per position,
whatever the number of rows) and transformers' own forward for everything else (prompts, CPU),
so only decode changes, and it changes alike in graph and eager decode, alone or batched,
whatever the cache holds. Every other module with weights, and attention, runs once per row
inside `rows.decode_rows`.
"""

from __future__ import annotations

import inspect
import logging
import types

import torch

from . import rows

log = logging.getLogger(__name__)


def _one_position(x: torch.Tensor, width: int) -> bool:
    """Whether each row of `x` (each batch row inside `rows.decode_rows`) is one decoded
    position: one row of `width`, or [1, 1, ...] such as a token's per-head q/k norms."""
    per = x.numel() // x.shape[0] if rows.batched(x) else x.numel()
    return per == width or (x.dim() >= 3 and x.shape[1] == 1)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    x, width = hidden_states, self.weight.shape[-1]
    if x.is_cuda and x.is_contiguous() and self.weight.dim() == 1 and x.shape[-1] == width and _one_position(x, width):
        from .triton_trunk import rmsnorm_rows

        return rmsnorm_rows(x, self.weight, self.variance_epsilon)
    if rows.batched(x):
        return rows.per_row(type(self).forward.__get__(self), x)
    return type(self).forward(self, x)


def _router_forward(self, hidden_states: torch.Tensor):
    x, h = hidden_states, self.hidden_dim
    one = x.numel() == h or (rows.batched(x) and x.numel() == x.shape[0] * h)
    if x.is_cuda and x.is_contiguous() and self.weight.is_contiguous() and one:
        from .triton_trunk import topk_router_rows

        return topk_router_rows(x.reshape(-1, h), self.weight, self.top_k)
    if rows.batched(x):
        return rows.per_row(type(self).forward.__get__(self), x)
    return type(self).forward(self, x)


def _rows_forward(self, *args, **kwargs):
    """Any other module with weights: inside `rows.decode_rows`, once per row (its lone call)."""
    if args and isinstance(args[0], torch.Tensor) and rows.batched(args[0]):
        return rows.per_row(type(self).forward.__get__(self), args[0], *args[1:], **kwargs)
    return type(self).forward(self, *args, **kwargs)


def _reference_sources() -> dict[str, tuple[str, object]]:
    """kind -> (the reference forward's source with its class name as 'X', the patch)."""
    try:
        from transformers.models.mixtral import modeling_mixtral as mx

        return {
            "norm": (inspect.getsource(mx.MixtralRMSNorm.forward).replace("MixtralRMSNorm", "X"), _norm_forward),
            "router": (
                inspect.getsource(mx.MixtralTopKRouter.forward).replace("MixtralTopKRouter", "X"),
                _router_forward,
            ),
        }
    except (ImportError, AttributeError, OSError, TypeError):
        return {}


def _kind(cls: type, refs: dict, seen: dict[type, str | None]) -> str | None:
    if cls not in seen:
        try:
            src = inspect.getsource(cls.forward).replace(cls.__name__, "X")
        except (OSError, TypeError):
            src = None
        seen[cls] = next((kind for kind, (ref, _) in refs.items() if src == ref), None)
    return seen[cls]


def install(model: torch.nn.Module, kernels: bool = True) -> dict[str, int]:
    """Patch the trunk of `model` for decode. With `kernels`: every standard RMSNorm and
    Mixtral-style router gets its one-launch kernel. Always: every other module with weights
    of the decoder layers and the head runs once per row inside `rows.decode_rows` (modules
    that handle rows themselves, `handles_rows`, and embeddings aside), and so does attention
    (`_attention_rows`). Returns counts by kind."""
    refs = _reference_sources() if kernels else {}
    seen: dict[type, str | None] = {}
    counts = {kind: 0 for kind in refs} | {"rows": 0}
    for module in model.modules():
        if "forward" in vars(module) or getattr(module, "handles_rows", False):
            continue  # patched already, or computes rows itself
        if isinstance(module, torch.nn.Embedding) or next(module.children(), None) is not None:
            continue  # a gather, or a container (its leaves are patched)
        if next(module.parameters(recurse=False), None) is None:
            continue  # no weights: elementwise (activations; rotary, whose buffer is its frequencies)
        kind = _kind(type(module), refs, seen) if isinstance(getattr(module, "weight", None), torch.Tensor) else None
        module.forward = types.MethodType(refs[kind][1] if kind is not None else _rows_forward, module)
        counts[kind or "rows"] += 1
    _attention_rows()
    log.debug("decode trunk ops: %s", counts)
    return counts


def _attention_rows() -> None:
    """Wrap transformers' "sdpa" attention function (once per process): inside
    `rows.decode_rows` it runs once per row, on the row's own window of keys and mask, as the
    row's lone decode reads them (on the H200 the kernel PyTorch picks gives other bits for a
    row batched with others, or padded wider: scripts/probe_attention_padding.py); outside, it
    is transformers' function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    orig = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(orig, "_moe_llm_rows", False):
        return

    def attention(module, query, key, value, attention_mask, **kwargs):
        r = rows.current()
        if r is None or r.count <= 1 or query.shape[0] != r.count:
            return orig(module, query, key, value, attention_mask, **kwargs)
        outs = []
        for b, (w, masked) in enumerate(zip(r.widths, r.masked, strict=True)):
            mask = attention_mask[b : b + 1, ..., :w] if masked and attention_mask is not None else None
            out, _ = orig(module, query[b : b + 1], key[b : b + 1, :, :w], value[b : b + 1, :, :w], mask, **kwargs)
            outs.append(out)
        return torch.cat(outs), None

    attention._moe_llm_rows = True
    AttentionInterface.register("sdpa", attention)
