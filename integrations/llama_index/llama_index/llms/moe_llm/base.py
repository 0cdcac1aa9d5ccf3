"""`MoeLLM`: a LlamaIndex LLM on a moe-llm engine.

`complete` feeds the prompt as plain text; `chat` renders messages with the
model's chat template, so query and chat engines (which call `chat` when
`metadata.is_chat_model`) get the model's own turn format. Streaming responses
carry the running text and the delta; the last one carries usage in
`raw["usage"]`, which `TokenCountingHandler` reads. Async variants run the
engine in a worker thread and never block the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from moe_llm.adapters import EngineOptions, usage_counts
from moe_llm.aio import astream
from moe_llm.engine import Engine, StreamChunk
from moe_llm.tools import render_chat

_ROLES = {"developer": "system", "chatbot": "assistant", "model": "assistant", "function": "tool"}


def to_chat_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex chat messages -> OpenAI-style dicts for a chat template."""
    out = []
    for m in messages:
        role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
        out.append({"role": _ROLES.get(role, role), "content": m.content or ""})
    return out


async def _final(responses: AsyncIterator[CompletionResponse]) -> CompletionResponse:
    """The last response of a stream (it carries the full text and the usage)."""
    last = None
    async for r in responses:
        last = r
    assert last is not None
    return last


class _Running:
    """Engine stream chunks -> (running text, delta, raw) with usage on the last one."""

    def __init__(self) -> None:
        self.text = ""
        self.produced = 0

    def feed(self, piece: StreamChunk) -> tuple[str, str, dict[str, Any]]:
        self.text += piece.text
        self.produced += len(piece.token_ids)
        raw: dict[str, Any] = {}
        if piece.finish_reason is not None:
            raw = {"usage": usage_counts(piece.stats, self.produced), "finish_reason": piece.finish_reason}
            raw["stats"] = piece.stats
        return self.text, piece.text, raw


class MoeLLM(EngineOptions, CustomLLM):
    """A Mixture-of-Experts model with offloaded experts, as a LlamaIndex LLM.

    Example:
        ```python
        from llama_index.core import Settings
        from llama_index.llms.moe_llm import MoeLLM

        Settings.llm = MoeLLM(model_path="/models/Mixtral-8x7B-Instruct-v0.1", experts_bits=2, gpu_budget="12GiB")
        ```
    Pass `engine=` to share one loaded `moe_llm.Engine`.
    """

    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    max_new_tokens: int = Field(default=256, gt=0, description="Maximum number of tokens to generate.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    top_k: int = Field(default=0, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    seed: int | None = Field(default=None, description="Sampling seed for reproducible non-greedy output.")
    stop: list[str] = Field(default_factory=list, description="Stop strings; generation ends before them.")
    context_window: int | None = Field(default=None, description="Override the model's context length.")

    _engine: Engine = PrivateAttr()

    def __init__(self, engine: Engine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = self.resolve_engine(engine)

    @classmethod
    def class_name(cls) -> str:
        return "MoeLLM"

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self._engine.context_length,
            num_output=self.max_new_tokens,
            model_name=self._engine.model_name,
            is_chat_model=bool(self._engine.tokenizer.chat_template),
        )

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        opts = {
            "temperature": self.temperature, "max_new_tokens": self.max_new_tokens, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop),
        }  # fmt: skip
        opts.update({k: v for k, v in kwargs.items() if k in opts and v is not None})
        return opts

    def _prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted else self.completion_to_prompt(prompt)

    def _chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return render_chat(self._engine.tokenizer, to_chat_dicts(messages)).token_ids

    # -- completion ----------------------------------------------------------------------

    def _complete_stream(self, prompt: Any, kwargs: dict[str, Any]) -> Iterator[CompletionResponse]:
        running = _Running()
        for piece in self._engine.stream(prompt, **self._options(kwargs)):
            text, delta, raw = running.feed(piece)
            yield CompletionResponse(text=text, delta=delta, raw=raw)

    async def _acomplete_stream(self, prompt: Any, kwargs: dict[str, Any]) -> AsyncIterator[CompletionResponse]:
        running = _Running()
        async for piece in astream(self._engine, prompt, **self._options(kwargs)):
            text, delta, raw = running.feed(piece)
            yield CompletionResponse(text=text, delta=delta, raw=raw)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        last = deque(self._complete_stream(self._prompt(prompt, formatted), kwargs), maxlen=1)[0]
        return CompletionResponse(text=last.text, raw=last.raw)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._complete_stream(self._prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        last = await _final(self._acomplete_stream(self._prompt(prompt, formatted), kwargs))
        return CompletionResponse(text=last.text, raw=last.raw)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return self._acomplete_stream(self._prompt(prompt, formatted), kwargs)

    # -- chat ----------------------------------------------------------------------------

    @staticmethod
    def _chat_response(r: CompletionResponse) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=r.text), delta=r.delta, raw=r.raw)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = deque(self._complete_stream(self._chat_ids(messages), kwargs), maxlen=1)[0]
        return self._chat_response(CompletionResponse(text=last.text, raw=last.raw))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return (self._chat_response(r) for r in self._complete_stream(self._chat_ids(messages), kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        last = await _final(self._acomplete_stream(self._chat_ids(messages), kwargs))
        return self._chat_response(CompletionResponse(text=last.text, raw=last.raw))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            async for r in self._acomplete_stream(self._chat_ids(messages), kwargs):
                yield self._chat_response(r)

        return gen()
