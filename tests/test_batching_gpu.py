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


@pytest.mark.parametrize("lone_w, batch_w", [(1024, 1024), (256, 512)])
def test_batched_attention_row_is_its_lone_decode_at_mixtral_width(lone_w, batch_w):
    """Attention at Mixtral-8x7B's geometry (32 query heads on 8 key/value heads of 128): a row
    inside a batched step, whose keys are a slice of the batch's cache (another head stride,
    maybe a wider window), gives the bits of its lone decode, whose keys are a window of the
    1,152-position static cache. The tiny models of the tests above have other strides and
    kernels; a full-size run of scripts/bench_streams.py once found rows that differed."""
    import torch
    from torch import nn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from moe_llm.kernels import rows, trunk_ops

    trunk_ops._attention_rows()  # what `trunk_ops.install` registers for every engine
    attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    gen = torch.Generator("cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)

    static_k, static_v = rand(1, 8, 1152, 128), rand(1, 8, 1152, 128)
    q = rand(2, 32, 1, 128).transpose(1, 2).contiguous().transpose(1, 2)  # the projections' layout
    pos = lone_w - 5
    lone_mask = (torch.arange(lone_w, device="cuda") <= pos).view(1, 1, 1, lone_w)
    want, _ = attention(module, q[:1], static_k[:, :, :lone_w], static_v[:, :, :lone_w], lone_mask, scaling=0.088)
    batch_k, batch_v = rand(2, 8, batch_w, 128), rand(2, 8, batch_w, 128)
    batch_k[0, :, :lone_w], batch_v[0, :, :lone_w] = static_k[0, :, :lone_w], static_v[0, :, :lone_w]
    positions = torch.tensor([[pos], [batch_w - 3]], device="cuda")
    mask = (torch.arange(batch_w, device="cuda")[None, :] <= positions)[:, None, None, :]
    with rows.decode_rows([lone_w, batch_w], [True, True]):
        got, _ = attention(module, q, batch_k, batch_v, mask, scaling=0.088)
    assert torch.equal(got[:1], want)
