"""Float32 operation sequences that the CPU expert kernel (`experts/cpu/moe_cpu.c`) repeats
step for step, so that the GPU and the CPU compute an expert to the same bits
(`gemv_i8`, `triton_moe_rows`): an add that is never fused with the multiply before it, and
SiLU through one fixed `exp`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _add_rn(a, b):
    """a + b in float32 through PTX with an explicit rounding mode: LLVM cannot see into it and
    ptxas never fuses an add.rn with the multiply before it, so every product stays rounded as
    on the CPU (plain multiplies whose results reach only these adds are safe)."""
    a, b = tl.broadcast(a, b)
    return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _exp_det(x):
    """e^x in the fixed sequence of float32 operations of the CPU kernel's `exp_det`
    (experts/cpu/moe_cpu.c): the same bits on both."""
    zero = tl.where(x == x, 0.0, 0.0)  # zeros in x's layout (tl.zeros_like has no Gluon form)
    c = tl.where(x < -87.0, zero - 87.0, x)
    c = tl.where(c > 88.0, zero + 88.0, c)
    n = libdevice.rint(c * 1.4426950216293335)
    r = _add_rn(c, -(n * 0.693145751953125))
    r = _add_rn(r, -(n * 1.428606765330187e-06))
    p = _add_rn((zero + 0.0013888889225199819) * r, zero + 0.008333333767950535)
    p = _add_rn(p * r, zero + 0.0416666679084301)
    p = _add_rn(p * r, zero + 0.1666666716337204)
    p = _add_rn(p * r, zero + 0.5)
    p = _add_rn(p * r, zero + 1.0)
    p = _add_rn(p * r, zero + 1.0)
    s = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, p * s)


@triton.jit
def _silu_det(v):
    """v / (1 + e^-v), as the CPU kernel computes it."""
    e = _exp_det(-v)
    return libdevice.div_rn(v, _add_rn(e, tl.where(e == e, 1.0, 1.0)))
