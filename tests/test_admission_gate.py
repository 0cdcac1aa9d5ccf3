"""The expert cache's admission gate (`experts.admission`): decode admissions that evict go on
only while they pay for their copies. Simulated routing through the real cache on CPU, driven as
`ExpertsRuntime.end_step` drives it (observe a step's routing, then admit its misses), against
the same cache with every admission let through."""

from __future__ import annotations

import random

import pytest
import torch

from moe_llm.experts import ExpertCache, ExpertFormat, ExpertStore
from moe_llm.experts.admission import SAMPLE, WINDOW, AdmissionGate

LAYERS, EXPERTS, TOP_K = 4, 8, 2


def _cache(slots: int) -> ExpertCache:
    fmt = ExpertFormat.build(hidden=16, intermediate=8, bits=None, dtype=torch.float32)
    store = ExpertStore(fmt, list(range(LAYERS)), EXPERTS)
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            store.put(layer, e, {"gate_up_proj": torch.zeros(16, 16), "down_proj": torch.zeros(16, 8)})
    return ExpertCache(store, torch.device("cpu"), slots, floor=0)


def _decode(route, gated: bool, slots: int, steps: int = 2000, seed: int = 0):
    """(hit rate, copies, held back) over the last three quarters of `steps` decode steps."""
    cache = _cache(slots)
    if not gated:
        cache.gate = AdmissionGate(sample=1)  # lets every admission through
    rng = random.Random(seed)
    for step in range(steps):
        keys = [(layer, e) for layer in range(LAYERS) for e in route(rng, step)]
        cache.observe(keys)
        for key in keys:
            if not cache.is_resident(*key):
                cache.admit(key, set(keys))
        if step == steps // 4:
            base = cache.stats.copy()
    used = cache.stats - base
    return used.hit_rate, used.prefetch_issued, used.admissions_held


def uniform(rng, step):
    return rng.sample(range(EXPERTS), TOP_K)


def skewed(rng, step):  # Zipf-like popularity, as trained routers favour some experts
    weights = [1 / (e + 1) ** 1.2 for e in range(EXPERTS)]
    picked: set[int] = set()
    while len(picked) < TOP_K:
        picked.add(rng.choices(range(EXPERTS), weights)[0])
    return list(picked)


def shifting(rng, step):  # three hot experts a layer, a new three every 150 steps
    hot = [(step // 150 * 3 + i) % EXPERTS for i in range(3)]
    return rng.sample(hot, TOP_K) if rng.random() < 0.9 else rng.sample(range(EXPERTS), TOP_K)


@pytest.mark.parametrize("slots", [12, 20])
def test_uniform_routing_closes_the_gate_and_keeps_the_hit_rate(slots):
    """Every expert equally likely: a copy only trades one expert for an equally useful one. The
    gate holds back most copies, and the hit rate stays at the share of experts resident."""
    hit, copies, held = _decode(uniform, True, slots)
    hit_all, copies_all, _ = _decode(uniform, False, slots)
    assert copies <= copies_all / 5 and held > 0
    assert abs(hit - hit_all) <= 0.01
    assert abs(hit - slots / (LAYERS * EXPERTS)) <= 0.02


@pytest.mark.parametrize("slots", [12, 20])
def test_skewed_routing_hits_as_often_with_fewer_copies(slots):
    hit, copies, _ = _decode(skewed, True, slots)
    hit_all, copies_all, _ = _decode(skewed, False, slots)
    assert hit >= hit_all - 0.005
    assert copies < copies_all / 2


@pytest.mark.parametrize("slots", [12, 20])
def test_a_shifting_working_set_is_still_followed(slots):
    """When the hot experts change, admissions pay again and the gate lets them through: the hit
    rate stays close to admitting everything, far above the share of experts resident."""
    hit, copies, _ = _decode(shifting, True, slots)
    hit_all, copies_all, _ = _decode(shifting, False, slots)
    assert hit >= hit_all - 0.015
    assert hit >= slots / (LAYERS * EXPERTS) + 0.2
    assert copies <= copies_all


def test_the_gate_opens_while_trials_pay_and_samples_while_closed():
    gate = AdmissionGate(horizon=2, window=8)
    for i in range(8):  # losing swaps: the victim is routed every step, the admitted expert never hit
        gate.trial((0, i), (1, i))
        for _ in range(2):
            gate.seen((1, i), hit=False)
            gate.tick()
    assert not gate.open
    assert [gate.allow() for _ in range(2 * SAMPLE)].count(True) == 2
    for i in range(8):  # paying swaps: the admitted expert hit every step, the victim never routed
        gate.trial((0, i), (1, i))
        for _ in range(2):
            gate.seen((0, i), hit=True)
            gate.tick()
    assert gate.open and gate.allow()


def test_the_gate_is_open_until_trials_have_finished():
    gate = AdmissionGate()
    assert gate.open and all(gate.allow() for _ in range(3 * SAMPLE))


def test_admissions_into_free_slots_always_go_through():
    cache = _cache(slots=8)
    for _ in range(3 * WINDOW):  # close the gate with losing trials
        cache.gate.trial((9, 0), (9, 1))
        cache.gate.seen((9, 1), hit=False)
        for _ in range(32):
            cache.gate.tick()
    assert not cache.gate.open
    cache.observe([(0, 0), (0, 1)])
    assert cache.admit((0, 0), {(0, 0), (0, 1)}) and cache.admit((0, 1), {(0, 0), (0, 1)})
    assert cache.stats.admissions_held == 0
