"""Async access to an `Engine` without blocking the event loop.

Generation is synchronous compute. `astream` runs the engine's stream in a worker
thread (one per request) and hands each chunk to the loop through an
`asyncio.Queue`, so the loop keeps serving other tasks between tokens. Concurrent
requests share the engine's batch (`moe_llm.runtime.batching`) from their worker threads, never
blocking the loop. A consumer that stops early (or is cancelled, e.g. a client that
disconnects) sets a flag; the worker then closes the stream, which takes the request
out of the batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..runtime.engine import Engine, StreamChunk

_DONE = object()
_workers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # the running `aiterate` threads


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def join_workers(timeout: float) -> bool:
    """Wait up to `timeout` seconds for every worker thread to end (after the server stopped:
    a cancelled request's worker leaves the batch at its next token, and a process must not exit
    while one is inside a forward). True if none is left."""
    deadline = time.monotonic() + timeout
    for worker in list(_workers):
        worker.join(max(0.0, deadline - time.monotonic()))
    return not any(w.is_alive() for w in list(_workers))


async def astream(engine: Engine, prompt: Any, **kwargs: Any) -> AsyncIterator[StreamChunk]:
    """Async version of `engine.stream(prompt, **kwargs)`; same chunks, same errors."""
    async for chunk in aiterate(lambda: engine.stream(prompt, **kwargs)):
        yield chunk


async def aiterate(make: Callable[[], Iterator[StreamChunk]] | Iterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
    """Drain a stream in a worker thread: `make` is the stream, or a function that creates it
    there (its errors are raised here)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            stop.set()

    def work() -> None:
        chunks = None
        try:
            chunks = make() if callable(make) else make
            for chunk in chunks:
                if stop.is_set():
                    break
                put(chunk)
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(_Failure(exc))
        finally:
            if chunks is not None:
                chunks.close()
            put(_DONE)

    worker = threading.Thread(target=work, name="moe-llm-astream", daemon=True)
    _workers.add(worker)
    worker.start()
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
