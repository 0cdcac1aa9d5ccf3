"""The trunk that CUDA-graph decode captures (static KV cache, explicit mask over a
window, the transformers layers called directly) computes what transformers
computes. Run eagerly here, so it is checked on every machine; the GPU tests replay
the same trunk as graphs."""

from __future__ import annotations

import pytest
import torch

import moe_llm
from moe_llm.runtime.decode_graph import MIN_WINDOW, GraphDecoder, unsupported_reason

NEW = 12
PROMPT_TEXT = "Experts live in host memory"


def _decoder(engine) -> GraphDecoder:
    assert unsupported_reason(engine.model, engine.hf_config) is None
    return GraphDecoder(engine.model, engine.hf_config, engine.runtime, torch.device("cpu"), engine.context_length)


def _greedy(engine, dec, prompt_ids, n, write_through=True):
    """Greedy tokens and logits: an eager prefill (writing its KV straight into the static
    cache, as the engine does, or copied in afterwards), then the static-KV trunk."""
    kv = engine._new_kv()
    if write_through:
        dec.prefill_cache(kv)
    with torch.inference_mode():
        out = engine.model(input_ids=torch.tensor([prompt_ids]), use_cache=True, **{engine._kv_arg: kv})
    if write_through:  # the prompt's KV exists once: in the static cache
        assert all(layer.keys is None for layer in kv.layers) and dec.kv.allocated
    dec.begin(kv, len(prompt_ids))
    steps = [out.logits[0, -1].float()]
    toks = [int(steps[-1].argmax())]
    for i in range(n - 1):
        logits = dec.step_eager(toks[-1], len(prompt_ids) + i).float()
        steps.append(logits)
        toks.append(int(logits.argmax()))
    return toks, torch.stack(steps)


@pytest.mark.parametrize("write_through", [True, False])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_static_kv_trunk_equals_transformers(tiny_dirs, family, write_through):
    from test_equivalence import hf_reference

    prompt_ids, want, _ = hf_reference(tiny_dirs[family])
    engine = moe_llm.load(tiny_dirs[family], cache_per_layer=2, prefetch=True)
    toks, logits = _greedy(engine, _decoder(engine), prompt_ids, NEW, write_through)
    assert toks == want[:NEW]
    # each step's logits equal a full no-cache forward over prompt + generated tokens
    full = engine.logits(prompt_ids + toks[:-1])[len(prompt_ids) - 1 :]
    assert torch.allclose(logits, full, atol=1e-4, rtol=1e-4)


def test_static_kv_across_window_sizes(tiny_mixtral):
    """A prompt just short of the first window, decoded past it: the next window's mask and
    KV view take over with no change in the logits."""
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2)
    dec = _decoder(engine)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.hf_config.vocab_size, (MIN_WINDOW - 4,), generator=g).tolist()
    assert dec.window_for(len(prompt) - 1) == MIN_WINDOW
    assert dec.window_for(len(prompt) + NEW) == 2 * MIN_WINDOW
    toks, logits = _greedy(engine, dec, prompt, NEW)
    full = engine.logits(prompt + toks[:-1])[len(prompt) - 1 :]
    assert torch.allclose(logits, full, atol=1e-4, rtol=1e-4)


def test_position_outside_the_static_cache_is_refused(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2, max_context=64)
    dec = _decoder(engine)
    with pytest.raises(ValueError, match="outside the static cache"):
        dec.step_eager(1, 64)


def test_window_sizes():
    dec = GraphDecoder.__new__(GraphDecoder)
    dec.max_len = 3000
    assert [dec.window_for(p) for p in (0, 255, 256, 511, 512, 2999)] == [256, 256, 512, 512, 1024, 3000]


def test_graph_fallbacks_keep_the_tokens(tiny_mixtral, caplog):
    """Where graphs cannot run (here: capture on a machine without CUDA, and a KV layout the
    static cache refuses), the engine says so once, decodes eagerly from the same KV, and
    gives the tokens of an engine that never tried."""
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2)
    want = engine.generate(PROMPT_TEXT, max_new_tokens=NEW).token_ids

    engine.graphs = _decoder(engine)  # its first step tries to capture, which fails here
    assert engine.generate(PROMPT_TEXT, max_new_tokens=NEW).token_ids == want
    assert engine.graphs is None and "decoding eagerly" in caplog.text

    caplog.clear()
    engine.graphs = dec = _decoder(engine)
    dec.kv.num_layers += 1  # a layout mismatch: begin() refuses the prefill's cache
    assert engine.generate(PROMPT_TEXT, max_new_tokens=NEW).token_ids == want
    assert engine.graphs is None and "cannot take this model's KV cache" in caplog.text
    assert engine.generate(PROMPT_TEXT, max_new_tokens=NEW).token_ids == want

    caplog.clear()
    engine.graphs = dec = _decoder(engine)
    dec.kv.max_len = 2  # the prompt does not fit: no layer writes through, each keeps its KV
    dec.max_len = 10**6  # (so the engine still tries the graphs for this request)
    assert engine.generate(PROMPT_TEXT, max_new_tokens=NEW).token_ids == want
    assert engine.graphs is None and "cannot take this model's KV cache" in caplog.text


def test_a_batch_static_cache_writes_each_row_at_its_own_position():
    """`batch_graph.RowsKV`: rows' caches moved in keep their positions; each step writes row b's
    key and value at pos[b] only; a row's layers read back as alone."""
    from moe_llm.runtime.batch_graph import RowsKV

    torch.manual_seed(2)
    lengths = [3, 5]
    sources = [[(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for _ in range(2)] for n in lengths]
    pos = torch.tensor([[3], [5]])
    kv = RowsKV(pos, 8)
    moved = []
    kv.fill([lambda layer, src=src: src[layer] for src in sources], lengths, 2, moved.append)
    assert moved == [0, 1]  # each layer handed on as soon as it is moved
    new_k, new_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, values = kv.update(new_k, new_v, 1)
    assert keys.shape == (2, 2, 8, 4)
    for b, n in enumerate(lengths):
        k, v = kv.layers_of(b)[1]
        assert torch.equal(k[0, :, :n], sources[b][1][0][0]) and torch.equal(v[0, :, :n], sources[b][1][1][0])
        assert torch.equal(k[0, :, n], new_k[b, :, 0]) and torch.equal(v[0, :, n], new_v[b, :, 0])
        assert not k[0, :, n + 1 :].any()  # nothing written past the row's position
        k0, _ = kv.layers_of(b)[0]
        assert torch.equal(k0[0, :, :n], sources[b][0][0][0]) and not k0[0, :, n:].any()  # layer 0 untouched


def test_rows_keep_their_keys_and_values_through_batch_changes():
    """`batch_graph.BatchGraph` bookkeeping (no capture): rows' KV moves into a batch, into the
    next batch when the rows change, and back into a cache of its own when a row decodes on
    alone, to the bit; a batch whose rows are all done or gone holds nothing."""
    from types import SimpleNamespace

    from transformers import DynamicCache

    from moe_llm.runtime.batch_graph import BatchGraph
    from moe_llm.runtime.sequence import DECODE, DONE

    torch.manual_seed(3)
    engine = SimpleNamespace(_new_kv=DynamicCache, hf_config=SimpleNamespace(num_hidden_layers=2), device="cpu")
    graph = BatchGraph(SimpleNamespace(engine=engine))

    def row(n):
        kv = DynamicCache()
        layers = [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for _ in range(2)]
        for i, (k, v) in enumerate(layers):
            kv.update(k, v, i)
        return SimpleNamespace(kv=kv, cached=n, state=DECODE), layers

    (a, ka), (b, kb), (c, kc) = row(3), row(5), row(4)
    graph._rebuild([a, b], [(256, True), (256, True)])
    assert a.kv is None and b.kv is None and graph.holds(a) and graph.holds(b)
    for seq, want in ((a, ka), (b, kb)):
        for (k, v), (wk, wv) in zip(graph.layers_of(seq), want, strict=True):
            assert torch.equal(k[:, :, : seq.cached], wk) and torch.equal(v[:, :, : seq.cached], wv)
    a.state = DONE
    graph.forget(a)
    graph._rebuild([b, c], [(256, True), (512, True)])  # b moves from the last batch, c joins
    assert graph.batch.width == 512 and not graph.holds(a)
    for seq, want in ((b, kb), (c, kc)):
        for (k, v), (wk, wv) in zip(graph.layers_of(seq), want, strict=True):
            assert torch.equal(k[:, :, : seq.cached], wk) and torch.equal(v[:, :, : seq.cached], wv)
    c.state = DONE
    graph.forget(c)
    graph.release(b)  # b decodes on alone: its own cache again, and the batch goes
    assert graph.batch is None
    for layer, (wk, wv) in zip(b.kv.layers, kb, strict=True):
        assert torch.equal(layer.keys, wk) and torch.equal(layer.values, wv)
