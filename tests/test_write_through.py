"""Write-through prefill: a lone request bound for the CUDA-graph decoder prefills its prompt
straight into the decoder's static KV, so the prompt's KV never exists twice; one that does
not go to the graph after all takes its KV back and decodes eagerly from a complete cache.

CUDA graphs need a GPU, so here the real `GraphDecoder` (static KV, write-through layers,
the trunk it captures, the greedy pick it leaves on the device) runs each step eagerly, as
`step_eager` does; everything else is the engine's own path on CPU."""

from __future__ import annotations

import pytest
import torch

import moe_llm
from moe_llm.runtime.decode_graph import GraphDecoder, _WriteThroughLayer

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 12
PROMPT = "Experts live in host memory"


class EagerGraphs(GraphDecoder):
    """The graph decoder with each step run eagerly instead of replayed (CPU has no CUDA graphs)."""

    begins: list[list[str]]

    def _forward(self, pos: int) -> torch.Tensor:
        return self._eager(self.window_for(pos))[0, -1]

    def begin(self, kv, n: int) -> None:
        # what the decoder is handed: write-through layers that hold nothing, or plain ones
        self.begins.append([f"{type(layer).__name__}:{0 if layer.keys is None else layer.keys.shape[-2]}"
                            for layer in kv.layers])  # fmt: skip
        super().begin(kv, n)


def engine_with_graphs(path, **opts):
    engine = moe_llm.load(path, cache_per_layer=2, prefill_chunk=64, **opts)
    engine.graphs = dec = EagerGraphs(engine.model, engine.hf_config, engine.runtime, torch.device("cpu"), 512)
    dec.begins = []
    return engine, dec


@pytest.fixture(scope="module")
def eager(tiny_mixtral):
    """Each prompt's tokens from the eager engine (no graph decoder, no prefix cache)."""
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2, prefill_chunk=64, prefix_cache=0)
    return {p: engine.generate(p, max_new_tokens=NEW).token_ids for p in (PROMPT, "hi", "a")}


@pytest.mark.parametrize("prompt", [PROMPT, "a"])
def test_a_lone_request_prefills_into_the_static_kv(tiny_mixtral, prompt):
    engine, dec = engine_with_graphs(tiny_mixtral, prefix_cache=0)
    n = len(engine.encode(prompt))
    got = engine.generate(prompt, max_new_tokens=NEW).token_ids
    assert dec.begins == [["_WriteThroughLayer:0"] * engine.hf_config.num_hidden_layers]  # held once: static
    assert engine.graphs is dec and dec.kv.allocated
    copied, cdec = engine_with_graphs(tiny_mixtral, prefix_cache=0)
    copied.batcher.prefill.write_through = False  # the prefill's own cache, copied in by begin
    assert copied.generate(prompt, max_new_tokens=NEW).token_ids == got
    assert cdec.begins == [[f"DynamicLayer:{n}"] * engine.hf_config.num_hidden_layers]
    for a, b in zip(dec.kv.keys, cdec.kv.keys, strict=True):  # the same prompt KV either way
        assert torch.equal(a[:, :, :n], b[:, :, :n])


def test_the_prefix_cache_keeps_a_write_through_prompt_from_the_static_kv(tiny_mixtral, eager):
    engine, dec = engine_with_graphs(tiny_mixtral)
    ids = engine.encode(PROMPT)
    r = engine.generate(PROMPT, max_new_tokens=NEW)
    assert r.token_ids == eager[PROMPT] and dec.begins[0][0] == "_WriteThroughLayer:0"
    ran = ids + r.token_ids[: r.stats["tokens_generated"] - 1]
    match = engine.prefix_cache.match(ran + [0])
    assert match.tokens == len(ran) > len(ids)  # the prompt and the decoded positions (torch decode here)
    kv = engine._new_kv()
    engine.prefix_cache.restore(kv, match, len(ids), engine.device)
    fresh = engine._new_kv()
    with torch.inference_mode():
        engine.model(input_ids=torch.tensor([ids]), use_cache=True, **{engine._kv_arg: fresh})
    for a, b in zip(kv.layers, fresh.layers, strict=True):  # what an eager prefill computes, bit for bit
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # the next request restores it (no write-through from a restored prefix: begin copies)
    again = engine.generate(ids + eager[PROMPT][:3], max_new_tokens=NEW)
    assert again.stats["prefix_cache_hit_tokens"] == len(ids) + 2 and again.stats["prefill_tokens"] == 1
    assert dec.begins[1] == [f"DynamicLayer:{len(ids) + 3}"] * engine.hf_config.num_hidden_layers


def test_a_request_that_arrives_during_the_prefill_takes_the_kv_back(tiny_mixtral, eager):
    engine, dec = engine_with_graphs(tiny_mixtral, prefix_cache=0)
    taken: list[int] = []
    real_take_back = _WriteThroughLayer.take_back
    late: list = []

    def arrive(module, args, kwargs):  # a second request queues while the first one's prefill runs
        if not late:
            late.append(engine.stream("hi", max_new_tokens=NEW))

    def spy(layer, n):
        taken.append(n)
        real_take_back(layer, n)

    hook = engine.model.register_forward_pre_hook(arrive, with_kwargs=True)
    try:
        _WriteThroughLayer.take_back = spy
        first = engine.stream(PROMPT, max_new_tokens=NEW)
        head = next(first)  # the first token: the prefill ran, wrote through, and the request stayed eager
        seq = first.seq
        layers = seq.kv.layers
        assert taken == [len(seq.prompt_ids)] * len(layers)
        assert all(isinstance(x, _WriteThroughLayer) and x.static is None for x in layers)
        assert not seq.on_graph and dec.begins == []
        got = list(head.token_ids) + [t for c in first for t in c.token_ids]
        other = [t for c in late[0] for t in c.token_ids]
    finally:
        _WriteThroughLayer.take_back = real_take_back
        hook.remove()
    assert got == eager[PROMPT] and other == eager["hi"]  # a complete cache: the eager tokens
    assert dec.begins == [] and engine.batcher.active_requests == 0


def test_a_failed_begin_gives_the_kv_back_and_decodes_eagerly(tiny_mixtral, eager, caplog):
    engine, dec = engine_with_graphs(tiny_mixtral, prefix_cache=0)
    dec.kv.num_layers += 1  # a layout the static cache refuses once the prompt is written: begin fails
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == eager[PROMPT]
    assert dec.begins == [["_WriteThroughLayer:0"] * engine.hf_config.num_hidden_layers]
    assert engine.graphs is None and "cannot take this model's KV cache" in caplog.text


def test_no_write_through_for_a_prompt_of_several_chunks_or_a_batch(tiny_mixtral, eager):
    engine, dec = engine_with_graphs(tiny_mixtral, prefix_cache=0)
    long_prompt = "Beautiful is better than ugly. " * 12
    n = len(engine.encode(long_prompt))
    assert n > 64
    engine.generate(long_prompt, max_new_tokens=4)
    assert dec.begins == [[f"DynamicLayer:{n}"] * engine.hf_config.num_hidden_layers]  # copied in by begin
    a, b = engine.stream(PROMPT, max_new_tokens=NEW), engine.stream("hi", max_new_tokens=NEW)
    got = [[t for c in s for t in c.token_ids] for s in (a, b)]
    assert got == [eager[PROMPT], eager["hi"]] and len(dec.begins) == 1  # batched: eager, never written through


def test_no_write_through_past_the_static_kv(tiny_mixtral, eager):
    engine, dec = engine_with_graphs(tiny_mixtral)
    dec.max_len = len(engine.encode(PROMPT)) + NEW - 2  # the prompt and its new tokens do not fit
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == eager[PROMPT]
    assert dec.begins == [] and not dec.kv.allocated  # nothing was written into the static KV
    assert engine.stats_dict()["prefix_cache_tokens"] > 0  # a plain cache: the prefix cache kept it
