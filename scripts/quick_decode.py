"""A short decode-only pass of the benchmark protocol (for iterating on speed).

Runs the resident, full and no-cache rows of `moe-llm bench` with 64 new tokens and one
TTFT length, no accelerate baseline, and prints tok/s, bytes per token and the
profile of the full row. The numbers that go into docs come from `moe-llm bench`.

    python scripts/quick_decode.py [--out quick.json]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--explore", action="store_true", help="also depth-2 and 3-guess prefetch, and eager decode")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    budget = 12 << 30
    variants = [
        Variant("full", 2, budget, profile=True),
        Variant("no-cache-no-prefetch", 2, budget, prefetch=False, retain=False),
        Variant("resident", 2, None),
    ]
    if args.explore:  # prefetch policies side by side
        variants += [
            Variant("full-lfu", 2, budget, options=(("cache_policy", "lfu"),)),
            Variant("full-eager", 2, budget, options=(("cuda_graphs", False),)),
        ]
    run = run_bench(
        Geometry(), variants=variants, workload=Workload(new_tokens=args.new_tokens, ttft_prompts=(512, 1024)),
        accelerate_layers=None, out=args.out, budget=budget,
    )  # fmt: skip
    for row in run["variants"]:
        print(
            f"{row['name']:>22}: {row['decode_tok_s']:6.2f} tok/s  {row['bytes_per_token'] / 1e6:7.0f} MB/token "
            f"hit {row['hit_rate']:.2f}  ttft1024 {row['ttft_s']['1024']:.3f}s  "
            f"peak {row['peak_gpu_bytes'] / 2**30:.2f} GiB  ÷overlap {row.get('ratio_to_overlap_limit', 0):.2f}"
        )
        if "profile" in row:
            print(json.dumps(row["profile"], indent=1))


if __name__ == "__main__":
    main()
