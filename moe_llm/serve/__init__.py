"""Serving: the OpenAI-compatible HTTP server (`moe-llm serve`: `app`, `protocol`, `metrics`,
`expert_view`, a web page), and what every front end shares: the Python adapters' options
(`adapters`), async streaming (`aio`) and chat rendering and tool calls (`tools`).

The HTTP server needs the `serve` extra (fastapi, uvicorn); `create_app` imports it on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
