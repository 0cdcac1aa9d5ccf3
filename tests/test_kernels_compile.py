"""Every decode GEMV launch the engine makes builds for an H200 (sm_90), on any machine.

Triton compiles to a cubin without a GPU, so CI (which has none) catches a kernel that no longer
builds, or that a new Triton release no longer accepts, before a GPU session spends device time
on it. Each case takes its constexprs from the engine's own launch builders (`triton_moe._launch`
with the built-in tiles, `triton_gemv._launch` for the dense int8 GEMVs, `GemvGroup`'s), for the
Mixtral-8x7B shapes and tiny ones. The Gluon GEMVs (`kernels/gemv_i8.py`) must also use no shared
memory: keeping each 32-column block in one thread's registers, with no layout moves through
shared memory, is what made them fast.
"""

from __future__ import annotations

import platform
import sys

import pytest
import torch

if sys.platform == "linux" and platform.machine() == "x86_64":  # the test extra installs Triton here
    import triton
else:  # pragma: no cover
    triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from moe_llm.experts.format import ExpertFormat  # noqa: E402
from moe_llm.kernels import gemv_i8  # noqa: E402
from moe_llm.kernels import triton_gemv as tg  # noqa: E402
from moe_llm.kernels import triton_moe as tm  # noqa: E402
from moe_llm.kernels import triton_moe_rows as tr  # noqa: E402
from moe_llm.quant.compact import QuantSpec  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)
POINTERS = {  # pointer arguments by name; every other argument is an int32
    "xq_ptr": "*i32", "dx_ptr": "*fp32", "xs_ptr": "*fp32", "idx_ptr": "*i64", "table_ptr": "*i64",
    "base_ptr": "*u8", "pcut_ptr": "*i32", "cnt_ptr": "*i32", "q_ptr": "*u8", "sq_ptr": "*u8", "zq_ptr": "*u8",
    "meta_ptr": "*fp32", "start_ptr": "*i32", "rows_ptr": "*i32",
}  # fmt: skip


def _compile(fn, consts: dict, out: str, gluon: bool):
    consts = dict(consts)
    warps = consts.pop("num_warps", 4)
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, out if n == "out_ptr" else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    source = (GluonASTSource if gluon else ASTSource)(fn, sig, consts, attrs)
    return triton.compile(source, target=H200, options={"num_warps": warps})


FORMATS = [
    pytest.param(f"{size}-{bits}bit", ExpertFormat.build(h, i, bits, torch.bfloat16), id=f"{size}-{bits}bit")
    for bits in (2, 3, 4)
    for size, h, i in (("mixtral", 4096, 14336), ("tiny", 64, 128))
]


@pytest.mark.parametrize("name,fmt", FORMATS)
def test_routed_expert_kernels_build(name, fmt):
    """The routed-experts GEMVs (lone token, with and without the CPU's share) and the batched
    rows kernel, with the tiles the engine takes for this width."""
    tuning = tm.default_tuning(fmt.bits)
    for proj, out in (("gate_up_proj", "*fp32"), ("down_proj", "*fp64")):
        consts = tm._launch(fmt, proj, 2, tuning)[2]
        for cpu in (False, True):
            kernel = _compile(gemv_i8._moe_gemv_i8_kernel, dict(consts, CPU=cpu), out, gluon=True)
            assert kernel.metadata.shared == 0, (name, proj, cpu)
        rows = {k: v for k, v in consts.items() if k not in ("QB", "L3")}
        _compile(tr._moe_rows_kernel, dict(rows, CPU=True, RB=4), out, gluon=False)


@pytest.mark.parametrize(
    "spec", [QuantSpec(4, 64, 6144, 4096), QuantSpec(4, 64, 32000, 4096), QuantSpec(2, 32, 64, 128),
             QuantSpec(3, 64, 40, 128), QuantSpec(4, 8, 16, 64)], ids=str,
)  # fmt: skip
def test_dense_int8_kernels_build(spec):
    """One matrix (o_proj, the LM head) and the q/k/v group, as `linear` and `GemvGroup` launch them."""
    consts = tg._launch(spec, False, 1, None, True)[2]
    kernel = _compile(gemv_i8._qgemv_i8_kernel, consts, "*bf16", gluon=True)
    assert kernel.metadata.shared == 0
    group = {k: v for k, v in consts.items() if k != "GLU"}
    group.update(MP=4, L1=gl.BlockedLayout([1], [32], [consts["num_warps"]], [0]))
    kernel = _compile(gemv_i8._group_gemv_i8_kernel, group, "*bf16", gluon=True)
    assert kernel.metadata.shared == 0
