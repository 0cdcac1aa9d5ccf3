"""OpenAI-compatible HTTP serving (`moe-llm serve`): FastAPI app, metrics, a web page.

Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
