"""Fixtures for the LangChain / LlamaIndex adapter tests.

`engine` is the session's shared tiny CPU engine (random weights: output is noise
but deterministic under greedy decoding). `scripted` builds an engine whose replies
are fixed text: the tiny model never chooses a tool, so tool-calling tests script
the model's *text* and exercise the real rendering, streaming, parsing and
dispatch code on it.
"""

from __future__ import annotations

from collections import deque

import pytest

from moe_llm.config import GenerationConfig
from moe_llm.runtime.engine import StreamChunk
from moe_llm.runtime.textstream import TextStream


class ScriptedEngine:
    """Replays scripted replies token by token through the real tokenizer and `TextStream`."""

    def __init__(self, engine, replies: list[str]):
        self._engine = engine
        self.replies = deque(replies)
        self.prompts: list[str] = []  # decoded prompts, for assertions on rendering

    def __getattr__(self, name):  # tokenizer, model_name, context_length, encode, count_tokens, ...
        return getattr(self._engine, name)

    def stream(self, prompt, **kwargs):
        gen = GenerationConfig.build(**kwargs)
        ids = self._engine.encode(prompt)
        self.prompts.append(self._engine.tokenizer.decode(ids))
        reply = self._engine.tokenizer(self.replies.popleft(), add_special_tokens=False)["input_ids"]
        return self._run(ids, reply[: gen.max_new_tokens], gen)

    def _run(self, prompt_ids, reply, gen):
        text = TextStream(self._engine.tokenizer, gen.stop)
        finish = "length" if len(reply) == gen.max_new_tokens else "stop"
        pending: list[int] = []
        for tok in reply:
            pending.append(tok)
            delta = text.push(tok)
            if delta or text.stopped:
                yield StreamChunk(delta, pending)
                pending = []
            if text.stopped:
                finish = "stop"
                break
        tail = "" if text.stopped else text.flush()
        yield StreamChunk(tail, pending, finish, {"prompt_tokens": len(prompt_ids)})

    def generate(self, prompt, **kwargs):
        raise AssertionError("adapters stream; they should not call generate()")


@pytest.fixture(scope="session")
def engine(tiny_engine):
    return tiny_engine


@pytest.fixture
def scripted(engine):
    """scripted(["reply 1", "reply 2", ...]) -> an engine that answers with those texts in turn."""
    return lambda replies: ScriptedEngine(engine, list(replies))


@pytest.fixture(scope="session")
def base_engine(tiny_base_engine):
    """The session's engine on a checkpoint without a chat template (the generic one applies)."""
    return tiny_base_engine


@pytest.fixture
def scripted_base(base_engine):
    """Like `scripted`, on the checkpoint without a chat template."""
    return lambda replies: ScriptedEngine(base_engine, list(replies))
