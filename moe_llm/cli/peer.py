"""`moe-llm peer merge OUR.json DIR` / `moe-llm peer show DIR`: the llama.cpp `--n-cpu-moe` peer
(see docs/peer.md). `merge` adds the `llamacpp` block, the speedups and their targets to a
`moe-llm bench` JSON, in place, and prints the tables."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from ..errors import ConfigError
from . import app

peer_app = typer.Typer(help="The llama.cpp --n-cpu-moe peer: read its results, set ours beside them.")
app.add_typer(peer_app, name="peer")

SPEEDUPS = ("speedup_vs_llamacpp_decode", "speedup_vs_llamacpp_prefill", "speedup_vs_llamacpp_resident")


def _block(peer_dir: Path, device: str) -> dict:
    from ..bench.peer import parse_peer_dir

    try:
        return parse_peer_dir(peer_dir, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _console() -> Console:
    return Console(highlight=False, markup=False, width=10_000, soft_wrap=True)  # markdown tables, unwrapped


@peer_app.command("merge")
def merge(
    our_json: Path = typer.Argument(..., help="A `moe-llm bench` JSON, updated in place."),
    peer_dir: Path = typer.Argument(..., help="The output folder of `benchmarks/peers/llamacpp.sh bench`."),
    bits: int | None = typer.Option(None, "--bits", help="Expert bits of the compared rows (default: the full row's)."),
    budget_gib: float | None = typer.Option(None, "--budget-gib", help="Headline budget (default: the run's)."),
    device: str = typer.Option("CUDA0", "--device", help="The GPU's buffer name in the -v log."),
) -> None:
    """Add the llamacpp block and the speedups to our bench JSON, and print the tables."""
    from ..bench import peer
    from ..bench.peer_tables import comparison_table, configs_table
    from ..bench.runner import write_json

    block = _block(peer_dir, device)
    if not our_json.exists():
        raise ConfigError(f"{our_json} does not exist (run moe-llm bench first)")
    run = json.loads(our_json.read_text())
    peer.merge(run, block, bits=bits, budget=round(budget_gib * peer.GIB) if budget_gib else None)
    write_json(our_json, run)
    out = _console()
    out.print(f"llama.cpp {block['version']}, {len(block['configs'])} configurations; {peer.FIT_RULE}\n")
    out.print(configs_table(block) + "\n")
    out.print(comparison_table(run, block) + "\n")
    for key in SPEEDUPS:
        value = run.get(key)
        out.print(f"{key}: {'-' if value is None else format(value, '.3f')}")
    out.print(f"wrote {our_json}")


@peer_app.command("show")
def show(
    peer_dir: Path = typer.Argument(..., help="The output folder of `benchmarks/peers/llamacpp.sh bench`."),
    as_json: bool = typer.Option(False, "--json", help="The block as JSON instead of a table."),
    device: str = typer.Option("CUDA0", "--device", help="The GPU's buffer name in the -v log."),
) -> None:
    """Print the llama.cpp configurations of a peer folder, without touching any JSON."""
    from ..bench.peer_tables import configs_table

    block = _block(peer_dir, device)
    out = _console()
    out.print(json.dumps(block, indent=2) if as_json else f"llama.cpp {block['version']}\n\n{configs_table(block)}")
