"""Where does a cold 1024-token prefill spend its time? (GPU; for iterating on TTFT.)

Builds the synthetic Mixtral-8x7B (2-bit experts), then for each prompt-prefetch
policy times several cold TTFTs at 12 GiB and traces one with torch.profiler:
bytes copied (in experts), prefetch waste, and the copy engine's idle gaps
between the first and the last host->device copy. The numbers that go into docs
come from `moe-llm bench`.

    python scripts/ttft_probe.py [--out probe.json] [--runs 5] [--policies default,off]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from moe_llm.bench.protocol import pinned_bandwidth
from moe_llm.bench.synthetic import Geometry, SyntheticModel
from moe_llm.prefetch import Prefetcher

_ORIGINAL_ISSUE = Prefetcher.issue
_ORIGINALS = {"issue": Prefetcher.issue, "prompt_start": Prefetcher.prompt_start}


def _no_prompt_prefetch(self, layer, guessed, decode):
    if decode:
        _ORIGINAL_ISSUE(self, layer, guessed, decode)


# prompt-prefetch policies: Prefetcher methods replaced for the probe
POLICIES = {
    "default": {},
    "off": {"issue": _no_prompt_prefetch, "prompt_start": lambda self, tokens, top_k: 0},
    "no-first-layer": {"prompt_start": lambda self, tokens, top_k: 0},
}


def _gaps(trace: dict) -> dict:
    copies, kernels = [], []
    for ev in trace.get("traceEvents", []):
        cat = ev.get("cat", "")
        if "dur" not in ev:
            continue
        span = (float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]))
        if cat == "gpu_memcpy" and "HtoD" in ev.get("name", ""):
            copies.append(span)
        elif cat == "kernel":
            kernels.append(span)
    if not copies:
        return {"error": "no copies traced"}
    copies.sort()
    kernels.sort()
    busy, gaps = 0.0, []
    cur_s, cur_e = copies[0]
    for s, e in copies[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    first, last = copies[0][0], cur_e
    start = min(copies[0][0], kernels[0][0] if kernels else first)
    end = max(last, kernels[-1][1] if kernels else last)
    big = sorted(gaps, reverse=True)
    return {
        "copies": len(copies),
        "copy_mean_us": sum(e - s for s, e in copies) / len(copies),
        "copy_span_ms": (last - first) / 1e3,
        "copy_busy_ms": busy / 1e3,
        "copy_idle_ms": (last - first - busy) / 1e3,
        "gaps_over_50us": sum(1 for g, _ in gaps if g > 50),
        "top_gaps": [{"us": round(g, 1), "at_ms": round((t - first) / 1e3, 2)} for g, t in big[:8]],
        "before_first_copy_ms": (first - start) / 1e3,
        "after_last_copy_ms": (end - last) / 1e3,
        "gpu_span_ms": (end - start) / 1e3,
    }


def probe(model: SyntheticModel, name: str, budget, prompt, runs: int, prefetch: bool = True) -> dict:
    for attr, fn in {**_ORIGINALS, **POLICIES.get(name, {})}.items():
        setattr(Prefetcher, attr, fn)
    engine = model.engine(budget, prefetch=prefetch)
    try:
        engine.generate(prompt[:16], max_new_tokens=2)
        engine.generate(prompt, max_new_tokens=1)
        times, stats = [], []
        for _ in range(runs):
            engine.reset_cache()
            torch.cuda.synchronize()
            before = engine.stats.copy()
            times.append(engine.generate(prompt, max_new_tokens=1).stats["time_to_first_token_s"])
            torch.cuda.synchronize()
            stats.append(engine.stats - before)
        from torch.profiler import ProfilerActivity, profile

        engine.reset_cache()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            engine.generate(prompt, max_new_tokens=1)
            torch.cuda.synchronize()
            traced_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "trace.json"
            prof.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
        d0 = stats[-1]
        nb = model.fmt.nbytes
        return {
            "policy": name,
            "prefetch": prefetch,
            "slots_per_layer": engine.cache.slots_per_layer,
            "ttft_s": times,
            "ttft_min_s": min(times),
            "ttft_median_s": sorted(times)[len(times) // 2],
            "experts_copied": d0.bytes_to_device / nb,
            "prefetch_issued": d0.prefetch_issued,
            "prefetch_wasted": d0.prefetch_wasted,
            "evictions": d0.evictions,
            "misses": d0.cache_misses,
            "traced_wall_s": traced_s,
            "trace": _gaps(trace),
        }
    finally:
        for attr, fn in _ORIGINALS.items():
            setattr(Prefetcher, attr, fn)
        engine.cache.synchronize()
        del engine
        model.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = SyntheticModel(Geometry(), "cuda", experts_bits=2, attn_bits=4)
    bw = pinned_bandwidth(model.device)
    bound = model.expert_bytes_total / bw
    prompt = model.random_prompt(args.tokens, 7)
    rows = []
    jobs = [("resident", None, True), ("noprefetch", 12 << 30, False)]
    jobs += [(p, 12 << 30, True) for p in args.policies.split(",")]
    for name, budget, pf in jobs:
        row = probe(model, name if pf else "default", budget, prompt, args.runs, prefetch=pf)
        row["label"] = name
        row["ratio_min"] = row["ttft_min_s"] / bound
        row["ratio_median"] = row["ttft_median_s"] / bound
        rows.append(row)
        t = row["trace"]
        print(
            f"{name:>11}: median {row['ttft_median_s']:.3f}s ({row['ratio_median']:.3f}x) min {row['ttft_min_s']:.3f}s "
            f"copied {row['experts_copied']:.0f} wasted {row['prefetch_wasted']} | copy busy {t.get('copy_busy_ms', 0):.1f} "
            f"idle {t.get('copy_idle_ms', 0):.1f} head {t.get('before_first_copy_ms', 0):.1f} "
            f"tail {t.get('after_last_copy_ms', 0):.1f} ms",
            flush=True,
        )
    result = {"bandwidth_Bps": bw, "bound_s": bound, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"bound_s": bound, "bandwidth_GBps": bw / 1e9}))


if __name__ == "__main__":
    main()
