"""Options and helpers shared by CLI subcommands."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from ..errors import ConfigError

err_console = Console(stderr=True)

BITS_HELP = "2, 3, 4 or none"


def parse_bits(value: str | None, allowed: tuple[int, ...], name: str) -> int | None:
    if value is None or value.strip().lower() in ("none", "16", "bf16", "fp16"):
        return None
    try:
        bits = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))} or none, got {value!r}") from None
    if bits not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))} or none, got {value!r}")
    return bits


def bits_option(value: str | None, allowed: tuple[int, ...], name: str) -> int | str | None:
    """Bits for `moe_llm.load`: None when the option was not given (settings apply),
    "none" when the user asked for full precision."""
    if value is None:
        return None
    bits = parse_bits(value, allowed, name)
    return "none" if bits is None else bits


def check_engine_options(
    device: str | None,
    experts_bits: str | None,
    attn_bits: str | None,
    cache_per_layer: int | None,
    gpu_budget: str | None,
    **extra,
) -> None:
    """Refuse bad engine options (with the settings they combine with) before the slow load;
    `extra`: further EngineConfig fields (None: not given)."""
    from ..settings import resolve_engine_config

    eb = bits_option(experts_bits, (2, 3, 4), "--experts-bits")
    ab = bits_option(attn_bits, (4,), "--attn-bits")
    given = {k: v for k, v in extra.items() if v is not None}
    resolve_engine_config(
        dict(device=device, experts_bits=eb, attn_bits=ab, cache_per_layer=cache_per_layer, gpu_budget=gpu_budget,
             **given)
    )  # fmt: skip


def quiet_transformers() -> None:
    """Keep transformers' own warnings and progress bars out of our output, unless
    TRANSFORMERS_VERBOSITY asks for them. Call it where the command imports transformers anyway."""
    from transformers.utils import logging as hf_logging

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_model(model_dir: Path | None) -> tuple[Path, bool]:
    """(directory, is_random_default)."""
    if model_dir is not None:
        return model_dir, False
    from ..defaults import default_model_dir

    with err_console.status("preparing the embedded default model..."):
        return default_model_dir()


def load_engine(
    model_dir: Path,
    device: str,
    experts_bits: str | None,
    attn_bits: str | None,
    cache_per_layer: int | None,
    gpu_budget: str | None,
    prefetch: bool,
    quiet: bool = False,
    **options,
):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    import moe_llm

    quiet_transformers()
    eb = bits_option(experts_bits, (2, 3, 4), "--experts-bits")
    ab = bits_option(attn_bits, (4,), "--attn-bits")
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=quiet,
    ) as progress:
        task = progress.add_task("loading experts", total=None)

        def cb(stage: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=f"loading {stage}")

        return moe_llm.load(
            model_dir, device=device, experts_bits=eb, attn_bits=ab, cache_per_layer=cache_per_layer,
            gpu_budget=gpu_budget, prefetch=None if prefetch else False, progress=cb, **options,
        )  # fmt: skip


ModelArg = typer.Argument(None, help="Local HF checkpoint directory (default: the embedded demo model).")
# option defaults of None defer to MOE_LLM_* variables and the settings file (moe_llm.settings)
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: settings, else cpu).")
ExpertsBitsOpt = typer.Option(
    None, "--experts-bits", help=f"Expert quantization: {BITS_HELP} (default: settings, else none)."
)
AttnBitsOpt = typer.Option(
    None, "--attn-bits", help="Dense/attention quantization: 4 or none (default: settings, else none)."
)
HeadBitsOpt = typer.Option(
    None, "--head-bits", help="LM head quantization: 4 or none (default: settings, else none = 16-bit)."
)
CacheOpt = typer.Option(None, "--cache-per-layer", help="Expert slots, as a count per MoE layer (the cache is global).")
BudgetOpt = typer.Option(None, "--gpu-budget", help="Device memory budget, e.g. 12GiB.")
CpuExpertsOpt = typer.Option(
    None, "--cpu-experts", help="Missed experts on the CPU too: auto (cost model), all, or off (default: auto)."
)
NoPrefetchOpt = typer.Option(
    False, "--no-prefetch", help="No copies ahead of use (prompt prefetch, decode admissions)."
)
