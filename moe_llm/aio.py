"""Async access to an `Engine` without blocking the event loop.

Generation is synchronous compute. `astream` runs the engine's generator in a
worker thread and hands each chunk to the loop through an `asyncio.Queue`, so
the loop keeps serving other tasks between tokens. Concurrent callers queue on
the engine's FIFO lock inside their worker threads, never on the loop. A
consumer that stops early sets a flag; the worker then closes the generator,
which releases the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from .engine import Engine, GenerationResult, StreamChunk

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


async def astream(engine: Engine, prompt: Any, **kwargs: Any) -> AsyncIterator[StreamChunk]:
    """Async version of `engine.stream(prompt, **kwargs)`; same chunks, same errors."""
    chunks = engine.stream(prompt, **kwargs)  # validates the request here, in the caller
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            stop.set()

    def work() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    break
                put(chunk)
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(_Failure(exc))
        finally:
            chunks.close()
            put(_DONE)

    threading.Thread(target=work, name="moe-llm-astream", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()


async def agenerate(engine: Engine, prompt: Any, **kwargs: Any) -> GenerationResult:
    """Async version of `engine.generate(prompt, **kwargs)`."""
    parts: list[str] = []
    ids: list[int] = []
    last: StreamChunk | None = None
    async for chunk in astream(engine, prompt, **kwargs):
        parts.append(chunk.text)
        ids.extend(chunk.token_ids)
        last = chunk
    assert last is not None and last.finish_reason is not None
    stats = last.stats or {}
    return GenerationResult("".join(parts), ids, int(stats.get("prompt_tokens", 0)), last.finish_reason, stats)
