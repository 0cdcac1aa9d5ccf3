"""A uvicorn server on a free port in a background thread, for tests that talk HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """Yield the base URL (http://127.0.0.1:PORT) of `app` served by uvicorn until the block ends."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serve_process(model, *args: str, env: dict | None = None):
    """Yield (process, base URL) of `moe-llm serve MODEL --port P ARGS` once its /health answers;
    the process is killed at the end if it is still running."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "moe_llm", "serve", str(model), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        if not wait_for(up, timeout=60):
            raise AssertionError(proc.stderr.read() if proc.poll() is not None else "server did not start")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def interleaved(engine, prompts, max_new_tokens: int, **opts) -> list[list[int]]:
    """Submit every prompt, then consume the streams round-robin: one batch from the first step on."""
    streams = [engine.stream(p, max_new_tokens=max_new_tokens, **opts) for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        for i in list(live):
            try:
                got[i].extend(next(streams[i]).token_ids)
            except StopIteration:
                live.remove(i)
    return got
