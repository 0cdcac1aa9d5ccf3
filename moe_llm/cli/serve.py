"""`moe-llm serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import typer

from ..errors import ConfigError
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
    resolve_model,
)


@app.command()
def serve(
    model_dir: Path = ModelArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port"),
    api_key: str = typer.Option(
        None, "--api-key", envvar="MOE_LLM_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1."
    ),
    model_name: str = typer.Option(None, "--model-name", help="Model id clients use (default: the directory name)."),
    max_batch: int = typer.Option(None, "--max-batch", help="Requests decoded together (default: settings, else 8)."),
    max_queue: int = typer.Option(None, "--max-queue", help="Waiting requests before 429 (default 64)."),
    max_tokens: int = typer.Option(512, "--default-max-tokens", help="max_tokens of a request that gives none."),
    max_body: int = typer.Option(4 * 2**20, "--max-body-bytes", help="Largest request body (413 past it)."),
    drain: float = typer.Option(
        30.0, "--drain-timeout", help="On Ctrl-C or SIGTERM, seconds to let requests in flight finish before exiting."
    ),
    experts_bits: str = ExpertsBitsOpt,
    attn_bits: str = AttnBitsOpt,
    cache_per_layer: int = CacheOpt,
    gpu_budget: str = BudgetOpt,
    no_prefetch: bool = NoPrefetchOpt,
    cpu_experts: str = CpuExpertsOpt,
    device: str = DeviceOpt,
):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health, /metrics) with a chat page at /."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--default-max-tokens", max_tokens),
                        ("--max-body-bytes", max_body)):  # fmt: skip
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be positive, got {value}")
    if not drain >= 0:
        raise ConfigError(f"--drain-timeout must be 0 or more seconds, got {drain}")
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key / MOE_LLM_API_KEY must not be empty")
    check_engine_options(device, experts_bits, attn_bits, cache_per_layer, gpu_budget, cpu_experts=cpu_experts)
    try:
        import uvicorn

        from ..serve import create_app
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"serve needs the serve extra: pip install 'moe-llm[serve]' ({exc.name} is missing)"
        ) from None
    path, is_random = resolve_model(model_dir)
    if model_dir is None:
        err_console.print("[cyan]note:[/] no model given; serving the embedded demo MoE")
    given = (("max_batch", max_batch), ("max_queue", max_queue), ("cpu_experts", cpu_experts))
    options = {k: v for k, v in given if v is not None}
    engine = load_engine(path, device, experts_bits, attn_bits, cache_per_layer, gpu_budget, not no_prefetch, **options)
    web = create_app(engine, model_name=model_name, api_key=api_key, max_body_bytes=max_body,
                     default_max_tokens=max_tokens)  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    err_console.print(f"serving [bold]{web.state.server.model}[/] on http://{shown}:{port} (chat page at /)")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err_console.print("[yellow]warning:[/] listening beyond localhost without --api-key")
    config = uvicorn.Config(web, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain)
    _serve_until_stopped(uvicorn.Server(config))
    from ..serve.aio import join_workers

    if not join_workers(timeout=30.0):  # requests cut at the drain timeout leave the batch at their next token
        err_console.print("[yellow]warning:[/] a request was still running at exit")
    engine.close()  # ends what is left with EngineClosedError, stops the CPU road, frees the GPU memory
    err_console.print("stopped")


class _NoCancelTracebacks(logging.Filter):
    """Drop uvicorn's traceback of a request task cancelled at the drain timeout (uvicorn says
    so in its own line just before)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


def _serve_until_stopped(server) -> None:
    """Run a uvicorn server until Ctrl-C or SIGTERM: it stops accepting, lets what is in flight
    finish (up to its timeout_graceful_shutdown, then cancels it) and returns, so the command
    exits 0. uvicorn's own handlers would re-raise the signal once shut down, killing the
    process; a second Ctrl-C still forces the exit."""
    logging.getLogger("uvicorn.error").addFilter(_NoCancelTracebacks())
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.capture_signals = contextlib.nullcontext  # keep these handlers; re-raise nothing
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
