"""Decode attention for one query position, grouped query heads read as one tile (split-K
flash decoding): two launches a layer, and the same bits for a row whatever path decodes it.

transformers' SDPA path for a grouped-query decode step (transformers < 5.2x) repeats every
key/value head for each of its query heads (`repeat_kv`: two copies of the whole window a
layer), turns a bool mask into an additive one (two more launches) and lets SDPA's dispatcher
pick a kernel (cuDNN on an H200) by shapes, strides and addresses. Together that is 1.06 ms of
a 5.24 ms resident Mixtral-8x7B token on the H200 (benchmarks/results/h200-resident-profile-*).
Here:

- `_attention_split_kernel`, grid (rows, key/value heads, splits of SPLIT key positions): the
  REP query heads of a key/value head are the rows of one tile (padded to 16 for `tl.dot`), so
  each key and value is read once; a split's online softmax in float32, a bool mask
  (broadcast over rows and heads, or per head) read in place, keys and values no row may read
  loaded as zeros (whatever stale bytes a static cache holds there);
- `_attention_merge_kernel`, grid (rows, query heads): the splits' partial sums merged one by
  one in split order, where a split with no readable key is skipped.

One binary serves every call of a geometry (head dim, heads per key/value head, dtype): the
window length, the split count, the mask's strides and address and whether there is a mask at
all are runtime values the compiler does not specialise on (Triton compiles a variant per
integer divisible by 16 or equal to 1 and per 16-byte-aligned address, and two variants of the
same source need not round alike: an additive mask's variant gave other bits than a bool one's
on the H200). So a row's bits depend only on its query and the keys it may read: a lone decode
over a window of the static cache under a mask, the same row sliced out of a batch's keys, and
an eager decode over exactly its keys with no mask all give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT = 64  # key positions per program (a 1,024-position window of 8 heads: 128 programs)
BLOCK_K = 64


# every integer that differs between the calls of one geometry, and the mask's address
_RUNTIME = ("W", "smb", "smh", "smn", "has_mask", "S", "HQ")


@triton.jit(do_not_specialize=_RUNTIME, do_not_specialize_on_alignment=("m_ptr",))
def _attention_split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, acc_ptr, ml_ptr, W, scale,
    sqb, sqh, skb, skh, skn, svb, svh, svn, smb, smh, smn, has_mask, S, HQ,
    REP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Row b, key/value head g, keys [s * SPLIT, (s + 1) * SPLIT) of W: for each of the REP
    query heads g * REP + r the split's running max m, sum l and unnormalised output acc, at
    acc[b, head, s, :] and ml[b, head, s, 0:2]. has_mask: 0, every key up to W is read; 1, the
    uint8 mask at m_ptr says which (nonzero: read)."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    r = tl.arange(0, BLOCK_M)
    rmask = r < REP
    heads = g * REP + r
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=rmask[:, None], other=0.0)  # [M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for k0 in tl.static_range(0, SPLIT, BLOCK_K):
        n = s * SPLIT + k0 + tl.arange(0, BLOCK_K)
        live = rmask[:, None] & (n < W)[None, :]  # [M, BLOCK_K]
        # `live & (has_mask != 0)` compiles to the same SASS, but Triton 3.9's interpreter makes
        # that scalar test an int32 mask, which its loads refuse
        use = tl.where(has_mask != 0, live, False)
        mv = tl.load(m_ptr + b * smb + heads[:, None] * smh + n[None, :] * smn, mask=use, other=1)
        live = live & (mv != 0)
        readable = tl.sum(live.to(tl.int32), axis=0) > 0  # [BLOCK_K]: a key some row reads
        k = tl.load(k_ptr + b * skb + g * skh + n[:, None] * skn + d[None, :], mask=readable[:, None], other=0.0)
        v = tl.load(v_ptr + b * svb + g * svh + n[:, None] * svn + d[None, :], mask=readable[:, None], other=0.0)
        qk = tl.where(live, tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [M, BLOCK_K] float32
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    at = (b * HQ + heads) * S + s
    tl.store(acc_ptr + at[:, None] * D + d[None, :], acc, mask=rmask[:, None])
    tl.store(ml_ptr + at * 2, m_i, mask=rmask)
    tl.store(ml_ptr + at * 2 + 1, l_i, mask=rmask)


@triton.jit(do_not_specialize=("S", "HQ"))
def _attention_merge_kernel(acc_ptr, ml_ptr, out_ptr, S, HQ, sob, soh, D: tl.constexpr):
    """out[b, 0, head, :] from the S splits of (b, head), merged one after the other in split
    order. A split with no readable key (m = -inf) is skipped, so the result depends only on
    the keys a row may read: a window padded wider, or cut at the row's last key, gives the
    same bits."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    at = (b * HQ + h) * S
    mx = tl.max(tl.full([2], float("-inf"), tl.float32), axis=0)  # float32 scalars
    den = tl.sum(tl.zeros([2], tl.float32), axis=0)
    num = tl.zeros([D], tl.float32)
    s = 0
    while s < S:  # (a while loop: Triton's interpreter cannot range over a runtime integer)
        m = tl.load(ml_ptr + (at + s) * 2)
        l = tl.load(ml_ptr + (at + s) * 2 + 1)  # noqa: E741
        acc = tl.load(acc_ptr + (at + s) * D + d)
        some = m > float("-inf")
        m_new = tl.maximum(mx, m)
        c_old = tl.exp(mx - m_new)  # mx = -inf before the first readable split: 0
        c_new = tl.exp(m - m_new)
        num = tl.where(some, num * c_old + acc * c_new, num)
        den = tl.where(some, den * c_old + l * c_new, den)
        mx = tl.where(some, m_new, mx)
        s += 1
    tl.store(out_ptr + b * sob + h * soh + d, (num / den).to(out_ptr.dtype.element_ty))


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention` takes these: CUDA, one query position, query [B, Hq, 1, D]
    over key/value [B, Hk, W, D] (Hk dividing Hq) of one float16/bfloat16 dtype, D a power of
    two from 16 to 256, every last dimension contiguous, and a mask (if any) [B or 1, Hq or 1,
    1, W] of bool (an additive mask goes to transformers' SDPA: the engine's decoders pass bool
    masks or none)."""
    if not (query.is_cuda and query.dim() == key.dim() == value.dim() == 4 and query.shape[2] == 1):
        return False
    B, HQ, _, D = query.shape
    if key.shape != value.shape or key.shape[0] != B or key.shape[3] != D or HQ % key.shape[1]:
        return False
    if not (query.dtype == key.dtype == value.dtype and query.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not (16 <= D <= 256 and D & (D - 1) == 0) or HQ // key.shape[1] > 64:
        return False
    if not (query.stride(-1) == key.stride(-1) == value.stride(-1) == 1):
        return False
    if mask is None:
        return True
    return (
        mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, HQ) and mask.shape[2] == 1
        and mask.shape[3] == key.shape[2] and mask.dtype == torch.bool and mask.device == query.device
    )  # fmt: skip


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(query @ key^T * scale) @ value over the keys `mask` lets a row read (True: read;
    None: every key) for `supported` inputs, in transformers' attention output layout
    [B, 1, Hq, D]."""
    B, HQ, _, D = query.shape
    HK, W = key.shape[1], key.shape[2]
    rep = HQ // HK
    S = triton.cdiv(W, SPLIT)
    acc = torch.empty(B, HQ, S, D, dtype=torch.float32, device=query.device)
    ml = torch.empty(B, HQ, S, 2, dtype=torch.float32, device=query.device)
    out = torch.empty(B, 1, HQ, D, dtype=query.dtype, device=query.device)
    if mask is None:  # the mask pointer is never read: the query's bytes stand in
        m, ms, has_mask = query.view(torch.uint8), (0, 0, 0), 0
    else:
        m, has_mask = mask.view(torch.uint8), 1
        ms = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in (0, 1)) + (mask.stride(3),)
    _attention_split_kernel[(B, HK, S)](
        query, key, value, m, acc, ml, W, float(scale),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), *ms, has_mask, S, HQ,
        REP=rep, BLOCK_M=max(16, triton.next_power_of_2(rep)), D=D, SPLIT=SPLIT, BLOCK_K=BLOCK_K, num_warps=4,
    )  # fmt: skip
    _attention_merge_kernel[(B, HQ)](acc, ml, out, S, HQ, out.stride(0), out.stride(2), D=D, num_warps=4)
    return out
