"""The `moe-llm` command line. Each subcommand lives in its own module.

Every `MoeLLMError` becomes one line on stderr and exit code 2, with no traceback.
Subcommand modules import torch, transformers and rich's heavier parts inside their
functions, so `moe-llm --help` and `--version` start in well under a second.
"""

from __future__ import annotations

import logging
import sys

import typer

from ..errors import MoeLLMError

app = typer.Typer(
    name="moe-llm",
    help="Run Mixture-of-Experts LLMs with offloaded, quantized experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: typer's rich help panel prints `<bool>` after every flag (typer 0.29)
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},  # wide terminals get whole command summaries
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        sys.stdout.write(f"moe-llm {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


def _register() -> None:
    from . import generate  # noqa: F401  (registers generate, demo, make-tiny)

    for optional in ("quantize", "chat", "plan", "bench", "peer", "evaluate", "serve"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{optional}":
                raise


def fail(message: str) -> None:
    """Print one error line and exit 2."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register()
    try:
        app(args=argv, prog_name="moe-llm", standalone_mode=True)
    except MoeLLMError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
