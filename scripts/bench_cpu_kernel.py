"""Time the CPU expert kernel on a Mixtral-8x7B expert (H=4096, I=14336) against memory speed.

    python scripts/bench_cpu_kernel.py [--bits 2 3] [--threads 1 2 16] [--repeats 20]

Experts hold random codes and meta in the real layout (speed does not depend on the values).
Calls rotate over enough distinct experts (4x the last-level cache, from sysfs) that each one
is read from DRAM, not the cache.
For each thread count it prints ms per one-token expert MLP, GB/s of expert bytes read, and
the ratio to `measure_read_bandwidth` at the same thread count; median and best of the
repeats (on a shared machine the best is the uncontended figure). The compute ceiling (one
thread on cache-resident weights) says whether a row is compute- or memory-bound: memory-bound
when threads x ceiling exceeds the read bandwidth.
"""

from __future__ import annotations

import argparse
import glob
import re
import statistics
import time

import torch

from moe_llm.bench.synthetic import random_expert
from moe_llm.experts.cpu import default_threads, expert_mlp, experts_mlp, isa, measure_read_bandwidth, qlinear
from moe_llm.experts.format import ExpertFormat, matrix_views
from moe_llm.quant import QuantSpec

FALLBACK_LLC = 32 * 2**20


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), else 32 MiB. The H200 host's L3 is
    300 MiB: a rotation sized for 32 MiB stayed in it and read above RAM speed."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            sizes.append(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    return max(sizes, default=FALLBACK_LLC)


def time_calls(fn, n_buffers: int, repeats: int, gap_s: float = 0.0) -> list[float]:
    for i in range(n_buffers):  # warm-up: first touch, thread team start
        fn(i)
    times = []
    for i in range(repeats):
        if gap_s:
            time.sleep(gap_s)  # sparse calls, as decode at a large cache makes them
        t0 = time.perf_counter()
        fn(i % n_buffers)
        times.append(time.perf_counter() - t0)
    return times


def compute_ceiling(fmt: ExpertFormat, buf: torch.Tensor, x: torch.Tensor, repeats: int, rows: int = 4096) -> float:
    """GB/s of expert bytes one thread computes when the weights are cache-resident: the first
    `rows` rows of gate_up_proj (a few MB, inside the last-level cache), called repeatedly."""
    spec = fmt.specs["gate_up_proj"]
    part = QuantSpec(spec.bits, spec.group_size, rows, spec.in_features)
    views = matrix_views(fmt.layout.views(buf), "gate_up_proj")
    t = {
        "q": views["q"][:rows],
        "scale_q": views["scale_q"][: part.groups],
        "zero_q": views["zero_q"][: part.groups],
        "meta": views["meta"][: part.meta_rows],
    }
    best = min(time_calls(lambda i: qlinear(x, t, part, threads=1), 2, repeats))
    return part.payload_bits() / 8 / best / 1e9


def one_call(fmt: ExpertFormat, bufs: list[torch.Tensor], x: torch.Tensor, threads: int, n: int):
    """Call i: expert i alone (n=1, `expert_mlp`) or experts i, i+1 (n=2, `experts_mlp`)."""
    if n == 1:
        return lambda i: expert_mlp(x, bufs[i], fmt, threads=threads)
    return lambda i: experts_mlp(x, [bufs[i], bufs[(i + 1) % len(bufs)]], [0.6, 0.4], fmt, threads=threads)


def report(
    label: str, call, n: int, fmt: ExpertFormat, bw: float, n_buf: int, repeats: int, gap_s: float = 0.0
) -> None:
    times = time_calls(call, n_buf, repeats, gap_s)
    med, best = statistics.median(times), min(times)
    g_med, g_best = n * fmt.nbytes / med / 1e9, n * fmt.nbytes / best / 1e9
    print(
        f" {label}   {med * 1e3:8.2f} ({best * 1e3:6.2f})     {g_med:6.1f} ({g_best:5.1f})"
        f"          {100 * g_med / bw:5.1f}% ({100 * g_best / bw:5.1f}%)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--threads", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--gaps-ms", type=float, nargs="+", default=[], help="also time calls this far apart")
    ap.add_argument(
        "--llc-multiple", type=float, default=4.0, help="bytes of distinct experts / the last-level cache's size"
    )
    args = ap.parse_args()
    cores = default_threads()
    llc = last_level_cache_bytes()
    thread_counts = args.threads or sorted({1, min(2, cores), cores})
    bw = {t: measure_read_bandwidth(t) for t in thread_counts}
    print(f"kernel ISA {isa()}, {cores} physical cores, last-level cache {llc / 2**20:.0f} MiB")
    for t in thread_counts:
        print(f"measured read bandwidth, {t:>2} threads: {bw[t]:6.1f} GB/s")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.hidden, generator=gen)
    for bits in args.bits:
        fmt = ExpertFormat.build(args.hidden, args.intermediate, bits, torch.bfloat16)
        n_buf = max(2, int(args.llc_multiple * llc / fmt.nbytes) + 1)
        bufs = [random_expert(fmt, "cpu", gen) for _ in range(n_buf)]
        mb = fmt.nbytes / 1e6
        ceiling = compute_ceiling(fmt, bufs[0], x, args.repeats)
        print(f"\n{bits}-bit expert: {mb:.1f} MB ({fmt.bits_per_param:.2f} bits/param), {n_buf} distinct buffers")
        print(f" compute ceiling, weights in cache: {ceiling:.1f} GB/s per thread")
        print(" threads   ms/expert median (min)   GB/s median (best)   % of read bw median (best)")
        for t in thread_counts:
            report(f"{t:>8}", one_call(fmt, bufs, x, t, 1), 1, fmt, bw[t], n_buf, args.repeats)
        t = thread_counts[-1]
        report(f" top-2 x{t}", one_call(fmt, bufs, x, t, 2), 2, fmt, bw[t], n_buf, args.repeats)
        for gap in args.gaps_ms:
            for t in thread_counts:
                report(
                    f"{t:>3} @{gap:g}ms", one_call(fmt, bufs, x, t, 1), 1, fmt, bw[t], n_buf, args.repeats, gap / 1e3
                )


if __name__ == "__main__":
    main()
