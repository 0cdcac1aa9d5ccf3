"""The global expert cache and its policies: one pool for every layer, floors, LRU and LFU
victims, admission after decode steps, prompt prefetch bookkeeping."""

from __future__ import annotations

import pytest
import torch

from moe_llm.experts import ExpertCache, ExpertFormat, ExpertStore, PromptPrefetcher
from moe_llm.experts.policy import LFUPolicy, LRUPolicy, make_policy

E = 6


def make_cache(slots=3, layers=(0, 1), retain=True, policy="lru", floor=0) -> ExpertCache:
    fmt = ExpertFormat.build(hidden=16, intermediate=8, bits=None, dtype=torch.float32)
    store = ExpertStore(fmt, list(layers), E)
    for layer in layers:
        for e in range(E):
            store.put(
                layer, e, {"gate_up_proj": torch.full((16, 16), 100.0 * layer + e), "down_proj": torch.zeros(16, 8)}
            )
    return ExpertCache(store, torch.device("cpu"), slots, retain=retain, policy=policy, floor=floor)


def test_miss_then_hit_and_slot_holds_the_expert():
    c = make_cache()
    s = c.acquire(0, 4)
    assert c.stats.cache_misses == 1 and c.stats.cache_hits == 0
    assert torch.all(c.views(s)["gate_up_proj"] == 4.0)
    assert c.acquire(0, 4) == s
    assert c.stats.cache_hits == 1
    assert c.stats.bytes_to_device == c.store.fmt.nbytes


def test_one_pool_serves_every_layer_and_evicts_the_globally_least_recent():
    c = make_cache(slots=3)
    c.acquire(0, 0)
    c.acquire(1, 0)
    c.acquire(1, 1)  # one layer may hold more than its share
    assert c.per_layer() == {0: 1, 1: 2}
    c.acquire(1, 0)  # (1, 0) becomes most recent: (0, 0) is now the oldest
    c.acquire(1, 2)
    assert c.keys() == {(1, 0), (1, 1), (1, 2)} and c.stats.evictions == 1


def test_floor_keeps_a_layer_resident_while_others_can_give():
    c = make_cache(slots=3, floor=1)
    c.acquire(0, 0)
    c.acquire(1, 0)
    c.acquire(1, 1)
    c.acquire(1, 2)  # the oldest is (0, 0), but layer 0 is at its floor: layer 1 gives a slot
    assert c.is_resident(0, 0) and c.per_layer() == {0: 1, 1: 2}


def test_protected_experts_survive_and_recycling_still_finds_a_slot():
    c = make_cache(slots=2)
    a = c.acquire(0, 0)
    c.acquire(0, 1)
    s = c.acquire(0, 2, protect=[1])  # (0, 1) is protected: (0, 0) goes
    assert s == a and c.is_resident(0, 1) and not c.is_resident(0, 0)
    c.acquire(0, 3, protect=[1, 2])  # everything protected: the oldest is taken anyway (prefill recycling)
    assert c.is_resident(0, 3)


def test_evicted_slot_is_reused_and_overwritten():
    c = make_cache(slots=1)
    s0 = c.acquire(0, 0)
    s1 = c.acquire(1, 5)
    assert s0 == s1
    assert torch.all(c.views(s1)["gate_up_proj"] == 105.0)


def test_no_retain_drops_after_release():
    c = make_cache(slots=2, retain=False)
    s = c.acquire(0, 1)
    c.release(s)
    assert not c.is_resident(0, 1) and c.keys() == set()
    assert not c.admit((0, 2), protect=set())  # the no-cache ablation never admits


def test_observe_counts_hits_misses_and_bytes_read_in_place():
    c = make_cache(slots=2)
    c.acquire(0, 1)
    c.observe([(0, 1), (0, 2), (1, 3)])
    assert (c.stats.cache_hits, c.stats.cache_misses) == (0 + 1, 1 + 2)  # the acquire's miss, then 1 hit 2 misses
    assert c.stats.bytes_from_host == 2 * c.store.fmt.nbytes


def test_lru_admits_every_miss_into_the_least_recent_slot():
    c = make_cache(slots=2)
    c.acquire(0, 0)
    c.acquire(0, 1)
    c.observe([(0, 1), (1, 4)])
    assert c.admit((1, 4), protect={(0, 1), (1, 4)})
    assert c.keys() == {(0, 1), (1, 4)} and c.stats.prefetch_issued == 1
    c.observe([(1, 4)])
    assert c.stats.prefetch_used == 1


def test_lfu_admits_only_a_more_frequent_expert():
    c = make_cache(slots=1, policy="lfu")
    c.acquire(0, 0)
    for _ in range(3):
        c.observe([(0, 0)])
    c.observe([(1, 1)])
    assert not c.admit((1, 1), protect=set())  # used once, against three uses
    for _ in range(4):
        c.observe([(1, 1)])
    assert c.admit((1, 1), protect=set())
    assert c.keys() == {(1, 1)}


def test_lfu_counts_decay_so_old_favourites_fade():
    p = LFUPolicy(half_life=1.0)
    for _ in range(8):
        p.touch((0, 0))
    for _ in range(20):
        p.tick()
    p.touch((0, 1))
    p.admitted((0, 0))
    assert p.admit((0, 1), victim=(0, 0))


def test_policies_by_name():
    assert isinstance(make_policy("lru"), LRUPolicy) and isinstance(make_policy("lfu"), LFUPolicy)
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("fifo")


def test_reset_frees_everything():
    c = make_cache(slots=3)
    for e in range(3):
        c.acquire(0, e)
    c.reset()
    assert c.keys() == set() and c.per_layer() == {0: 0, 1: 0}
    c.acquire(1, 2)
    assert c.is_resident(1, 2)


def _prefetcher(c: ExpertCache, guesses=2) -> PromptPrefetcher:
    router = torch.eye(E, 16)  # expert e scores hidden[e]
    return PromptPrefetcher(c, {0: router, 1: router}, {0: None}, {0: 1}, guesses=guesses)


def test_prompt_guess_ranks_experts_by_token_count():
    c = make_cache(slots=4)
    pf = _prefetcher(c, guesses=1)
    hidden = torch.zeros(5, 16)
    hidden[:3, 2] = 1.0  # three tokens pick expert 2
    hidden[3:, 4] = 1.0  # two pick expert 4
    guess = pf.guess(0, hidden).tolist()
    ranked, needed = guess[:-1], guess[-1]
    assert ranked[:2] == [2, 4] and needed == 2
    assert pf.guess(1, hidden) is None  # no MoE layer after the last


def test_prompt_prefetch_never_evicts_the_current_layer():
    c = make_cache(slots=3)
    for e in range(3):
        c.acquire(0, e)
    pf = _prefetcher(c)
    assert pf.issue(0, [4, 5, 2]) == 0  # every slot holds layer 0, which is still computing
    c.reset()
    assert pf.issue(0, [4, 5, 2]) == 2 and c.keys() == {(1, 4), (1, 5)}


def test_prompt_start_fills_free_slots_only():
    c = make_cache(slots=4)
    c.acquire(1, 0)
    pf = _prefetcher(c)
    issued = pf.prompt_start(tokens=64, top_k=2)
    assert issued == 3 and c.is_resident(1, 0)  # three free slots, nothing evicted
    assert pf.prompt_start(tokens=2, top_k=2) == 0  # a short prompt is not worth it


def test_a_long_prompt_keeps_the_copy_queue_two_layers_deep():
    c = make_cache(slots=3 * E, layers=(0, 1, 2))
    router = torch.eye(E, 16)
    pf = PromptPrefetcher(c, {0: router, 1: router, 2: router}, {0: None, 1: None}, {0: 1, 1: 2}, guesses=2)
    assert pf.prompt_start(tokens=64, top_k=2) == 2 * E  # the first two MoE layers, whole
    assert c.per_layer() == {0: E, 1: E, 2: 0}
    assert pf.issue(0, [4, 5, 2]) == E  # layer 1's guess is in already; all of layer 2 behind it
    assert c.per_layer() == {0: E, 1: E, 2: E}
    c.reset()
    pf.prompt_start(tokens=2, top_k=2)  # a short prompt: only the next layer's guess
    assert pf.issue(0, [4, 5, 2]) == 2 and c.keys() == {(1, 4), (1, 5)}
