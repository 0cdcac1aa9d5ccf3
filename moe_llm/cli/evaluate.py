"""`moe-llm perplexity` and `moe-llm trace`: measurements over a text file."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import InputError
from . import app
from .common import AttnBitsOpt, DeviceOpt, ExpertsBitsOpt, err_console, load_engine

TextArg = typer.Argument(..., help="UTF-8 text file to measure on.")
ModelDirArg = typer.Argument(..., help="Local HF checkpoint directory.")
WindowOpt = typer.Option(1024, "--window", help="Tokens per forward pass (capped by the context length).")
MaxWindowsOpt = typer.Option(None, "--max-windows", help="Score only this many windows, evenly spaced over the text.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object.")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise InputError(f"{path} is empty")
    return text


def _check_window(window: int, stride: int | None, max_windows: int | None) -> None:
    if window < 2:
        raise InputError(f"--window must be at least 2, got {window}")
    if stride is not None and not 0 < stride <= window:
        raise InputError(f"--stride must be between 1 and --window ({window}), got {stride}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows must be at least 1, got {max_windows}")


def _engine_and_ids(model_dir: Path, text_file: Path, device, experts_bits, attn_bits, quiet: bool):
    """Read the text (before the slow model load, so a bad path fails fast), load, tokenize."""
    from ..eval.evaluate import tokenize_text

    text = _read_text(text_file)
    engine = load_engine(model_dir, device, experts_bits, attn_bits, None, None, False, quiet=quiet)
    return engine, tokenize_text(engine, text)


@app.command()
def perplexity(
    model_dir: Path = ModelDirArg,
    text_file: Path = TextArg,
    experts_bits: str = ExpertsBitsOpt,
    attn_bits: str = AttnBitsOpt,
    window: int = WindowOpt,
    stride: int = typer.Option(512, "--stride", help="Tokens the window advances; the rest is context."),
    max_windows: int = MaxWindowsOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Sliding-window perplexity of a text file: {"perplexity": ..., "tokens": ...}."""
    from ..eval.evaluate import perplexity as measure

    _check_window(window, stride, max_windows)
    engine, ids = _engine_and_ids(model_dir, text_file, device, experts_bits, attn_bits, as_json)
    if len(ids) < 2:
        raise InputError(f"{text_file} has fewer than 2 tokens")
    with err_console.status("scoring...", spinner="dots") if not as_json else nullcontext():
        result = measure(engine, ids, window=window, stride=stride, max_windows=max_windows)
    out = result.to_dict()
    out.update(experts_bits=engine.config.experts_bits, attn_bits=engine.config.attn_bits, model=str(model_dir))
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
        return
    eb, ab = engine.config.experts_bits, engine.config.attn_bits
    Console().print(
        f"perplexity [bold]{result.perplexity:.3f}[/] over {result.tokens} tokens "
        f"(window {result.window}, stride {result.stride}; experts {f'{eb}-bit' if eb else 'unquantized'}, "
        f"attention {f'{ab}-bit' if ab else 'unquantized'})"
    )


@app.command()
def trace(
    model_dir: Path = ModelDirArg,
    text_file: Path = TextArg,
    window: int = WindowOpt,
    max_windows: int = MaxWindowsOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Routing statistics over a text: LRU hit rate per cache size, prefetch recall per distance."""
    from ..eval.evaluate import routing_report, trace_routing

    _check_window(window, None, max_windows)
    engine, ids = _engine_and_ids(model_dir, text_file, device, "none", "none", as_json)
    with err_console.status("tracing...", spinner="dots") if not as_json else nullcontext():
        report = routing_report(trace_routing(engine, ids, window=window, max_windows=max_windows))
    report["model"] = str(model_dir)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    console = Console()
    hits = Table(title=f"LRU hit rate ({report['tokens']} tokens, top-{report['top_k']} of {report['num_experts']})")
    hits.add_column("experts cached per layer")
    hits.add_column("hit rate")
    for c, h in zip(report["cache_sizes"], report["lru_hit_rate"], strict=True):
        hits.add_row(str(c), f"{h:.3f}")
    console.print(hits)
    recall = Table(title="prefetch recall (router of layer L+a on the hidden state of layer L)")
    recall.add_column("layers ahead")
    for n in report["prefetch_counts"]:
        recall.add_column(f"{n} prefetched")
    for a, row in report["prefetch_recall"].items():
        recall.add_row(a, *(f"{r:.3f}" for r in row))
    console.print(recall)
