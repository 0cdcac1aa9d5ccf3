"""The exact int8 GEMV row loop for one decoded token, in Gluon (Triton with explicit layouts).

Rows of a compact matrix times int8 activations (`triton_gemv.quantize_activations`), with the
arithmetic of the CPU kernel (`experts/cpu/moe_cpu.c`, whose header gives the formula): per
block of QB columns rint(isum * (s * dx)) - rint((s * z) * xs), summed in float64 (exact
integers, so the order of the sum never changes a bit).

Why Gluon: the strided packing puts block b of every plane of a row in the same QB packed
bytes, QB / 4 int32 words. Here a block of 8 words lies on two neighbouring lanes, 16 bytes
each (layout `tile_layout`): one 16-byte load of a warp reads 512 contiguous bytes, each L1
sector once. Each lane forms a plane's codes with one mask (no shift: the dot product is then
2^(bits * j) times the true one, and an exact shift undoes it) and sums its half-block's
`dp4a` products in one chain; the pair meets with one shuffle, then shares the rows out
(`_epilogue_layout`) to finish each block once (scales, roundings, the float64 add), keeping
one float64 partial per (row, block) until the end of the row. The matrix shapes are
constants of the kernels, so the loads of every plane take immediate offsets.

History on an H200, a 2-bit layer of two experts: plain Triton (each block split over two
threads, every plane's products moved through shared memory) 67 us; one thread a block (two
16-byte loads 16 bytes apart, each touching every sector of 512 bytes for half its bytes: the
L1 at 81% of its throughput, 12 cycles an instruction waiting on it) 53 us; two lanes a block
49 us.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import constexpr_function
from triton.experimental.gluon import language as gl
from triton.language.extra import libdevice

from .triton_exact import _add_rn, _silu_det
from .triton_moe_rows import _gpu_limit

_MAGIC_I = gl.constexpr(0x4B400000)  # the bits of 1.5 * 2^23: bits(M) + i is M + i for |i| < 2^22
_MAGIC_F = gl.constexpr(12582912.0)
_MAGIC_U8 = gl.constexpr(0x4B000000)  # the bits of 2^23: bits(2^23) | b is 2^23 + b for 0 <= b < 2^23
_MAGIC_U8_F = gl.constexpr(8388608.0)


def tile_layout(rows: int, blocks: int, words: int, num_warps: int) -> gl.BlockedLayout:
    """The layout of a tile of `rows` rows x `blocks` blocks x `words` int32 words: a block of 8
    words lies on two neighbouring lanes, 16 bytes each, so one 16-byte load of a warp reads 512
    contiguous bytes (each sector once). The lanes walk a row's blocks first, then rows. Warps
    take rows while each thread keeps two (which the epilogue shares out between the two lanes
    of a block, `_epilogue_layout`), then blocks; warps the blocks cannot use take rows after
    all. Thread or warp counts that the tile cannot use are given to rows as repeats."""
    h = 2 if words >= 8 else 1
    tb = min(32 // h, blocks)
    tr = 32 // (h * tb)
    wr = min(num_warps, max(1, rows // (2 * tr)))  # warps take rows while each thread keeps two
    wb = min(num_warps // wr, max(1, blocks // tb))
    wr = num_warps // wb
    spt_r = max(1, rows // (tr * wr))
    return gl.BlockedLayout([spt_r, 1, words // h], [tr, tb, h], [wr, wb, 1], [2, 1, 0])


@constexpr_function
def _words_per_thread(l3):
    return l3.size_per_thread[2]


@constexpr_function
def _epilogue_layout(l3):
    """The [rows, blocks] layout the per-block epilogue runs in. After the sum over a block's two
    half-blocks both lanes of the pair hold the block's sums for all of the thread's rows; where
    the rows allow, the pair splits them (lane bit 0 becomes a row bit: no data moves), so each
    block of each row is finished once. Otherwise both lanes finish it (the slice of the tile)."""
    spt, tpw, wpc = l3.size_per_thread, l3.threads_per_warp, l3.warps_per_cta
    if tpw[2] == 2 and tpw[0] == 1 and spt[0] % 2 == 0 and (wpc[0] == 1 or wpc[1] == 1):
        return gl.BlockedLayout([spt[0] // 2, 1], [2, tpw[1]], [wpc[0], wpc[1]], [0, 1])
    return gl.SliceLayout(2, l3)


@constexpr_function
def _lane_mask(lane, shift):
    """lane << shift as an int32 constant (two's complement)."""
    m = (lane << shift) & 0xFFFFFFFF
    return m - (1 << 32) if m >= 1 << 31 else m


@constexpr_function
def _log2(n):
    return n.bit_length() - 1


@gluon.jit
def _u8_float(v):
    """float(v) of uint8 codes, exactly, by bit placement (no conversion instruction)."""
    return (v.to(gl.int32) | _MAGIC_U8).to(gl.float32, bitcast=True) - _MAGIC_U8_F


@constexpr_function
def _dp4a_chain(n):
    """PTX for `pack` = n words of a block: one chain of dp4a into the first output (the others
    are 0, which ptxas folds away in the sum over the words)."""
    lines = [f"dp4a.u32.s32 $0, ${n}, ${2 * n}, 0;"]
    lines += [f"dp4a.u32.s32 $0, ${n + i}, ${2 * n + i}, $0;" for i in range(1, n)]
    lines += [f"mov.b32 ${i}, 0;" for i in range(1, n)]
    return " ".join(lines)


@constexpr_function
def _chain_constraints(n):
    return ",".join(["=r"] * n + ["r"] * (2 * n))


@gluon.jit
def _dot_blocks(codes, xw, SHIFT: gl.constexpr, PACK: gl.constexpr):
    """Per (row, block): the dp4a sum of codes [R, B, W] (unsigned bytes, each code scaled by
    2^SHIFT) with int8 activations xw [B, W], shifted back (exact: every term is a multiple).
    A thread holds PACK consecutive words of a block, whose products accumulate in one dp4a chain."""
    x3 = gl.expand_dims(xw, 0) + codes * 0  # broadcast to the codes' shape
    d = gl.inline_asm_elementwise(
        _dp4a_chain(PACK), _chain_constraints(PACK), [codes, x3], dtype=gl.int32, is_pure=True, pack=PACK,
    )  # fmt: skip
    return gl.sum(d, axis=2) >> SHIFT


@gluon.jit
def _block_isum(word, hi_word, hi_sel, xw, j: gl.constexpr, BITS: gl.constexpr, PACK: gl.constexpr):
    """The exact integer dot products [R, B] of plane j's codes with one row's activations."""
    MB: gl.constexpr = 4 if BITS == 4 else 2
    LANE: gl.constexpr = 0x0F0F0F0F if MB == 4 else 0x03030303
    isum = _dot_blocks(word & _lane_mask(LANE, MB * j), xw, MB * j, PACK)
    if BITS == 3:
        # the code's high bit: bit 2j + hi_sel of each byte of the 1-bit plane's words
        hi = _dot_blocks(hi_word & (0x01010101 << (2 * j + hi_sel)), xw, 0, PACK)
        isum += (hi >> (2 * j + hi_sel)) << 2
    return isum


@gluon.jit
def _rows_i8(
    xq_ptr, dx_ptr, xs_ptr, q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr, pid_n, pid_s, N, P: gl.constexpr,
    P1: gl.constexpr, G: gl.constexpr, stride_q: gl.constexpr, p_split, stride_split, p_limit, BITS: gl.constexpr,
    GROUP: gl.constexpr, QB: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_P: gl.constexpr, GLU: gl.constexpr,
    ROW_META: gl.constexpr, L3: gl.constexpr,
):  # fmt: skip
    """out[split, n] = sum_k W[n, k] x[k] over this split's bytes [pid_s * p_split, + p_split)
    (and below p_limit) for the BLOCK_N rows of row block pid_n, as float64 exact sums (times
    2^-32), or with GLU (W is [2N, K]: gate rows, then up rows) silu(gate) * up in float32."""
    S: gl.constexpr = gl.SliceLayout(2, L3)  # [rows, blocks] of the codes' tile
    E: gl.constexpr = _epilogue_layout(L3)  # [rows, blocks] of the epilogue
    PACK: gl.constexpr = _words_per_thread(L3)
    XL: gl.constexpr = gl.SliceLayout(0, L3)  # [blocks, words] of the activations
    W: gl.constexpr = QB // 4
    NB: gl.constexpr = BLOCK_P // QB
    MB: gl.constexpr = 4 if BITS == 4 else 2
    PER: gl.constexpr = 8 // MB
    row0 = pid_n * BLOCK_N
    # rows past N read row N - 1 (never stored): no load masks
    rows_in = gl.minimum(row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, S)), N - 1)
    b = gl.arange(0, NB, layout=gl.SliceLayout(0, S))
    wi = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    # loop-invariant pointers: each tile adds a scalar offset to them
    row_w = gl.expand_dims(gl.expand_dims((rows_in.to(gl.int64) * stride_q) >> 2, 1), 2)  # [R, 1, 1]
    tile_w = gl.expand_dims(gl.expand_dims(b * W, 0), 2) + gl.expand_dims(gl.expand_dims(wi, 0), 1)
    wp = q_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + row_w + tile_w  # [R, B, W] words
    up_words: gl.constexpr = (N * stride_q) >> 2 if GLU else 0  # gate row n's up row is n + N (GLU: N is a constant)
    xp = (
        xq_ptr
        + gl.expand_dims(gl.arange(0, NB, layout=gl.SliceLayout(1, XL)) * W, 1)
        + gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(0, XL)), 0)
    )  # [B, W] activation words
    rows = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, E))
    be = gl.arange(0, NB, layout=gl.SliceLayout(0, E))
    gbase = gl.minimum(rows, N - 1) * G  # [R] first group of each row
    g2 = gl.expand_dims(gbase, 1) + gl.expand_dims((be * QB) >> _log2(GROUP), 0)  # [R, B] group offsets
    sq_t = sq_ptr + g2  # [R, B] each block's scale code at tile 0 of plane 0
    zq_t = zq_ptr + g2
    dx_t = dx_ptr + be  # [B] each block's activation scale at tile 0 of plane 0
    xs_t = xs_ptr + be
    p_start = pid_s * p_split
    p_end = gl.minimum(p_start + p_split, p_limit)  # p_limit <= P: bytes past it are another road's
    acc = gl.zeros([BLOCK_N, NB], gl.float64, layout=E)
    acc_up = gl.zeros([BLOCK_N, NB], gl.float64, layout=E)
    for p0 in range(p_start, p_end, BLOCK_P):
        word = gl.load(wp + (p0 >> 2))
        up = word
        if GLU:
            up = gl.load(wp + (up_words + (p0 >> 2)))
        hi_sel = (p0 >= P1).to(gl.int32)
        hi_word = word
        hi_up = up
        if BITS == 3:
            hi_off = (P + p0 % P1) >> 2
            hi_word = gl.load(wp + hi_off)
            if GLU:
                hi_up = gl.load(wp + (up_words + hi_off))
        # per-tile pointers; each plane j adds a constant (its columns start at j * P), so the
        # plane loads take immediate offsets (P is a multiple of the tile, hence of QB)
        xw_p = xp + (p0 >> 2)
        dx_p = dx_t + (p0 >> _log2(QB))
        xs_p = xs_t + (p0 >> _log2(QB))
        g_tile = p0 >> _log2(GROUP)
        for j in gl.static_range(PER):
            xw = gl.load(xw_p + (j * P) // 4)  # [B, W] four int8 activations a word
            dx = gl.expand_dims(gl.load(dx_p + (j * P) // QB), 0)
            xs = gl.expand_dims(gl.load(xs_p + (j * P) // QB), 0)
            g0 = _plane_group(g_tile, p0, j * P, GROUP)
            isum = gl.convert_layout(_block_isum(word, hi_word, hi_sel, xw, j, BITS, PACK), E)
            acc += _block_terms(isum, sq_t + g0, zq_t + g0, g2 + g0, gbase + g0, dx, xs, meta_ptr, ROW_META)
            if GLU:
                gu = g0 + N * G  # the up rows' groups
                isum = gl.convert_layout(_block_isum(up, hi_up, hi_sel, xw, j, BITS, PACK), E)
                acc_up += _block_terms(isum, sq_t + gu, zq_t + gu, g2 + gu, gbase + gu, dx, xs, meta_ptr, ROW_META)
    y = gl.sum(acc, axis=1) * 2.3283064365386963e-10  # 2^-32: exact
    if GLU:
        y_up = gl.sum(acc_up, axis=1) * 2.3283064365386963e-10
        y = _silu_det(y.to(gl.float32)) * y_up.to(gl.float32)
    gl.store(out_ptr + pid_s * stride_split + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)


@gluon.jit
def _load4(ptr):
    """The four float32 at each of `ptr` (16-byte aligned: a meta run's min and step of the scales
    and of the zeros) with one 16-byte load."""
    return gl.inline_asm_elementwise(
        "ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,l", [ptr.to(gl.int64, bitcast=True)],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1,
    )  # fmt: skip


@gluon.jit
def _plane_group(g_tile, p0, c: gl.constexpr, GROUP: gl.constexpr):
    """The group of column c + p0 (p0 a tile start, g_tile = p0 // GROUP): a constant offset from
    g_tile when c starts a group."""
    if c % GROUP == 0:
        g = g_tile + c // GROUP
    else:
        g = (p0 + c) >> _log2(GROUP)
    return g


@gluon.jit
def _block_terms(isum, sqp, zqp, gidx, g_first, dx, xs, meta_ptr, ROW_META: gl.constexpr):
    """rint(isum * (s * dx)) - rint((s * z) * xs) in float64 [R, B] (sqp, zqp: each block's
    scale and zero codes, gidx: each block's group, g_first [R]: each row's first group of the
    tile): s and z expanded from their 8-bit codes with the float32 (min, step) of their run of
    128 groups, as the CPU does."""
    if ROW_META:  # the tile's groups of a row share one run
        m = gl.expand_dims((g_first >> 7) << 2, 1)
    else:
        m = (gidx >> 7) << 2
    s_min, s_step, z_min, z_step = _load4(meta_ptr + m)
    scale = _add_rn(_u8_float(gl.load(sqp)) * s_step, s_min)
    zero = _add_rn(_u8_float(gl.load(zqp)) * z_step, z_min)
    f = (isum + _MAGIC_I).to(gl.float32, bitcast=True) - _MAGIC_F  # float(isum), exactly
    p = libdevice.rint(f * (scale * dx))
    q = libdevice.rint((scale * zero) * xs)
    return p.to(gl.float64) - q.to(gl.float64)


@gluon.jit
def _moe_gemv_i8_kernel(
    xq_ptr, x_stride, dx_ptr, xs_ptr, s_stride, idx_ptr, table_ptr, base_ptr, out_ptr, out_stride, N: gl.constexpr,
    P: gl.constexpr, P1: gl.constexpr, G: gl.constexpr, stride_q: gl.constexpr, p_split, stride_split, pcut_ptr, PD,
    CPU: gl.constexpr,
    OFF_Q: gl.constexpr, OFF_SQ: gl.constexpr, OFF_ZQ: gl.constexpr, OFF_META: gl.constexpr,
    BITS: gl.constexpr, GROUP: gl.constexpr, QB: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_P: gl.constexpr,
    GLU: gl.constexpr, ROW_META: gl.constexpr, L3: gl.constexpr,
):  # fmt: skip
    """`triton_moe`'s routed-experts GEMV: routed position j = program_id(1) reads expert
    top_k_index[j] through its table entry (a GPU slot or pinned host memory)."""
    pid_e = gl.program_id(1)
    e = gl.load(idx_ptr + pid_e)
    off = gl.multiple_of(gl.load(table_ptr + e), 64)
    q_ptr = base_ptr + off + OFF_Q
    meta_ptr = (base_ptr + off + OFF_META).to(gl.pointer_type(gl.float32), bitcast=True)
    p_limit = _gpu_limit(pcut_ptr, pid_e, gl.program_id(0) * BLOCK_N, P, PD, CPU, GLU)
    _rows_i8(
        xq_ptr + pid_e * x_stride, dx_ptr + pid_e * s_stride, xs_ptr + pid_e * s_stride, q_ptr, base_ptr + off + OFF_SQ,
        base_ptr + off + OFF_ZQ, meta_ptr, out_ptr + pid_e * out_stride, gl.program_id(0), gl.program_id(2), N, P, P1,
        G, stride_q, p_split, stride_split, p_limit, BITS, GROUP, QB, BLOCK_N, BLOCK_P, GLU, ROW_META, L3,
    )  # fmt: skip


@gluon.jit
def _qgemv_i8_kernel(
    xq_ptr, dx_ptr, xs_ptr, q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr, N: gl.constexpr, P: gl.constexpr,
    P1: gl.constexpr, G: gl.constexpr, stride_q: gl.constexpr, p_split, stride_split, x_stride, s_stride, out_stride,
    BITS: gl.constexpr, GROUP: gl.constexpr, QB: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_P: gl.constexpr, GLU: gl.constexpr, ROW_META: gl.constexpr, L3: gl.constexpr,
):  # fmt: skip
    """One matrix whose tensors are passed as pointers (attention, the LM head, tests): input row
    program_id(2) (strides x_stride, s_stride; out_stride) runs the same code as a lone row."""
    r = gl.program_id(2).to(gl.int64)
    _rows_i8(
        xq_ptr + r * x_stride, dx_ptr + r * s_stride, xs_ptr + r * s_stride, q_ptr, sq_ptr, zq_ptr, meta_ptr,
        out_ptr + r * out_stride, gl.program_id(0), gl.program_id(1), N, P, P1, G, stride_q, p_split, stride_split, P,
        BITS, GROUP, QB, BLOCK_N, BLOCK_P, GLU, ROW_META, L3,
    )  # fmt: skip


@gluon.jit
def _group_gemv_i8_kernel(
    xq_ptr, dx_ptr, xs_ptr, base_ptr, table_ptr, start_ptr, rows_ptr, out_ptr, P: gl.constexpr, P1: gl.constexpr,
    G: gl.constexpr, stride_q: gl.constexpr, p_split, x_stride, s_stride, out_stride, BITS: gl.constexpr,
    GROUP: gl.constexpr, QB: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_P: gl.constexpr, ROW_META: gl.constexpr, L3: gl.constexpr, MP: gl.constexpr,
    L1: gl.constexpr,
):  # fmt: skip
    """Several matrices of one shape of row (the projections of one input: q, k and v) in one
    launch (`triton_group.GemvGroup`): row block program_id(0) belongs to member m, the last whose
    first block start[m] it reaches; the member's four tensors lie at the int64 byte offsets
    table[4m:4m+4] from base_ptr (every tensor starts on a 16-byte boundary), its rows[m] output
    rows at row offset rows[MP + m]. Input row program_id(1) runs the same code as a lone row."""
    blk = gl.program_id(0)
    r = gl.program_id(1).to(gl.int64)
    starts = gl.load(start_ptr + gl.arange(0, MP, layout=L1))  # [MP] first row block of each member, padded high
    m = gl.sum((starts <= blk).to(gl.int32), axis=0) - 1
    first = gl.load(start_ptr + m)
    n = gl.load(rows_ptr + m)
    out_row = gl.load(rows_ptr + MP + m)
    q_ptr = base_ptr + gl.multiple_of(gl.load(table_ptr + 4 * m), 16)
    sq_ptr = base_ptr + gl.multiple_of(gl.load(table_ptr + 4 * m + 1), 16)
    zq_ptr = base_ptr + gl.multiple_of(gl.load(table_ptr + 4 * m + 2), 16)
    meta_ptr = (base_ptr + gl.multiple_of(gl.load(table_ptr + 4 * m + 3), 16)).to(
        gl.pointer_type(gl.float32), bitcast=True
    )
    _rows_i8(
        xq_ptr + r * x_stride, dx_ptr + r * s_stride, xs_ptr + r * s_stride, q_ptr, sq_ptr, zq_ptr, meta_ptr,
        out_ptr + r * out_stride + out_row, blk - first, 0, n, P, P1, G, stride_q, p_split, 0, P, BITS, GROUP, QB,
        BLOCK_N, BLOCK_P, False, ROW_META, L3,
    )  # fmt: skip
