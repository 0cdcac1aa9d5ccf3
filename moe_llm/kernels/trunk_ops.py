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

The rotary embedding has no module: attention calls its modeling file's `apply_rotary_pos_emb`.
Where that function and its `rotate_half` are Mixtral's (compared by syntax tree, docstrings and
decorators aside), the file's function is wrapped once per process, and the installed model's
attention modules mark their calls; a marked decoded position on CUDA takes `rotary_rows`
(transformers' bits, in one launch instead of ten), anything else the original function.
"""

from __future__ import annotations

import ast
import inspect
import logging
import sys
import textwrap
import threading
import types

import torch

from . import rows

log = logging.getLogger(__name__)
_local = threading.local()  # .attention: inside the forward of an installed model's marked attention


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
    if kernels:
        counts["attention"] = _install_attention(model)
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
    """Wrap transformers' "sdpa" attention function (once per process). A decoded position on
    CUDA (`triton_attention.supported`, with none of the extras some families pass: sinks, soft
    caps, position biases, dropout) takes `triton_attention.decode_attention`, which reads each
    key/value head once for all its query heads. Inside `rows.decode_rows` attention runs once
    per row, on the row's own window of keys and mask, as the row's lone decode reads them, so
    a batched row gets its lone bits (the kernel's arithmetic depends only on the row; the
    kernel PyTorch's SDPA picks on the H200 gives other bits for a row batched with others, or
    padded wider: scripts/probe_attention_padding.py). Anything else is transformers' function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    orig = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(orig, "_moe_llm_rows", False):
        return

    def one(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        extras = any(kwargs.get(k) is not None for k in _ATTENTION_EXTRAS) or getattr(module, "sinks", None) is not None
        if query.is_cuda and not extras and not (dropout and module.training):
            from .triton_attention import decode_attention, supported  # (triton: CUDA machines only)

            mask = attention_mask
            if mask is not None and mask.dim() == 4 and mask.shape[-1] > key.shape[-2]:
                mask = mask[..., : key.shape[-2]]  # as transformers' sdpa_attention_forward
            if supported(query, key, value, mask):  # one decoded position, shapes and dtypes it computes
                scale = query.shape[-1] ** -0.5 if scaling is None else scaling
                return decode_attention(query, key, value, mask, scale), None
        return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    def attention(module, query, key, value, attention_mask, **kwargs):
        r = rows.current()
        if r is None or r.count <= 1 or query.shape[0] != r.count:
            return one(module, query, key, value, attention_mask, **kwargs)
        outs = []
        for b, (w, masked) in enumerate(zip(r.widths, r.masked, strict=True)):
            mask = attention_mask[b : b + 1, ..., :w] if masked and attention_mask is not None else None
            out, _ = one(module, query[b : b + 1], key[b : b + 1, :, :w], value[b : b + 1, :, :w], mask, **kwargs)
            outs.append(out)
        return torch.cat(outs), None

    attention._moe_llm_rows = True
    AttentionInterface.register("sdpa", attention)


# attention arguments of some families that `triton_attention` does not compute (GPT-OSS's sinks
# are a module parameter, checked apart)
_ATTENTION_EXTRAS = ("s_aux", "sinks", "softcap", "position_bias", "attention_bias", "head_mask")


def _syntax(fn) -> str | None:
    """A function's syntax tree without its name, decorators and docstring (None without source)."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef):
        return None
    if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
        node.body = node.body[1:]  # the docstring
    node.name, node.decorator_list = "X", []
    return ast.dump(node)


def _rotary_reference() -> tuple[str | None, str | None]:
    try:
        from transformers.models.mixtral import modeling_mixtral as mx
    except ImportError:
        return None, None
    return _syntax(mx.apply_rotary_pos_emb), _syntax(mx.rotate_half)


def _rotary_file(cls: type, ref: tuple[str | None, str | None]):
    """The modeling file of attention class `cls` when its forward calls that file's
    `apply_rotary_pos_emb` and the file's function (and `rotate_half`) are Mixtral's; else None."""
    mod = sys.modules.get(cls.__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    if fn is None or code is None or "apply_rotary_pos_emb" not in code.co_names:
        return None
    if getattr(fn, "_moe_llm_rotary", False):
        return mod
    same = None not in ref and (_syntax(fn), _syntax(getattr(mod, "rotate_half", None))) == ref
    return mod if same else None


def _wrap_rotary(orig):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if getattr(_local, "attention", False) and unsqueeze_dim == 1 and q.is_cuda:
            from .triton_trunk import rotary_rows, rotary_supported

            if rotary_supported(q, k, cos, sin):
                return rotary_rows(q, k, cos, sin)
        return orig(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb._moe_llm_rotary = True
    apply_rotary_pos_emb.__wrapped__ = orig
    return apply_rotary_pos_emb


def _attention_forward(self, *args, **kwargs):
    prev = getattr(_local, "attention", False)
    _local.attention = True
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _local.attention = prev


def _install_attention(model: torch.nn.Module) -> int:
    """Mark the attention modules whose rotary embedding is Mixtral's (module docstring); returns
    how many were marked."""
    ref = _rotary_reference()
    files: dict[type, object] = {}
    n = 0
    for module in model.modules():
        cls = type(module)
        if "forward" in vars(module):
            continue
        if cls not in files:
            files[cls] = _rotary_file(cls, ref)
        mod = files[cls]
        if mod is None:
            continue
        if not getattr(mod.apply_rotary_pos_emb, "_moe_llm_rotary", False):
            mod.apply_rotary_pos_emb = _wrap_rotary(mod.apply_rotary_pos_emb)
        module.forward = types.MethodType(_attention_forward, module)
        n += 1
    return n
