"""Aggregate decode speed of N concurrent requests on the synthetic Mixtral (continuous batching).

    python scripts/bench_streams.py [--budget-gib 12] [--streams 1 2 4 8] [--new-tokens 64] [--out s.json]
    python scripts/bench_streams.py --device cpu --batch-mode fused --streams 1 4 8 --new-tokens 24

For each N, N threads call `engine.generate` at once with different 64-token prompts and
`--new-tokens` greedy tokens (the batcher decodes them in one step each); prints the
aggregate tok/s (all generated tokens / the wall time from the first request's start to the
last one's end, prefills and graph captures included, so it is a lower bound of the decode
rate), per-stream tok/s, the sum of the streams' own decode rates (`decode_tok_s`: each from
its first token to its last, so without its prefill), the ratio to one stream, the steady
rate (`steady_tok_s`: 16 batched steps timed once all N rows decode, with no prefill or
capture among them; `steady_ratio_to_one` against one row's; `miss_limit_ratio`: the ratio to
one row if a step's time were in proportion to its missed experts, N * misses of one row's step
/ misses of this row's, and `steady_vs_miss_limit` the steady ratio against it), and whether
every stream's tokens equal its prompt's lone run (`equal_to_alone`; no prefix cache, so
every prefill is a cold one; `diverged_at`: per stream the first token that differs; and
`lone_repeatable`: whether each lone run, made twice, gave the same tokens), the peak GPU memory of the row (`peak_gpu_bytes`, against the
budget), how many requests so far waited for KV room (`kv_waited`, cumulative), and the CPU
road's bytes and busy time a step (`cpu_expert_mb_per_step`, `cpu_expert_ms_per_step`). Each N
runs twice; the faster run counts. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from moe_llm.bench.synthetic import Geometry, SyntheticModel
from moe_llm.runtime.decode_graph import window_for

PROMPT = 64  # tokens of each stream's prompt
# --device cpu: 8 layers of a 1024-wide Mixtral (2-bit experts of 3584), small enough for a laptop
CPU_GEOMETRY = Geometry(layers=8, hidden=1024, intermediate=3584, heads=16, kv_heads=4, vocab=8000, max_positions=4096)


PATHS: dict[tuple[int, ...], list[tuple[int, str]]] = {}  # --trace: prompt -> (position, decode path) per step


def trace_paths() -> None:
    """Record the path of every decode step of every request in PATHS: the graph decoder (run
    ahead when greedy), the eager one-token forward, or a fused step of B rows (on the batch
    graph, or eager): where a stream leaves its lone tokens, the paths say which one gave it."""
    from moe_llm.runtime.batching import Batcher

    one, fused = Batcher._decode_one, Batcher._decode_fused

    def decode_one(self, seq):
        PATHS.setdefault(tuple(seq.prompt_ids), []).append((seq.cached, "graph" if seq.on_graph else "eager"))
        return one(self, seq)

    def decode_fused(self, rows):
        way = f"fused{len(rows)}-{'graph' if self._fused.graph is not None else 'eager'}"
        for seq in rows:
            PATHS.setdefault(tuple(seq.prompt_ids), []).append((seq.cached, way))
        return fused(self, rows)

    Batcher._decode_one, Batcher._decode_fused = decode_one, decode_fused


def segments(steps: list[tuple[int, str]]) -> str:
    """'graph@64-70 fused4-graph@71-150 ...': runs of one path over consecutive positions."""
    out: list[list] = []
    for pos, way in steps:
        if out and out[-1][0] == way and out[-1][2] + 1 == pos:
            out[-1][2] = pos
        else:
            out.append([way, pos, pos])
    return " ".join(f"{w}@{a}-{b}" for w, a, b in out)


def run(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """(wall seconds, each prompt's GenerationResult), all prompts started at once."""
    PATHS.clear()
    out: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def one(i: int) -> None:
        barrier.wait()
        out[i] = engine.generate(prompts[i], max_new_tokens=new_tokens, temperature=0.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where token lists `a` and `b` differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-gib", type=float, default=12)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--policy", default="lru", help="the expert cache's policy (lru, lfu)")
    ap.add_argument("--cpu-experts", default="auto", help="the CPU road for misses (auto, off, all)")
    ap.add_argument("--batch-mode", default="auto", help="auto, exact or fused")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu: a smaller synthetic Mixtral (CPU_GEOMETRY), fp32")
    ap.add_argument("--trace", action="store_true", help="print the decode paths of a stream that left its lone tokens")
    ap.add_argument(
        "--profile", type=int, default=0, help="then profile steady steps of this many rows (profile_steady)"
    )
    args = ap.parse_args()
    if args.trace:
        trace_paths()
    if args.device == "cpu":
        model = SyntheticModel(CPU_GEOMETRY, "cpu", experts_bits=2, attn_bits=None, dtype=torch.float32)
        budget = None  # every expert in the "device" cache: the CPU kernel reads them in place either way
    else:
        model = SyntheticModel(Geometry(), "cuda", experts_bits=2, attn_bits=4, head_bits=4)
        budget = int(args.budget_gib * 2**30)
    # a budget's plan holds one context of KV for the rows that decode together, each at the
    # graph decoder's window of its last position: the context makes room for the most streams
    # at once, and every row uses the same engine
    window = window_for(PROMPT + args.new_tokens - 1, max_len=1 << 30)
    engine = model.engine(
        budget, max_context=max(1152, max(args.streams) * window), max_batch=max(args.streams), prefix_cache=0,
        cache_policy=args.policy, cpu_experts=args.cpu_experts, batch_mode=args.batch_mode,
    )  # fmt: skip
    engine.generate(model.random_prompt(PROMPT, 999), max_new_tokens=8)  # warm-up: captures, compiles
    rows, base, steady_base, base_misses = [], None, None, None
    lone: dict[int, list[int]] = {}  # prompt seed -> its tokens decoded alone
    for n in args.streams:
        seeds = [100 * n + i for i in range(n)]
        prompts = [model.random_prompt(PROMPT, s) for s in seeds]
        best = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            before = engine.stats.copy()
            wall, results = run(engine, prompts, args.new_tokens)
            paths = {i: list(PATHS.get(tuple(p), [])) for i, p in enumerate(prompts)}
            if best is None or wall < best[0]:
                best = (wall, results, engine.stats - before, paths)
        wall, results, used, paths = best
        toks = [r.token_ids for r in results]
        repeatable = True  # a prompt decoded alone twice gives the same tokens (the reference holds)
        for s, p in zip(seeds, prompts, strict=True):
            if s not in lone:
                lone[s] = engine.generate(p, max_new_tokens=args.new_tokens, temperature=0.0).token_ids
                again = engine.generate(p, max_new_tokens=args.new_tokens, temperature=0.0).token_ids
                repeatable = repeatable and again == lone[s]
        total = sum(len(t) for t in toks)
        agg = total / wall
        base = base or agg
        steady = steady_tok_s(engine, model, n)
        steady_base = steady_base or steady
        # each stream's own decode rate (first token to last; other streams' prefills interleave)
        decode = sum(r.stats["tokens_per_second"] for r in results)
        row = dict(streams=n, tokens=total, wall_s=wall, aggregate_tok_s=agg, per_stream_tok_s=agg / n,
                   decode_tok_s=decode,
                   ratio_to_one=agg / base, steady_tok_s=steady, steady_ratio_to_one=steady / steady_base, steps=used.decode_steps, hit_rate=used.hit_rate,
                   misses_per_step=used.cache_misses / max(used.decode_steps, 1),
                   copied_mb_per_step=used.bytes_to_device / max(used.decode_steps, 1) / 1e6,
                   cpu_expert_calls=used.cpu_expert_calls, batch_mode=engine.batcher.stats()["batch_mode"],
                   # the CPU road's share of a step: is it the longer road once rows are batched?
                   cpu_expert_mb_per_step=used.cpu_expert_bytes / max(used.decode_steps, 1) / 1e6,
                   cpu_expert_ms_per_step=used.cpu_expert_ms / max(used.decode_steps, 1),
                   equal_to_alone=all(t == lone[s] for t, s in zip(toks, seeds, strict=True)),
                   # per stream: the first token index where it left its lone run (None: equal)
                   diverged_at=[first_difference(t, lone[s]) for t, s in zip(toks, seeds, strict=True)],
                   lone_repeatable=repeatable,
                   # the streams' runs, the lone runs and the steady steps: within the budget?
                   peak_gpu_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                   kv_waited=engine.batcher.stats()["requests_kv_waited"])  # fmt: skip
        # the physical limit where misses dominate: a step's time in proportion to its missed
        # experts (uniform routing: N rows miss more distinct experts, each read once for all)
        base_misses = base_misses or row["misses_per_step"]
        row["miss_limit_ratio"] = n * base_misses / row["misses_per_step"] if row["misses_per_step"] else None
        row["steady_vs_miss_limit"] = (
            row["steady_ratio_to_one"] / row["miss_limit_ratio"] if row["miss_limit_ratio"] else None
        )
        rows.append(row)
        for i, at in enumerate(row["diverged_at"]):
            if at is not None and args.trace:
                print(f"stream {i} (seed {seeds[i]}) left its lone tokens at token {at} (position "
                      f"{PROMPT + at - 1} decoded it): {segments(paths[i])}", flush=True)  # fmt: skip
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.out:  # after every row: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"budget_gib": args.budget_gib, "new_tokens": args.new_tokens, "rows": rows}, f, indent=1)

    if args.profile:
        profile_steady(engine, model, args.profile)


def _rounds(streams, k: int) -> float:
    """Seconds for k rounds of next() over every stream (one thread drives them all, so each
    round is one batched step)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(k):
        for s in streams:
            next(s)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _steady_streams(engine, model, n: int, steps: int, rounds_after: int) -> list:
    """n streams driven until every row decodes and the batch graph is captured (6 rounds), with
    room for `rounds_after` * `steps` more rounds."""
    prompts = [model.random_prompt(PROMPT, 7000 + i) for i in range(n)]
    streams = [engine.stream(p, max_new_tokens=12 + rounds_after * steps, temperature=0.0) for p in prompts]
    _rounds(streams, 6)
    return streams


def _drain(streams) -> None:
    for s in streams:
        for _ in s:
            pass


def steady_tok_s(engine, model, n: int, steps: int = 16) -> float:
    """Aggregate decode tok/s of n rows once they all decode: no prefill or capture inside."""
    streams = _steady_streams(engine, model, n, steps, 1)
    wall = _rounds(streams, steps)
    _drain(streams)
    return n * steps / wall


def profile_steady(engine, model, n: int, steps: int = 16) -> None:
    """Where a step of `n` rows goes once they all decode (prefills and captures excluded): one
    thread drives every stream, so each round of next() is one batched step. Prints the wall
    ms per step, a torch.profiler table over `steps` steps (GPU time per kernel) and a cProfile
    of the host over as many."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    streams = _steady_streams(engine, model, n, steps, 3)
    captures = engine.batcher.stats()["batch_graph_captures"]
    wall = _rounds(streams, steps)
    print(f"steady: {n} rows, {1e3 * wall / steps:.2f} ms per step, {n * steps / wall:.1f} tok/s", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _rounds(streams, steps)
    print(f"torch.profiler over {steps} steps (per step: divide by {steps})")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    cp = cProfile.Profile()
    cp.enable()
    _rounds(streams, steps)
    cp.disable()
    pstats.Stats(cp).sort_stats("tottime").print_stats(25)
    print(
        f"graph captures before/after the measured steps: {captures} / {engine.batcher.stats()['batch_graph_captures']}"
    )
    _drain(streams)


if __name__ == "__main__":
    main()
