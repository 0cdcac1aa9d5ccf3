"""`Engine.close`: the engine's model, expert cache and threads go when it returns (not at the
cycle collector's next pass, which nothing else triggers: tensor memory does not count), queued and later calls fail with one typed error, and a new engine
loads and answers as before."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

import moe_llm
from moe_llm.errors import EngineClosedError, MoeLLMError


@pytest.fixture
def no_gc():
    """The cycle collector off, so only `close` (which runs it once) can free the engine."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_close_frees_the_model_and_cache_without_the_collector(tiny_mixtral, no_gc):
    engine = moe_llm.load(tiny_mixtral, device="cpu", experts_bits=2, cache_per_layer=2)
    before = engine.generate("hello", max_new_tokens=4).token_ids
    model, cache, runtime = weakref.ref(engine.model), weakref.ref(engine.cache), weakref.ref(engine.runtime)
    engine.close()
    assert model() is None and cache() is None and runtime() is None
    engine.close()  # a second close is a no-op
    with pytest.raises(EngineClosedError, match="closed"):
        engine.generate("hello", max_new_tokens=4)
    with pytest.raises(EngineClosedError):
        engine.logits([1, 2, 3])
    with pytest.raises(EngineClosedError):
        engine.stream("hello")
    assert engine.stats_dict()["expert_slots"] == 0
    with moe_llm.load(tiny_mixtral, device="cpu", experts_bits=2, cache_per_layer=2) as again:
        assert again.generate("hello", max_new_tokens=4).token_ids == before
    assert again.closed


def test_without_close_the_engine_waits_for_the_collector(tiny_mixtral, no_gc):
    """Why `close` exists: the engine's parts point back at it."""
    engine = moe_llm.load(tiny_mixtral, device="cpu", cache_per_layer=2)
    cache = weakref.ref(engine.cache)
    del engine
    assert cache() is not None
    gc.collect()
    assert cache() is None


def test_a_request_queued_when_the_engine_closes_fails_with_one_typed_error(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, device="cpu", cache_per_layer=2)
    stream = engine.stream("hello there", max_new_tokens=50)  # queued; runs when consumed
    started = threading.Event()
    errors: list[BaseException] = []

    def consume(s=stream):
        try:
            for _ in s:
                started.set()
        except MoeLLMError as exc:
            errors.append(exc)
        started.set()

    closer = threading.Timer(0.0, engine.close)
    worker = threading.Thread(target=consume)
    worker.start()
    started.wait(10)
    closer.start()
    worker.join(30)
    closer.join(30)
    assert not worker.is_alive()
    assert engine.closed
    # the request either finished before the close or failed with the typed error; never a hang
    assert all(isinstance(e, EngineClosedError) for e in errors)
    with pytest.raises(EngineClosedError):
        engine.generate("hello", max_new_tokens=2)
