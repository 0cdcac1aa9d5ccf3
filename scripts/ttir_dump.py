"""Dump the TTIR of the decode kernels for many constexpr settings, compiled for sm_90 with no GPU
(Triton's front end runs on any machine with Triton installed):

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

import moe_llm.experts  # noqa: F401
from moe_llm.kernels import triton_gemv as tg
from moe_llm.kernels import triton_group as tgr
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
options = backend.parse_options({})


def ttir(fn, consts, fp_x=False, ptr=None):
    sig = {n: "constexpr" if n in consts else (ptr or PTR).get(n, "i32") for n in fn.arg_names}
    if fp_x:
        sig["x_ptr"] = "*fp32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    text = str(mod)
    return re.sub(r" loc\([^)]*\)|#loc.*\n|loc\(.*?\)", "", text)


out = []
for bits, glu, i8, magic in itertools.product((2, 3, 4), (False, True), (False, True), (True, False)):
    c = dict(BITS=bits, GROUP=64, BLOCK_N=16, BLOCK_P=256, GLU=glu, UNROLL=1, MAGIC=magic, I8=i8, ROW_META=True)
    out.append((f"qgemv {c}", ttir(tg._qgemv_kernel, c, fp_x=not i8)))
    for cpu in (False, True):
        cm = dict(c, CPU=cpu, OFF_Q=0, OFF_SQ=1024, OFF_ZQ=2048, OFF_META=4096)
        out.append((f"moe {cm}", ttir(tm._moe_gemv_kernel, cm, fp_x=not i8)))
for bits, glu, rb, cpu in itertools.product((2, 3, 4), (False, True), (2, 4), (False, True)):
    c = dict(
        CPU=cpu,
        BITS=bits,
        GROUP=64,
        BLOCK_N=8,
        BLOCK_P=256,
        GLU=glu,
        UNROLL=1,
        ROW_META=True,
        RB=rb,
        OFF_Q=0,
        OFF_SQ=1024,
        OFF_ZQ=2048,
        OFF_META=4096,
    )
    out.append((f"rows {c}", ttir(tr._moe_rows_kernel, c)))
for bits, glu, bp in itertools.product((2, 3), (False, True), (512, 1024)):  # the wide tiles of Tuning's defaults
    c = dict(BITS=bits, GROUP=64, BLOCK_N=8, BLOCK_P=bp, GLU=glu, UNROLL=1, ROW_META=True, OFF_Q=0, OFF_SQ=1024,
             OFF_ZQ=2048, OFF_META=4096)  # fmt: skip
    out.append((f"moe {c}", ttir(tm._moe_gemv_kernel, dict(c, MAGIC=True, I8=True, CPU=True))))
    out.append((f"rows {c}", ttir(tr._moe_rows_kernel, dict(c, CPU=True, RB=2))))
for bits, i8 in itertools.product((2, 3, 4), (False, True)):
    c = dict(BITS=bits, GROUP=64, BLOCK_N=16, BLOCK_P=256, UNROLL=1, MAGIC=True, I8=i8, ROW_META=True, MP=4)
    out.append((f"group {c}", ttir(tgr._group_gemv_kernel, c, fp_x=not i8)))
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
