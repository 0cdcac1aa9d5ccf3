"""Trace one cold prefill (TTFT) of the synthetic Mixtral and say where the link sits idle.

    python scripts/trace_prefill.py [--tokens 1024] [--budget-gib 12] [--trace out.json]

Prints the wall time, the copy engine's busy time, and the largest gaps between host-to-device
copies with the host-side operations that ran during each gap (from torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moe_llm.bench.synthetic import Geometry, SyntheticModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--budget-gib", type=float, default=None, help="default: every expert resident")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--gaps", type=int, default=12)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    model = SyntheticModel(Geometry(layers=args.layers), "cuda", experts_bits=2, attn_bits=4, head_bits=4)
    budget = None if args.budget_gib is None else int(args.budget_gib * 2**30)
    engine = model.engine(budget, max_context=args.tokens + 128)
    prompt = model.random_prompt(args.tokens, 1)
    for _ in range(2):
        engine.reset_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(prompt, max_new_tokens=1)
        torch.cuda.synchronize()
        print(f"untraced cold TTFT {time.perf_counter() - t0:.3f} s")
    engine.reset_cache()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompt, max_new_tokens=1)
        torch.cuda.synchronize()
    path = args.trace or "/tmp/prefill_trace.json"
    prof.export_chrome_trace(path)
    events = json.load(open(path))["traceEvents"]
    dev = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("gpu_memcpy", "kernel")]
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation")]
    h2d = sorted((e for e in dev if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]), key=lambda e: e["ts"])
    kern = sorted((e for e in dev if e["cat"] == "kernel"), key=lambda e: e["ts"])
    t_first = min(e["ts"] for e in dev)
    t_last = max(e["ts"] + e["dur"] for e in dev)
    busy = sum(e["dur"] for e in h2d)
    print(
        f"device span {(t_last - t_first) / 1e3:.1f} ms, H2D busy {busy / 1e3:.1f} ms in {len(h2d)} copies, "
        f"{sum(e['args'].get('bytes', 0) for e in h2d) / 1e9:.2f} GB; kernels {sum(e['dur'] for e in kern) / 1e3:.1f} ms"
    )
    print(
        f"before the first H2D: {(h2d[0]['ts'] - t_first) / 1e3:.2f} ms; after the last: {(t_last - h2d[-1]['ts'] - h2d[-1]['dur']) / 1e3:.2f} ms"
    )
    gaps = []
    for a, b in zip(h2d, h2d[1:], strict=False):
        g = b["ts"] - (a["ts"] + a["dur"])
        if g > 0:
            gaps.append((g, a["ts"] + a["dur"], b["ts"]))
    gaps.sort(reverse=True)
    print(
        f"H2D gaps: {len(gaps)}, total {sum(g for g, _, _ in gaps) / 1e3:.1f} ms, over 0.2 ms: "
        f"{sum(g for g, _, _ in gaps if g > 200) / 1e3:.1f} ms in {sum(1 for g, _, _ in gaps if g > 200)}"
    )
    for g, s, e in gaps[: args.gaps]:
        ops = {}
        for c in cpu:
            lo, hi = max(s, c["ts"]), min(e, c["ts"] + c["dur"])
            if hi > lo:
                ops[c["name"]] = ops.get(c["name"], 0) + (hi - lo)
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
        ks = [k["name"][:40] for k in kern if s <= k["ts"] < e][:4]
        print(
            f" gap {g / 1e3:6.2f} ms at {(s - t_first) / 1e3:7.1f} ms: host "
            + ", ".join(f"{n[:38]} {d / 1e3:.2f}" for n, d in top)
            + f" | kernels {ks}"
        )


if __name__ == "__main__":
    main()
