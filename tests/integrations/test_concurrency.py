"""One engine, many callers: threads and tasks through the adapters get exactly the sequential greedy outputs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_moe_llm import ChatMoeLLM, MoeLLM
from llama_index.llms.moe_llm import MoeLLM as LlamaMoeLLM

N = 8
PROMPTS = [
    "The quick brown fox", "Sparse is better", "Experts live in", "Readability counts",
    "A mixture of", "Flat is better", "The router", "Simple is",
    "def main():", "Beautiful is", "An LRU cache", "numbers 0123",
]  # fmt: skip


@pytest.fixture(scope="module")
def sequential(engine):
    return [engine.generate(p, max_new_tokens=N).text for p in PROMPTS]


def _four_threads_three_each(call) -> list[str]:
    """4 threads x 3 requests, all in flight at once; results in prompt order."""
    chunks = [PROMPTS[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda ps: [call(p) for p in ps], chunks))
    out = [""] * len(PROMPTS)
    for i, rs in enumerate(results):
        out[i::4] = rs
    return out


def test_engine_threads(engine, sequential):
    assert _four_threads_three_each(lambda p: engine.generate(p, max_new_tokens=N).text) == sequential


def test_engine_streams_from_threads(engine, sequential):
    assert _four_threads_three_each(lambda p: "".join(c.text for c in engine.stream(p, max_new_tokens=N))) == sequential


def test_langchain_threads_and_batch(engine, sequential):
    llm = MoeLLM(engine=engine, max_tokens=N)
    assert _four_threads_three_each(llm.invoke) == sequential
    assert llm.batch(PROMPTS, config={"max_concurrency": 4}) == sequential


def test_llama_index_threads(engine, sequential):
    llm = LlamaMoeLLM(engine=engine, max_new_tokens=N)
    assert _four_threads_three_each(lambda p: llm.complete(p).text) == sequential


async def test_async_tasks(engine, sequential):
    llm = MoeLLM(engine=engine, max_tokens=N)

    async def streamed(p: str) -> str:
        return "".join([piece async for piece in llm.astream(p)])

    got = await asyncio.gather(*(llm.ainvoke(p) if i % 2 else streamed(p) for i, p in enumerate(PROMPTS)))
    assert list(got) == sequential


async def test_chat_abatch(engine):
    chat = ChatMoeLLM(engine=engine, max_tokens=N)
    expected = [engine.generate([{"role": "user", "content": p}], max_new_tokens=N).text for p in PROMPTS[:4]]
    got = await chat.abatch(PROMPTS[:4])
    assert [m.content for m in got] == expected
