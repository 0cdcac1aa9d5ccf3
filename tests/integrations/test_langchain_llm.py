"""LangChain `MoeLLM` (text completion): every entry point agrees with the engine under greedy decoding."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_moe_llm import ChatMoeLLM, MoeLLM

PROMPT = "The quick brown fox"
N = 12


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


class AsyncTokenRecorder(AsyncCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


@pytest.fixture(scope="module")
def llm(engine):
    return MoeLLM(engine=engine, max_tokens=N)


@pytest.fixture(scope="module")
def greedy(engine):
    return engine.generate(PROMPT, max_new_tokens=N).text


def test_invoke_matches_engine(llm, greedy):
    assert greedy and llm.invoke(PROMPT) == greedy


def test_stream_pieces_concatenate_to_invoke(llm, greedy):
    pieces = list(llm.stream(PROMPT))
    assert len(pieces) > 1 and "".join(pieces) == greedy


def test_batch_matches_sequential(llm, engine):
    prompts = [PROMPT, "Sparse is better", "Experts live in"]
    expected = [engine.generate(p, max_new_tokens=N).text for p in prompts]
    assert llm.batch(prompts) == expected
    assert llm.batch(prompts, config={"max_concurrency": 3}) == expected


async def test_ainvoke_and_astream(llm, greedy):
    assert await llm.ainvoke(PROMPT) == greedy
    assert "".join([p async for p in llm.astream(PROMPT)]) == greedy


def test_callbacks_get_every_token_in_order(llm, greedy):
    for run in (llm.invoke, lambda p, config: "".join(llm.stream(p, config=config))):
        rec = TokenRecorder()
        assert run(PROMPT, config={"callbacks": [rec]}) == greedy
        assert len(rec.tokens) > 1 and "".join(rec.tokens) == greedy


async def test_async_callbacks_get_every_token_in_order(llm, greedy):
    rec = AsyncTokenRecorder()
    assert await llm.ainvoke(PROMPT, config={"callbacks": [rec]}) == greedy
    assert "".join(rec.tokens) == greedy


def _stop_in(text: str) -> tuple[str, str]:
    """A stop string taken from the middle of text, and the text before its first occurrence."""
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    return stop, text[: text.find(stop)]


def test_stop_sequences_truncate_and_never_leak(llm, greedy):
    stop, before = _stop_in(greedy)
    assert llm.invoke(PROMPT, stop=[stop]) == before
    pieces = list(llm.stream(PROMPT, stop=[stop]))
    assert "".join(pieces) == before  # a partial match streamed early could not be taken back
    assert MoeLLM(engine=llm.client, max_tokens=N, stop=[stop]).invoke(PROMPT) == before


async def test_stop_sequences_async(llm, greedy):
    stop, before = _stop_in(greedy)
    assert "".join([p async for p in llm.astream(PROMPT, stop=[stop])]) == before


def test_generation_info_and_usage(llm, engine):
    result = llm.generate([PROMPT])
    info = result.generations[0][0].generation_info
    prompt_tokens = len(engine.encode(PROMPT))
    assert info["finish_reason"] == "length" and info["model_name"] == engine.model_name
    assert info["usage"] == {"input_tokens": prompt_tokens, "output_tokens": N, "total_tokens": prompt_tokens + N}
    assert result.llm_output["token_usage"]["output_tokens"] == N


def test_per_call_options_override_fields(llm, engine):
    assert llm.invoke(PROMPT, max_tokens=3) == engine.generate(PROMPT, max_new_tokens=3).text
    sampled = engine.generate(PROMPT, max_new_tokens=N, temperature=1.0, seed=7).text
    assert llm.invoke(PROMPT, temperature=1.0, seed=7) == sampled


def test_token_counting_uses_the_model_tokenizer(llm, engine):
    text = "Experts live in host memory."
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.get_token_ids(text) == ids
    assert llm.get_num_tokens(text) == len(ids)


def test_construct_from_model_path(tiny_mixtral, greedy):
    llm = MoeLLM(model_path=str(tiny_mixtral), device="cpu", max_tokens=N)
    assert llm.invoke(PROMPT) == greedy


def test_needs_a_model():
    with pytest.raises(ValueError, match="model_path"):
        MoeLLM()
    with pytest.raises(ValueError, match="model_path"):
        ChatMoeLLM()


def test_bad_options_raise_clear_errors(llm):
    from moe_llm.errors import InputError

    with pytest.raises(InputError, match="temperature"):
        llm.invoke(PROMPT, temperature=-1.0)


async def test_abandoned_astream_releases_the_engine(llm, greedy):
    async for _ in llm.astream(PROMPT):
        break
    assert await asyncio.wait_for(llm.ainvoke(PROMPT), timeout=60) == greedy
