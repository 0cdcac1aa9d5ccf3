"""The benchmark protocol (`shared/benchmark.md`): one process, every figure.

For each variant (full engine, no prefetch, no cache and no prefetch, unlimited
budget, other budgets and bit widths) a fresh engine is wired over the same
synthetic trunk and store, warmed up (kernels compiled), and then measured:

- TTFT for each prompt length, each from a cold cache (every expert copied), with the
  reported run's timeline (`ttft_layers`): when each MoE layer's routing reached the host,
  so a slow prefill shows whether every layer slowed (the link) or a few stalled;
- the workload: a random prompt, then greedy decode; decode tok/s and the
  cache/prefetch counters are taken over the decode steps only;
- both `repeats` times (default 3): a row reports the middle run (by decode tok/s,
  with that run's counters; by time for each TTFT) and keeps every run's figure
  in `decode_tok_s_runs` / `ttft_s_runs`, so the spread is on record;
- peak GPU memory (`torch.cuda.max_memory_allocated`) over the variant.

Ratios: bound = 1 / (bytes moved per token / pinned bandwidth + resident time
per token), overlap limit = 1 / max(bytes per token / bandwidth, resident time),
where the bandwidth is measured in the same run (64 MiB pinned copies) and the
resident time comes from the unlimited-budget variant of the same bit width.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..runtime.engine import Engine
from .kernels import kernel_timings
from .synthetic import SyntheticModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 512
    new_tokens: int = 128
    ttft_prompts: tuple[int, ...] = (512, 1024)
    seed: int = 0
    repeats: int = 3  # timed runs of the workload and of each TTFT, per variant


def _middle(values: list, key=None):
    """The middle element of `values` sorted by `key` (the upper middle for an even count):
    a run that was measured, unlike the mean of two."""
    return sorted(values, key=key)[len(values) // 2]


@dataclass(frozen=True)
class Variant:
    name: str
    bits: int | None = 2
    gpu_budget: int | None = None  # bytes; None with cache_per_layer None = every expert resident
    cache_per_layer: int | None = None
    prefetch: bool = True
    retain: bool = True  # False: each expert dropped right after use ("no cache")
    profile: bool = False
    options: tuple[tuple[str, object], ...] = ()  # more EngineConfig fields, e.g. (("cache_policy", "lfu"),)

    @property
    def resident(self) -> bool:
        return self.gpu_budget is None and self.cache_per_layer is None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ram_read_bandwidth() -> float | None:
    """This machine's RAM read bandwidth (bytes/s), measured now with every physical core
    (`planning.speed.measure_machine`, which also rewrites machine.json, so every `auto` split
    of the run starts from this run's probe and not from one cached while other work ran);
    None where the CPU kernel cannot be built."""
    from ..errors import ConfigError
    from ..planning import speed

    try:
        return speed.measure_machine()["ram_gbps"] * 1e9
    except ConfigError as exc:
        log.info("no RAM read probe: %s", exc)
        return None


def pinned_bandwidth(device: torch.device, nbytes: int = 64 << 20, reps: int = 20) -> float:
    """Host->device bytes/s of `nbytes` pinned copies (host memcpy on CPU)."""
    if device.type != "cuda":
        src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        return nbytes * reps / (time.perf_counter() - t0)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    _sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return nbytes * reps / (start.elapsed_time(end) / 1e3)


def _decode_run(engine: Engine, prompt: list[int], new_tokens: int) -> dict:
    """The workload: prefill `prompt`, decode greedily; counters over decode steps only."""
    dev = engine.device
    first = None
    ids: list[int] = []
    last = None
    t_first = 0.0
    for chunk in engine.stream(prompt, max_new_tokens=new_tokens):
        if first is None:
            first, t_first = engine.stats.copy(), time.perf_counter()
        ids.extend(chunk.token_ids)
        last = chunk
    _sync(dev)
    t_end = time.perf_counter()
    steps = len(ids) - 1  # forward passes after the prefill
    dec = engine.stats - first
    return {
        "generated_tokens": len(ids),
        "distinct_tokens": len(set(ids)),
        "decode_tok_s": steps / (t_end - t_first) if steps > 0 else 0.0,
        "engine_tok_s": last.stats["tokens_per_second"],
        "ttft_workload_s": last.stats["time_to_first_token_s"],
        "hit_rate": dec.hit_rate,
        "host_syncs_per_token": dec.host_syncs_per_token,
        "prefetch_issued_per_token": dec.prefetch_issued / max(steps, 1),
        "prefetch_used_per_token": dec.prefetch_used / max(steps, 1),
        "misses_per_token": dec.cache_misses / max(steps, 1),
        "copied_bytes_per_token": dec.bytes_to_device / max(steps, 1),
        "admissions_held_per_token": dec.admissions_held / max(steps, 1),  # experts.admission's gate
        "zero_copy_bytes_per_token": dec.bytes_from_host / max(steps, 1),
        # what crosses the link: admission copies plus misses read in place
        "bytes_per_token": (dec.bytes_to_device + dec.bytes_from_host) / max(steps, 1),
        "cpu_expert_calls_per_token": dec.cpu_expert_calls / max(steps, 1),
        "cpu_expert_bytes_per_token": dec.cpu_expert_bytes / max(steps, 1),
        "cpu_expert_ms_per_token": dec.cpu_expert_ms / max(steps, 1),
        # the rate at which the CPU threads computed their shares of missed experts
        "cpu_expert_gbps": dec.cpu_expert_bytes / dec.cpu_expert_ms / 1e6 if dec.cpu_expert_ms > 0 else None,
    }


@contextmanager
def _layer_clock(runtime) -> Iterator[list[float]]:
    """Host times at which each prompt layer's experts were enqueued: just after its one host
    sync (the routing), so the gaps are the GPU's pace through the prompt, layer by layer."""
    marks: list[float] = []
    inner = runtime._grouped

    def timed(*args):
        out = inner(*args)
        marks.append(time.perf_counter())
        return out

    runtime._grouped = timed  # this engine's runtime only, for this one prompt
    try:
        yield marks
    finally:
        del runtime._grouped


def _ttft(engine: Engine, prompt: list[int]) -> tuple[float, dict | None]:
    """One cold TTFT (every expert of every layer is copied) and its layer timeline (ms):
    to the first layer's routing, between layers' routings, and from the last to the token."""
    engine.reset_cache()
    _sync(engine.device)
    allocs = _device_allocs(engine.device)
    with _layer_clock(engine.runtime) as marks:
        t0 = time.perf_counter()
        ttft = engine.generate(prompt, max_new_tokens=1).stats["time_to_first_token_s"]
        end = t0 + ttft
    if not marks:  # the prompt took no host-dispatched layer (no timeline to give)
        return ttft, None
    ms = [round((b - a) * 1e3, 2) for a, b in zip([t0, *marks], [*marks, end], strict=True)]
    timeline = {"first_ms": ms[0], "layer_ms": ms[1:-1], "last_ms": ms[-1]}
    if allocs is not None:  # cudaMalloc / cudaFree calls the caching allocator made during the prompt
        now = _device_allocs(engine.device)
        timeline["device_mallocs"], timeline["device_frees"] = now[0] - allocs[0], now[1] - allocs[1]
    return ttft, timeline


def _device_allocs(device: torch.device) -> tuple[int, int] | None:
    """(cudaMalloc, cudaFree) calls of the caching allocator so far on `device` (None off CUDA)."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return stats.get("num_device_alloc", 0), stats.get("num_device_free", 0)


def _traced(engine: Engine, run: Callable[[], object]):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        out = run()
        _sync(engine.device)
        wall = time.perf_counter() - t0
    return prof, wall, out


def profile_prefill(engine: Engine, prompt: list[int]) -> dict:
    """torch.profiler over one cold prefill (TTFT): wall, H2D copy, kernel time, top kernels."""
    engine.reset_cache()
    _sync(engine.device)
    prof, wall, _ = _traced(engine, lambda: engine.generate(prompt, max_new_tokens=1))
    return _summary(prof, wall, 1, "prompt")


def profile_decode(engine: Engine, prompt: list[int], tokens: int = 8) -> dict:
    """torch.profiler over `tokens` decode steps right after `prompt`: per-token wall, H2D copy
    and kernel time. The prefill and the first token stay outside the trace, and attention reads
    the window that follows `prompt` (the timed rows' window when `prompt` is theirs; a short
    prompt hides costs that grow with it, such as attention's)."""
    engine.generate(prompt, max_new_tokens=2)  # this window's graph captured, kernels compiled
    stream = engine.stream(prompt, max_new_tokens=tokens + 1)
    next(stream)  # the prefill and the first token, before the trace
    prof, wall, chunks = _traced(engine, lambda: [c.token_ids for c in stream])
    steps = sum(len(ids) for ids in chunks)  # the tokens decoded inside the trace
    return _summary(prof, wall, max(steps, 1), "token")


def _summary(prof, wall: float, n: int, unit: str) -> dict:
    copy_us = kernel_us = sync_us = 0.0
    kernels = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if "Memcpy HtoD" in ev.key:
            copy_us += dev_us
        elif dev_us and not ev.key.startswith("Memcpy") and not ev.key.startswith("Memset"):
            kernel_us += dev_us
            kernels.append((dev_us, ev.key, ev.count))
        if ev.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync"):
            sync_us += ev.cpu_time_total
    kernels.sort(reverse=True)
    return {
        f"{unit}s": n,
        f"wall_s_per_{unit}": wall / n,
        f"h2d_copy_s_per_{unit}": copy_us / 1e6 / n,
        f"kernel_s_per_{unit}": kernel_us / 1e6 / n,
        f"host_wait_s_per_{unit}": sync_us / 1e6 / n,
        "top_kernels": [{"name": k[:80], f"s_per_{unit}": us / 1e6 / n, "calls": c} for us, k, c in kernels[:14]],
    }


def run_variant(model: SyntheticModel, v: Variant, workload: Workload, prompts: dict) -> dict:
    """Measure one variant; returns its row (without the ratios).

    Every variant first runs the whole workload once untimed, and the CUDA caching
    allocator is never emptied between variants: on the benchmark VM a cudaMalloc
    costs milliseconds, and the growing KV cache of 32 layers would otherwise land
    such calls inside the timed decode of whichever variant runs after a flush."""
    dev = model.device
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    engine = model.engine(
        v.gpu_budget, prefetch=v.prefetch, retain=v.retain, cache_per_layer=v.cache_per_layer, **dict(v.options)
    )
    try:
        engine.generate(prompts["warmup"], max_new_tokens=4)  # compile kernels, touch every path
        engine.generate(prompts[max(workload.ttft_prompts)], max_new_tokens=2)
        engine.generate(prompts["main"], max_new_tokens=workload.new_tokens)
        row = {
            "name": v.name,
            "experts_bits": v.bits,
            "gpu_budget_bytes": v.gpu_budget,
            "expert_slots": engine.cache.num_slots,
            "total_experts": len(model.info.layers) * model.info.num_experts,
            "num_experts": model.info.num_experts,
            "cache_policy": engine.config.cache_policy,
            "max_context": engine.config.max_context,
            "prefetch": v.prefetch,
            "cache": v.retain,
            "expert_bytes": model.fmt.nbytes,
            "expert_bits_per_param": model.fmt.bits_per_param,
            "plan": engine.plan.to_dict(),
            "cpu_experts": engine.config.cpu_experts,
            "cpu_road": engine.runtime.cpu_road,  # split (GPU and CPU threads), cpu, or off
            # of each missed expert, the down-plane bytes the CPU takes, by misses in the layer,
            # after the untimed warm-up runs
            "cpu_take": engine.runtime.split_take,
        }
        repeats = max(1, workload.repeats)
        ttft = {str(n): [_ttft(engine, prompts[n]) for _ in range(repeats)] for n in workload.ttft_prompts}
        middle = {n: _middle(runs, key=lambda r: r[0]) for n, runs in ttft.items()}
        row["ttft_s"] = {n: r[0] for n, r in middle.items()}
        row["ttft_s_runs"] = {n: [r[0] for r in runs] for n, runs in ttft.items()}
        row["ttft_layers"] = {n: r[1] for n, r in middle.items()}  # the reported run's timeline
        runs = []
        for _ in range(repeats):
            engine.reset_cache()
            runs.append(_decode_run(engine, prompts["main"], workload.new_tokens))
        row.update(_middle(runs, key=lambda r: r["decode_tok_s"]))
        row["decode_tok_s_runs"] = [r["decode_tok_s"] for r in runs]
        row["cpu_take_end"] = engine.runtime.split_take  # 'auto' moves its tables as it decodes
        row["uniform_hit_rate"] = engine.cache.num_slots / row["total_experts"] if v.retain else 0.0
        row["slots_per_layer_at_end"] = engine.cache.per_layer()
        if v.profile:
            try:
                row["profile"] = profile_decode(engine, prompts["main"])
                row["profile_prefill"] = profile_prefill(engine, prompts[max(workload.ttft_prompts)])
            except Exception as exc:  # the profiler is optional on some runtimes
                row["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        _sync(dev)
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        return row
    finally:
        engine.cache.synchronize()
        engine.runtime.close()  # the split's serving thread
        del engine
        model.detach()


def add_ratios(row: dict, bandwidth: float, resident_s: float, all_expert_bytes: int) -> None:
    """bound, overlap limit and TTFT transfer bound for one measured row."""
    transfer = row["bytes_per_token"] / bandwidth
    row["transfer_s_per_token"] = transfer
    row["resident_s_per_token"] = resident_s
    row["bound_tok_s"] = 1.0 / (transfer + resident_s)
    row["overlap_limit_tok_s"] = 1.0 / max(transfer, resident_s)
    row["ratio_to_bound"] = row["decode_tok_s"] / row["bound_tok_s"]
    row["ratio_to_overlap_limit"] = row["decode_tok_s"] / row["overlap_limit_tok_s"]
    ttft_bound = all_expert_bytes / bandwidth
    row["ttft_transfer_bound_s"] = ttft_bound
    # a prompt's layer at the link's pace: its experts' copies (`ttft_layers` against this)
    row["ttft_copy_ms_per_layer"] = 1e3 * ttft_bound * row["num_experts"] / row["total_experts"]
    row["ttft_ratio_to_bound"] = {n: t / ttft_bound for n, t in row["ttft_s"].items()}


def run_protocol(
    model: SyntheticModel,
    variants: list[Variant],
    workload: Workload,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Run `variants` (grouped by bit width: the model's store is rebuilt per width)."""
    dev = model.device
    bandwidth = pinned_bandwidth(dev)
    ram = ram_read_bandwidth()
    prompts = {n: model.random_prompt(n, workload.seed + n) for n in workload.ttft_prompts}
    prompts["main"] = model.random_prompt(workload.prompt_tokens, workload.seed)
    prompts["warmup"] = model.random_prompt(32, workload.seed + 1)
    rows, kernels = [], {}
    for bits in dict.fromkeys(v.bits for v in variants):
        if model.fmt.bits != bits:
            model.set_experts(bits)
        if dev.type == "cuda":
            try:
                path = next((dict(v.options).get("kernel_tuning") for v in variants if v.bits == bits), None)
                tuning = None
                if path:
                    from ..kernels.triton_moe import Tuning

                    tuning = Tuning.from_file(path, bits)
                kernels[str(bits)] = kernel_timings(model.fmt, dev, tuning=tuning)
            except Exception as exc:  # timings are diagnostics; never lose the rows for them
                kernels[str(bits)] = {"error": f"{type(exc).__name__}: {exc}"}
        group = [v for v in variants if v.bits == bits]
        group.sort(key=lambda v: not v.resident)  # resident time first: every ratio needs it
        resident_s = None
        for v in group:
            t0 = time.perf_counter()
            row = run_variant(model, v, workload, prompts)
            if v.resident:
                resident_s = 1.0 / row["decode_tok_s"]
            if resident_s is not None:
                add_ratios(row, bandwidth, resident_s, model.expert_bytes_total)
            row["host_store_bytes"] = model.store.nbytes
            row["store_build_s"] = model.store_build_s
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            log.info("%s: %.2f tok/s", v.name, row["decode_tok_s"])
            if on_row:
                on_row(row)
    return {
        "pinned_bandwidth_bytes_s": bandwidth,
        "ram_read_bandwidth_bytes_s": ram,
        "variants": rows,
        "kernels": kernels,
    }
