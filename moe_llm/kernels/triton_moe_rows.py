"""Routed experts of B decoded rows (`kernels.rows`), each expert's weights read once for all
the rows that route to it.

The B * k routed positions are sorted by expert (`MoeDecode.rows`). Positions that route to
one expert form a group; the first position of each run of up to RB in a group leads it
(`_groups_kernel` writes each position's count: the rows it leads, or 0). A leader's
program reads each weight tile once, from its slot or over the link for a miss, and
computes it against each of its rows' int8 activations. The int8 sums are exact integers
(`triton_tiles._block_sums_i8`), so a row gets the bits of its lone `MoeDecode` call however
the rows are grouped; the batch reads each expert once, not once per row. With a CPU share
(`experts.split`) a leader reads only the GPU's part of a missed expert (its cut, which every
position of one expert shares: the cut depends on the layer's miss count only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_exact import _silu_det
from .triton_tiles import _block_sums_i8, _group_scales, _plane_codes, _tile_words

MAX_GROUP = 4  # rows one program computes (a larger group takes more programs, each reading the expert)


@triton.jit
def _groups_kernel(idx_ptr, cnt_ptr, N, RB: tl.constexpr, NP: tl.constexpr):
    """idx [N] sorted expert ids -> cnt [N]: at the first position of each run of RB positions
    of one expert, the run's length; 0 elsewhere."""
    i = tl.arange(0, NP)
    live = i < N
    e = tl.load(idx_ptr + i, mask=live, other=-1)
    same = (e[:, None] == e[None, :]) & live[None, :]
    start = tl.min(tl.where(same, i[None, :], NP), axis=1)
    end = tl.max(tl.where(same, i[None, :] + 1, 0), axis=1)
    cnt = tl.where((i - start) % RB == 0, tl.minimum(end - i, RB), 0)
    tl.store(cnt_ptr + i, cnt.to(tl.int32), mask=live)


@triton.jit
def _gpu_limit(pcut_ptr, pos, row0, P, PD, CPU: tl.constexpr, GLU: tl.constexpr):
    """Bytes of each weight row the GPU reads for routed position `pos` in a program whose
    output rows start at `row0`: all P, or with a CPU share (`experts.split`: the CPU computes
    intermediate neurons i % PD >= pcut[pos]) gate_up row blocks on the GPU's side whole and
    the others not at all, and down's bytes [0, pcut) only."""
    limit = P
    if CPU:
        cut = tl.load(pcut_ptr + pos)
        if GLU:
            limit = tl.where(row0 % PD < cut, P, 0)
        else:
            limit = tl.minimum(cut, P)
    return limit


@triton.jit
def _tile_rows_i8(
    xq_ptr, dx_ptr, xs_ptr, x_stride, s_stride, cnt, q_ptr, sq_ptr, zq_ptr, meta_ptr, row_off, gbase, mask, p0,
    P, P1, RB: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, ROW_META: tl.constexpr,
):  # fmt: skip
    """The exact int8 tile product (`gemv_i8`'s arithmetic) for the `cnt` (<= RB) consecutive input rows of one expert:
    the weight tile and its scales are loaded once. Returns [RB, BLOCK_N] float64 sums (0 for
    rows past cnt)."""
    MB: tl.constexpr = 4 if BITS == 4 else 2
    PER: tl.constexpr = 8 // MB
    SUB: tl.constexpr = GROUP if GROUP < BLOCK_P else BLOCK_P
    QB: tl.constexpr = SUB if SUB < 32 else 32
    NQ: tl.constexpr = BLOCK_P // QB
    offs_w = tl.arange(0, BLOCK_P // 4)
    which = tl.arange(0, RB)
    word, hi_word, hi_sel = _tile_words(q_ptr, row_off, mask, p0, P, P1, BITS, BLOCK_P)
    acc = tl.zeros([RB, BLOCK_N], dtype=tl.float64)
    for j in tl.static_range(PER):
        col0 = j * P + p0
        blk = col0 // QB + tl.arange(0, NQ)
        codes = _plane_codes(word, hi_word, hi_sel, j, BITS)
        scale, zero = _group_scales(sq_ptr, zq_ptr, meta_ptr, gbase, col0, mask, NQ, QB, GROUP, ROW_META)
        for r in tl.static_range(RB):
            if r < cnt:
                xw = tl.load(xq_ptr + r * x_stride + col0 // 4 + offs_w)
                dx = tl.load(dx_ptr + r * s_stride + blk)
                xs = tl.load(xs_ptr + r * s_stride + blk)
                part = tl.sum(_block_sums_i8(codes, xw, dx, xs, scale, zero, BLOCK_N, NQ, QB), axis=1)
                acc = tl.where(which[:, None] == r, acc + part[None, :], acc)
    return acc


@triton.jit
def _moe_rows_kernel(
    xq_ptr, x_stride, dx_ptr, xs_ptr, s_stride, idx_ptr, cnt_ptr, table_ptr, base_ptr, out_ptr, out_stride,
    N, P, P1, G, stride_q, p_split, stride_split, pcut_ptr, PD, CPU: tl.constexpr,
    OFF_Q: tl.constexpr, OFF_SQ: tl.constexpr, OFF_ZQ: tl.constexpr, OFF_META: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, GLU: tl.constexpr,
    ROW_META: tl.constexpr, RB: tl.constexpr,
):  # fmt: skip
    """Sorted position j = program_id(1) leads cnt[j] rows (positions j .. j + cnt - 1, all
    routed to expert idx[j]): out[j + r, split, n] as `gemv_i8._rows_i8` computes each
    alone with int8 activations (row j + r of xq, dx, xs), with CPU only the GPU's part of
    each weight row (`_gpu_limit`)."""
    pid_e = tl.program_id(1)
    cnt = tl.load(cnt_ptr + pid_e)
    if cnt > 0:
        e = tl.load(idx_ptr + pid_e)
        off = tl.multiple_of(tl.load(table_ptr + e), 64)  # as `gemv_i8._moe_gemv_i8_kernel`
        q_ptr = base_ptr + off + OFF_Q
        sq_ptr = base_ptr + off + OFF_SQ
        zq_ptr = base_ptr + off + OFF_ZQ
        meta_ptr = (base_ptr + off + OFF_META).to(tl.pointer_type(tl.float32), bitcast=True)
        xq_ptr += pid_e * x_stride
        dx_ptr += pid_e * s_stride
        xs_ptr += pid_e * s_stride
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        row_off = rows.to(tl.int64) * stride_q
        up_off = (rows + N).to(tl.int64) * stride_q
        p_start = tl.program_id(2) * p_split
        p_end = tl.minimum(p_start + p_split, _gpu_limit(pcut_ptr, pid_e, tl.program_id(0) * BLOCK_N, P, PD, CPU, GLU))
        acc = tl.zeros([RB, BLOCK_N], dtype=tl.float64)
        acc_up = tl.zeros([RB, BLOCK_N], dtype=tl.float64)
        for p0 in range(p_start, p_end, BLOCK_P):
            acc += _tile_rows_i8(
                xq_ptr, dx_ptr, xs_ptr, x_stride, s_stride, cnt, q_ptr, sq_ptr, zq_ptr, meta_ptr, row_off,
                rows * G, row_mask, p0, P, P1, RB, BITS, GROUP, BLOCK_N, BLOCK_P, ROW_META,
            )  # fmt: skip
            if GLU:
                acc_up += _tile_rows_i8(
                    xq_ptr, dx_ptr, xs_ptr, x_stride, s_stride, cnt, q_ptr, sq_ptr, zq_ptr, meta_ptr, up_off,
                    (rows + N) * G, row_mask, p0, P, P1, RB, BITS, GROUP, BLOCK_N, BLOCK_P, ROW_META,
                )  # fmt: skip
        acc = acc * 2.3283064365386963e-10  # 2^-32: exact
        acc_up = acc_up * 2.3283064365386963e-10
        if GLU:
            acc = _silu_det(acc.to(tl.float32)) * acc_up.to(tl.float32)
        which = tl.arange(0, RB)
        dst = out_ptr + (pid_e + which)[:, None].to(tl.int64) * out_stride + tl.program_id(2) * stride_split
        store_mask = (which < cnt)[:, None] & row_mask[None, :]
        tl.store(dst + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=store_mask)


def group_counts(sorted_idx: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """(cnt [n] int32, RB): how many of the sorted positions from each one its program computes."""
    n = sorted_idx.numel()
    rb = min(triton.next_power_of_2(rows), MAX_GROUP)
    cnt = torch.empty(n, dtype=torch.int32, device=sorted_idx.device)
    _groups_kernel[(1,)](sorted_idx, cnt, n, RB=rb, NP=triton.next_power_of_2(n))
    return cnt, rb


def rows_gemv(launch, quant, sorted_idx, cnt, rb, table_row, base, out, cuts=None) -> None:
    """One routed-experts GEMV (`triton_moe._launch`) over sorted positions with int8 activations
    `quant` (xq, dx, sums, qb; one row per position, already quantized), grouped by `cnt`.
    `cuts`: (int32 cut of each sorted position, PD) when the CPU computes a share of misses."""
    grid, args, consts, _, _ = launch
    xq, dx, sums, _ = quant
    consts = {k: v for k, v in consts.items() if k not in ("QB", "L3")}  # the lone-token kernel's
    pcut, pd = cuts if cuts is not None else (cnt, 0)
    _moe_rows_kernel[(grid[0], sorted_idx.numel(), grid[2])](
        xq, xq.stride(0), dx, sums, dx.stride(0), sorted_idx, cnt, table_row, base, out, out.stride(0), *args,
        pcut, pd, CPU=cuts is not None, RB=rb, **consts,
    )  # fmt: skip
