"""`moe-llm generate`, `moe-llm demo` and `moe-llm make-tiny`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from . import app
from .common import (
    AttnBitsOpt,
    BudgetOpt,
    CacheOpt,
    CpuExpertsOpt,
    DeviceOpt,
    ExpertsBitsOpt,
    ModelArg,
    NoPrefetchOpt,
    check_engine_options,
    err_console,
    load_engine,
    quiet_transformers,
    resolve_model,
)


def stats_table(stats: dict, total_experts: int | None = None) -> Table:
    slots = str(stats.get("expert_slots", ""))
    t = Table(title="generation stats", show_header=False)
    rows = [
        ("tokens", f"{stats.get('tokens_generated', 0)} (prompt {stats.get('prompt_tokens', 0)})"),
        ("decode tok/s", f"{stats.get('tokens_per_second', 0.0):.1f}"),
        ("time to first token", f"{stats.get('time_to_first_token_s', 0.0) * 1000:.0f} ms"),
        ("cache hits / misses", f"{stats.get('cache_hits', 0)} / {stats.get('cache_misses', 0)}"),
        ("hit rate", f"{stats.get('hit_rate', 0.0):.2f}"),
        ("prefetch issued / used", f"{stats.get('prefetch_issued', 0)} / {stats.get('prefetch_used', 0)}"),
        ("bytes copied to device", f"{stats.get('bytes_to_device', 0) / 2**20:.1f} MiB"),
        ("bytes read in place (misses)", f"{stats.get('bytes_from_host', 0) / 2**20:.1f} MiB"),
        ("host syncs per token", f"{stats.get('host_syncs_per_token', 0.0):.1f}"),
        ("expert bits/param", f"{stats.get('expert_bits_per_param', 0.0):.2f}"),
        ("expert slots", f"{slots} of {total_experts}" if total_experts else slots),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


@app.command()
def generate(
    model_dir: Path = ModelArg,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    experts_bits: str = ExpertsBitsOpt,
    attn_bits: str = AttnBitsOpt,
    cache_per_layer: int = CacheOpt,
    gpu_budget: str = BudgetOpt,
    no_prefetch: bool = NoPrefetchOpt,
    cpu_experts: str = CpuExpertsOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
):
    """Generate text from a prompt, streaming tokens (or one JSON object with --json)."""
    from ..config import GenerationConfig
    from ..serve.tools import ensure_utf8

    opts = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop or []
    )
    GenerationConfig.build(**opts)  # refuse bad options before the slow load
    check_engine_options(device, experts_bits, attn_bits, cache_per_layer, gpu_budget, cpu_experts=cpu_experts)
    ensure_utf8(prompt)  # argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
    path, is_random = resolve_model(model_dir)
    if is_random and not as_json:
        err_console.print(
            "[yellow]note:[/] no model given; using the embedded tiny MoE with [bold]random weights[/] "
            "(it shows the machinery, its text is noise)"
        )
    elif model_dir is None and not as_json:
        err_console.print(
            "[cyan]note:[/] no model given; using the embedded demo MoE (Mixtral architecture, 21M "
            "parameters, 8 experts, trained on the Python standard library's source: it writes Python-like text)"
        )
    engine = load_engine(
        path, device, experts_bits, attn_bits, cache_per_layer, gpu_budget, not no_prefetch, quiet=as_json,
        **({"cpu_experts": cpu_experts} if cpu_experts else {}),
    )  # fmt: skip
    request = [{"role": "user", "content": prompt}] if chat else prompt
    if as_json:
        result = engine.generate(request, **opts)
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        return
    last = None
    for chunk in engine.stream(request, **opts):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None and last.stats:
        err_console.print(stats_table(last.stats, len(engine.cache.layers) * engine.cache.num_experts))
        err_console.print(f"finish reason: {last.finish_reason}")


@app.command()
def demo(
    prompt: str = typer.Option("def parse_args(argv):", "--prompt", "-p"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    experts_bits: str = typer.Option("4", "--experts-bits", help="Expert quantization: 2, 3, 4 or none."),
    attn_bits: str = typer.Option("4", "--attn-bits", help="Dense/attention quantization: 4 or none."),
    cache_per_layer: int = typer.Option(4, "--cache-per-layer", help="Expert slots per layer (of 8)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
):
    """Stream from the embedded default model (4-bit experts, half of them cached) with cache statistics."""
    generate(
        model_dir=None, prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
        seed=None, stop=None, experts_bits=experts_bits, attn_bits=attn_bits, cache_per_layer=cache_per_layer,
        gpu_budget=None, no_prefetch=False, cpu_experts=None, device=device, as_json=False, chat=False,
    )  # fmt: skip


@app.command("make-tiny")
def make_tiny_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    family: str = typer.Option("mixtral", "--family", help="mixtral, qwen3_moe or olmoe."),
    seed: int = typer.Option(0, "--seed"),
    layers: int = typer.Option(2, "--layers"),
    experts: int = typer.Option(8, "--experts"),
    fused: bool = typer.Option(False, "--fused", help="Write transformers 5.x fused expert tensors."),
    shards: int = typer.Option(1, "--shards", help="Split the weights over this many safetensors files."),
):
    """Write a seeded random-init tiny MoE checkpoint with a real tokenizer."""
    from ..errors import ConfigError
    from ..tiny import FAMILIES, make_tiny

    if family not in FAMILIES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if layers < 1 or experts < 2 or shards < 1:
        raise ConfigError("--layers >= 1, --experts >= 2 and --shards >= 1 are required")
    quiet_transformers()
    path = make_tiny(out_dir, family, seed=seed, layers=layers, experts=experts, fused=fused, shards=shards)
    err_console.print(f"wrote a random-weight tiny {family} to {path}")
