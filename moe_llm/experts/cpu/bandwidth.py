"""Measured host-memory read bandwidth, the ceiling of a memory-bound CPU expert kernel."""

from __future__ import annotations

from .kernel import default_threads, lib

DEFAULT_BYTES = 1 << 30  # larger than any last-level cache the kernel targets


def measure_read_bandwidth(threads: int | None = None, nbytes: int = DEFAULT_BYTES, repeats: int = 5) -> float:
    """GB/s (1e9 bytes/s) of a multi-threaded sum over `nbytes` of freshly touched memory, best
    of `repeats` passes; each thread reads the part it touched first (NUMA-local)."""
    if nbytes < 8 or repeats < 1:
        raise ValueError("need nbytes >= 8 and repeats >= 1")
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    gbs = lib().moe_cpu_read_bandwidth(nbytes, n, repeats)
    if gbs < 0:
        raise MemoryError(f"cannot allocate {nbytes} bytes to measure read bandwidth")
    return gbs
