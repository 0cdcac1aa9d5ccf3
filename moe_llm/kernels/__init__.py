"""Expert and dense-matrix compute for the compact format.

`expert_mlp` and `quant_linear` are the entry points of the trunk and the
offload runtime. On CUDA with Triton, one token goes through the fused
dequant-GEMV (`triton_gemv`) and many tokens through a Triton dequantize into a
reusable workspace plus a cuBLAS GEMM (`triton_dequant`), a block of output rows
at a time so the workspace stays bounded (`chunking`). Everywhere else
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

from ..experts.format import ExpertFormat, matrix_views
from . import rows
from .chunking import (
    DEQUANT_WORKSPACE_BYTES,
    chunked_expert_mlp,
    chunked_linear,
    dequant_workspace_numel,
)

ActFn = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def triton_kernels() -> SimpleNamespace | None:
    """The Triton kernels (gemv, linear, combine, dequantize, dequantize_rows,
    supported_spec), or None when Triton cannot be imported."""
    try:
        from . import triton_dequant, triton_moe
        from . import triton_gemv as tg
        from .triton_group import GemvGroup
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        log.info("Triton kernels unavailable (%s); using the torch reference path", exc)
        return None
    return SimpleNamespace(
        gemv=tg.gemv, linear=tg.linear, combine=triton_moe.combine, supported_spec=tg.supported_spec, GemvGroup=GemvGroup,
        dequantize=triton_dequant.dequantize,
        dequantize_rows=triton_dequant.dequantize_rows,
    )  # fmt: skip


def fast_path(x: torch.Tensor, fmt: ExpertFormat) -> SimpleNamespace | None:
    """Triton kernels if they can run this expert format on x's device."""
    if fmt.specs is None or not x.is_cuda:
        return None
    tk = triton_kernels()
    if tk is None or not all(tk.supported_spec(s) for s in fmt.specs.values()):
        return None
    return tk


def workspace_numel(fmt: ExpertFormat) -> int:
    """Elements (of `fmt.dtype`) of the prefill workspace `expert_mlp` wants: at most
    DEQUANT_WORKSPACE_BYTES, however large the expert."""
    dsize = torch.empty((), dtype=fmt.dtype).element_size()
    return dequant_workspace_numel(fmt.hidden, fmt.intermediate, dsize)


def expert_mlp(
    x: torch.Tensor,
    views: dict[str, torch.Tensor],
    fmt: ExpertFormat,
    act_fn: ActFn,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = down(act(gate(x)) * up(x)) for one expert. x: [n, H] -> [n, H].

    `workspace` (CUDA fast path): a flat buffer of the compute dtype that receives the
    dequantized matrices a row chunk at a time; `workspace_numel(fmt)` elements bound it,
    any size from one chunk of rows up works (2*I*H: each matrix in one piece). Default:
    a fresh one of `workspace_numel(fmt)`."""
    tk = fast_path(x, fmt)
    if tk is not None:
        if workspace is None:
            workspace = torch.empty(workspace_numel(fmt), dtype=fmt.dtype, device=x.device)
        gu, down = matrix_views(views, "gate_up_proj"), matrix_views(views, "down_proj")
        return chunked_expert_mlp(x, gu, down, fmt.specs, fmt.dtype, act_fn, workspace, tk.dequantize_rows)
    gate_up = fmt.dense(views, "gate_up_proj")  # [2I, H]
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    h = act_fn(gate) * up  # [n, I]
    return F.linear(h, fmt.dense(views, "down_proj"))


def quant_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], spec, dtype: torch.dtype) -> torch.Tensor:
    """y = x @ W.T for a compact-quantized W (dense layers: attention projections, a 4-bit
    LM head). On CUDA, many tokens dequantize W in row chunks of at most
    DEQUANT_WORKSPACE_BYTES (a [32000, 4096] head would be 250 MiB whole)."""
    if x.is_cuda:
        tk = triton_kernels()
        if tk is not None and tk.supported_spec(spec):
            if x.numel() == spec.in_features or rows.batched(x):  # decoded positions: fused dequant-GEMV
                return tk.linear(x.to(dtype), tensors, spec, dtype)
            return chunked_linear(x, tensors, spec, dtype, tk.dequantize_rows)
    if rows.batched(x):  # decoded rows elsewhere: each as alone
        return rows.per_row(quant_linear, x, tensors, spec, dtype)
    from ..quant import compact

    return F.linear(x, compact.dequantize(tensors, spec, dtype))


__all__ = [
    "DEQUANT_WORKSPACE_BYTES",
    "ActFn",
    "expert_mlp",
    "fast_path",
    "matrix_views",
    "quant_linear",
    "triton_kernels",
    "workspace_numel",
]
