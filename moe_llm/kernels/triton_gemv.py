"""Fused dequant-GEMV for the compact format on CUDA (Triton), for decode: the launches of the
dense matrices and the float-activation row loop.

Decoded tokens go through the exact int8 GEMV (`gemv_i8`, Gluon: `gemv` with `quant`, and
`linear` always); the float-activation loop below is the near-exact reference of the tests.
One program owns ``BLOCK_N`` output rows and walks the packed bytes of those
rows in tiles of ``BLOCK_P`` bytes (up to 256). Thanks to the strided packing
(see `quant.packing`), a byte tile at packed column ``p0`` holds ``8 // b``
contiguous column tiles ``j * P + p0 + [0, BLOCK_P)``; ``BLOCK_P`` is a power of
two dividing ``P``, so each column tile either lies inside one quantization group
or covers whole groups. Per (row, group) the kernel expands the 8-bit scale/zero
with the float32 (min, step) of its run of 128 groups and accumulates
``scale * (sum(code * x) - zero * sum(x))``: packed weights are read once, in
contiguous tiles, and never written back dequantized.

The routed experts of a decode step go through `triton_moe`, which runs the int8 row loop
(`gemv_i8._rows_i8`) on experts found through the cache's table and sums their K-partials
(`combine`); q, k and v of a token share one launch (`triton_group`).

The float tile dot products live in `triton_tiles`. With int8 activations (`gemv_i8`) the
arithmetic is exact and the same as the CPU kernel's (`experts/cpu/moe_cpu.c`, whose header
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
from .triton_exact import _silu_det
from .triton_tiles import _tile_dot

NUM_WARPS = 4
MAGIC_CODES = True  # codes turned into floats by bit placement, not int->float conversion (see triton_tiles._tile_dot)
MAX_BLOCK_P = 256  # widest byte tile of the float-activation GEMV
_TARGET_PROGRAMS = 8 * 132  # about eight programs per SM of an H100/H200; fine elsewhere too
_MAX_UNROLL = 1


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


@triton.jit
def _gemv_rows(
    x_ptr, q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr, pid_n, pid_s, N, P, P1, G, stride_q, p_split, stride_split,
    p_limit, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    GLU: tl.constexpr, UNROLL: tl.constexpr, MAGIC: tl.constexpr, ROW_META: tl.constexpr,
):  # fmt: skip
    """out[split, n] = sum_k W[n, k] x[k] over this split's K range, for BLOCK_N rows, with float
    activations. With GLU the matrix is [2N, K] (gate rows, then up rows) and out[n] =
    silu(gate) * up. UNROLL byte tiles per trip keep more loads in flight (a GEMV is
    latency-bound otherwise); tiles past the split's end are masked out."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_off = rows.to(tl.int64) * stride_q
    gbase = rows * G
    up_off = (rows + N).to(tl.int64) * stride_q
    up_gbase = (rows + N) * G
    p_start = pid_s * p_split
    p_end = tl.minimum(p_start + p_split, p_limit)  # p_limit <= P: bytes past it are another road's
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P * UNROLL):
        for u in tl.static_range(UNROLL):
            pu = p0 + u * BLOCK_P
            live = pu < p_end
            mask = row_mask & live
            pu = tl.where(live, pu, 0)  # dead tiles read in-bounds bytes and contribute 0
            acc += _tile_dot(
                x_ptr, q_ptr, sq_ptr, zq_ptr, meta_ptr, row_off, gbase, mask, pu, P, P1,
                BITS, GROUP, BLOCK_N, BLOCK_P, MAGIC, ROW_META,
            )  # fmt: skip
            if GLU:
                acc_up += _tile_dot(
                    x_ptr, q_ptr, sq_ptr, zq_ptr, meta_ptr, up_off, up_gbase, mask, pu, P, P1,
                    BITS, GROUP, BLOCK_N, BLOCK_P, MAGIC, ROW_META,
                )  # fmt: skip
    if GLU:
        acc = _silu_det(acc.to(tl.float32)) * acc_up.to(tl.float32)
    tl.store(out_ptr + pid_s * stride_split + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _qgemv_kernel(
    x_ptr, q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr, N, P, P1, G, stride_q, p_split, stride_split, x_stride,
    out_stride, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    GLU: tl.constexpr, UNROLL: tl.constexpr, MAGIC: tl.constexpr, ROW_META: tl.constexpr,
):  # fmt: skip
    """One matrix whose tensors are passed as pointers (attention, the LM head, tests), float
    activations. Input row program_id(2) (strides x_stride; out_stride) runs the same code as a
    lone row."""
    r = tl.program_id(2).to(tl.int64)
    _gemv_rows(
        x_ptr + r * x_stride, q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr + r * out_stride, tl.program_id(0),
        tl.program_id(1), N, P, P1, G, stride_q, p_split, stride_split, P, BITS, GROUP, BLOCK_N, BLOCK_P, GLU, UNROLL,
        MAGIC, ROW_META,
    )  # fmt: skip


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


def split_for(spec: QuantSpec, glu: bool = False) -> int:
    """How many K-splits a GEMV over `spec` uses (1 with the fused GLU)."""
    if glu:
        return 1
    n_blocks = triton.cdiv(spec.out_features, block_n(spec))
    iters = _geometry(spec)[0] // block_p(spec)
    split = 1
    while n_blocks * split * 2 <= _TARGET_PROGRAMS and iters // (split * 2) >= 4:
        split *= 2
    return split


def block_n(spec: QuantSpec, glu: bool = False) -> int:
    """Rows per program: few rows and wide byte tiles keep many programs per SM, each
    streaming long contiguous row segments (swept on an H200: 8 rows for gate_up and
    attention, 16 for the long rows of down_proj)."""
    return 16 if spec.in_features >= 8192 and not glu else 8


# One-token dense GEMVs take int8 activations (`gemv_i8`), swept on an H200 (4-bit Mixtral shapes,
# benchmarks/results/h200-dense-gemv-gluon.log): 4 rows a program, 1 KB byte tiles and 2 warps
# read q+k+v as one launch in 6.9 us (1.95 TB/s; 10.6 with the earlier 16 x 256-byte int8 tiles,
# 15.2 with float activations), o_proj in 5.9 (11.9 float) and the [32000, 4096] LM head in 22.3
# (3.1 TB/s).
INT8_BLOCK_N = 4
INT8_BLOCK_P = 1024
INT8_WARPS = 2


def _unroll(iters: int, limit: int = _MAX_UNROLL) -> int:
    u = 1
    while u * 2 <= min(iters, limit):
        u *= 2
    return u


@lru_cache(maxsize=256)
def _launch(
    spec: QuantSpec, glu: bool, split: int | None, bn: int | None = None, i8: bool = False
) -> tuple[tuple[int, int], tuple[int, ...], dict]:
    """(grid, int args, constexprs) of one GEMV over `spec` (bn: rows per program, default
    `block_n`), with float activations or (`i8`) int8 ones (`gemv_i8`); computed once per shape."""
    P, P1, G, stride_q = _geometry(spec)
    n = spec.out_features // 2 if glu else spec.out_features
    split = split or split_for(spec, glu)
    bp = block_p(spec, INT8_BLOCK_P if i8 else None)
    bn = bn or (INT8_BLOCK_N if i8 else block_n(spec, glu))
    warps = INT8_WARPS if i8 else NUM_WARPS
    iters = triton.cdiv(P // bp, split)  # byte tiles per split
    p_split = iters * bp
    consts = dict(BITS=spec.bits, GROUP=spec.group_size, BLOCK_N=bn, BLOCK_P=bp, GLU=glu, ROW_META=row_meta(spec, bp),
                  num_warps=warps)  # fmt: skip
    if i8:
        qb = activation_block(spec, bp)
        consts.update(QB=qb, L3=tile_layout(bn, bp // qb, qb // 4, warps))
    else:
        consts.update(UNROLL=_unroll(iters), MAGIC=MAGIC_CODES)
    return (triton.cdiv(n, bn), split), (n, P, P1, G, stride_q, p_split, n), consts


def gemv(
    x: torch.Tensor, t: dict[str, torch.Tensor], spec: QuantSpec, out: torch.Tensor, glu: bool = False,
    split: int | None = None, quant: tuple | None = None, bn: int | None = None,
) -> None:  # fmt: skip
    """x: [K] or [R, K] -> out: [R, split, N] (partials) or [R, N] when the split is 1 (default:
    `split_for(spec, glu)`; R = 1 may be left out). With ``glu`` the matrix is [2N, K] and
    ``out`` receives silu(gate) * up. With `quant` = (xq, dx, xs) from `_quantized` the product
    is the exact int8 one (`gemv_i8`) and x is not read. Each row is computed as it would be
    alone."""
    grid, args, consts = _launch(spec, glu, split, bn, quant is not None)
    rows = x.numel() // spec.in_features
    if quant is not None:
        xq, dx, xs = quant
        meta = t["meta"] if t["meta"].data_ptr() % 16 == 0 else t["meta"].clone()  # read 16 bytes at a time
        _qgemv_i8_kernel[(*grid, rows)](
            xq, dx, xs, t["q"], t["scale_q"], t["zero_q"], meta, out, *args, xq.stride(0), dx.stride(0),
            out.numel() // rows, **consts,
        )  # fmt: skip
        return
    _qgemv_kernel[(*grid, rows)](
        x, t["q"], t["scale_q"], t["zero_q"], t["meta"], out, *args, spec.in_features, out.numel() // rows, **consts
    )


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
    gemv(flat, t, spec, out, split=1, quant=_quantized(flat, spec))
    return out.view(*lead, n)


assert META_GROUP == 128, "the kernels hard-code runs of 128 groups per (min, step) pair"
