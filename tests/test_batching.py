"""Continuous batching and prompt-prefix reuse on the engine (CPU, tiny Mixtral).

The invariance contract: greedy tokens do not depend on what else is in the batch, on how a
prompt was chunked, or on whether its prefix came from the prefix cache."""

from __future__ import annotations

import threading

import pytest
from serve_helpers import interleaved as batch_streams

import moe_llm
from moe_llm.runtime.sequence import QueueFullError

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "Experts live in host memory",
    "def parse_args(argv):" * 3,  # longer than one 16-token prefill chunk
    "The quick brown fox jumps over the lazy dog " * 4,  # several chunks
    "a",  # a one-token prompt: its prefill is the runtime's one-token path
]
NEW = 20
VARIANTS = {
    "unquantized": {},
    "2-bit experts": {"experts_bits": 2},
    "4-bit experts and attention": {"experts_bits": 4, "attn_bits": 4},
}


def load(path, **opts):
    return moe_llm.load(path, cache_per_layer=2, prefill_chunk=16, **opts)


def interleaved(engine, prompts, **opts) -> list[list[int]]:
    return batch_streams(engine, prompts, NEW, **opts)


@pytest.fixture(scope="module")
def solo(tiny_mixtral):
    """Each prompt run alone, per variant (the reference)."""
    out = {}
    for name, opts in VARIANTS.items():
        engine = load(tiny_mixtral, prefix_cache=0, **opts)
        out[name] = [engine.generate(p, max_new_tokens=NEW).token_ids for p in PROMPTS]
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_batched_greedy_tokens_equal_each_request_alone(tiny_mixtral, solo, variant, mode):
    engine = load(tiny_mixtral, batch_mode=mode, **VARIANTS[variant])
    got = interleaved(engine, PROMPTS)
    assert got == solo[variant]
    assert all(len(t) > 0 for t in got)
    assert engine.batcher.counters.max_rows >= 3  # requests decoded in the same steps (one stops after a token)
    if mode == "fused":
        assert engine.batcher.counters.batched_rows > 0  # ...through one forward of several rows
    assert engine.batcher.active_requests == 0 and engine.cache.consistent()


def test_exact_batching_keeps_each_seeded_sample(tiny_mixtral):
    """Sampling in a batch: each request keeps its own seeded generator, so it draws what it draws alone."""
    engine = load(tiny_mixtral, batch_mode="exact")
    alone = [engine.generate(p, max_new_tokens=NEW, temperature=0.9, seed=i).token_ids for i, p in enumerate(PROMPTS)]
    streams = [engine.stream(p, max_new_tokens=NEW, temperature=0.9, seed=i) for i, p in enumerate(PROMPTS)]
    got = [[t for c in s for t in c.token_ids] for s in streams]  # drained one after the other, batched all along
    assert got == alone


def test_generate_from_several_threads_shares_the_batch(tiny_mixtral, solo):
    engine = load(tiny_mixtral, batch_mode="fused")
    got = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i):
        barrier.wait()
        got[i] = engine.generate(PROMPTS[i], max_new_tokens=NEW).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == solo["unquantized"]
    assert engine.batcher.counters.max_rows >= 2  # not serialised behind a lock
    assert not engine._lock._held


def test_max_batch_admits_waiting_requests_between_steps(tiny_mixtral, solo):
    engine = load(tiny_mixtral, max_batch=2)
    assert interleaved(engine, PROMPTS) == solo["unquantized"]
    assert engine.batcher.counters.max_rows == 2


def test_a_gpu_budget_admits_only_the_requests_whose_kv_its_plan_holds(tiny_mixtral):
    """With a budget the plan reserves one context of KV for the requests that decode together:
    a request waits while the active ones and it would not fit it, each at the widest of their
    reservations (prompt + new tokens here: no graph decoder on CPU). The tokens stay each
    request's own, and a lone request always runs."""
    prompt = "Experts live in host memory"
    alone = load(tiny_mixtral, prefix_cache=0)
    want = alone.generate(prompt, max_new_tokens=NEW)
    reserve = want.prompt_tokens + NEW  # the most positions one request may hold
    for rows in (1, 2, 3):
        context = rows * reserve + reserve // 2  # room for `rows` requests, not one more
        engine = moe_llm.load(tiny_mixtral, gpu_budget="2GiB", max_context=context, prefill_chunk=16, prefix_cache=0)
        got = interleaved(engine, [prompt] * 4)
        assert got == [want.token_ids] * 4
        assert engine.batcher.counters.max_rows == rows  # the others waited for room, then ran
        assert engine.batcher.stats()["requests_kv_waited"] == 4 - rows
        assert engine.batcher.active_requests == 0 and engine.batcher.queue_depth == 0
    # without a budget nothing is planned: max_batch alone bounds the batch
    engine = load(tiny_mixtral, max_context=reserve + 1, prefix_cache=0)
    assert interleaved(engine, [prompt] * 4) == [want.token_ids] * 4
    assert engine.batcher.counters.max_rows == 4 and engine.batcher.stats()["requests_kv_waited"] == 0


def test_queue_limit_raises_queue_full(tiny_mixtral):
    engine = load(tiny_mixtral, max_batch=1, max_queue=2)
    streams = [engine.stream("hello", max_new_tokens=4) for _ in range(2)]
    with pytest.raises(QueueFullError):
        engine.stream("hello", max_new_tokens=4)
    assert engine.stats_dict()["requests_rejected"] == 1
    for s in streams:
        assert [t for c in s for t in c.token_ids]
    assert len(engine.generate("hello", max_new_tokens=4).token_ids) > 0


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(tiny_mixtral):
    engine = load(tiny_mixtral)
    short = engine.stream("hi", max_new_tokens=NEW)
    first = next(short)  # "hi" has its first token: it decodes from now on
    long_prompt = "Beautiful is better than ugly. " * 12  # about 10 chunks of 16 tokens
    n_chunks = -(-len(engine.encode(long_prompt)) // 16)
    assert n_chunks >= 5
    long = engine.stream(long_prompt, max_new_tokens=4)
    steps0 = engine.batcher.counters.steps
    got_short = list(first.token_ids)
    for chunk in short:  # every step decodes "hi" and runs at most one chunk of the long prompt
        got_short.extend(chunk.token_ids)
    short_steps = engine.batcher.counters.steps - steps0
    assert len([t for c in long for t in c.token_ids]) > 0
    assert short_steps < NEW + 2  # "hi" was never held up for the whole long prefill
    assert got_short == load(tiny_mixtral).generate("hi", max_new_tokens=NEW).token_ids


def test_abandoning_a_batched_stream_leaves_the_others_intact(tiny_mixtral, solo):
    engine = load(tiny_mixtral)
    streams = [engine.stream(p, max_new_tokens=NEW) for p in PROMPTS]
    next(streams[1])
    streams[1].close()  # walks away mid-batch
    del streams[1]
    rest = [[t for c in s for t in c.token_ids] for s in streams]
    assert rest == [solo["unquantized"][i] for i in (0, 2, 3)]
    assert engine.batcher.active_requests == 0 and engine.cache.consistent()


@pytest.mark.parametrize("variant", ["unquantized", "2-bit experts"])
def test_prefix_reuse_gives_the_tokens_of_a_full_prefill(tiny_mixtral, variant):
    """(More turns, branches and the memory limit: tests/test_prefix_reuse.py.)"""
    opts = VARIANTS[variant]
    cached, plain = load(tiny_mixtral, **opts), load(tiny_mixtral, prefix_cache=0, **opts)
    turn1 = [{"role": "system", "content": "Answer briefly. " * 6}, {"role": "user", "content": "Hello there"}]
    reply = cached.generate(turn1, max_new_tokens=8)
    assert reply.stats["prefix_cache_hit_tokens"] == 0
    turn2 = [*turn1, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "Go on."}]
    again = cached.generate(turn2, max_new_tokens=NEW)
    n1 = len(cached.encode(turn1))
    assert again.stats["prefix_cache_hit_tokens"] >= n1 - 1 > (n1 // 16) * 16  # turn 1's prompt, to the token
    assert again.token_ids == plain.generate(turn2, max_new_tokens=NEW).token_ids
    same = cached.generate(turn2, max_new_tokens=NEW)  # the whole prompt but its last token or two is cached now
    assert len(cached.encode(turn2)) - 3 < same.stats["prefix_cache_hit_tokens"] < len(cached.encode(turn2))
    assert same.token_ids == again.token_ids
    d = cached.stats_dict()
    assert (
        d["prefix_cache_hit_tokens"] == again.stats["prefix_cache_hit_tokens"] + same.stats["prefix_cache_hit_tokens"]
    )
    assert d["prefix_cache_bytes"] > 0


def test_stats_report_batching_and_prefix_counters(tiny_engine):
    d = tiny_engine.stats_dict()
    for key in ("queue_depth", "active_requests", "prefix_cache_hit_tokens", "prefill_tokens",
                "recent_tokens_per_second", "time_to_first_token_avg_s", "host_syncs_per_token", "bytes_to_device",
                "batch_mode", "batch_graph_captures", "batch_graph_replays"):  # fmt: skip
        assert key in d
    assert d["batch_mode"] == "exact"  # the CPU default
    assert d["batch_graph_captures"] == d["batch_graph_replays"] == 0  # CUDA graphs only


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_fused_batching_on_other_families(tiny_dirs, family):
    alone = load(tiny_dirs[family], prefix_cache=0)
    want = [alone.generate(p, max_new_tokens=NEW).token_ids for p in PROMPTS[:3]]
    engine = load(tiny_dirs[family], batch_mode="fused")
    assert interleaved(engine, PROMPTS[:3]) == want
    assert engine.batcher.counters.batched_rows > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_fused_rows_on_cpu_read_each_routed_expert_once(tiny_mixtral, bits):
    """With the CPU kernel, a fused step computes each distinct routed expert once for all the
    rows routed to it (the union of the batch's experts, not one read per row), and every
    request still gets its lone tokens."""
    want = [load(tiny_mixtral, experts_bits=bits, prefix_cache=0).generate(p, max_new_tokens=NEW).token_ids
            for p in PROMPTS]  # fmt: skip
    runs = {}
    for mode in ("exact", "fused"):
        engine = load(tiny_mixtral, experts_bits=bits, batch_mode=mode, prefix_cache=0)
        assert engine.runtime.cpu_road == "cpu"
        before = engine.stats.copy()
        runs[mode] = (interleaved(engine, PROMPTS), engine.stats - before)
    assert runs["exact"][0] == runs["fused"][0] == want
    exact, fused = runs["exact"][1], runs["fused"][1]
    assert fused.cpu_expert_calls < exact.cpu_expert_calls  # rows that share an expert share its read
    assert fused.cpu_expert_bytes < exact.cpu_expert_bytes
