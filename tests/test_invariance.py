"""With 2-bit experts the output must not depend on the cache size or on prefetch:
offloading is a data-movement choice, never a numerical one."""

from __future__ import annotations

import pytest

import moe_llm

PROMPT = "Experts live in host memory"


@pytest.fixture(scope="module")
def quantized_outputs(tiny_dirs):
    out = {}
    for family in ("mixtral", "olmoe"):
        for cache in (1, 2, 8):
            for prefetch in (True, False):
                engine = moe_llm.load(tiny_dirs[family], experts_bits=2, cache_per_layer=cache, prefetch=prefetch)
                res = engine.generate(PROMPT, max_new_tokens=16)
                out[family, cache, prefetch] = (res.token_ids, engine.stats.copy())
    return out


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_2bit_tokens_identical_for_every_cache_size_and_prefetch(quantized_outputs, family):
    runs = {k: v[0] for k, v in quantized_outputs.items() if k[0] == family}
    reference = runs[family, 8, False]
    assert len(reference) > 0
    for key, tokens in runs.items():
        assert tokens == reference, key


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
@pytest.mark.parametrize("cpu_experts", ["off", "all"])
def test_a_budget_of_one_slot_for_every_layer_gives_the_same_tokens(quantized_outputs, tiny_dirs, family, cpu_experts):
    """A budget with room for one expert slot in all (fewer slots than MoE layers, floor 0):
    the prompt recycles the slot, decode reads every other expert where it lies; the tokens
    are those of a slot for every expert."""
    full = moe_llm.load(tiny_dirs[family], experts_bits=2, cache_per_layer=8)
    p = full.plan
    budget = p.trunk_bytes + p.kv_bytes + p.workspace_bytes + p.expert_bytes
    engine = moe_llm.load(tiny_dirs[family], experts_bits=2, gpu_budget=budget, cpu_experts=cpu_experts)
    assert engine.plan.slots == 1 < engine.plan.moe_layers and engine.plan.floor == 0
    res = engine.generate(PROMPT, max_new_tokens=16)
    assert res.token_ids == quantized_outputs[family, 8, False][0]
    assert engine.stats.cache_misses > engine.stats.cache_hits
    with pytest.raises(moe_llm.BudgetError, match="one expert slot"):
        moe_llm.load(tiny_dirs[family], experts_bits=2, gpu_budget=budget - 1)


def test_smaller_caches_move_more_bytes(quantized_outputs):
    def moved(c):
        stats = quantized_outputs["mixtral", c, False][1]
        return stats.bytes_to_device + stats.bytes_from_host  # copies plus misses read in place

    assert moved(1) > moved(2) > moved(8)
    assert quantized_outputs["mixtral", 8, False][1].evictions == 0  # a slot for every expert: nothing leaves


def test_full_cache_has_no_misses_after_warmup(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, experts_bits=2, cache_per_layer=8)
    engine.generate(PROMPT, max_new_tokens=4)  # warm-up touches experts
    # force every expert resident, then run again: zero misses
    for layer in engine.cache.layers:
        for e in range(engine.cache.store.num_experts):
            slot = engine.cache.acquire(layer, e)
            engine.cache.release(slot)
    before = engine.stats.copy()
    engine.generate(PROMPT, max_new_tokens=8)
    delta = engine.stats - before
    assert delta.cache_misses == 0 and delta.cache_hits > 0 and delta.bytes_to_device == 0


def test_2bit_moves_at_most_3_bits_per_param(tiny_engine, tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, experts_bits=2, cache_per_layer=1)
    res = engine.generate(PROMPT, max_new_tokens=2)
    assert res.stats["expert_bits_per_param"] <= 3.0
    assert engine.fmt.bits_per_param <= 3.0


def test_quantized_attention_runs_and_is_deterministic(tiny_mixtral):
    a = moe_llm.load(tiny_mixtral, experts_bits=4, attn_bits=4, cache_per_layer=2)
    b = moe_llm.load(tiny_mixtral, experts_bits=4, attn_bits=4, cache_per_layer=8, prefetch=False)
    assert a.generate(PROMPT, max_new_tokens=10).token_ids == b.generate(PROMPT, max_new_tokens=10).token_ids


def test_policies_and_admissions_change_bytes_not_tokens(tmp_path):
    from moe_llm.tiny import make_tiny

    path = make_tiny(tmp_path / "deep", "mixtral", seed=3, layers=4)
    runs = {}
    for policy in ("lru", "lfu"):
        for cache in (1, 3):
            for prefetch in (True, False):
                engine = moe_llm.load(
                    path, experts_bits=2, cache_per_layer=cache, cache_policy=policy, prefetch=prefetch
                )
                runs[policy, cache, prefetch] = (
                    engine.generate(PROMPT, max_new_tokens=16).token_ids,
                    engine.stats.copy(),
                )
    reference = moe_llm.load(path, experts_bits=2, cache_per_layer=8, prefetch=False).generate(
        PROMPT, max_new_tokens=16
    )
    assert all(tokens == reference.token_ids for tokens, _ in runs.values())
    lru, static = runs["lru", 3, True][1], runs["lru", 3, False][1]
    assert lru.evictions > static.evictions  # admissions that evict happen only with prefetch
    assert lru.host_syncs_per_token == 0  # decode reads misses in place: no waits inside a step


def test_prefill_issues_copies_in_layer_order(tiny_mixtral):
    """A prompt that needs more experts than a layer has slots: each layer's own
    recycled-slot copies are issued before the next layer's prefetch (the copy
    stream runs them in that order), so no layer waits behind the next one's copies."""
    engine = moe_llm.load(tiny_mixtral, experts_bits=2, cache_per_layer=2, prefetch=True)
    cache = engine.cache
    loads, original = [], cache._load

    def spy(key, slot):
        loads.append(key[0])
        original(key, slot)

    cache._load = spy
    engine.generate(" ".join([PROMPT] * 8), max_new_tokens=1)  # the prefill only
    assert engine.stats.prefetch_issued > 0 and engine.stats.cache_misses > 0
    assert set(loads) == set(cache.layers) and loads == sorted(loads)
