"""The `moe-llm` command line. Each subcommand lives in its own module.

Every `MoeLLMError` becomes one line on stderr and exit code 2, with no traceback.
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
)


def _register() -> None:
    from . import generate  # noqa: F401  (registers generate, demo, make-tiny)

    for optional in ("quantize", "chat", "plan", "bench", "evaluate"):
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
        app(args=argv, standalone_mode=True)
    except MoeLLMError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
