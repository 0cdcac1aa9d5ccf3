"""Dequantize a compact-format matrix to bf16/fp16 on CUDA (Triton), for prefill.

Prefill runs many tokens through each expert, so it pays to expand the packed
weights once into a reusable workspace and hand the product to cuBLAS. One
program reads a [BLOCK_N, BLOCK_P] tile of packed bytes and writes the
``8 // b`` contiguous column tiles it encodes (see `triton_gemv` for the
geometry). The arithmetic is the reference's: ``(code - zero) * scale`` in fp32.

`dequantize_rows` expands a block of rows [r0, r1) only (`chunking.row_range`
gives its tensor views), so prefill can bound its workspace; the kernel then
offsets group indices by ``G0``, where the block starts inside its first meta run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.compact import QuantSpec
from .chunking import row_range
from .triton_gemv import NUM_WARPS, _geometry, block_p


@triton.jit
def _dequant_kernel(
    q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr, N, K, P, P1, G, G0, stride_q,
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
        m = ((gidx + G0) // 128) * 4  # G0: where a row block starts inside its first meta run
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


def _expand(t: dict[str, torch.Tensor], spec: QuantSpec, g0: int, w: torch.Tensor) -> None:
    """Dequantize the [spec.out_features, in] block whose tensors are `t` into w (contiguous)."""
    n, k = spec.out_features, spec.in_features
    P, P1, G, stride_q = _geometry(spec)
    bp = block_p(spec, widest=spec.group_size)  # each tile inside one group
    bn = 64
    grid = (triton.cdiv(n, bn), P // bp)
    _dequant_kernel[grid](
        t["q"], t["scale_q"], t["zero_q"], t["meta"], w, n, k, P, P1, G, g0, stride_q,
        BITS=spec.bits, GROUP=spec.group_size, BLOCK_N=bn, BLOCK_P=bp, num_warps=NUM_WARPS,
    )  # fmt: skip


def dequantize(
    t: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W [out, in] in `dtype`, written into `out` (a flat workspace of at least out*in) if given."""
    n, k = spec.out_features, spec.in_features
    w = torch.empty(n, k, dtype=dtype, device=t["q"].device) if out is None else out[: n * k].view(n, k)
    _expand(t, spec, 0, w)
    return w


def dequantize_rows(
    t: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype, r0: int, r1: int, out: torch.Tensor
) -> None:
    """Rows [r0, r1) of W into `out`, a contiguous [r1 - r0, in] tensor of `dtype`
    (a `chunking.DequantRows`)."""
    views, block, g0 = row_range(t, spec, r0, r1)
    if out.dtype != dtype or tuple(out.shape) != (r1 - r0, spec.in_features) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{r1 - r0}, {spec.in_features}] {dtype} tensor")
    _expand(views, block, g0, out)
