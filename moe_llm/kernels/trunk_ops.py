"""Fewer launches for a decoded token on CUDA: transformers' standard RMSNorm, Mixtral's
softmax top-k router and the rotary embedding of q and k, each in one Triton launch
(`triton_trunk`). The rotary one is bit for bit transformers' (`_Rotary`).

`install` patches the instances whose class's forward is, by source, transformers' standard
RMSNorm or Mixtral's router (compared with Mixtral's own, the class name aside), so families
with other formulas (GPT-OSS's norms, routers with `norm_topk_prob`, sigmoid routers) keep
theirs. A patched module takes the kernel for one contiguous CUDA row and transformers' own
forward for everything else (prompts, batched rows, CPU), so only one-token decode changes,
and it changes alike in graph and eager decode, whatever the cache holds.
"""

from __future__ import annotations

import inspect
import logging
import types

import torch

log = logging.getLogger(__name__)


def _one_cuda_row(x: torch.Tensor, width: int) -> bool:
    return x.is_cuda and x.is_contiguous() and x.numel() == x.shape[-1] == width


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if _one_cuda_row(hidden_states, self.weight.shape[-1]) and self.weight.dim() == 1:
        from .triton_trunk import rmsnorm_row

        return rmsnorm_row(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _router_forward(self, hidden_states: torch.Tensor):
    if _one_cuda_row(hidden_states, self.hidden_dim) and self.weight.is_contiguous():
        from .triton_trunk import topk_router_row

        return topk_router_row(hidden_states.reshape(1, -1), self.weight, self.top_k)
    return type(self).forward(self, hidden_states)


def _one_token_rotary(q, k, cos, sin) -> bool:
    d = q.shape[-1]
    return (
        q.is_cuda and q.dim() == 4 and k.dim() == 4 and q.shape[0] == q.shape[2] == k.shape[0] == k.shape[2] == 1
        and k.shape[-1] == d and d >= 2 and d & (d - 1) == 0 and q.stride(-1) == k.stride(-1) == 1
        and cos.numel() == sin.numel() == d and cos.is_contiguous() and sin.is_contiguous()
        and q.dtype == k.dtype == cos.dtype == sin.dtype and q.dtype in (torch.bfloat16, torch.float16)
    )  # fmt: skip


class _Rotary:
    """A modeling module's `apply_rotary_pos_emb` with one launch for one token's q and k
    (`triton_trunk.rotary_row`), the original for everything else. The kernel rounds as torch's
    ops round, so it gives the same bits; the first call checks that against the original (out
    of graph capture), and a mismatch turns the kernel off for good."""

    def __init__(self, original):
        self.original = original
        self.checked = False
        self.off = False

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if self.off or args or kwargs or not _one_token_rotary(q, k, cos, sin):
            return self.original(q, k, cos, sin, *args, **kwargs)
        from .triton_trunk import rotary_row

        if not self.checked:
            if torch.cuda.is_current_stream_capturing():
                return self.original(q, k, cos, sin)
            want = self.original(q, k, cos, sin)
            self.checked = True
            try:
                got = rotary_row(q, k, cos, sin)
                self.off = not all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            except Exception:  # a Triton that cannot build the kernel here
                log.exception("one-launch rotary embedding failed; keeping transformers'")
                self.off = True
                return want
            if self.off:
                log.warning("one-launch rotary embedding differs from transformers' here; keeping transformers'")
            return want
        return rotary_row(q, k, cos, sin)


def _install_rotary(model: torch.nn.Module) -> int:
    """Wrap `apply_rotary_pos_emb` in the modeling modules of `model`'s classes whose function
    (and `rotate_half`) is, by source, Mixtral's. Returns how many modules it wrapped."""
    try:
        from transformers.models.mixtral import modeling_mixtral as mx

        ref = (_body(mx.apply_rotary_pos_emb), _body(mx.rotate_half))
    except (ImportError, AttributeError, OSError, TypeError):
        return 0
    count = 0
    for mod in {inspect.getmodule(type(m)) for m in model.modules()}:
        fn, rot = getattr(mod, "apply_rotary_pos_emb", None), getattr(mod, "rotate_half", None)
        if fn is None or rot is None or isinstance(fn, _Rotary):
            continue
        try:
            if (_body(fn), _body(rot)) != ref:
                continue
        except (OSError, TypeError):
            continue
        mod.apply_rotary_pos_emb = _Rotary(fn)
        count += 1
    return count


def _body(fn) -> str:
    """A function's source without its decorators."""
    return "\n".join(line for line in inspect.getsource(fn).splitlines() if not line.lstrip().startswith("@"))


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


def install(model: torch.nn.Module) -> dict[str, int]:
    """Patch every standard RMSNorm and Mixtral-style router of `model`. Returns counts by kind."""
    refs = _reference_sources()
    seen: dict[type, str | None] = {}
    counts = {kind: 0 for kind in refs}
    for module in model.modules():
        if "forward" in vars(module) or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue  # patched already, or not one of these
        kind = _kind(type(module), refs, seen)
        if kind is not None:
            module.forward = types.MethodType(refs[kind][1], module)
            counts[kind] += 1
    counts["rotary"] = _install_rotary(model)
    log.debug("one-launch decode ops: %s", counts)
    return counts
