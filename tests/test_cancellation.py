"""Consumers that walk away mid-stream (break, exception, a stream left unclosed, a failure
inside the forward) leave the engine exactly as ready as a fresh one: same greedy tokens,
every slot accounted for, no KV cache alive, the request lock free."""

from __future__ import annotations

import gc
import signal
import weakref

import psutil
import pytest

import moe_llm

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [0, 84, 104, 101, 32, 113, 117, 105, 99, 107]
NEW = 24


@pytest.fixture(scope="module")
def reference(tiny_mixtral):
    fresh = moe_llm.load(tiny_mixtral, cache_per_layer=2)
    return fresh.generate(PROMPT, max_new_tokens=NEW).token_ids


@pytest.fixture
def engine(tiny_mixtral, monkeypatch):
    """A fresh engine whose KV caches are tracked by weak reference."""
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2)
    engine.kv_refs = []
    new_kv = engine._new_kv

    def tracked():
        kv = new_kv()
        engine.kv_refs.append(weakref.ref(kv))
        return kv

    monkeypatch.setattr(engine, "_new_kv", tracked)
    return engine


@pytest.fixture
def deadline():
    """Fail instead of hanging if a request deadlocks on the engine lock."""

    def expired(signum, frame):
        raise TimeoutError("request blocked: the engine was not released")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def assert_ready(engine) -> None:
    assert engine.cache.consistent()  # every slot free xor resident, once
    assert not engine._lock._held and not engine._lock._queue
    assert engine.kv_refs and all(ref() is None for ref in engine.kv_refs)  # no KV state survives


def take(stream, n: int) -> list[int]:
    got = []
    for chunk in stream:
        got.extend(chunk.token_ids)
        if len(got) >= n:
            break
    return got


def test_breaking_out_50_times_then_greedy_equals_a_fresh_engine(engine, reference, deadline):
    rss = psutil.Process().memory_info().rss
    requests0 = engine.stats.requests
    for _ in range(50):
        assert len(take(engine.stream(PROMPT, max_new_tokens=64), 3)) >= 3
        assert_ready(engine)
    gc.collect()
    assert psutil.Process().memory_info().rss < rss * 1.05
    assert engine.stats.requests == requests0 + 50  # cancelled requests are still accounted
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == reference
    assert_ready(engine)


def test_an_exception_in_the_consumer_releases_the_engine(engine, reference, deadline):
    with pytest.raises(RuntimeError, match="consumer gave up"):
        for _ in engine.stream(PROMPT, max_new_tokens=64):
            raise RuntimeError("consumer gave up")
    assert_ready(engine)
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == reference


def test_a_stream_left_open_does_not_block_the_next_request(engine, reference, deadline):
    abandoned = engine.stream(PROMPT, max_new_tokens=64)
    next(abandoned)
    next(abandoned)  # suspended while holding the engine
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == reference
    del abandoned
    assert_ready(engine)


def test_a_failure_inside_the_forward_resets_slot_bookkeeping(engine, reference, deadline, monkeypatch):
    runtime = engine.runtime
    real = runtime.forward
    calls = {"n": 0}

    def flaky(layer, hidden, top_k_index, top_k_weights):
        calls["n"] += 1
        if calls["n"] == 7:
            # fail halfway through a slot assignment, as a Ctrl-C or a device error would
            runtime.cache._take_slot(set(), force=True)
            raise KeyboardInterrupt
        return real(layer, hidden, top_k_index, top_k_weights)

    monkeypatch.setattr(runtime, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPT, max_new_tokens=64)
    monkeypatch.setattr(runtime, "forward", real)
    assert_ready(engine)
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == reference
