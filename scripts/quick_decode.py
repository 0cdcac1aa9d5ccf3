"""A short decode-only pass of the benchmark protocol (for iterating on speed).

Runs the resident, full and no-cache rows of `moe-llm bench` with 64 new tokens and one
TTFT length, no accelerate baseline, and prints tok/s, bytes per token and the
profile of the full row. The numbers that go into docs come from `moe-llm bench`.

    python scripts/quick_decode.py [--out quick.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from moe_llm.bench.protocol import Variant, Workload
from moe_llm.bench.runner import run_bench
from moe_llm.bench.synthetic import Geometry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--explore", action="store_true", help="also the lfu policy and eager decode")
    ap.add_argument("--cpu", action="store_true", help="the CPU road: cpu_experts off/auto/all at 12 and 4 GiB")
    ap.add_argument("--rows", nargs="+", default=None, help="only these rows, by name")
    ap.add_argument("--profile", nargs="+", default=None, help="trace these rows (decode and cold prefill)")
    ap.add_argument("--kernel-tuning", default=None, help="decode-kernel tiles (scripts/tune_moe.py)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    budget = 12 << 30
    o = (("max_context", 1152),) + ((("kernel_tuning", args.kernel_tuning),) if args.kernel_tuning else ())
    variants = [
        Variant("full", 2, budget, profile=True, options=o),
        Variant("no-cache-no-prefetch", 2, budget, prefetch=False, retain=False, options=o),
        Variant("resident", 2, None, options=o),
    ]
    if args.cpu:  # cpu_experts is "auto" in the rows above
        variants = [variants[0], variants[2]]
        for b in (budget, 4 << 30):
            gib = f"{b >> 30}GiB"
            variants += [
                Variant(f"cpu-off-{gib}", 2, b, options=o + (("cpu_experts", "off"),)),
                Variant(f"cpu-all-{gib}", 2, b, options=o + (("cpu_experts", "all"),)),
            ]
        variants.append(Variant("cpu-auto-4GiB", 2, 4 << 30, options=o))
    if args.explore:  # prefetch policies side by side
        variants += [
            Variant("full-lfu", 2, budget, options=o + (("cache_policy", "lfu"),)),
            Variant("full-eager", 2, budget, options=o + (("cuda_graphs", False),)),
        ]
    if args.rows:
        variants = [v for v in variants if v.name in args.rows]
    if args.profile:
        variants = [dataclasses.replace(v, profile=v.name in args.profile) for v in variants]
    run = run_bench(
        Geometry(), variants=variants, workload=Workload(new_tokens=args.new_tokens, ttft_prompts=(1024,), repeats=1),
        accelerate_layers=None, out=args.out, budget=budget,
    )  # fmt: skip
    for row in run["variants"]:
        print(
            f"{row['name']:>22}: {row['decode_tok_s']:6.2f} tok/s  {row['bytes_per_token'] / 1e6:7.0f} MB/token "
            f"hit {row['hit_rate']:.2f}  ttft1024 {row['ttft_s']['1024']:.3f}s  slots {row['expert_slots']}  "
            f"peak {row['peak_gpu_bytes'] / 2**30:.2f} GiB  ÷overlap {row.get('ratio_to_overlap_limit', 0):.2f}  "
            f"cpu {row.get('cpu_road')} {row.get('cpu_take')} {row.get('cpu_expert_calls_per_token', 0):.1f} calls/token "
            f"{row.get('cpu_expert_ms_per_token', 0):.2f} ms/token"
        )
        for key in ("profile", "profile_prefill"):
            if key in row:
                print(json.dumps(row[key], indent=1))


if __name__ == "__main__":
    main()
