"""Compile the decode GEMVs the engine launches for an H200 (sm_90) on any machine and report
their SASS: registers a thread, shared memory, instructions and the commonest opcodes
(development tool: it needs Triton, not a GPU).

    python scripts/sass_report.py [--bits 2 3] [--dump DIR]

Reading the SASS here is how the seventh session found what held the old int8 GEMV back
(shuffles and shared-memory layout moves per 32-column block, docs/benchmarks.md); a change to
a kernel can be judged the same way before any device time is spent. `--dump` writes each
kernel's SASS and TTGIR to DIR.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from moe_llm.experts.format import ExpertFormat
from moe_llm.kernels import gemv_i8
from moe_llm.kernels import triton_gemv as tg
from moe_llm.kernels import triton_moe as tm
from moe_llm.quant.compact import QuantSpec

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"xq_ptr": "*i32", "dx_ptr": "*fp32", "xs_ptr": "*fp32", "idx_ptr": "*i64", "table_ptr": "*i64",
            "base_ptr": "*u8", "pcut_ptr": "*i32", "q_ptr": "*u8", "sq_ptr": "*u8", "zq_ptr": "*u8",
            "meta_ptr": "*fp32"}  # fmt: skip


def build(fn, consts: dict, out: str, ints: dict):
    """`fn` compiled for sm_90 with the runtime ints the engine passes (their divisibility by 16
    is specialised as at a launch)."""
    consts = dict(consts)
    warps = consts.pop("num_warps")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs and name in ints:  # the shapes, compiled in
            consts[name] = ints[name]
        if name in consts:
            sig[name] = "constexpr"
        elif ints.get(name) == 1:
            sig[name], consts[name] = "constexpr", 1  # Triton specialises an int 1 to a constant
        else:
            sig[name] = POINTERS.get(name, out if name == "out_ptr" else "i32")
            if sig[name].startswith("*") or ints.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})  # fmt: skip


def report(kernel, label: str, dump: Path | None) -> None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([BIN / "nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    ops = [
        m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    ]
    top = " ".join(f"{op}:{n}" for op, n in collections.Counter(ops).most_common(16))
    print(f"{label}: {regs.group(1) if regs else '?'} registers, {kernel.metadata.shared} B shared, "
          f"{len(ops)} instructions\n    {top}")  # fmt: skip
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        (dump / f"{stem}.sass").write_text(sass)
        (dump / f"{stem}.ttgir").write_text(kernel.asm["ttgir"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--dump", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    for bits in args.bits:
        fmt = ExpertFormat.build(4096, 14336, bits, torch.bfloat16)
        tuning = tm.default_tuning(bits)
        for name, out in (("gate_up_proj", "*fp32"), ("down_proj", "*fp64")):
            grid, ints, consts, _, _ = tm._launch(fmt, name, 2, tuning)
            P, P1, G, stride_q = tg._geometry(fmt.specs[name])
            values = dict(zip(("N", "P", "P1", "G", "stride_q", "p_split", "stride_split"), ints, strict=True))
            # the strides MoeDecode._gemv passes: the int8 rows and block scales (0: one row shared by
            # the positions), the output rows (h or the float64 parts: multiples of 16 here)
            k_words, k_blocks = fmt.specs[name].in_features // 4, fmt.specs[name].in_features // 32
            shared = name == "gate_up_proj"
            values |= {"x_stride": 0 if shared else k_words, "s_stride": 0 if shared else k_blocks,
                       "out_stride": 16 * fmt.hidden, "PD": P}  # fmt: skip
            k = build(gemv_i8._moe_gemv_i8_kernel, dict(consts, CPU=False), out, values)
            label = f"{bits}-bit {name} {consts['BLOCK_N']} rows x {consts['BLOCK_P']} B x {consts['num_warps']} warps"
            report(k, label, args.dump)
    spec = QuantSpec(4, 64, 6144, 4096)  # q+k+v of Mixtral-8x7B as one matrix
    _, ints, consts = tg._launch(spec, False, 1)
    values = dict(zip(("N", "P", "P1", "G", "stride_q", "p_split", "stride_split"), ints, strict=True))
    report(build(gemv_i8._qgemv_i8_kernel, consts, "*bf16", values), "4-bit dense [6144, 4096]", args.dump)


if __name__ == "__main__":
    main()
