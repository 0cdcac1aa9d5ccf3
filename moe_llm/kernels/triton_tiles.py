"""The pieces of the exact int8 arithmetic in plain Triton that the batched rows kernel
(`triton_moe_rows`) uses: the group scales, the tile's int32 words, a plane's codes and one
row's block sums (`gemv_i8` is the lone token's Gluon version)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_exact import _add_rn


@triton.jit
def _group_scales(sq_ptr, zq_ptr, meta_ptr, gbase, col0, mask, NB: tl.constexpr, COLS: tl.constexpr,
                  GROUP: tl.constexpr, ROW_META: tl.constexpr):  # fmt: skip
    """(scale, zero) [BLOCK_N, NB] of the groups of the NB runs of COLS columns (COLS divides or
    equals GROUP) from column col0 of each row (flat group index gbase + g): 8-bit codes
    expanded with the float32 (min, step) of their run of 128 groups, with plain float32
    multiplies and adds (as the CPU kernel computes them). The groups of a row are contiguous
    bytes, so the loads vectorise; with ROW_META (groups per row a multiple of the tile's) they
    never straddle two runs, so a row needs one meta entry."""
    gidx = gbase[:, None] + (col0 + tl.arange(0, NB) * COLS)[None, :] // GROUP
    m2 = mask[:, None]
    if ROW_META:
        m = ((gbase + col0 // GROUP) // 128 * 4)[:, None]
    else:
        m = (gidx // 128) * 4
    s_min = tl.load(meta_ptr + m, mask=m2, other=0.0)
    s_step = tl.load(meta_ptr + m + 1, mask=m2, other=0.0)
    z_min = tl.load(meta_ptr + m + 2, mask=m2, other=0.0)
    z_step = tl.load(meta_ptr + m + 3, mask=m2, other=0.0)
    scale = _add_rn(tl.load(sq_ptr + gidx, mask=m2, other=0).to(tl.float32) * s_step, s_min)
    zero = _add_rn(tl.load(zq_ptr + gidx, mask=m2, other=0).to(tl.float32) * z_step, z_min)
    return scale, zero


@triton.jit
def _dp4a(a, b):
    """Per int32 lane: the dot product of four unsigned bytes of `a` (codes) with four signed
    bytes of `b` (int8 activations), one `dp4a` instruction."""
    return tl.inline_asm_elementwise(
        "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, tl.zeros_like(a)], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _tile_words(q_ptr, row_off, mask, p0, P, P1, BITS: tl.constexpr, BLOCK_P: tl.constexpr):
    """The packed bytes [p0, p0 + BLOCK_P) of each row as int32 words [BLOCK_N, BLOCK_P / 4], and
    with 3 bits the words of the 1-bit plane and which of its two bits is this tile's
    (`_plane_codes`); other widths return the words again and 0."""
    offs_w = tl.arange(0, BLOCK_P // 4)
    q32 = q_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    word = tl.load(q32 + (row_off[:, None] + p0) // 4 + offs_w[None, :], mask=mask[:, None], other=0)
    if BITS == 3:
        hi_word = tl.load(q32 + (row_off[:, None] + P + (p0 % P1)) // 4 + offs_w[None, :], mask=mask[:, None], other=0)
        hi_sel = (p0 >= P1).to(tl.int32)
    else:
        hi_word = word
        hi_sel = 0
    return word, hi_word, hi_sel


@triton.jit
def _plane_codes(word, hi_word, hi_sel, j: tl.constexpr, BITS: tl.constexpr):
    """The codes of columns j * P + 4w .. 4w + 3 of each word w, one per byte lane: thanks to the
    strided packing one shift and one mask (and with 3 bits the high bit from the 1-bit plane)."""
    MB: tl.constexpr = 4 if BITS == 4 else 2
    LANE_MASK: tl.constexpr = 0x0F0F0F0F if MB == 4 else 0x03030303
    codes = (word >> (MB * j)) & LANE_MASK
    if BITS == 3:
        codes = codes | (((hi_word >> (2 * j + hi_sel)) & 0x01010101) << 2)
    return codes


@triton.jit
def _block_sums_i8(codes, xw, dx, xs, scale, zero, BLOCK_N: tl.constexpr, NQ: tl.constexpr, QB: tl.constexpr):
    """codes [BLOCK_N, W] times one row's int8 activations xw [W] (four per word), per block of
    QB columns: rint(isum * (s * dx)) - rint((s * z) * xs) in float64 [BLOCK_N, NQ] (exact
    integers, so they add up in any order without rounding)."""
    W: tl.constexpr = NQ * QB // 4
    d = _dp4a(codes, tl.broadcast_to(xw[None, :], (BLOCK_N, W)))  # [BLOCK_N, W]
    isum = tl.sum(tl.reshape(d, (BLOCK_N, NQ, QB // 4)), axis=2)  # [BLOCK_N, NQ] exact
    p = libdevice.rint(isum.to(tl.float32) * (scale * dx[None, :]))
    q = libdevice.rint((scale * zero) * xs[None, :])
    return p.to(tl.float64) - q.to(tl.float64)
