"""`run_bench`: build the synthetic model, run every variant, the baseline, and write JSON.

The JSON is rewritten after every measured row, so a run cut short still leaves
what it measured.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .protocol import Variant, Workload, run_protocol
from .report import summarize
from .synthetic import Geometry, SyntheticModel

log = logging.getLogger(__name__)

ROUTING_NOTE = (
    "random weights route almost uniformly across experts: the worst case for an expert cache "
    "(an LRU with K of E slots then hits about K/E of the time)"
)


def default_variants(
    bits: int,
    budget: int,
    extra_budgets: tuple[int, ...] = (),
    also_bits: tuple[int, ...] = (),
    options: tuple[tuple[str, object], ...] = (),
) -> list[Variant]:
    """The ablations at `budget`, the resident row, the other policy, extra budgets, other bit
    widths. `options` (e.g. max_context, head_bits) apply to every row."""
    o = tuple(options)
    vs = [
        Variant("full", bits, budget, profile=True, options=o),  # cpu_experts "auto"
        Variant("full-cpu-off", bits, budget, options=o + (("cpu_experts", "off"),)),  # the GPU road only
        Variant("full-cpu-all", bits, budget, options=o + (("cpu_experts", "all"),)),  # every miss on the CPU
        Variant("full-lfu", bits, budget, options=o + (("cache_policy", "lfu"),)),
        Variant("no-prefetch", bits, budget, prefetch=False, options=o),
        Variant("no-cache-no-prefetch", bits, budget, prefetch=False, retain=False, options=o),
        Variant("resident", bits, None, profile=True, options=o),
        Variant("full-eager", bits, budget, options=o + (("cuda_graphs", False),)),  # what the graph buys
    ]
    vs += [Variant(f"full-{b / (1 << 30):g}GiB", bits, b, options=o) for b in extra_budgets]
    for cpu in ("off", "all"):
        vs += [
            Variant(f"full-cpu-{cpu}-{b / (1 << 30):g}GiB", bits, b, options=o + (("cpu_experts", cpu),))
            for b in extra_budgets
        ]
    vs += [
        Variant(f"full-lfu-{b / (1 << 30):g}GiB", bits, b, options=o + (("cache_policy", "lfu"),))
        for b in extra_budgets
    ]
    for ob in also_bits:  # the other widths: the headline budget and the resident time for its bound
        vs.append(Variant(f"full-{ob}bit", ob, budget, options=o))
        vs.append(Variant(f"resident-{ob}bit", ob, None, options=o))
    return vs


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": __import__("os").cpu_count(),
    }
    for mod in ("triton", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sms=props.multi_processor_count)
    return info


def write_json(path: Path | None, run: dict) -> None:
    """Write `run` to `path` atomically (a temporary file, then a rename); None writes nothing."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=2, default=str) + "\n")
    tmp.replace(path)


def run_bench(
    geometry: Geometry,
    device: str = "cuda",
    bits: int = 2,
    budget: int = 12 << 30,
    extra_budgets: tuple[int, ...] = (16 << 30,),
    also_bits: tuple[int, ...] = (3,),
    workload: Workload = Workload(),
    accelerate_layers: int | None = 6,
    out: Path | None = None,
    command: str = "",
    on_row: Callable[[dict], None] | None = None,
    variants: list[Variant] | None = None,
    options: tuple[tuple[str, object], ...] = (),
    head_bits: int | None = 4,
) -> dict:
    """Run the whole protocol in this process; returns (and writes) the result dict."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    run: dict = {
        "command": command,
        "machine": machine_info(dev),
        "geometry": geometry.to_dict(),
        "attention_bits": 4,
        "routing": ROUTING_NOTE,
        "workload": {
            "prompt_tokens": workload.prompt_tokens,
            "new_tokens": workload.new_tokens,
            "ttft_prompts": list(workload.ttft_prompts),
            "greedy": True,
            "batch": 1,
            "ttft_note": "each TTFT starts from a cold cache: every expert of every layer is copied",
            "repeats": workload.repeats,
            "repeats_note": "rows report the middle of `repeats` timed runs; every run is in *_runs",
        },
        "gpu_budget_bytes": budget,
    }
    variants = variants or default_variants(bits, budget, extra_budgets, also_bits, options)
    run["engine_options"] = dict(options)
    run["head_bits"] = head_bits
    t_build = time.perf_counter()
    model = SyntheticModel(geometry, device, experts_bits=variants[0].bits, attn_bits=4, head_bits=head_bits)
    run["build_s"] = time.perf_counter() - t_build
    run["variants"] = []

    def row_done(row: dict) -> None:
        run["variants"].append(row)
        write_json(out, run)
        if on_row:
            on_row(row)

    measured = run_protocol(model, variants, workload, on_row=row_done)
    run["pinned_bandwidth_bytes_s"] = measured["pinned_bandwidth_bytes_s"]
    run["ram_read_bandwidth_bytes_s"] = measured["ram_read_bandwidth_bytes_s"]
    run["kernels"] = measured["kernels"]
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if accelerate_layers and dev.type == "cuda":
        from .baseline import accelerate_baseline

        try:
            run["accelerate"] = accelerate_baseline(geometry, dev, budget, layers=accelerate_layers)
        except Exception as exc:  # report, do not lose the engine's rows
            log.exception("accelerate baseline failed")
            run["accelerate"] = {"error": f"{type(exc).__name__}: {exc}"}
    summarize(run)
    run["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run["total_s"] = time.perf_counter() - t0
    write_json(out, run)
    return run
