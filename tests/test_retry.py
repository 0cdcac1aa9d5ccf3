"""Shrink-and-retry on out-of-memory while allocating the slot pool; nothing else is retried."""

from __future__ import annotations

import logging

import pytest
import torch

from moe_llm.errors import BudgetError
from moe_llm.retry import allocate_shrinking, is_oom


def fake_device(capacity: int):
    calls = []

    def alloc(k: int) -> str:
        calls.append(k)
        if k > capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {k} slots")
        return f"pool[{k}]"

    return alloc, calls


def test_out_of_memory_shrinks_until_it_fits_and_logs(caplog):
    alloc, calls = fake_device(capacity=3)
    with caplog.at_level(logging.WARNING, logger="moe_llm.retry"):
        pool, k = allocate_shrinking(alloc, 8, bytes_per_slot=2**20)
    assert (pool, k) == ("pool[3]", 3)
    assert calls == [8, 6, 4, 3]
    assert "out of memory allocating 8 expert slots" in caplog.text
    assert "shrunk from 8 to 3" in caplog.text


def test_a_fixed_slot_count_is_not_shrunk():
    alloc, calls = fake_device(capacity=3)
    with pytest.raises(BudgetError, match="out of memory allocating 5 expert slot"):
        allocate_shrinking(alloc, 5, bytes_per_slot=1, shrink=False)
    assert calls == [5]


def test_out_of_memory_at_one_slot_is_a_budget_error():
    alloc, calls = fake_device(capacity=0)
    with pytest.raises(BudgetError, match="1 expert slot"):
        allocate_shrinking(alloc, 2, bytes_per_slot=1)
    assert calls == [2, 1]


def test_programming_errors_are_never_retried():
    calls = []

    def broken(k: int):
        calls.append(k)
        raise TypeError("bad argument")

    with pytest.raises(TypeError, match="bad argument"):
        allocate_shrinking(broken, 8, bytes_per_slot=1)
    assert calls == [8]


def test_is_oom():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_load_shrinks_the_cache_on_out_of_memory(tiny_mixtral, monkeypatch):
    import moe_llm
    from moe_llm.checkpoint import loader

    real = loader.ExpertCache

    def tight_device(store, device, slots, **kwargs):
        if slots > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(store, device, slots, **kwargs)

    monkeypatch.setattr(loader, "ExpertCache", tight_device)
    engine = moe_llm.load(tiny_mixtral, gpu_budget="1GiB")  # the plan gives every expert a slot
    assert engine.cache.num_slots == engine.plan.slots <= 4
    assert engine.generate([0, 84, 104, 101], max_new_tokens=4).token_ids
    with pytest.raises(BudgetError, match="8 expert slot"):
        moe_llm.load(tiny_mixtral, cache_per_layer=4)
