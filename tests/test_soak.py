"""Soak: 2,000 generated tokens on the tiny model keep the process RSS flat (< 5% growth
after warm-up), across streamed, blocking, chat and abandoned requests."""

from __future__ import annotations

import gc

import psutil
import pytest

import moe_llm

pytestmark = pytest.mark.usefixtures("one_thread")

TOTAL = 2000


def test_rss_stays_flat_over_2000_tokens(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2)
    proc = psutil.Process()
    prompts = [
        [0, 84, 104, 101, 32, 113, 117, 105, 99, 107],
        "A mixture of experts routes every token",
        [{"role": "user", "content": "Tell me about experts."}],
    ]

    def request(i: int, max_new_tokens: int = 200) -> int:
        prompt = prompts[i % len(prompts)]
        if i % 4 == 3:  # an abandoned stream
            n = 0
            for chunk in engine.stream(prompt, max_new_tokens=max_new_tokens):
                n += len(chunk.token_ids)
                if n >= 40:
                    break
            return engine.stats.tokens_generated
        if i % 2:
            for _ in engine.stream(prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=i):
                pass
        else:
            engine.generate(prompt, max_new_tokens=max_new_tokens)
        return engine.stats.tokens_generated

    for i in range(4):  # warm-up: allocator pools, tokenizer caches, lazy imports
        request(i, max_new_tokens=60)
    gc.collect()
    baseline, start = proc.memory_info().rss, engine.stats.tokens_generated
    i = 4
    while request(i) - start < TOTAL:
        i += 1
    gc.collect()
    growth = proc.memory_info().rss / baseline - 1
    assert engine.stats.tokens_generated - start >= TOTAL
    assert growth < 0.05, f"RSS grew {growth:.1%} over {engine.stats.tokens_generated - start} tokens"
