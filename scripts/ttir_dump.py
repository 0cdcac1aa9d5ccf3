"""Dump the TTIR of the decode kernels (the TTGIR of the Gluon ones, `gemv_i8`) for many constexpr
settings, compiled for sm_90 with no GPU (Triton's front end runs on any machine with Triton
installed):

    python scripts/ttir_dump.py before.txt   # then change the kernels' Python
    python scripts/ttir_dump.py after.txt && cmp before.txt after.txt

A change that only moves or renames code gives the same IR (rename the modules in the callee
names first, e.g. with sed); any change at all to a kernel's Python that fails to compile
(an unknown name, a shape or type error) fails here instead of on the GPU machine."""

import itertools
import re
import sys

from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

import moe_llm.experts  # noqa: F401
from moe_llm.kernels import gemv_i8 as gi
from moe_llm.kernels import triton_moe as tm
from moe_llm.kernels import triton_moe_rows as tr
from moe_llm.kernels import triton_trunk as tt

PTR = {
    "x_ptr": "*i32",
    "dx_ptr": "*fp32",
    "xs_ptr": "*fp32",
    "xq_ptr": "*i32",
    "q_ptr": "*u8",
    "sq_ptr": "*u8",
    "zq_ptr": "*u8",
    "meta_ptr": "*fp32",
    "out_ptr": "*fp64",
    "idx_ptr": "*i64",
    "table_ptr": "*i64",
    "base_ptr": "*u8",
    "pcut_ptr": "*i32",
    "cnt_ptr": "*i32",
    "start_ptr": "*i32",
    "rows_ptr": "*i32",
    "part_ptr": "*fp64",
    "w_ptr": "*fp32",
    "cpu_ptr": "*fp64",
    "take_ptr": "*i32",
    "head_ptr": "*i32",
    "xbox_ptr": "*fp32",
}
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)


def ttir(fn, consts, ptr=None, gluon=False, warps=4):
    """The kernel's IR: TTIR, or for a Gluon kernel the TTGIR its source gives (`gluon`)."""
    sig = {n: "constexpr" if n in consts else (ptr or PTR).get(n, "i32") for n in fn.arg_names}
    source = GluonASTSource if gluon else ASTSource
    src = source(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    opts = backend.parse_options({"num_warps": warps})
    mod = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    text = str(mod)
    return re.sub(r" loc\([^)]*\)|#loc.*\n|loc\(.*?\)", "", text)


out = []
for bits, glu, bp, rows, warps in itertools.product((2, 3, 4), (False, True), (256, 1024), (2, 8), (1, 2)):
    c = dict(BITS=bits, GROUP=64, QB=32, BLOCK_N=rows, BLOCK_P=bp, GLU=glu, ROW_META=True,
             L3=gi.tile_layout(rows, bp // 32, 8, warps), P=2048, P1=1024, G=128, stride_q=2048)  # fmt: skip
    out.append((f"qgemv_i8 {c}", ttir(gi._qgemv_i8_kernel, dict(c, N=512), gluon=True, warps=warps)))
    for cpu in (False, True):
        cm = dict(c, CPU=cpu, OFF_Q=0, OFF_SQ=1024, OFF_ZQ=2048, OFF_META=4096)
        out.append((f"moe_i8 {cm}", ttir(gi._moe_gemv_i8_kernel, dict(cm, N=512), gluon=True, warps=warps)))
    if not glu:
        cg = dict(c, MP=4, L1=gl.BlockedLayout([1], [32], [warps], [0]))
        del cg["GLU"]
        out.append((f"group_i8 {cg}", ttir(gi._group_gemv_i8_kernel, cg, gluon=True, warps=warps)))
for bits, glu, rb, cpu, bp in itertools.product((2, 3, 4), (False, True), (2, 4), (False, True), (256, 1024)):
    c = dict(CPU=cpu, BITS=bits, GROUP=64, BLOCK_N=8, BLOCK_P=bp, GLU=glu, ROW_META=True, RB=rb, OFF_Q=0, OFF_SQ=1024,
             OFF_ZQ=2048, OFF_META=4096)  # fmt: skip
    out.append((f"rows {c}", ttir(tr._moe_rows_kernel, c)))
for kt, n in ((2, None), (1, 1), (8, None)):  # N = 1 is specialised to a constant
    c = dict(KT=kt, NP=max(2, kt), BLOCK=1024) | ({"N": n} if n else {})
    out.append((f"publish {c}", ttir(tm._publish_kernel, c)))
for cpu in (False, True):
    c = dict(HAS_W=True, CPU=cpu, BLOCK=1024)
    out.append((f"combine {c}", ttir(tm._combine_kernel, c)))
for dt, d in itertools.product(("bf16", "fp16", "fp32"), (64, 128)):
    names = ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr")
    out.append((f"rotary {dt} D={d}", ttir(tt._rotary_kernel, dict(D=d, BLOCK=d), ptr={n: f"*{dt}" for n in names})))
with open(sys.argv[1], "w") as f:
    for name, text in out:
        f.write(f"=== {name}\n{text}\n")
print(len(out), "kernels")
