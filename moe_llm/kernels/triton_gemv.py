"""Launches of the exact int8 dequant-GEMV (`gemv_i8`, Gluon) for the dense matrices of a
decoded token, and the activation quantizer every int8 GEMV starts from.

`gemv` and `linear` quantize x to int8 per block of 32 columns (`quantize_activations`) and
run `gemv_i8._qgemv_i8_kernel`: one program owns ``INT8_BLOCK_N`` output rows and walks their
packed bytes in tiles of ``INT8_BLOCK_P`` bytes. Thanks to the strided packing (see
`quant.packing`), a byte tile at packed column ``p0`` holds ``8 // b`` contiguous column
tiles ``j * P + p0 + [0, BLOCK_P)``; packed weights are read once, in contiguous tiles, and
never written back dequantized.

The routed experts of a decode step go through `triton_moe`, which runs the same int8 row loop
(`gemv_i8._rows_i8`) on experts found through the cache's table and sums their K-partials
(`combine`); q, k and v of a token share one launch (`triton_group`).

The arithmetic is exact and the same as the CPU kernel's (`experts/cpu/moe_cpu.c`, whose header
gives the formula): per block of 32 columns one rounded float32 product per term, rounded to
an integer (block scales are kept times 2^32), the integers summed in float64, which no
order of summation changes. Every add that follows a multiply goes through
`triton_exact._add_rn` (PTX with an explicit rounding mode, which the compiler never fuses
into an FMA), so a GPU and a CPU computing one expert, or each computing a share of it, give
the same bits.
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..quant.compact import META_GROUP, QuantSpec
from ..quant.packing import packed_cols
from .gemv_i8 import _qgemv_i8_kernel, tile_layout

NUM_WARPS = 4  # of the prefill dequantize kernel (`triton_dequant`)
MAX_BLOCK_P = 256  # default widest byte tile (the dequantize kernel, `supported_spec`)


def block_p(spec: QuantSpec, widest: int | None = None) -> int:
    """Packed-byte tile width: the widest power of two up to `widest` (default
    MAX_BLOCK_P) that divides every packed plane. With power-of-two groups, a
    column tile then either lies inside one group or covers whole groups."""
    main = packed_cols(spec.in_features, 4 if spec.bits == 4 else 2)
    b = gcd(widest or MAX_BLOCK_P, main)
    if spec.bits == 3:
        b = gcd(b, packed_cols(spec.in_features, 1))
    return b


def supported_spec(spec: QuantSpec) -> bool:
    b, g = block_p(spec), spec.group_size
    pow2 = (b & (b - 1)) == 0 and (g & (g - 1)) == 0
    return spec.bits in (2, 3, 4) and b >= 8 and pow2


@triton.jit
def _quant_kernel(x_ptr, x_stride, xq_ptr, dx_ptr, xs_ptr, K, QB: tl.constexpr, BLOCK: tl.constexpr):
    """Row r = program_id(1) of x [R, K] -> int8 activations packed four to an int32 word
    (xq [R, K/4]), a scale per block of QB columns times 2^32 (dx [R, K/QB]: x ~ dx * xq / 2^32)
    and the block sums of the quantized x times their scale (xs [R, K/QB])."""
    r = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + r * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    xb = tl.reshape(x, (BLOCK // QB, QB))
    amax = tl.max(tl.abs(xb), axis=1)  # [BLOCK/QB]
    c127 = tl.zeros_like(amax) + 127.0
    dx = libdevice.div_rn(amax, c127) * 4294967296.0  # times 2^32, as the CPU kernel keeps it
    inv = tl.where(amax > 0, libdevice.div_rn(c127, amax), 0.0)
    qf = libdevice.rint(xb * inv[:, None])  # round half to even, as the CPU kernel's nearbyintf
    qv = tl.reshape(qf.to(tl.int32) & 0xFF, (BLOCK // 4, 4))
    shifts = tl.arange(0, 4) * 8
    words = tl.sum(qv << shifts[None, :], axis=1)  # [BLOCK/4]
    nw = K // 4
    w_offs = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    tl.store(xq_ptr + r * nw + w_offs, words, mask=w_offs < nw)
    nb = K // QB
    b_offs = tl.program_id(0) * (BLOCK // QB) + tl.arange(0, BLOCK // QB)
    tl.store(dx_ptr + r * nb + b_offs, dx, mask=b_offs < nb)
    # sums of the quantized x: the zero-point term then carries the same x as the code term
    # (as in the CPU kernel), so both roads compute one expert alike
    tl.store(xs_ptr + r * nb + b_offs, tl.sum(qf, axis=1) * dx, mask=b_offs < nb)


def row_meta(spec: QuantSpec, bp: int) -> bool:
    """Whether a tile's groups of one row always share one meta run (see triton_tiles._group_scales)."""
    ng = max(1, bp // spec.group_size)
    return (spec.in_features // spec.group_size) % ng == 0


def activation_block(spec: QuantSpec, bp: int) -> int:
    """Columns per int8 activation scale for a GEMV over `spec` with byte tiles of `bp`."""
    return min(32, spec.group_size, bp)


def quantize_activations(x: torch.Tensor, qb: int, xq: torch.Tensor, dx: torch.Tensor, xs: torch.Tensor) -> None:
    """x [R, K] -> xq int32 [R, K/4] (int8 x4), dx and xs float32 [R, K/qb] (see _quant_kernel)."""
    rows, k = x.shape
    block = max(qb, min(1024, triton.next_power_of_2(k)))
    _quant_kernel[(triton.cdiv(k, block), rows)](x, x.stride(0), xq, dx, xs, k, QB=qb, BLOCK=block)


def _geometry(spec: QuantSpec) -> tuple[int, int, int, int]:
    """(P, P1, G, stride_q): main-plane bytes, 1-bit-plane bytes, groups per row, row stride."""
    K = spec.in_features
    if spec.bits == 3:
        P, P1 = packed_cols(K, 2), packed_cols(K, 1)
    else:
        P, P1 = packed_cols(K, spec.bits), 1
    return P, P1, K // spec.group_size, packed_cols(K, spec.bits)


# One-token dense GEMVs take int8 activations (`gemv_i8`), swept on an H200 (4-bit Mixtral shapes,
# benchmarks/results/h200-dense-gemv-gluon.log): 4 rows a program, 1 KB byte tiles and 2 warps
# read q+k+v as one launch in 6.9 us (1.95 TB/s; 10.6 with the earlier 16 x 256-byte int8 tiles,
# 15.2 with float activations), o_proj in 5.9 (11.9 float) and the [32000, 4096] LM head in 22.3
# (3.1 TB/s).
INT8_BLOCK_N = 4
INT8_BLOCK_P = 1024
INT8_WARPS = 2


@lru_cache(maxsize=256)
def _launch(
    spec: QuantSpec, glu: bool, split: int, bn: int | None = None
) -> tuple[tuple[int, int], tuple[int, ...], dict]:
    """(grid, int args, constexprs) of one int8 GEMV over `spec` (`gemv_i8`; bn: rows per
    program, default `INT8_BLOCK_N`) with `split` K-splits; computed once per shape."""
    P, P1, G, stride_q = _geometry(spec)
    n = spec.out_features // 2 if glu else spec.out_features
    bp = block_p(spec, INT8_BLOCK_P)
    bn = bn or INT8_BLOCK_N
    qb = activation_block(spec, bp)
    iters = triton.cdiv(P // bp, split)  # byte tiles per split
    p_split = iters * bp
    consts = dict(BITS=spec.bits, GROUP=spec.group_size, BLOCK_N=bn, BLOCK_P=bp, GLU=glu, ROW_META=row_meta(spec, bp),
                  QB=qb, L3=tile_layout(bn, bp // qb, qb // 4, INT8_WARPS), num_warps=INT8_WARPS)  # fmt: skip
    return (triton.cdiv(n, bn), split), (n, P, P1, G, stride_q, p_split, n), consts


def gemv(
    x: torch.Tensor, t: dict[str, torch.Tensor], spec: QuantSpec, out: torch.Tensor, glu: bool = False,
    split: int = 1, quant: tuple | None = None, bn: int | None = None,
) -> None:  # fmt: skip
    """x: [K] or [R, K] -> out: [R, split, N] (partials) or [R, N] when the split is 1 (R = 1 may
    be left out), the exact int8 product (`gemv_i8`). With ``glu`` the matrix is [2N, K] and
    ``out`` receives silu(gate) * up. `quant` = (xq, dx, xs) from `_quantized` saves quantizing
    x again (x is then not read). Each row is computed as it would be alone."""
    grid, args, consts = _launch(spec, glu, split, bn)
    rows = x.numel() // spec.in_features
    xq, dx, xs = quant if quant is not None else _quantized(x.reshape(rows, spec.in_features), spec)
    meta = t["meta"] if t["meta"].data_ptr() % 16 == 0 else t["meta"].clone()  # read 16 bytes at a time
    _qgemv_i8_kernel[(*grid, rows)](
        xq, dx, xs, t["q"], t["scale_q"], t["zero_q"], meta, out, *args, xq.stride(0), dx.stride(0),
        out.numel() // rows, **consts,
    )  # fmt: skip


def _quantized(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] (or [K]) as int8 activations for a GEMV over `spec` (`quantize_activations`)."""
    k, qb = spec.in_features, activation_block(spec, block_p(spec, INT8_BLOCK_P))
    rows = x.numel() // k
    xq = torch.empty(rows, k // 4, dtype=torch.int32, device=x.device)
    dx = torch.empty(rows, k // qb, dtype=torch.float32, device=x.device)
    xs = torch.empty(rows, k // qb, dtype=torch.float32, device=x.device)
    quantize_activations(x.reshape(rows, k), qb, xq, dx, xs)
    return xq, dx, xs


def linear(x: torch.Tensor, t: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """y = x @ W.T for decoded positions (x: [..., K], each row computed as alone) through the
    int8 GEMV (`gemv_i8`), one launch, no K-split."""
    lead = x.shape[:-1]
    n = spec.out_features
    rows = x.numel() // spec.in_features
    out = torch.empty(rows, n, dtype=dtype, device=x.device)
    flat = x.reshape(rows, spec.in_features).contiguous()
    gemv(flat, t, spec, out)
    return out.view(*lead, n)


assert META_GROUP == 128, "the kernels hard-code runs of 128 groups per (min, step) pair"
