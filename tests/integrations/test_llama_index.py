"""LlamaIndex `MoeLLM`: completion/chat agree with the engine, and real query/chat engines run on it."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.llms.moe_llm import MoeLLM

N = 12
PROMPT = "The quick brown fox"
DOCS = [
    "Experts live in pinned host memory and are copied to the GPU on a cache miss.",
    "The router sends every token to two of eight experts.",
    "An LRU cache keeps recently used experts on the device.",
]
CHAT = [ChatMessage(role=MessageRole.SYSTEM, content="Be brief."), ChatMessage(role=MessageRole.USER, content="Hi")]


@pytest.fixture(scope="module")
def llm(engine):
    return MoeLLM(engine=engine, max_new_tokens=N)


@pytest.fixture
def settings(llm, engine):
    """LlamaIndex's global Settings pointed at the tiny model, with a token counter; restored afterwards."""
    counter = TokenCountingHandler(tokenizer=engine.tokenizer.encode)
    saved = (Settings._llm, Settings._embed_model, Settings._callback_manager)
    Settings.llm = llm
    Settings.embed_model = MockEmbedding(embed_dim=8)
    Settings.callback_manager = CallbackManager([counter])
    yield counter
    Settings._llm, Settings._embed_model, Settings._callback_manager = saved


@pytest.fixture
def index(settings):
    return VectorStoreIndex.from_documents([Document(text=t) for t in DOCS])


def test_metadata_is_real(llm, engine):
    meta = llm.metadata
    assert meta.context_window == engine.context_length == 4096
    assert meta.num_output == N and meta.model_name == engine.model_name and meta.is_chat_model


def test_complete_matches_engine_and_reports_usage(llm, engine):
    expected = engine.generate(PROMPT, max_new_tokens=N)
    r = llm.complete(PROMPT)
    assert r.text == expected.text
    assert r.raw["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": N,
        "total_tokens": expected.prompt_tokens + N,
    }
    assert r.raw["finish_reason"] == "length"


def test_stream_complete_deltas_concatenate_to_complete(llm):
    text = llm.complete(PROMPT).text
    responses = list(llm.stream_complete(PROMPT))
    assert len(responses) > 2
    assert "".join(r.delta for r in responses) == text
    assert all(r.text == "".join(x.delta for x in responses[: i + 1]) for i, r in enumerate(responses))
    assert responses[-1].raw["usage"]["completion_tokens"] == N


async def test_async_completion_matches(llm):
    text = llm.complete(PROMPT).text
    assert (await llm.acomplete(PROMPT)).text == text
    gen = await llm.astream_complete(PROMPT)
    assert "".join([r.delta async for r in gen]) == text


def test_chat_uses_the_chat_template(llm, engine):
    expected = engine.generate(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], max_new_tokens=N
    )
    r = llm.chat(CHAT)
    assert r.message.role == MessageRole.ASSISTANT and r.message.content == expected.text
    assert r.raw["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert "".join(x.delta for x in llm.stream_chat(CHAT)) == expected.text


async def test_async_chat_matches(llm):
    text = llm.chat(CHAT).message.content
    assert (await llm.achat(CHAT)).message.content == text
    gen = await llm.astream_chat(CHAT)
    assert "".join([r.delta async for r in gen]) == text


def test_stop_and_per_call_options(llm, engine):
    full = llm.complete(PROMPT).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    stopped = MoeLLM(engine=engine, max_new_tokens=N, stop=[stop])
    assert stopped.complete(PROMPT).text == full[: full.find(stop)]
    assert llm.complete(PROMPT, max_new_tokens=3).text == engine.generate(PROMPT, max_new_tokens=3).text


def test_query_engine(index, settings, engine):
    response = index.as_query_engine(similarity_top_k=2).query("Where do experts live?")
    assert len(response.source_nodes) == 2 and isinstance(response.response, str) and response.response
    # the answer came from the model, through the chat template, with the retrieved context in the prompt
    event = settings.llm_token_counts[-1]
    assert "Experts live in pinned host memory" in event.prompt or "two of eight" in event.prompt
    assert event.completion_token_count == N


def test_streaming_query(index):
    answer = index.as_query_engine(similarity_top_k=2).query("Where do experts live?").response
    response = index.as_query_engine(streaming=True, similarity_top_k=2).query("Where do experts live?")
    pieces = list(response.response_gen)
    assert len(pieces) > 2 and "".join(pieces) == answer  # greedy: streaming changes nothing


def test_context_chat_engine(index):
    chat_engine = index.as_chat_engine(chat_mode="context")
    first = chat_engine.chat("What does the router do?")
    assert first.response and first.source_nodes
    second = chat_engine.stream_chat("And the cache?")
    assert "".join(second.response_gen) == second.response
    assert len(chat_engine.chat_history) == 4


def test_token_counting_handler_counts_model_usage(index, settings, llm):
    settings.reset_counts()
    index.as_query_engine().query("Where do experts live?")
    llm.complete(PROMPT)  # a direct completion is counted too
    events = settings.llm_token_counts
    assert len(events) == 2
    assert all(e.completion_token_count == N for e in events)
    assert events[1].prompt_token_count == len(llm.engine.encode(PROMPT))  # taken from raw["usage"]
    assert settings.total_llm_token_count == sum(e.total_token_count for e in events) > 2 * N


def test_construct_from_model_path(tiny_mixtral, llm):
    other = MoeLLM(model_path=str(tiny_mixtral), device="cpu", max_new_tokens=N)
    assert other.engine is not llm.engine
    assert other.complete(PROMPT).text == llm.complete(PROMPT).text


def test_needs_a_model():
    with pytest.raises(ValueError, match="model_path"):
        MoeLLM()


async def test_concurrent_async_requests_match_sequential(llm):
    prompts = [PROMPT, "Sparse is better", "Experts live in", "Readability counts"]
    expected = [llm.complete(p).text for p in prompts]
    got = await asyncio.gather(*(llm.acomplete(p) for p in prompts))
    assert [r.text for r in got] == expected
