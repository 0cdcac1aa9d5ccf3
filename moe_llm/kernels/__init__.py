"""Expert and dense-matrix compute for the compact format.

`expert_mlp` is the one entry point the offload runtime calls. CPU (and any
device without a fused kernel) dequantizes with torch ops and runs a matmul;
CUDA decode uses the fused Triton dequant-GEMV when it is available.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..expert_format import ExpertFormat

ActFn = Callable[[torch.Tensor], torch.Tensor]


def expert_mlp(x: torch.Tensor, views: dict[str, torch.Tensor], fmt: ExpertFormat, act_fn: ActFn) -> torch.Tensor:
    """y = down(act(gate(x)) * up(x)) for one expert. x: [n, H] -> [n, H]."""
    if fmt.bits is not None and x.is_cuda:
        from . import triton_gemv

        if triton_gemv.supports(x, fmt):
            return triton_gemv.expert_mlp(x, views, fmt, act_fn)
    gate_up = fmt.dense(views, "gate_up_proj")  # [2I, H]
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    h = act_fn(gate) * up  # [n, I]
    return F.linear(h, fmt.dense(views, "down_proj"))


def quant_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], spec, dtype: torch.dtype) -> torch.Tensor:
    """y = x @ W.T for a compact-quantized W (dense layers: attention projections)."""
    if x.is_cuda:
        from . import triton_gemv

        if triton_gemv.supports_linear(x, spec):
            return triton_gemv.linear(x, tensors, spec)
    from ..quant import compact

    return F.linear(x, compact.dequantize(tensors, spec, dtype))
