"""Sweep the single-matrix decode GEMV (attention, the LM head) on this GPU (development tool).

For Mixtral-8x7B's 4-bit attention shapes (q/o, k/v, the q+k+v group as one launch) and the
4-bit LM head, times `triton_gemv.gemv` under CUDA graphs (no launch overhead) for each tiling,
with float activations and with int8 activations (the quantization launch included), split 1
or 2 along K (the partial sum included), checks each against the reference dequantize +
matmul, and prints GB/s of packed bytes.

    python scripts/tune_gemv.py [--out tune.json]
"""

# ruff: noqa: B023  (every closure below is timed within the iteration that made it)
from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from moe_llm.bench.synthetic import random_compact
from moe_llm.kernels import triton_gemv as tg
from moe_llm.quant import QuantSpec, compact, pick_group_size

SHAPES = {  # name: (bits, out, in)
    "q_o_4bit": (4, 4096, 4096),
    "kv_4bit": (4, 1024, 4096),
    "qkv_4bit": (4, 6144, 4096),
    "lm_head_4bit": (4, 32000, 4096),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(dev).manual_seed(0)
    base_block_n = tg.block_n
    results = []
    for name, (bits, n, k) in SHAPES.items():
        spec = QuantSpec(bits, pick_group_size(bits, k), n, k)
        t = random_compact(spec, dev, gen)
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        x = torch.randn(k, device=dev, generator=gen).to(torch.bfloat16)
        ref = compact.dequantize(t, spec, torch.float32) @ x.float()
        for bn, unroll, warps, int8, split in itertools.product((4, 8, 16, 32), (1, 2), (4, 8), (False, True), (1, 2)):
            tg.NUM_WARPS, tg._MAX_UNROLL = warps, unroll
            tg.block_n = lambda spec, glu=False, bn=bn: bn
            tg._launch.cache_clear()
            qb = tg.activation_block(spec, tg.block_p(spec))
            quant = (
                torch.empty(k // 4, dtype=torch.int32, device=dev),
                torch.empty(k // qb, device=dev),
                torch.empty(k // qb, device=dev),
            )
            out = torch.empty(split, n, device=dev)
            y = torch.empty(n, dtype=torch.bfloat16, device=dev)

            def run(out=out, y=y, quant=quant, int8=int8, split=split, qb=qb):
                if int8:
                    tg.quantize_activations(x.view(1, -1), qb, *(q.view(1, -1) for q in quant))
                tg.gemv(x, t, spec, out if split > 1 else y, split=split, quant=quant if int8 else None)
                if split > 1:
                    torch.sum(out, 0, out=y)

            try:
                run()
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                ms = do_bench_cudagraph(run, rep=30)
            except Exception as exc:  # a tiling that does not compile or fit
                results.append(dict(shape=name, bn=bn, unroll=unroll, warps=warps, int8=int8, error=str(exc)[:120]))
                continue
            r = dict(shape=name, bp=tg.block_p(spec), bn=bn, unroll=unroll, warps=warps, int8=int8, split=split,
                     us=ms * 1e3, gb_s=nbytes / (ms * 1e-3) / 1e9, err=err)  # fmt: skip
            results.append(r)
        best = sorted(
            (r for r in results if r["shape"] == name and "us" in r and r["err"] < 2e-2), key=lambda r: r["us"]
        )
        print(name, nbytes / 1e6, "MB", flush=True)
        for r in best[:6]:
            print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        now = [r for r in results if r["shape"] == name and "us" in r and r["bn"] == 8 and r["unroll"] == 1
               and r["warps"] == 4 and not r["int8"] and r["split"] == 1]  # fmt: skip
        print("    today's tiling:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in now[0].items()})
    tg.block_n = base_block_n
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
