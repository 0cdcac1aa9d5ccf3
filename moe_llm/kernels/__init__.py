"""Expert and dense-matrix compute for the compact format.

`expert_mlp` and `quant_linear` are the entry points of the trunk and the
offload runtime. On CUDA with Triton, one token goes through the fused
dequant-GEMV (`triton_gemv`) and many tokens through a Triton dequantize into a
reusable workspace plus a cuBLAS GEMM (`triton_dequant`). Everywhere else
(CPU, no Triton, shapes the kernels do not tile) the reference torch
dequantize + matmul runs. Triton is imported lazily, so `import moe_llm` works
without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..expert_format import ExpertFormat, matrix_views

ActFn = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def triton_kernels() -> SimpleNamespace | None:
    """The Triton kernels (gemv, linear, combine, dequantize, supported_spec,
    DecodeWorkspace), or None when Triton cannot be imported."""
    try:
        from . import triton_dequant
        from . import triton_gemv as tg
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        log.info("Triton kernels unavailable (%s); using the torch reference path", exc)
        return None
    return SimpleNamespace(
        gemv=tg.gemv, linear=tg.linear, combine=tg.combine, supported_spec=tg.supported_spec,
        DecodeWorkspace=tg.DecodeWorkspace, dequantize=triton_dequant.dequantize,
    )  # fmt: skip


def fast_path(x: torch.Tensor, fmt: ExpertFormat) -> SimpleNamespace | None:
    """Triton kernels if they can run this expert format on x's device."""
    if fmt.specs is None or not x.is_cuda:
        return None
    tk = triton_kernels()
    if tk is None or not all(tk.supported_spec(s) for s in fmt.specs.values()):
        return None
    return tk


def expert_mlp(
    x: torch.Tensor,
    views: dict[str, torch.Tensor],
    fmt: ExpertFormat,
    act_fn: ActFn,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = down(act(gate(x)) * up(x)) for one expert. x: [n, H] -> [n, H].

    `workspace` (CUDA fast path): a flat buffer of at least 2*I*H elements of the
    compute dtype that receives the dequantized matrices, one after the other."""
    tk = fast_path(x, fmt)
    if tk is not None:
        gu = tk.dequantize(matrix_views(views, "gate_up_proj"), fmt.specs["gate_up_proj"], fmt.dtype, workspace)
        gate, up = F.linear(x, gu).chunk(2, dim=-1)  # [n, I] each
        h = act_fn(gate) * up
        down = tk.dequantize(matrix_views(views, "down_proj"), fmt.specs["down_proj"], fmt.dtype, workspace)
        return F.linear(h, down)
    gate_up = fmt.dense(views, "gate_up_proj")  # [2I, H]
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    h = act_fn(gate) * up  # [n, I]
    return F.linear(h, fmt.dense(views, "down_proj"))


def quant_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], spec, dtype: torch.dtype) -> torch.Tensor:
    """y = x @ W.T for a compact-quantized W (dense layers: attention projections)."""
    if x.is_cuda:
        tk = triton_kernels()
        if tk is not None and tk.supported_spec(spec):
            if x.numel() == spec.in_features:  # one token: fused dequant-GEMV
                return tk.linear(x.to(dtype), tensors, spec, dtype)
            return F.linear(x.to(dtype), tk.dequantize(tensors, spec, dtype))
    from ..quant import compact

    return F.linear(x, compact.dequantize(tensors, spec, dtype))


__all__ = ["ActFn", "expert_mlp", "fast_path", "matrix_views", "quant_linear", "triton_kernels"]
