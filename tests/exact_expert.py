"""A numpy model of the exact expert arithmetic shared by the CPU kernel (experts/cpu/moe_cpu.c)
and the GPU decode kernels (kernels/triton_gemv.py), one float32 operation at a time.

Per output row: int8 activations per block of 32 columns (round half to even, scale
amax / 127 kept times 2^32), then over the segments of the row that lie in one block and
one weight group (a whole block when the group size is a multiple of 32)
    rint(isum * (s_g * d_b)) - rint((s_g * z_g) * (qsum * d_b))
with isum = sum(code * xq) and qsum = sum(xq), exact integers, every other step one rounded
float32 operation, summed exactly in float64 and scaled by 2^-32. SiLU uses `exp_det`.
The kernels must equal this bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from moe_llm.experts.format import ExpertFormat, matrix_views
from moe_llm.quant import packing

F32 = np.float32
GRID = F32(2.0**32)
QB = 32


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [K] -> (xq int64 [K], d float32 [nblk]: block scales times 2^32)."""
    xq = np.zeros(x.shape, dtype=np.int64)
    d = np.zeros((x.shape[0] + QB - 1) // QB, dtype=F32)
    for b in range(d.shape[0]):
        blk = x[b * QB : (b + 1) * QB]
        amax = F32(np.max(np.abs(blk)))
        inv = F32(127) / amax if amax > 0 else F32(0)
        xq[b * QB : (b + 1) * QB] = np.rint(blk * inv).astype(np.int64)
        d[b] = F32(amax / F32(127)) * GRID
    return xq, d


def scales(t: dict[str, torch.Tensor], spec) -> tuple[np.ndarray, np.ndarray]:
    """(s, s * z) float32 [rows, G] with plain float32 multiplies and adds."""
    rows, G = spec.out_features, spec.in_features // spec.group_size
    sq = t["scale_q"].reshape(rows, G).numpy().astype(F32)
    zq = t["zero_q"].reshape(rows, G).numpy().astype(F32)
    meta = t["meta"].reshape(-1, 4).numpy().astype(F32)
    m = meta[(np.arange(rows * G) // 128).reshape(rows, G)]
    s = sq * m[..., 1] + m[..., 0]
    z = zq * m[..., 3] + m[..., 2]
    return s, s * z


def linear(t: dict[str, torch.Tensor], spec, x: np.ndarray) -> np.ndarray:
    """The exact float64 sums (times 2^-32) of W x for one token x float32 [K]."""
    codes = packing.unpack(t["q"], spec.bits, spec.in_features).numpy().astype(np.int64)  # [rows, K]
    s, sz = scales(t, spec)
    xq, d = quantize(x)
    K, gs = spec.in_features, spec.group_size
    total = np.zeros(spec.out_features, dtype=np.float64)
    j0 = 0
    while j0 < K:
        j1 = min((j0 // QB + 1) * QB, (j0 // gs + 1) * gs, K)
        b, g = j0 // QB, j0 // gs
        isum = (codes[:, j0:j1] * xq[j0:j1]).sum(axis=1).astype(F32)
        xs = F32(xq[j0:j1].sum()) * d[b]
        p = np.rint(isum * (s[:, g] * d[b]))
        q = np.rint(sz[:, g] * xs)
        total += p.astype(np.float64) - q.astype(np.float64)
        j0 = j1
    return total * 2.0**-32


def exp_det(x: np.ndarray) -> np.ndarray:
    x = np.clip(x.astype(F32), F32(-87), F32(88))
    n = np.rint(x * F32(1.4426950216293335))
    r = x - n * F32(0.693145751953125)
    r = r - n * F32(1.428606765330187e-06)
    p = F32(0.0013888889225199819)
    for c in (0.008333333767950535, 0.0416666679084301, 0.1666666716337204, 0.5, 1.0, 1.0):
        p = p * r + F32(c)
    s = ((n.astype(np.int32) + 127) << 23).astype(np.int32).view(F32)
    return p * s


def silu(v: np.ndarray) -> np.ndarray:
    return v / (F32(1) + exp_det(-v))


def expert(buf: torch.Tensor, fmt: ExpertFormat, x: torch.Tensor, keep: np.ndarray | None = None) -> np.ndarray:
    """down(silu(gate x) * (up x)) for one token, float64 [H] (exact sums, times 2^-32); with
    `keep` (bool [I]) h is zero outside it (a share of the expert)."""
    views = fmt.layout.views(buf)
    gu = linear(matrix_views(views, "gate_up_proj"), fmt.specs["gate_up_proj"], x.float().numpy())
    gate, up = gu[: fmt.intermediate].astype(F32), gu[fmt.intermediate :].astype(F32)
    h = silu(gate) * up
    if keep is not None:
        h = np.where(keep, h, F32(0))
    return linear(matrix_views(views, "down_proj"), fmt.specs["down_proj"], h)
