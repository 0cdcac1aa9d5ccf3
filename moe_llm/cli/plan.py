"""`moe-llm plan MODEL --gpu-budget 12GiB`: what would go where, from config.json alone, and
the decode speed to expect on a machine (`--pcie-gbps`, `--ram-gbps`, `--cores`, `--hbm-gbps`)
for each `cpu_experts` road: a projection from the cost model, not a measurement.

MODEL is a model directory or a known model's name (its config.json ships with moe-llm,
in moe_llm/data/known_configs/), so a plan needs no download.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .common import AttnBitsOpt, CacheOpt, ExpertsBitsOpt, HeadBitsOpt, bits_option

# the names, without importing torch for --help (planning.known_models reads the same files)
_KNOWN = sorted(p.stem for p in (Path(__file__).parents[1] / "data" / "known_configs").glob("*.json"))


def plan_table(mp, model_name: str, pcie_gbps: float) -> Table:
    from ..config import format_size

    p = mp.plan
    budget = format_size(p.budget_bytes) if p.budget_bytes else "no budget (every expert gets a slot)"
    title = (
        f"{model_name}: {mp.model_type}, {mp.num_layers} layers ({mp.moe_layers} MoE), "
        f"{mp.num_experts} experts, top-{mp.top_k} · {budget}"
    )
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("where")
    t.add_column("what")
    t.add_column("bytes", justify="right")
    attn = f"{mp.attn_bits}-bit" if mp.attn_bits else mp.dtype
    experts = f"{mp.experts_bits}-bit" if mp.experts_bits else mp.dtype
    head = f"{mp.head_bits}-bit" if mp.head_bits else mp.dtype
    t.add_row("GPU", f"trunk: attention/dense {attn}; LM head {head}; embeddings, norms, routers {mp.dtype}",
              format_size(p.trunk_bytes))  # fmt: skip
    t.add_row(
        "GPU",
        f"KV cache for the planned context of {mp.context:,} positions (with a budget, requests that "
        f"decode together share one context: {max(1, mp.context // 1024)} of up to 1,024 positions at once)",
        format_size(p.kv_bytes),
    )
    t.add_row("GPU", "activations and kernel workspace", format_size(p.workspace_bytes))
    t.add_row(
        "GPU",
        f"expert slots (one pool for all layers, {_floor_words(p)}): {p.slots} of {p.total_experts} "
        f"experts ({p.slots / p.total_experts:.0%}) x {format_size(p.expert_bytes)}",
        format_size(p.slot_pool_bytes),
    )
    total = format_size(p.device_bytes) + (f" of {format_size(p.budget_bytes)}" if p.budget_bytes else "")
    t.add_row("GPU", "[bold]total device[/]", f"[bold]{total}[/]")
    ram = f" of {format_size(mp.ram_bytes)}" if mp.ram_bytes else ""
    t.add_row(
        "host",
        f"pinned experts, {experts} ({mp.expert_bits_per_param:.2f} bits/param moved)",
        format_size(p.host_bytes) + ram,
    )
    per_token = mp.bytes_per_token
    ms = per_token / (pcie_gbps * 1e9) * 1e3
    t.add_row(
        "PCIe",
        f"expected hit rate {mp.expected_hit_rate:.1%} (uniform routing, slots / experts: random weights' worst case)",
        "",
    )
    t.add_row(
        "PCIe",
        f"expected expert bytes per token: (1 - hit rate) x top-{mp.top_k} x expert x {mp.moe_layers} "
        f"(~{ms:.1f} ms at {pcie_gbps:g} GB/s)",
        format_size(per_token),
    )
    return t


def _floor_words(p) -> str:
    if p.floor:
        return f">= {p.floor} per layer"
    return "fewer than one per layer: a prompt recycles them, decode reads misses in place or on the CPU"


def machine_line(m) -> str:
    from ..planning.speed import CPU_EFFICIENCY, CPU_GBPS_PER_THREAD

    def src(name: str) -> str:
        return f" [dim]({m.source(name)})[/]"

    return (
        f"machine: PCIe {m.pcie_gbps:g} GB/s{src('pcie_gbps')}, RAM {m.ram_gbps:g} GB/s{src('ram_gbps')}, "
        f"{m.cores} cores{src('cores')}, HBM {m.hbm_gbps:g} GB/s{src('hbm_gbps')}; CPU road {m.cpu_gbps:.1f} GB/s "
        + (
            "[dim](given)[/]"
            if m.cpu_road_gbps is not None
            else f"= min({CPU_EFFICIENCY:g} x RAM, {m.cpu_threads} threads x {CPU_GBPS_PER_THREAD:g} GB/s)"
        )
    )


def projection_table(roads: dict) -> Table:
    """Per cpu_experts road: missed experts per token, how many go over PCIe and to the CPU (with
    their bytes), and the projected time and speed."""
    t = Table(
        title="decode, batch 1, per token: projected by the cost model, not measured (uniform routing: worst case)",
        show_header=True,
        header_style="bold",
    )
    t.add_column("cpu_experts")
    for col in ("misses", "over PCIe (zero-copy)", "on the CPU", "ms"):
        t.add_column(col, justify="right")
    t.add_column("tok/s", justify="right", style="bold")
    for mode, r in roads.items():
        t.add_row(
            mode, f"{r.misses_per_token:.1f}",
            f"{r.pcie_experts_per_token:.1f} · {r.pcie_bytes_per_token / 1e6:,.0f} MB",
            f"{r.cpu_experts_per_token:.1f} · {r.cpu_bytes_per_token / 1e6:,.0f} MB",
            f"{r.s_per_token * 1e3:.1f}", f"{r.tok_s:.1f}",
        )  # fmt: skip
    return t


PROJECTION_NOTE = (
    "off: every miss read over PCIe; all: every miss computed by the CPU threads; auto: the cost model's "
    "split of each miss (experts.roads.take_table), so that both roads finish together; its counts are "
    "expert-equivalents; the CPU reads only its share of an expert's bytes (at 3 bits all of down_proj). HBM and the link at what "
    "the decode kernels reach of them (70% of HBM, at most the 1.35 TB/s an H200's resident token reads "
    "at; 65% of the link). "
    "Both roads' reads of a miss share the host's RAM bandwidth; a layer takes at least their sum at "
    "that rate. Not counted: KV reads, admission copies, kernel launches. The engine's auto only starts "
    "from this split, then takes the one its decode steps measure fastest."
)


@app.command()
def plan(
    model: str = typer.Argument(
        ...,
        help="Model directory (only config.json is read), or a known model's name, any case: "
        + ", ".join(_KNOWN)
        + " (a Hugging Face repository name such as mistralai/Mixtral-8x7B-v0.1 works too).",
    ),
    gpu_budget: str = typer.Option(None, "--gpu-budget", "--budget", help="Device memory budget, e.g. 12GiB."),
    ram: str = typer.Option(None, "--ram", help="Host RAM available for the pinned experts, e.g. 64GiB."),
    cache_per_layer: int = CacheOpt,
    experts_bits: str = ExpertsBitsOpt,
    attn_bits: str = AttnBitsOpt,
    head_bits: str = HeadBitsOpt,
    dtype: str = typer.Option(None, "--dtype", help="Compute dtype: bfloat16 (default), float16 or float32."),
    context: int = typer.Option(
        None,
        "--context",
        help="Context length to reserve KV cache for (default: settings' max_context, else 4096; at most the model's).",
    ),
    pcie_gbps: float = typer.Option(
        None, "--pcie-gbps", help="Host-to-GPU bandwidth in GB/s (default: measured here with --measure, else 25)."
    ),
    ram_gbps: float = typer.Option(
        None, "--ram-gbps", help="Host RAM read bandwidth in GB/s (default: measured here with --measure, else 60)."
    ),
    cores: int = typer.Option(None, "--cores", help="Physical CPU cores (default: this machine's)."),
    cpu_gbps: float = typer.Option(
        None,
        "--cpu-gbps",
        help="The CPU road's rate in GB/s, if known (scripts/bench_cpu_kernel.py; "
        "default: min(0.55 x RAM, 7 GB/s per core but one)).",
    ),  # fmt: skip
    hbm_gbps: float = typer.Option(
        None, "--hbm-gbps", help="GPU memory bandwidth in GB/s (default: the CUDA device's peak, else 500)."
    ),
    measure: bool = typer.Option(
        False, "--measure", help="Measure this machine's RAM (and, with a GPU, PCIe) bandwidth first, and keep it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Print what would go where for a GPU budget, the expected bytes per token, and the decode speed to
    expect for each cpu_experts road (a projection from the cost model); refuse if it cannot fit, naming
    the leaner settings or the budget that would."""
    from ..config import format_size
    from ..planning import machine, measure_machine, plan_model, project_decode

    mach = machine(pcie_gbps, ram_gbps, cores, hbm_gbps, cpu_gbps)  # bad values fail before any planning
    mp = plan_model(
        model, ram=ram, gpu_budget=gpu_budget, cache_per_layer=cache_per_layer, dtype=dtype, max_context=context,
        experts_bits=bits_option(experts_bits, (2, 3, 4), "--experts-bits"),
        attn_bits=bits_option(attn_bits, (4,), "--attn-bits"),
        head_bits=bits_option(head_bits, (4,), "--head-bits"),
    )  # fmt: skip
    if measure:  # after the plan: a budget that cannot fit fails at once
        measure_machine()
        mach = machine(pcie_gbps, ram_gbps, cores, hbm_gbps, cpu_gbps)
    roads = project_decode(mp, mach)
    if as_json:
        proj = {"machine": mach.to_dict(), "roads": {mode: r.to_dict() for mode, r in roads.items()}}
        sys.stdout.write(json.dumps({**mp.to_dict(), "decode_projection": proj}) + "\n")
        return
    console = Console()
    name = f"{mp.known_model} (shipped config.json)" if mp.known_model else Path(model).expanduser().name
    console.print(plan_table(mp, name, mach.pcie_gbps))
    left = (mp.plan.budget_bytes or 0) - mp.plan.device_bytes
    if mp.plan.budget_bytes:
        console.print(f"fits: {format_size(left)} of the budget left over")
    console.print(machine_line(mach))
    console.print(projection_table(roads))
    console.print(f"[dim]{PROJECTION_NOTE}[/]")
