"""Greedy decode on the graph decoder runs ahead by one step: the next step is enqueued, fed by
the device's argmax, before the host reads the current token (`Batcher._decode_ahead`).

CUDA graphs need a GPU, so here the real `GraphDecoder` runs each step eagerly
(`test_write_through.EagerGraphs`); the batcher, the ring, the routing snapshots and the
cache's step-numbered hit accounting are the engine's own code. The reference is the plain
engine (no graph decoder): run-ahead must not change a token, a count, or what is kept."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import interleaved
from test_write_through import EagerGraphs

import moe_llm

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 16
PROMPTS = ["Experts live in host memory", "def parse_args(argv):" * 3, "The quick brown fox " * 4]


def load(path, graphs: bool, **opts):
    """A CPU engine; with `graphs`, a graph decoder that runs its steps eagerly, counting the
    steps enqueued ahead (fed by the device's pick)."""
    engine = moe_llm.load(path, prefill_chunk=64, **{"cache_per_layer": 2, **opts})
    if graphs:
        dec = EagerGraphs(engine.model, engine.hf_config, engine.runtime, torch.device("cpu"), engine.context_length)
        dec.begins, dec.ahead, enqueue = [], 0, dec.enqueue

        def counted(pos, tok=None):
            dec.ahead += tok is None
            enqueue(pos, tok)

        dec.enqueue = counted
        engine.graphs = dec
    return engine


@pytest.fixture(scope="module")
def plain(tiny_mixtral):
    """Each prompt's greedy tokens from the plain engine (2-bit experts, every expert resident)."""
    engine = load(tiny_mixtral, False, experts_bits=2, cache_per_layer=8, prefix_cache=0)
    return {p: engine.generate(p, max_new_tokens=NEW).token_ids for p in PROMPTS}


@pytest.mark.parametrize("cache", [1, 2])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_run_ahead_gives_the_plain_tokens_for_any_cache(tiny_mixtral, plain, cache, policy):
    engine = load(tiny_mixtral, True, experts_bits=2, cache_per_layer=cache, cache_policy=policy)
    dec = engine.graphs
    for p in PROMPTS:
        assert engine.generate(p, max_new_tokens=NEW).token_ids == plain[p]
    assert dec.ahead > 0 and dec.in_flight == 0 and engine.graphs is dec
    assert engine.stats.cache_misses > 0 and engine.stats.evictions > 0  # admissions while a step ran ahead
    assert engine.cache.consistent()


def test_hits_are_what_each_step_read(tiny_mixtral):
    """With a step in flight the host admits and evicts before it observes that step: each
    observed step's hits are exactly its reads from slots (not from host RAM) all the same."""
    engine = load(tiny_mixtral, True, experts_bits=2, cache_per_layer=2)  # (1 leaves just the per-layer floors)
    cache = engine.cache
    reads: dict[int, int] = {}  # step -> experts it read from a slot
    seen: dict[int, int] = {}  # step -> hits observed
    slot_of, observe = cache.slot_of, cache.observe

    def spy_slot_of(layer, e):
        slot = slot_of(layer, e)
        reads[cache.steps] = reads.get(cache.steps, 0) + (slot is not None)
        return slot

    def spy_observe(routed, step=None):
        hits, misses = observe(routed, step)
        if step is not None:  # a step run ahead, or read back from the ring
            seen[step] = hits
        return hits, misses

    cache.slot_of, cache.observe = spy_slot_of, spy_observe
    for p in PROMPTS:
        engine.generate(p, max_new_tokens=NEW)
    assert len(seen) > 2 * NEW and sum(seen.values()) > 0
    assert seen == {step: reads.get(step, 0) for step in seen}


def _new_from(ref: list[int], i: int) -> int:
    """The first index from `i` on whose token does not appear before it (an EOS to end there)."""
    return next(j for j in range(i, len(ref)) if ref[j] not in ref[:j])


def _ending(engine, ref, ending):
    """Options that end a request of `ref`'s prompt after its first few tokens, and how many."""
    if ending == "length":
        return {"max_new_tokens": 5}, 5
    if ending == "eos":
        i = _new_from(ref, 4)
        engine.eos_ids = {ref[i]}  # token i ends it (and is not returned)
        return {"max_new_tokens": NEW}, i
    text = engine.tokenizer.decode(ref)
    pieces = [engine.tokenizer.decode(ref[:i]) for i in range(len(ref) + 1)]
    for i in range(3, len(ref)):  # a stop string that first appears with token i - 1, which is returned
        stop = text[len(pieces[i - 1]) : len(pieces[i])]
        if stop.strip() and stop not in pieces[i - 1]:
            return {"max_new_tokens": NEW, "stop": [stop]}, i
    pytest.skip("no stop string in the reference text")


@pytest.mark.parametrize("ending", ["eos", "stop", "length", "cancel"])
def test_a_request_that_ends_leaves_no_step_in_flight(tiny_mixtral, ending):
    """Unquantized: decode computes keys and values as a prefill does, so the prefix cache keeps
    every decoded position, and exactly those the request owns."""
    reference = load(tiny_mixtral, False, prefix_cache=0)
    prompt = PROMPTS[0]
    ref = reference.generate(prompt, max_new_tokens=NEW).token_ids
    engine = load(tiny_mixtral, True)
    dec, eos = engine.graphs, set(engine.eos_ids)
    ids = engine.encode(prompt)
    if ending == "cancel":
        stream = engine.stream(prompt, max_new_tokens=NEW)
        got = []
        while len(got) < 4:
            got.extend(next(stream).token_ids)
        assert dec.in_flight == 1  # the next token's step is running ahead
        stream.close()
        seq = stream.seq
        assert got == ref[: len(got)]
        kept = len(ids)  # a cancelled request keeps only its prompt (stored after its prefill)
    else:
        opts, n = _ending(engine, ref, ending)
        stream = engine.stream(prompt, **opts)
        got = [t for c in stream for t in c.token_ids]
        seq = stream.seq
        assert got == ref[:n] and seq.out_ids[:n] == ref[:n]
        kept = seq.cached
    assert dec.in_flight == 0 and engine.batcher.active_requests == 0
    # every step after the first ran ahead; past the last token (max_new_tokens) none does
    assert dec.ahead == seq.generated - (2 if ending == "length" else 1)
    assert seq.cached == len(ids) + seq.generated - 1  # the KV holds every token but the last
    assert engine.prefix_cache.tokens == kept
    assert engine.prefix_cache.match(ids + seq.out_ids + [0]).tokens == kept
    assert engine.stats.decode_steps == seq.generated - 1  # the prompt gave the first token
    engine.eos_ids = eos
    assert engine.generate(prompt, max_new_tokens=NEW).token_ids == ref  # the next request is unharmed
    assert engine.cache.consistent() and dec.in_flight == 0


def test_a_second_request_arriving_mid_stream_gets_its_solo_tokens(tiny_mixtral, plain):
    engine = load(tiny_mixtral, True, experts_bits=2, cache_per_layer=1)
    dec = engine.graphs
    first = engine.stream(PROMPTS[0], max_new_tokens=NEW)
    got = []
    while len(got) < 4:
        got.extend(next(first).token_ids)
    assert first.seq.on_graph and dec.in_flight == 1
    rest = interleaved(engine, PROMPTS[1:], NEW)  # they queue now, and decode with the first
    got.extend(t for c in first for t in c.token_ids)
    assert [got, *rest] == [plain[p] for p in PROMPTS]
    assert engine.batcher.counters.max_rows >= 2 and engine.batcher.active_requests == 0
    assert dec.in_flight == 0 and engine.cache.consistent()
    assert engine.generate(PROMPTS[0], max_new_tokens=NEW).token_ids == plain[PROMPTS[0]]  # back on the graph


def test_stats_count_only_the_steps_emitted(tiny_mixtral):
    """EOS after a few tokens discards a step run ahead: it is neither counted nor observed."""
    prompt = PROMPTS[0]
    runs = {}
    for graphs in (False, True):
        engine = load(tiny_mixtral, graphs, experts_bits=2, cache_per_layer=1)
        ref = engine.generate(prompt, max_new_tokens=NEW).token_ids
        i = _new_from(ref, 5)
        engine.eos_ids = {ref[i]}
        before = engine.stats.copy()
        r = engine.generate(prompt, max_new_tokens=NEW)
        runs[graphs] = (r, engine.stats - before)
        assert r.token_ids == ref[:i]
    (plain_r, plain_s), (ahead_r, ahead_s) = runs[False], runs[True]
    assert ahead_s.decode_steps == plain_s.decode_steps == i  # i + 1 tokens: the prompt gave the first
    assert ahead_s.cache_hits + ahead_s.cache_misses == plain_s.cache_hits + plain_s.cache_misses
    assert ahead_s.tokens_generated == plain_s.tokens_generated == i + 1
    for key in ("decode_steps", "host_syncs_per_token", "tokens_generated"):
        assert ahead_r.stats[key] == plain_r.stats[key], key
    assert ahead_r.stats["host_syncs_per_token"] == 0
    assert ahead_r.stats["tokens_per_second"] > 0 and ahead_r.stats["time_to_first_token_s"] > 0


def test_sampling_on_the_graph_decoder_does_not_run_ahead(tiny_mixtral):
    engine = load(tiny_mixtral, True)
    want = load(tiny_mixtral, False).generate(PROMPTS[0], max_new_tokens=NEW, temperature=0.8, seed=3).token_ids
    assert engine.generate(PROMPTS[0], max_new_tokens=NEW, temperature=0.8, seed=3).token_ids == want
    assert engine.graphs.ahead == 0 and engine.graphs.in_flight == 0 and engine.graphs.kv.allocated


def test_reset_cache_forgets_a_step_run_ahead(tiny_mixtral, plain):
    engine = load(tiny_mixtral, True, experts_bits=2)
    stream = engine.stream(PROMPTS[0], max_new_tokens=NEW)
    got = list(next(stream).token_ids)
    while engine.graphs.in_flight == 0:
        got.extend(next(stream).token_ids)
    engine.reset_cache()
    assert engine.graphs.in_flight == 0 and engine.cache.keys() == set()
    got.extend(t for c in stream for t in c.token_ids)  # the request goes on from the host's token
    assert got == plain[PROMPTS[0]]
