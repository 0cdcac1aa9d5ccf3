"""Fewer launches for a decoded token on CUDA: transformers' standard RMSNorm and Mixtral's
softmax top-k router, each in one Triton launch (`triton_trunk`).

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
    log.debug("one-launch decode ops: %s", counts)
    return counts
