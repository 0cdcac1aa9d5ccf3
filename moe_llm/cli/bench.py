"""`moe-llm bench`: the synthetic Mixtral-8x7B benchmark, printed as a table and written as JSON."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from . import app
from .common import bits_option, err_console

TINY = dict(layers=2, hidden=128, intermediate=256, experts=4, heads=4, kv_heads=2, vocab=512, max_positions=4096)


def _sizes(values: list[str] | None) -> tuple[int, ...]:
    from ..config import parse_size

    try:
        return tuple(parse_size(v) for v in values or [])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list of integers, got {text!r}") from None


def default_out() -> Path:
    """A new file in the current directory, so a run never overwrites earlier results."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(f"moe-llm-bench-{stamp}.json"), 1
    while path.exists():
        path, n = Path(f"moe-llm-bench-{stamp}-{n}.json"), n + 1
    return path


@app.command()
def bench(
    out: Path | None = typer.Option(
        None, "--out", "-o", help="JSON file to write (default: a new moe-llm-bench-DATE-TIME.json here)."
    ),
    device: str = typer.Option("cuda", "--device", help="cuda (cpu only with --tiny, for testing)."),
    layers: int = typer.Option(32, "--layers", help="Decoder layers of the synthetic Mixtral-8x7B geometry."),
    experts_bits: int = typer.Option(2, "--experts-bits", help="Expert bits of the headline rows."),
    also_bits: str = typer.Option("3", "--also-bits", help="Other expert bit widths to run (comma list, or '')."),
    gpu_budget: str = typer.Option("12GiB", "--gpu-budget", help="Budget of the headline rows."),
    extra_budget: list[str] = typer.Option(["16GiB", "4GiB"], "--extra-budget", help="More budgets (repeatable)."),
    max_context: int = typer.Option(
        1152, "--max-context", help="Context every row plans its KV for (llama-bench: prompt + generated tokens)."
    ),
    head_bits: str = typer.Option("4", "--head-bits", help="LM head quantization of the synthetic trunk: 4 or none."),
    kernel_tuning: Path | None = typer.Option(
        None, "--kernel-tuning", help="Decode-kernel tile shapes measured on this machine (scripts/tune_moe.py)."
    ),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens"),
    new_tokens: int = typer.Option(128, "--new-tokens"),
    ttft: str = typer.Option("512,1024", "--ttft", help="Prompt lengths for time to first token."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per variant; rows report the middle one."),
    accelerate_layers: int = typer.Option(
        6,
        "--accelerate-layers",
        help="Depth of the accelerate baseline (its bf16 layers must overflow the budget); 0 skips it.",
    ),
    rows: str = typer.Option("", "--rows", help="Only these rows, by name (comma list; default: every row)."),
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help="A tiny geometry (tests)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Benchmark offloaded decode and prefill on a synthetic Mixtral-8x7B (random weights, no download)."""
    from ..bench import Geometry, Workload, run_bench
    from ..bench.report import TABLE_HEADER, table_rows
    from ..config import parse_size

    if verbose:
        logging.getLogger("moe_llm").setLevel(logging.INFO)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("moe-llm bench needs a CUDA device (the synthetic model is built on it)")
    elif not tiny:
        raise ConfigError("moe-llm bench runs on cuda; --device cpu is only for the --tiny test geometry")
    if experts_bits not in (2, 3, 4):
        raise ConfigError(f"--experts-bits must be 2, 3 or 4, got {experts_bits}")
    geometry = Geometry(**TINY) if tiny else Geometry(layers=layers)
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    workload = Workload(prompt_tokens, new_tokens, _ints(ttft, "--ttft"), repeats=repeats)
    if max_context <= max(workload.ttft_prompts + (workload.prompt_tokens + workload.new_tokens - 1,)):
        raise ConfigError(f"--max-context {max_context} does not hold the workload's prompts and new tokens")
    hb = bits_option(head_bits, (4,), "--head-bits")
    console = Console(width=None if sys.stdout.isatty() else 200)

    out = out or default_out()
    options = (("max_context", max_context),) + ((("kernel_tuning", str(kernel_tuning)),) if kernel_tuning else ())
    variants = None
    if rows:
        from ..bench.runner import default_variants

        every = default_variants(experts_bits, parse_size(gpu_budget), _sizes(extra_budget), _ints(also_bits, "--also-bits"),
                                 options)  # fmt: skip
        wanted = [r.strip() for r in rows.split(",") if r.strip()]
        unknown = sorted(set(wanted) - {v.name for v in every})
        if unknown:
            raise ConfigError(f"--rows: no row named {', '.join(unknown)}; rows: {', '.join(v.name for v in every)}")
        variants = [v for v in every if v.name in wanted]

    def on_row(row: dict) -> None:
        err_console.print(f"[green]{row['name']}[/]: {row['decode_tok_s']:.2f} tok/s, TTFT {row['ttft_s']}")

    run = run_bench(
        geometry, device, bits=experts_bits, budget=parse_size(gpu_budget), extra_budgets=_sizes(extra_budget),
        also_bits=_ints(also_bits, "--also-bits"), workload=workload, accelerate_layers=accelerate_layers or None,
        out=out, command=shlex.join(["moe-llm", *sys.argv[1:]]), on_row=on_row,
        options=options, head_bits=hb, variants=variants,
    )  # fmt: skip
    table = Table(title=f"synthetic Mixtral ({geometry.layers} layers), random routing")
    for h in TABLE_HEADER:
        table.add_column(h)
    for r in table_rows(run):
        table.add_row(*r)
    console.print(table)
    acc = run.get("accelerate") or {}
    if "projected_tok_s" in acc:
        console.print(
            f"accelerate baseline (projected to {geometry.layers} layers): {acc['projected_tok_s']:.3f} tok/s"
        )
    for t in run.get("targets", []):
        mark = "[green]met[/]" if t["met"] else ("[red]missed[/]" if t["met"] is False else "n/a")
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        console.print(f"{t['key']}: {value} ({'>=' if t['kind'] == 'min' else '<='} {t['target']}) {mark}")
    console.print(f"wrote {out}")
