"""Sweep the int8 dense decode GEMV (`gemv_i8`: q+k+v, o_proj, the LM head) on this GPU.

For Mixtral-8x7B's 4-bit shapes, times `gemv_i8._qgemv_i8_kernel` in a CUDA graph over 8
copies of the matrix (more bytes than the L2 holds) for each tile (rows a program, packed-byte
tile, warps; settings with fewer 32-column blocks than threads are left out), checks that
every tile gives the same bits, and prints one JSON line each, then the engine's launch
(`triton_gemv.gemv` as `linear` calls it). The committed run (which also timed the float-activation
kernel, deleted since) is
benchmarks/results/h200-dense-gemv-gluon.log; its best tiles are `triton_gemv.INT8_*`.

    python scripts/tune_gemv.py > dense.log
"""

from __future__ import annotations

import itertools
import json

import torch
import triton

from moe_llm.bench.kernels import _graph_ms
from moe_llm.kernels import gemv_i8 as gi
from moe_llm.kernels import triton_gemv as tg
from moe_llm.quant.compact import QuantSpec, quantize

SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("head", 32000, 4096))  # 4-bit, groups of 64
COPIES = 8


def sweep(name: str, n: int, k: int) -> None:
    dev = "cuda"
    spec = QuantSpec(4, 64, n, k)
    t0 = quantize(torch.randn(n, k, device=dev) * 0.02, 4, 64, optimize=False)
    mats = [{key: v.clone() for key, v in t0.items()} for _ in range(COPIES)]
    x = torch.randn(k, device=dev).to(torch.bfloat16)
    q = tg._quantized(x.reshape(1, k), spec)
    out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    nbytes = sum(v.numel() * v.element_size() for v in t0.values())
    P, P1, G, stride_q = tg._geometry(spec)
    ref = None
    for bn, widest, warps in itertools.product((4, 8, 16, 32), (256, 512, 1024), (1, 2, 4)):
        bp = tg.block_p(spec, widest)
        qb = tg.activation_block(spec, bp)
        if bn * (bp // qb) < 32 * warps:
            continue
        consts = dict(BITS=4, GROUP=64, QB=qb, BLOCK_N=bn, BLOCK_P=bp, GLU=False, ROW_META=tg.row_meta(spec, bp),
                      L3=gi.tile_layout(bn, bp // qb, qb // 4, warps), num_warps=warps)  # fmt: skip

        def one(lay, consts=consts, bn=bn):
            t = mats[lay]
            gi._qgemv_i8_kernel[(triton.cdiv(n, bn), 1, 1)](
                *q, t["q"], t["scale_q"], t["zero_q"], t["meta"], out, n, P, P1, G, stride_q, P, n, q[0].stride(0),
                q[1].stride(0), n, **consts,
            )  # fmt: skip

        ms = _graph_ms(one, COPIES)
        one(0)
        same = ref is None or torch.equal(out, ref)
        ref = out.clone() if ref is None else ref
        row = dict(m=name, bn=bn, bp=bp, warps=warps, us=round(ms * 1e3, 2), gb_s=round(nbytes / ms / 1e6, 1))
        print(json.dumps(dict(row, same=same)), flush=True)
    ms = _graph_ms(lambda lay: tg.gemv(x.reshape(1, k), mats[lay], spec, out, quant=q), COPIES)
    print(json.dumps({"m": name, "cur": True, "us": round(ms * 1e3, 2), "gb_s": round(nbytes / ms / 1e6, 1)}))


if __name__ == "__main__":
    for shape in SHAPES:
        sweep(*shape)
