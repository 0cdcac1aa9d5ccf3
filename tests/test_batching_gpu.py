"""Batching on CUDA (skipped without a device): 'exact' and 'fused' give each request's lone
tokens; 'fused' hands a lone request to the CUDA-graph decoder and moves it to the fused step
when others join."""

from __future__ import annotations

import pytest
from serve_helpers import interleaved as batch_streams

import moe_llm

pytestmark = pytest.mark.gpu

PROMPTS = ["Experts live in host memory", "def parse_args(argv):" * 3, "The quick brown fox " * 6]
OPTS = dict(device="cuda", dtype="float32", experts_bits=2, cache_per_layer=2, prefill_chunk=16)


def interleaved(engine, prompts, new=16):
    return batch_streams(engine, prompts, new)


def test_exact_batching_on_cuda_gives_the_lone_tokens(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, batch_mode="exact", **OPTS)
    assert engine.graphs is None  # exact: no graph decoder, every row decodes eagerly
    alone = [engine.generate(p, max_new_tokens=16).token_ids for p in PROMPTS]
    assert interleaved(engine, PROMPTS) == alone
    assert engine.batcher.counters.max_rows >= 2 and engine.cache.consistent()


VARIANTS = {
    "fp32, 2-bit experts": dict(dtype="float32", experts_bits=2),
    "bf16, 2-bit experts, 4-bit attention and head": dict(dtype="bfloat16", experts_bits=2, attn_bits=4, head_bits=4),
    "bf16, 3-bit experts": dict(dtype="bfloat16", experts_bits=3),
    "bf16, unquantized": dict(dtype="bfloat16", experts_bits=None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_batching_on_cuda_gives_the_lone_graph_tokens(tiny_mixtral, variant):
    """Rows decoded in one fused step leave the CUDA-graph decoder and come back to it, and
    every request's greedy tokens are those of its lone run on the graphs, to the token."""
    opts = {**OPTS, **VARIANTS[variant]}
    engine = moe_llm.load(tiny_mixtral, batch_mode="fused", **opts)
    graphs = engine.runtime.device_dispatch  # quantized experts: lone requests decode on CUDA graphs
    assert (engine.graphs is not None) == graphs
    alone = [engine.generate(p, max_new_tokens=16).token_ids for p in PROMPTS]
    got = interleaved(engine, PROMPTS)
    assert got == alone
    assert engine.batcher.counters.batched_rows > 0 and engine.cache.consistent()
    graph = engine.batcher._fused.graph
    if graphs:  # the fused step replays as a CUDA graph, recaptured as rows leave
        assert graph is not None and graph.captures >= 2 and graph.replays > graph.captures
        assert graph.batch is None  # every row is done: its graph and KV are gone
    else:
        assert graph is None
    assert engine.batcher.active_requests == 0
    lone = engine.generate(PROMPTS[0], max_new_tokens=16).token_ids  # back on the graphs, if any
    assert lone == alone[0] and (not graphs or engine.graphs._windows)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_fused_batching_on_cuda_other_families(tiny_dirs, family):
    opts = {**OPTS, "dtype": "bfloat16", "attn_bits": 4}
    engine = moe_llm.load(tiny_dirs[family], batch_mode="fused", **opts)
    alone = [engine.generate(p, max_new_tokens=16).token_ids for p in PROMPTS]
    assert interleaved(engine, PROMPTS) == alone
    assert engine.batcher.counters.batched_rows > 0


def test_a_lone_request_on_cuda_prefills_into_the_static_kv(tiny_mixtral):
    """Write-through: the graph decoder gets layers that hold nothing (the prompt is in its static
    KV already); tokens equal the eager engine's, and a follow-up turn restores from the prefix cache."""
    engine = moe_llm.load(tiny_mixtral, batch_mode="fused", **{**OPTS, "prefill_chunk": 64})
    eager = moe_llm.load(
        tiny_mixtral, batch_mode="fused", cuda_graphs=False, prefix_cache=0, **{**OPTS, "prefill_chunk": 64}
    )
    dec, seen = engine.graphs, []
    begin = dec.begin

    def spy(kv, n):
        seen.append([(type(layer).__name__, layer.keys is None) for layer in kv.layers])
        begin(kv, n)

    dec.begin = spy
    ids = engine.encode(PROMPTS[0])
    got = engine.generate(ids, max_new_tokens=16)
    assert seen == [[("_WriteThroughLayer", True)] * engine.hf_config.num_hidden_layers]
    assert got.token_ids == eager.generate(ids, max_new_tokens=16).token_ids
    follow = ids + got.token_ids + ids[1:]  # the prompt is kept (from the static KV); decoded positions not
    again = engine.generate(follow, max_new_tokens=16)
    assert again.stats["prefix_cache_hit_tokens"] == len(ids) and not engine.batcher.prefill.like_prefill
    assert again.token_ids == eager.generate(follow, max_new_tokens=16).token_ids
