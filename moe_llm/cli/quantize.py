"""`moe-llm quantize SRC OUT`: quantize a checkpoint once into a fast-loading directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import app
from .common import err_console, parse_bits, quiet_transformers


@app.command()
def quantize(
    src_dir: Path = typer.Argument(..., help="Source Hugging Face MoE checkpoint directory."),
    out_dir: Path = typer.Argument(..., help="Directory to write the quantized model to."),
    experts_bits: str = typer.Option("2", "--experts-bits", help="Expert bits: 2, 3 or 4."),
    attn_bits: str = typer.Option("4", "--attn-bits", help="Attention/dense bits: 4 or none."),
    group_size: int = typer.Option(None, "--group-size", help="Expert group size (default: 32 for 2-bit, else 64)."),
    device: str = typer.Option(None, "--device", help="Quantize on this device (default: cuda if present)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Quantize SRC_DIR to OUT_DIR (safetensors + manifest); `moe_llm.load(OUT_DIR)` then skips hqq."""
    from ..checkpoint.qformat import QuantizeProgress, quantize_checkpoint
    from ..config import format_size
    from ..errors import ConfigError

    quiet_transformers()
    eb = parse_bits(experts_bits, (2, 3, 4), "--experts-bits")
    if eb is None:
        raise ConfigError("--experts-bits must be 2, 3 or 4 for a quantized directory")
    ab = parse_bits(attn_bits, (4,), "--attn-bits")
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tensors]}"),
        DownloadColumn(binary_units=True),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    # started at the first report, so a refusal before any work prints only its error line
    bar = Progress(*columns, console=err_console, transient=True, disable=quiet)
    task = None

    def on_progress(p: QuantizeProgress) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("quantizing", total=p.bytes_total, tensors="")
            bar.start()
        bar.update(task, completed=p.bytes_done, tensors=f"{p.tensors_done}/{p.tensors_total} tensors")

    try:
        manifest = quantize_checkpoint(
            src_dir, out_dir, experts_bits=eb, attn_bits=ab, group_size=group_size, device=device,
            overwrite=overwrite, progress=on_progress,
        )  # fmt: skip
    finally:
        if task is not None:
            bar.stop()
    weights = sum(f.bytes for n, f in manifest.files.items() if n.endswith(".safetensors"))
    if not quiet:
        err_console.print(
            f"wrote [bold]{out_dir}[/]: {len(manifest.files)} files, weights {format_size(weights)}, "
            f"experts {eb}-bit ({manifest.experts.bits_per_param:.2f} bits/param), "
            f"attention {f'{ab}-bit' if ab else 'unquantized'}",
            soft_wrap=True,
        )
