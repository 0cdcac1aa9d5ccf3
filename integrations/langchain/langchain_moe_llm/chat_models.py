"""`ChatMoeLLM`: a LangChain chat model on a moe-llm engine, with tool calling.

Messages go through the model's chat template (`Engine.chat_prompt`); a checkpoint
without one uses the generic ChatML template, whose turn markers also end a reply.
Bound tools reach the template natively when it supports them, else a system
message; the reply is scanned for tool-call markers while streaming, so content
before a call streams live and the call itself arrives, parsed, on the last
chunk. That last chunk also carries `usage_metadata` and `response_metadata`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from moe_llm.runtime.engine import StreamChunk
from moe_llm.serve.aio import astream
from moe_llm.serve.tools import ChatPrompt, ToolCallStream, normalize_tool_choice

from ._base import MoeParams, usage
from .structured import JsonReplyParser, ToolCallReplyParser

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> OpenAI-style dicts for a chat template."""
    out = []
    for m in messages:
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type, m.type)
        d: dict[str, Any] = {"role": role, "content": m.text}
        if isinstance(m, AIMessage) and m.tool_calls:
            d["tool_calls"] = [
                {"id": c.get("id"), "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
                for c in m.tool_calls
            ]
        if isinstance(m, ToolMessage):
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
        out.append(d)
    return out


def _decided(prompt: ChatPrompt) -> StreamChunk:
    """The engine's last chunk for a reply the prompt already fixed: nothing is generated."""
    return StreamChunk("", [], "stop", {"prompt_tokens": len(prompt.token_ids)})


class _Assembler:
    """Engine stream chunks -> ChatGenerationChunks (tool calls parsed at the end)."""

    def __init__(self, model_name: str, prompt: ChatPrompt, parse_tools: bool):
        self.model_name = model_name
        self.prompt = prompt
        self.pending = prompt.prefill  # the reply starts with the prefilled text
        self.calls = ToolCallStream() if parse_tools else None
        self.produced = 0

    def feed(self, piece: StreamChunk) -> ChatGenerationChunk | None:
        self.produced += len(piece.token_ids)
        text, self.pending = self.pending + piece.text, ""
        if self.calls is not None:
            text = self.calls.push(text)
        if piece.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=text)) if text else None
        chunks = []
        if self.calls is not None:
            tail, calls, invalid = self.calls.finish()
            text += tail
            chunks = [
                tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False), id=c.id, index=i)
                for i, c in enumerate(calls)
            ]
            # args that are not JSON make LangChain list the call under invalid_tool_calls
            chunks += [tool_call_chunk(name=c.name, args=c.raw, id=c.id, index=len(chunks)) for c in invalid]
        finish = "tool_calls" if chunks and piece.finish_reason == "stop" else piece.finish_reason
        message = AIMessageChunk(
            content=text,
            tool_call_chunks=chunks,
            usage_metadata=usage(len(self.prompt.token_ids), self.produced),
            response_metadata={"finish_reason": finish, "model_name": self.model_name},
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": finish})


class ChatMoeLLM(MoeParams, BaseChatModel):
    """A Mixture-of-Experts chat model with offloaded experts, for LangChain.

    Example:
        ```python
        from langchain_moe_llm import ChatMoeLLM

        chat = ChatMoeLLM(model_path="/models/Mixtral-8x7B-Instruct-v0.1", experts_bits=2, gpu_budget="12GiB")
        print(chat.invoke("Name three MoE models.").content)
        ```
    Share one loaded engine between models with `engine=`.
    """

    @property
    def _llm_type(self) -> str:
        return "moe_llm-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]):
        tools = kwargs.get("tools")
        prompt = self._engine.chat_prompt(
            to_chat_dicts(messages), tools=tools, tool_choice=kwargs.get("tool_choice"),
            response_format=kwargs.get("response_format"),
        )  # fmt: skip
        opts = self._gen_options(stop, kwargs)
        opts["stop"] += [s for s in prompt.stop if s not in opts["stop"]]  # the generic template's turn markers
        return prompt, _Assembler(self.model_name, prompt, parse_tools=bool(tools)), opts

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel fires on_llm_new_token for each yielded chunk itself
        prompt, assembler, opts = self._prepare(messages, stop, kwargs)
        pieces = [_decided(prompt)] if prompt.complete else self._engine.stream(prompt.token_ids, **opts)
        for piece in pieces:
            chunk = assembler.feed(piece)
            if chunk is not None:
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        prompt, assembler, opts = self._prepare(messages, stop, kwargs)
        if prompt.complete:
            yield assembler.feed(_decided(prompt))
            return
        async for piece in astream(self._engine, prompt.token_ids, **opts):
            chunk = assembler.feed(piece)
            if chunk is not None:
                yield chunk

    @staticmethod
    def _result(chunks: list[ChatGenerationChunk]) -> ChatResult:
        from langchain_core.language_models.chat_models import generate_from_stream

        return generate_from_stream(iter(chunks))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(list(self._stream(messages, stop, None, **kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result([c async for c in self._astream(messages, stop, None, **kwargs)])

    # -- tools and structured output -------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (schemas, pydantic models, functions or LangChain tools) to the model.

        `tool_choice`: None/"auto" (the model decides), "none", "any"/"required"/True
        (it must call one), or a tool name (it must call that one).
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = normalize_tool_choice(tool_choice)
        names = [t["function"]["name"] for t in formatted]
        if choice not in (None, "auto", "none", "any") and choice not in names:
            raise ValueError(f"tool_choice {choice!r} is not one of the bound tools: {names}")
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Structured output via a forced tool call ("function_calling") or a JSON reply.

        A reply without the structure raises `OutputParserException`; with `include_raw=True`
        the result is `{"raw": AIMessage, "parsed": None, "parsing_error": exc}` instead.
        `strict` is accepted for compatibility; the schema is given to the model as text.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        model = schema if isinstance(schema, type) and is_basemodel_subclass(schema) else None
        fmt = {"kwargs": {"method": method}, "schema": schema}
        parser: Runnable
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=fmt)
            parser = ToolCallReplyParser(key_name=name, validate_as=model)
        elif method in ("json_mode", "json_schema"):
            response_format: dict[str, Any] = {"type": "json_object"}
            if method == "json_schema":
                response_format = {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
            llm = self.bind(response_format=response_format, ls_structured_output_format=fmt)
            parser = JsonReplyParser(validate_as=model)
        else:
            raise ValueError(f"method must be 'function_calling', 'json_mode' or 'json_schema', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
