"""Dequantize a compact-format matrix to bf16/fp16 on CUDA (Triton), for prefill.

Prefill runs many tokens through each expert, so it pays to expand the packed
weights once into a reusable workspace and hand the product to cuBLAS. One
program reads a [BLOCK_N, BLOCK_P] tile of packed bytes and writes the
``8 // b`` contiguous column tiles it encodes (see `triton_gemv` for the
geometry). The arithmetic is the reference's: ``(code - zero) * scale`` in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.compact import QuantSpec
from .triton_gemv import NUM_WARPS, _geometry, block_p


@triton.jit
def _dequant_kernel(
    q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr, N, K, P, P1, G, stride_q,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    MB: tl.constexpr = 4 if BITS == 4 else 2
    PER: tl.constexpr = 8 // MB
    MASK: tl.constexpr = (1 << MB) - 1
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p0 = tl.program_id(1) * BLOCK_P
    offs = tl.arange(0, BLOCK_P)
    row_mask = rows < N
    row_q = rows.to(tl.int64) * stride_q
    row_out = rows.to(tl.int64) * K
    byte = tl.load(q_ptr + row_q[:, None] + p0 + offs[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
    if BITS == 3:
        hi_byte = tl.load(q_ptr + row_q[:, None] + P + (p0 % P1) + offs[None, :], mask=row_mask[:, None], other=0).to(
            tl.int32
        )
        hi_sel = (p0 >= P1).to(tl.int32)
    for j in tl.static_range(PER):
        code = (byte >> (MB * j)) & MASK
        if BITS == 3:
            code = code | (((hi_byte >> (2 * j + hi_sel)) & 1) << 2)
        col0 = j * P + p0
        gidx = rows * G + col0 // GROUP
        m = (gidx // 128) * 4
        scale = tl.load(sq_ptr + gidx, mask=row_mask, other=0).to(tl.float32) * tl.load(
            meta_ptr + m + 1, mask=row_mask, other=0.0
        ) + tl.load(meta_ptr + m, mask=row_mask, other=0.0)
        zero = tl.load(zq_ptr + gidx, mask=row_mask, other=0).to(tl.float32) * tl.load(
            meta_ptr + m + 3, mask=row_mask, other=0.0
        ) + tl.load(meta_ptr + m + 2, mask=row_mask, other=0.0)
        w = (code.to(tl.float32) - zero[:, None]) * scale[:, None]
        tl.store(
            out_ptr + row_out[:, None] + col0 + offs[None, :],
            w.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None],
        )


def dequantize(
    t: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W [out, in] in `dtype`, written into `out` (a flat workspace of at least out*in) if given."""
    n, k = spec.out_features, spec.in_features
    if out is None:
        w = torch.empty(n, k, dtype=dtype, device=t["q"].device)
    else:
        w = out[: n * k].view(n, k)
    P, P1, G, stride_q = _geometry(spec)
    bp = block_p(spec, widest=spec.group_size)  # each tile inside one group
    bn = 64
    grid = (triton.cdiv(n, bn), P // bp)
    _dequant_kernel[grid](
        t["q"], t["scale_q"], t["zero_q"], t["meta"], w, n, k, P, P1, G, stride_q,
        BITS=spec.bits, GROUP=spec.group_size, BLOCK_N=bn, BLOCK_P=bp, num_warps=NUM_WARPS,
    )  # fmt: skip
    return w
