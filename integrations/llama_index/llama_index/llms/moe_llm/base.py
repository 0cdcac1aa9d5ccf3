"""`MoeLLM`: a LlamaIndex function-calling LLM on a moe-llm engine.

`complete` feeds the prompt as plain text; `chat` renders messages with the
model's chat template (`Engine.chat_prompt`; the generic ChatML one on a
checkpoint without a template), so query and chat engines (which call `chat`
when `metadata.is_chat_model`) get the model's own turn format. Tools passed to
`chat(..., tools=...)` (what `chat_with_tools`, `FunctionAgent` and
`structured_predict` do) are rendered and parsed by `moe_llm.serve.tools`; calls come
back as `ToolCallBlock`s of the reply, and a stream holds a call back until it
is complete, so deltas never show call syntax. Streaming responses carry the
running text and the delta; the last one carries usage in `raw["usage"]`, which
`TokenCountingHandler` reads. Async variants run the engine in a worker thread
and never block the event loop.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

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
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from moe_llm.runtime.engine import Engine, StreamChunk
from moe_llm.serve.adapters import EngineOptions, usage_counts
from moe_llm.serve.aio import astream
from moe_llm.serve.tools import ChatPrompt, ToolCallStream

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

_ROLES = {"developer": "system", "chatbot": "assistant", "model": "assistant", "function": "tool"}


def _tool_calls(m: ChatMessage) -> list[dict[str, Any]]:
    """An assistant message's tool calls (`ToolCallBlock`s, or OpenAI-style `additional_kwargs`)
    as OpenAI-style dicts with object arguments."""
    calls = [
        {"id": b.tool_call_id, "name": b.tool_name, "arguments": b.tool_kwargs}
        for b in m.blocks
        if isinstance(b, ToolCallBlock)
    ]
    for c in m.additional_kwargs.get("tool_calls") or []:
        fn = c.get("function", c) if isinstance(c, dict) else None
        if fn and fn.get("name"):
            calls.append({"id": c.get("id"), "name": fn["name"], "arguments": fn.get("arguments", {})})
    out = []
    for c in calls:
        args = c["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = {"_raw": args}  # still shown to the model, as it wrote it
        out.append({"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": args}})
    return out


def to_chat_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex chat messages -> OpenAI-style dicts for a chat template."""
    out = []
    for m in messages:
        role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
        d: dict[str, Any] = {"role": _ROLES.get(role, role), "content": m.content or ""}
        if d["role"] == "assistant" and (calls := _tool_calls(m)):
            d["tool_calls"] = calls
        if d["role"] == "tool":
            d["tool_call_id"] = m.additional_kwargs.get("tool_call_id")
            if m.additional_kwargs.get("name"):
                d["name"] = m.additional_kwargs["name"]
        out.append(d)
    return out


async def _final(responses: AsyncIterator[Any]) -> Any:
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


def _decided(prompt: ChatPrompt) -> StreamChunk:
    """The engine's last chunk for a reply the prompt already fixed: nothing is generated."""
    return StreamChunk("", [], "stop", {"prompt_tokens": len(prompt.token_ids)})


class _ChatReply:
    """Engine stream chunks -> ChatResponses; with tools, calls are held back and parsed at the end."""

    def __init__(self, prompt: ChatPrompt, parse_tools: bool) -> None:
        self.pending = prompt.prefill  # the reply starts with the prefilled text
        self.calls = ToolCallStream() if parse_tools else None
        self.running = _Running()

    def feed(self, piece: StreamChunk) -> ChatResponse | None:
        text, self.pending = self.pending + piece.text, ""
        if self.calls is not None:
            text = self.calls.push(text)
        final = piece.finish_reason is not None
        blocks: list[Any] = []
        extra: dict[str, Any] = {}
        if final and self.calls is not None:
            tail, calls, invalid = self.calls.finish()
            text += tail
            blocks = [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
            if invalid:
                extra["invalid_tool_calls"] = [{"name": c.name, "raw": c.raw, "error": c.error} for c in invalid]
        content, delta, raw = self.running.feed(StreamChunk(text, piece.token_ids, piece.finish_reason, piece.stats))
        if not final and not delta:
            return None
        if final and blocks:
            content = content.rstrip()  # the space before the call marker
            if raw.get("finish_reason") == "stop":
                raw["finish_reason"] = "tool_calls"
        message = ChatMessage(
            role=MessageRole.ASSISTANT, blocks=[TextBlock(text=content), *blocks], additional_kwargs=extra
        )
        return ChatResponse(message=message, delta=delta, raw=raw)


class MoeLLM(EngineOptions, FunctionCallingLLM):
    """A Mixture-of-Experts model with offloaded experts, as a LlamaIndex function-calling LLM.

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
            # a base checkpoint chats through the generic template, but its query engines do better
            # prompting it with plain text
            is_chat_model=self._engine.chat_template_source != "generic",
            is_function_calling_model=True,
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

    def _chat_request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]):
        """(prompt, engine options, reply assembler) of one chat call; `tools` and `tool_choice`
        come from `_prepare_chat_with_tools`."""
        tools = kwargs.get("tools") or None
        prompt = self._engine.chat_prompt(to_chat_dicts(messages), tools=tools, tool_choice=kwargs.get("tool_choice"))
        opts = self._options(kwargs)
        opts["stop"] += [s for s in prompt.stop if s not in opts["stop"]]  # the generic template's turn markers
        return prompt, opts, _ChatReply(prompt, parse_tools=bool(tools))

    def _chat_stream(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Iterator[ChatResponse]:
        prompt, opts, reply = self._chat_request(messages, kwargs)
        pieces = [_decided(prompt)] if prompt.complete else self._engine.stream(prompt.token_ids, **opts)
        for piece in pieces:
            if (r := reply.feed(piece)) is not None:
                yield r

    async def _achat_stream(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> AsyncIterator[ChatResponse]:
        prompt, opts, reply = self._chat_request(messages, kwargs)
        if prompt.complete:
            yield reply.feed(_decided(prompt))
            return
        async for piece in astream(self._engine, prompt.token_ids, **opts):
            if (r := reply.feed(piece)) is not None:
                yield r

    @staticmethod
    def _whole(r: ChatResponse) -> ChatResponse:
        return ChatResponse(message=r.message, raw=r.raw)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._whole(deque(self._chat_stream(messages, kwargs), maxlen=1)[0])

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_stream(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._whole(await _final(self._achat_stream(messages, kwargs)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return self._achat_stream(messages, kwargs)

    # -- tools ---------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`chat` arguments for a call with tools; `tool_required` (or `tool_choice`
        "required"/a tool name) makes the reply start with a call."""
        messages = list(chat_history or [])  # never the caller's list
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        if tool_required and tool_choice in (None, "auto"):
            tool_choice = "required"
        specs = [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]
        return {"messages": messages, "tools": specs or None, "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first call unless parallel calls are allowed."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            if len(calls) > 1:
                response.message.blocks = [b for b in response.message.blocks if b not in calls[1:]]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The reply's tool calls; ValueError if there is none and `error_on_no_tool_call`."""
        calls = [
            ToolSelection(tool_id=b.tool_call_id or "", tool_name=b.tool_name, tool_kwargs=b.tool_kwargs)
            for b in response.message.blocks
            if isinstance(b, ToolCallBlock)
        ]
        if not calls and error_on_no_tool_call:
            invalid = response.message.additional_kwargs.get("invalid_tool_calls") or []
            why = (
                f"; the model wrote an unparsable call of {invalid[0]['name']}: {invalid[0]['error']}"
                if invalid
                else ""
            )
            raise ValueError(f"Expected at least one tool call, but got 0 tool calls{why}")
        return calls
