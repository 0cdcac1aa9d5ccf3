"""The CPU equivalence and invariance checks, run again on CUDA (pinned store, copy
stream, per-slot events, Triton kernels), plus the CUDA-only promises: one
device->host sync per MoE layer, slots allocated once, budget held."""

from __future__ import annotations

import warnings

import pytest
import torch

import moe_llm

pytestmark = pytest.mark.gpu

PROMPT = "Experts live in host memory"
NEW = 16


@pytest.fixture(scope="module")
def references(tiny_dirs):
    from test_equivalence import hf_reference  # transformers on CPU in fp32 is the oracle

    return {fam: hf_reference(path) for fam, path in tiny_dirs.items()}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("cache", [1, 2])
@pytest.mark.parametrize("prefetch", [True, False])
def test_cuda_greedy_tokens_equal_transformers(tiny_dirs, references, family, cache, prefetch):
    prompt_ids, want, _ = references[family]
    engine = moe_llm.load(tiny_dirs[family], device="cuda", dtype="float32", cache_per_layer=cache, prefetch=prefetch)
    assert engine.cache.store.buffer(engine.cache.layers[0], 0).is_pinned()
    got = engine.generate(prompt_ids, max_new_tokens=NEW).token_ids
    want = want[: next((i for i, t in enumerate(want) if t in engine.eos_ids), len(want))]
    assert got == want and len(got) > 0
    assert engine.stats.cache_misses > 0
    # unquantized experts have no device kernel: decode is dispatched by the host, one sync per layer
    assert engine.stats.host_syncs_per_token == len(engine.cache.layers)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_cuda_logits_match_transformers(tiny_dirs, references, family):
    prompt_ids, _, ref_logits = references[family]
    engine = moe_llm.load(tiny_dirs[family], device="cuda", dtype="float32", cache_per_layer=1)
    logits = engine.logits(prompt_ids).cpu()
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def quantized_cuda_runs(tiny_dirs):
    out = {}
    for family in ("mixtral", "qwen3_moe", "olmoe"):
        for cache in (1, 2, 8):
            for prefetch in (True, False):
                engine = moe_llm.load(
                    tiny_dirs[family], device="cuda", experts_bits=2, attn_bits=4, cache_per_layer=cache,
                    prefetch=prefetch,
                )  # fmt: skip
                pool = engine.cache.pool.data_ptr()
                res = engine.generate(PROMPT, max_new_tokens=NEW)
                fused = engine.runtime.device_dispatch and engine.graphs is not None
                out[family, cache, prefetch] = (res.token_ids, fused, pool == engine.cache.pool.data_ptr())
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_cuda_2bit_tokens_identical_for_every_cache_size_and_prefetch(quantized_cuda_runs, family):
    runs = {k: v for k, v in quantized_cuda_runs.items() if k[0] == family}
    reference = runs[family, 8, False][0]
    assert len(reference) > 0
    for key, (tokens, fused, same_pool) in runs.items():
        assert tokens == reference, key
        assert fused, f"{key}: decode did not use device-side dispatch in a CUDA graph"
        assert same_pool, f"{key}: the slot pool was reallocated"


def _count_syncs(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("cache", [1, 8])
def test_prompts_sync_once_per_moe_layer_and_decode_never(tiny_mixtral, tokens, cache):
    engine = moe_llm.load(tiny_mixtral, device="cuda", experts_bits=2, cache_per_layer=cache, prefetch=True)
    engine.generate(PROMPT, max_new_tokens=2)  # warm: kernels compiled, workspaces allocated
    rt, layer = engine.runtime, engine.cache.layers[0]
    hidden = torch.randn(tokens, engine.fmt.hidden, device="cuda", dtype=engine.fmt.dtype)
    weights = torch.full((tokens, 2), 0.5, device="cuda", dtype=engine.fmt.dtype)
    for _ in range(3):  # hits and misses alike
        index = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(tokens)])  # [T, 2]
        want = 0 if tokens == 1 else 1  # one token: device-side dispatch, misses read in place

        def call(index=index):
            with torch.inference_mode():  # as the engine calls it
                rt.forward(layer, hidden, index, weights)

        assert _count_syncs(call) == want


# -- CUDA-graph decode ----------------------------------------------------------------


def _long_prompt(engine, n: int) -> list[int]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, engine.hf_config.vocab_size, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_graph_decode_equals_eager_decode(tiny_dirs, family):
    """fp32, 2-bit experts: graph replay gives the eager engine's tokens, across a window change."""
    from moe_llm.runtime.decode_graph import MIN_WINDOW

    opts = dict(device="cuda", dtype="float32", experts_bits=2, cache_per_layer=2)
    graph = moe_llm.load(tiny_dirs[family], **opts)
    eager = moe_llm.load(tiny_dirs[family], cuda_graphs=False, **opts)
    assert graph.graphs is not None and eager.graphs is None
    prompt = _long_prompt(graph, MIN_WINDOW - 4)
    want = eager.generate(prompt, max_new_tokens=NEW).token_ids
    got = graph.generate(prompt, max_new_tokens=NEW).token_ids
    assert got == want and len(got) > 4
    assert sorted(graph.graphs._windows) == [MIN_WINDOW, 2 * MIN_WINDOW]
    # a second request replays the captured graphs
    assert graph.generate(PROMPT, max_new_tokens=NEW).token_ids == eager.generate(PROMPT, max_new_tokens=NEW).token_ids


def test_graph_capture_failure_falls_back_to_eager(tiny_mixtral, monkeypatch, caplog):
    from moe_llm.runtime.decode_graph import GraphDecoder

    opts = dict(device="cuda", dtype="float32", experts_bits=2, cache_per_layer=2)
    want = moe_llm.load(tiny_mixtral, cuda_graphs=False, **opts).generate(PROMPT, max_new_tokens=NEW).token_ids
    engine = moe_llm.load(tiny_mixtral, **opts)

    def broken(self, width):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphDecoder, "_capture_window", broken)
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == want
    assert engine.graphs is None and "decoding eagerly" in caplog.text
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == want


def test_graph_step_never_waits_for_the_host(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, device="cuda", experts_bits=2, cache_per_layer=1, prefetch=True)
    engine.generate(PROMPT, max_new_tokens=4)  # prefill + captured graph
    dec, rt = engine.graphs, engine.runtime
    misses = engine.stats.cache_misses
    rt.begin_step()
    assert _count_syncs(lambda: dec.step(1, 5)) == 0  # one replay: every layer and the LM head
    torch.cuda.synchronize()
    rt.end_step()
    assert engine.stats.cache_misses > misses  # one slot per layer: the step really read experts from host RAM
    assert engine.stats.host_syncs_per_token == 0


def test_graph_run_ahead_equals_eager_decode_with_admissions_in_flight(tiny_mixtral):
    """Greedy graph decode runs one step ahead: the cache admits and evicts while the next step
    is in flight (a small cache: misses, admissions, evictions), and the tokens and counts are
    the eager engine's; enqueueing a step never waits for the host."""
    opts = dict(device="cuda", dtype="float32", experts_bits=2, cache_per_layer=2)
    graph = moe_llm.load(tiny_mixtral, **opts)
    eager = moe_llm.load(tiny_mixtral, cuda_graphs=False, **opts)
    dec, ahead = graph.graphs, []
    enqueue = dec.enqueue

    def counted(pos, tok=None):
        ahead.append(tok is None)
        enqueue(pos, tok)

    dec.enqueue = counted
    prompts = [PROMPT, "def parse_args(argv):" * 3, _long_prompt(graph, 40)]
    for p in prompts:
        assert graph.generate(p, max_new_tokens=24).token_ids == eager.generate(p, max_new_tokens=24).token_ids
    assert sum(ahead) > 0 and dec.in_flight == 0 and graph.graphs is dec
    g, e = graph.stats, eager.stats
    assert g.cache_misses > 0 and g.prefetch_issued > 0 and g.evictions > 0
    assert g.decode_steps == e.decode_steps and g.cache_hits + g.cache_misses == e.cache_hits + e.cache_misses
    assert g.host_syncs_per_token == 0 and graph.cache.consistent()
    # one step enqueued ahead: no wait for the device
    rt = graph.runtime
    rt.begin_step()
    enqueue(5, 1)
    rt.begin_step()
    assert _count_syncs(lambda: enqueue(6)) == 0
    for _ in range(2):
        rt.end_step(dec.take()[1])
    # every expert resident (a warm cache): no misses, and still no host sync inside a step
    resident = moe_llm.load(tiny_mixtral, device="cuda", experts_bits=2, cache_per_layer=8)
    resident.generate(PROMPT, max_new_tokens=NEW)
    before = resident.stats.copy()
    resident.generate(PROMPT, max_new_tokens=NEW)
    warm = resident.stats - before
    assert warm.decode_steps > 0 and warm.host_syncs_per_token == 0
    assert warm.cache_misses == 0 and warm.cache_hits > 0


def test_request_past_the_static_kv_decodes_eagerly(tiny_mixtral):
    opts = dict(device="cuda", dtype="float32", experts_bits=2, cache_per_layer=2)
    want = moe_llm.load(tiny_mixtral, cuda_graphs=False, **opts).generate(PROMPT, max_new_tokens=NEW).token_ids
    engine = moe_llm.load(tiny_mixtral, **opts)
    n_prompt = len(engine.encode(PROMPT))
    engine.graphs.max_len = n_prompt + 2  # as if the planned context ended there
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == want
    assert not engine.graphs._windows and not engine.graphs.kv.allocated
