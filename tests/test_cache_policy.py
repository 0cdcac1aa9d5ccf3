"""Cache and prefetch policy: LRU order, eviction, slot reuse, counters, prefetch bookkeeping."""

from __future__ import annotations

import torch

from moe_llm.cache import ExpertCache
from moe_llm.expert_format import ExpertFormat
from moe_llm.prefetch import Prefetcher
from moe_llm.store import ExpertStore

E = 6


def make_cache(slots=3, layers=(0, 1), retain=True) -> ExpertCache:
    fmt = ExpertFormat.build(hidden=16, intermediate=8, bits=None, dtype=torch.float32)
    store = ExpertStore(fmt, list(layers), E)
    for layer in layers:
        for e in range(E):
            store.put(
                layer, e, {"gate_up_proj": torch.full((16, 16), 100.0 * layer + e), "down_proj": torch.zeros(16, 8)}
            )
    return ExpertCache(store, torch.device("cpu"), slots, retain=retain)


def test_miss_then_hit_and_slot_holds_the_expert():
    c = make_cache()
    s = c.acquire(0, 4)
    assert c.stats.cache_misses == 1 and c.stats.cache_hits == 0
    assert torch.all(c.views(s)["gate_up_proj"] == 4.0)
    assert c.acquire(0, 4) == s
    assert c.stats.cache_hits == 1
    assert c.stats.bytes_to_device == c.store.fmt.nbytes


def test_lru_order_and_eviction_of_least_recent():
    c = make_cache(slots=3)
    for e in (0, 1, 2):
        c.acquire(0, e)
    c.acquire(0, 0)  # 0 becomes most recent
    assert c.resident(0) == [1, 2, 0]
    c.acquire(0, 3)  # evicts 1
    assert c.resident(0) == [2, 0, 3]
    assert c.stats.evictions == 1 and not c.is_resident(0, 1)


def test_evicted_slot_is_reused_and_overwritten():
    c = make_cache(slots=1)
    s0 = c.acquire(0, 0)
    s1 = c.acquire(0, 5)
    assert s0 == s1
    assert torch.all(c.views(s1)["gate_up_proj"] == 5.0)


def test_layers_have_separate_pools():
    c = make_cache(slots=2)
    c.acquire(0, 0)
    c.acquire(0, 1)
    c.acquire(1, 0)
    assert c.resident(0) == [0, 1] and c.resident(1) == [0]
    assert torch.all(c.views(c.acquire(1, 0))["gate_up_proj"] == 100.0)


def test_protect_keeps_experts_still_needed():
    c = make_cache(slots=2)
    c.acquire(0, 0)
    c.acquire(0, 1)
    c.acquire(0, 2, protect=[0])  # LRU is 0, but it is protected -> 1 goes
    assert c.resident(0) == [0, 2]
    c.acquire(0, 3, protect=[0, 2])  # all protected: forced eviction of the LRU
    assert len(c.resident(0)) == 2 and c.is_resident(0, 3)


def test_prefetch_counts_issued_used_and_wasted():
    c = make_cache(slots=2)
    assert c.prefetch(0, [1, 2]) == 2
    assert c.stats.prefetch_issued == 2 and c.stats.cache_misses == 0
    c.acquire(0, 1)  # used
    assert c.stats.prefetch_used == 1 and c.stats.cache_hits == 1
    c.acquire(0, 3)  # evicts 2 (LRU), never used -> wasted
    assert c.stats.prefetch_wasted == 1


def test_prefetch_never_evicts_its_own_guesses():
    c = make_cache(slots=2)
    c.acquire(0, 0)
    assert c.prefetch(0, [1, 2, 3]) == 2  # only two slots: stops instead of evicting a guess
    assert set(c.resident(0)) == {1, 2}


def test_prefetch_of_resident_expert_refreshes_it():
    c = make_cache(slots=2)
    c.acquire(0, 0)
    c.acquire(0, 1)
    assert c.prefetch(0, [0]) == 0
    assert c.resident(0) == [1, 0]


def test_no_cache_mode_drops_after_use():
    c = make_cache(slots=2, retain=False)
    s = c.acquire(0, 0)
    c.release(s)
    c.acquire(0, 0)
    assert c.stats.cache_misses == 2 and c.stats.cache_hits == 0


def test_full_residency_means_no_misses():
    c = make_cache(slots=E)
    for e in range(E):
        c.release(c.acquire(0, e))
    misses = c.stats.cache_misses
    for _ in range(3):
        for e in reversed(range(E)):
            c.release(c.acquire(0, e))
    assert c.stats.cache_misses == misses


def test_reset_empties_every_layer():
    c = make_cache()
    c.acquire(0, 1)
    c.acquire(1, 2)
    c.reset()
    assert c.resident(0) == [] and c.resident(1) == []
    c.acquire(0, 1)
    assert c.stats.cache_misses == 3


def test_prefetcher_recall_bookkeeping():
    c = make_cache(slots=2)
    H = 16
    router = torch.zeros(E, H)
    router[3, 0] = 1.0
    router[5, 1] = 1.0
    pf = Prefetcher(c, {0: router, 1: router}, {0: None}, {0: 1}, guesses=2)
    hidden = torch.zeros(1, H)
    hidden[0, 0], hidden[0, 1] = 2.0, 1.0
    guess = pf.guess(0, hidden).tolist()
    assert guess == [3, 5]
    pf.issue(0, guess, decode=True)
    assert c.is_resident(1, 3) and c.is_resident(1, 5)
    pf.observe(1, {3, 4})
    assert c.stats.prefetch_recall == 0.5
    assert pf.guess(1, hidden) is None  # last MoE layer has no next layer


def test_depth_two_fills_only_when_the_next_layer_needs_no_copy():
    c = make_cache(slots=2, layers=(0, 1, 2))
    H = 16
    router = torch.zeros(E, H)
    router[3, 0] = 1.0
    router[5, 1] = 1.0
    routers = {0: router, 1: router, 2: router}
    pf = Prefetcher(c, routers, {0: None, 1: None}, {0: 1, 1: 2}, guesses=2, depth=2)
    assert pf.ids_per_token() == 4
    hidden = torch.zeros(1, H)
    hidden[0, 0], hidden[0, 1] = 2.0, 1.0
    guess = pf.guess(0, hidden).tolist()
    assert guess == [3, 5, 3, 5]  # layer 1's guesses, then layer 2's
    pf.issue(0, guess, decode=True)  # layer 1 needs copies: layer 2 is left alone
    assert c.is_resident(1, 3) and c.is_resident(1, 5) and c.resident(2) == []
    pf.issue(0, guess, decode=True)  # layer 1 holds its guesses: the idle copy stream serves layer 2
    assert c.is_resident(2, 3) and c.is_resident(2, 5)
    assert pf.guess(1, hidden).tolist() == [3, 5]  # one layer left: depth is cut at the last layer


def _prompt_prefetcher(slots: int):
    c = make_cache(slots=slots)
    H = 16
    router = torch.zeros(E, H)
    for e in range(4):
        router[e, e] = 1.0  # token with hidden = one-hot(e) picks expert e first
    return c, Prefetcher(c, {0: router, 1: router}, {0: None}, {0: 1}, guesses=1), H


def test_prompt_guess_ranks_experts_by_tokens_and_counts_the_needed():
    c, pf, H = _prompt_prefetcher(slots=2)
    hidden = torch.zeros(6, H)
    for row, e in enumerate([2, 2, 2, 0, 0, 3]):
        hidden[row, e] = 1.0
    guess = pf.guess(0, hidden).tolist()
    assert guess[:3] == [2, 0, 3] and guess[-1] == 3 and sorted(guess[:-1]) == list(range(E))


def test_prompt_prefetch_fills_free_slots_and_never_evicts_a_needed_expert():
    c, pf, H = _prompt_prefetcher(slots=2)
    hidden = torch.zeros(3, H)
    for row, e in enumerate([2, 0, 3]):
        hidden[row, e] = 1.0
    pf.issue(0, pf.guess(0, hidden).tolist(), decode=False)  # cold: the two free slots
    assert set(c.resident(1)) == {0, 2} and c.stats.evictions == 0
    hidden[1] = 0.0
    hidden[1, 3] = 1.0  # now experts 2 and 3 are picked (3 twice); 0 is not
    pf.issue(0, pf.guess(0, hidden).tolist(), decode=False)
    assert set(c.resident(1)) == {2, 3} and c.stats.evictions == 1  # 0 made room, 2 was kept
    hidden = torch.zeros(4, H)
    for row, e in enumerate([0, 1, 2, 3]):
        hidden[row, e] = 1.0  # all four needed: nothing resident may be evicted
    pf.issue(0, pf.guess(0, hidden).tolist(), decode=False)
    assert set(c.resident(1)) == {2, 3} and c.stats.evictions == 1


def test_prompt_start_fills_the_first_layer_only_for_long_prompts_and_evicts_nothing():
    c, pf, _ = _prompt_prefetcher(slots=2)
    assert pf.prompt_start(tokens=E, top_k=2) == 0 and c.resident(0) == []  # short: routing may skip experts
    assert pf.prompt_start(tokens=2 * E, top_k=2) == 2 and len(c.resident(0)) == 2
    c.reset()
    c.acquire(0, 3)
    c.acquire(0, 1)
    assert pf.prompt_start(tokens=64, top_k=2) == 0  # no free slot: a warm layer is left as it is
    assert set(c.resident(0)) == {1, 3} and c.stats.evictions == 0
