"""One-launch replacements for small transformers trunk ops of a decoded token, on CUDA
(`trunk_ops.install` puts them in).

A decoded token's layer was ~35 small kernels on the H200, each a few microseconds of launch
and ramp for a few KB of data. Two ops account for about 22 of them:

- RMSNorm (twice per layer): transformers runs eight kernels (to float32, pow, mean, add,
  rsqrt, mul, to the input dtype, times the weight). `rmsnorm_row` does the same arithmetic
  in the same dtypes in one launch; only the order of the sum of squares differs.
- The softmax top-k router (Mixtral's): linear, float, softmax, top-k (two kernels), sum and
  divide. `topk_router_row` does them in one launch: logits rounded to the weight's dtype as
  F.linear returns them, softmax of those in float32, the k largest by repeated argmax (ties
  to the lower expert id), divided by their sum. The logits' dot products are summed in
  another order than cuBLAS's.
- Rotary position embedding (`q * cos + rotate_half(q) * sin`, and the same for k): ten
  kernels a layer in transformers (four multiplies, two negations, two concatenations, two
  adds). `rotary_rows` does q and k in one launch with the same roundings: each product
  rounded to the tensors' dtype, their sum rounded once, so the result is transformers' to
  the bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_exact import _add_rn


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
    """Row program_id(0) of x [R, N]: every row with the same code, so a row's result does not
    depend on how many rows the launch has."""
    row = tl.program_id(0).to(tl.int64) * N
    x_ptr += row
    out_ptr += row
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    y = (x * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of each row of a contiguous CUDA x [..., N], one program per row."""
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    rows = x.numel() // n
    _rmsnorm_kernel[(rows,)](x, weight, out, n, float(eps), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out


@triton.jit
def _router_kernel(
    x_ptr, w_ptr, logits_ptr, scores_ptr, idx_ptr, H, E,
    K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # row of x [R, H], as alone
    x_ptr += row * H
    logits_ptr += row * E
    scores_ptr += row * K
    idx_ptr += row * K
    e = tl.arange(0, EP)
    em = e < E
    acc = tl.zeros([EP, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < H
        x = tl.load(x_ptr + h, mask=hm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * H + h[None, :], mask=em[:, None] & hm[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    logit = tl.sum(acc, axis=1).to(logits_ptr.dtype.element_ty)  # what F.linear returns
    tl.store(logits_ptr + e, logit, mask=em)
    lf = tl.where(em, logit.to(tl.float32), float("-inf"))
    p = tl.exp(lf - tl.max(lf, axis=0))
    p = p / tl.sum(p, axis=0)
    kk = tl.arange(0, KP)
    top_v = tl.zeros([KP], dtype=tl.float32)
    top_i = tl.zeros([KP], dtype=tl.int64)
    vals = tl.where(em, p, -1.0)
    for j in tl.static_range(K):
        m = tl.max(vals, axis=0)
        i = tl.min(tl.where(vals == m, e, EP), axis=0)
        top_v = tl.where(kk == j, m, top_v)
        top_i = tl.where(kk == j, i.to(tl.int64), top_i)
        vals = tl.where(e == i, -1.0, vals)
    top_v = top_v / tl.sum(top_v, axis=0)
    tl.store(scores_ptr + kk, top_v, mask=kk < K)
    tl.store(idx_ptr + kk, top_i, mask=kk < K)


def topk_router_rows(x: torch.Tensor, weight: torch.Tensor, top_k: int):
    """Mixtral's router for the rows of a contiguous CUDA x [R, H], weight [E, H], one program
    per row: (logits [R, E] in the promoted dtype, scores float32 [R, k], indices int64 [R, k])."""
    e, h = weight.shape
    r = x.shape[0]
    logits = torch.empty(r, e, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    scores = torch.empty(r, top_k, dtype=torch.float32, device=x.device)
    idx = torch.empty(r, top_k, dtype=torch.int64, device=x.device)
    ep = max(2, triton.next_power_of_2(e))
    block_h = max(16, min(triton.next_power_of_2(h), 8192 // ep))  # 8192 fp32 partial sums
    _router_kernel[(r,)](
        x, weight, logits, scores, idx, h, e, K=top_k, KP=max(2, triton.next_power_of_2(top_k)), EP=ep,
        BLOCK_H=block_h, num_warps=8,
    )  # fmt: skip
    return logits, scores, idx


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, HQ, q_sb, q_sh, k_sb, k_sh, qo_sb, qo_sh, ko_sb, ko_sh, c_sb,
    s_sb, D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Head program_id(1) of row program_id(0): a query head below HQ, else key head
    (program_id(1) - HQ). x * cos + rotate_half(x) * sin with transformers' roundings: both
    products rounded to the output dtype, then their sum (never fused with a multiply)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if h < HQ:
        src = q_ptr + b * q_sb + h * q_sh
        dst = qo_ptr + b * qo_sb + h * qo_sh
    else:
        src = k_ptr + b * k_sb + (h - HQ) * k_sh
        dst = ko_ptr + b * ko_sb + (h - HQ) * ko_sh
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, BLOCK)
    m = d < D
    x = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
    xr = tl.load(src + tl.where(d < HALF, d + HALF, d - HALF), mask=m, other=0.0).to(tl.float32)
    rot = tl.where(d < HALF, xr * -1.0, xr)  # rotate_half: cat(-x2, x1) (times -1: -0 for +0, as neg)
    c = tl.load(cos_ptr + b * c_sb + d, mask=m, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b * s_sb + d, mask=m, other=0.0).to(tl.float32)
    dt = qo_ptr.dtype.element_ty
    a = (x * c).to(dt)  # exact product of two 8- or 11-bit mantissas, rounded once
    r = (rot * s).to(dt)
    tl.store(dst + d, _add_rn(a.to(tl.float32), r.to(tl.float32)).to(dt), mask=m)


def rotary_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rotary_rows` takes these: CUDA decode rows q [B, Hq, 1, D] and k [B, Hk, 1, D]
    with cos and sin [B or 1, 1, D], all of one dtype, the head dimension contiguous and even."""
    B, D = q.shape[0], q.shape[-1]
    return (
        q.is_cuda and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
        and q.shape[2] == 1 and k.shape[2] == 1 and k.shape[0] == B and k.shape[-1] == D and D % 2 == 0
        and cos.shape[1:] == (1, D) and cos.shape[0] in (1, B)
        and len({q.dtype, k.dtype, cos.dtype, sin.dtype}) == 1 and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
        and k.device == q.device == cos.device == sin.device
    )  # fmt: skip


def rotary_rows(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim 1) for decode rows
    (`rotary_supported`) in one launch: (q_embed, k_embed), laid out as q and k."""
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    B, HQ, _, D = q.shape
    cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    sb = 0 if sin.shape[0] == 1 else sin.stride(0)
    _rotary_kernel[(B, HQ + k.shape[1])](
        q, k, cos, sin, qo, ko, HQ, q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1),
        ko.stride(0), ko.stride(1), cb, sb, D=D, BLOCK=triton.next_power_of_2(D), num_warps=1,
    )  # fmt: skip
    return qo, ko
