"""Sweep the decode GEMV's tile shapes on this GPU (development tool).

For Mixtral-8x7B's expert shapes (2- and 3-bit) and attention shapes (4-bit), times
`triton_gemv.gemv` under CUDA graphs (no launch overhead) for each tiling, checks
it against the reference dequantize + matmul, and prints GB/s of packed bytes.

    python scripts/tune_gemv.py [--out tune.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from moe_llm.bench.synthetic import random_compact
from moe_llm.kernels import triton_gemv as tg
from moe_llm.quant import QuantSpec, compact, pick_group_size

SHAPES = {  # name: (bits, out, in, glu)
    "gate_up_2bit": (2, 28672, 4096, True),
    "down_2bit": (2, 4096, 14336, False),
    "q_o_4bit": (4, 4096, 4096, False),
    "kv_4bit": (4, 1024, 4096, False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(dev).manual_seed(0)
    base_block_n = tg.block_n
    results = []
    for name, (bits, n, k, glu) in SHAPES.items():
        spec = QuantSpec(bits, pick_group_size(bits, k), n, k)
        t = random_compact(spec, dev, gen)
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        x = torch.randn(k, device=dev, generator=gen).to(torch.bfloat16)
        ref = compact.dequantize(t, spec, torch.float32) @ x.float()
        if glu:
            g, u = ref.chunk(2)
            ref = torch.nn.functional.silu(g) * u
        split_one = name.endswith("4bit")  # attention runs with split 1 (`linear`)
        for bp, bn, unroll, warps in itertools.product((64, 128, 256), (8, 16, 32), (1, 2), (4, 8)):
            tg.MAX_BLOCK_P, tg.NUM_WARPS, tg._MAX_UNROLL = bp, warps, unroll
            tg.block_n = lambda spec, glu=False, bn=bn: bn
            tg._launch.cache_clear()
            split = 1 if (glu or split_one) else tg.split_for(spec)
            out = torch.empty(n // 2 if glu else n, device=dev) if split == 1 else torch.empty(split, n, device=dev)
            try:
                tg.gemv(x, t, spec, out, glu=glu, split=split)
                got = out if split == 1 else out.sum(0)
                err = float((got - ref).abs().max() / ref.abs().max())
                ms = do_bench_cudagraph(functools.partial(tg.gemv, x, t, spec, out, glu=glu, split=split), rep=50)
            except Exception as exc:  # a tiling that does not compile or fit
                results.append(dict(shape=name, bp=bp, bn=bn, unroll=unroll, warps=warps, error=str(exc)[:120]))
                continue
            r = dict(shape=name, bp=tg.block_p(spec), bn=bn, unroll=unroll, warps=warps, split=split,
                     us=ms * 1e3, gb_s=nbytes / (ms * 1e-3) / 1e9, err=err)  # fmt: skip
            results.append(r)
        best = sorted(
            (r for r in results if r["shape"] == name and "us" in r and r["err"] < 1e-3), key=lambda r: r["us"]
        )
        print(name, nbytes / 1e6, "MB")
        for r in best[:5]:
            print("   ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
    tg.block_n = base_block_n
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
