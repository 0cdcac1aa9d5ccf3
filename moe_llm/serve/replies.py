"""Engine chunks -> OpenAI response objects: whole replies, SSE streams, usage, tool calls and
JSON mode, for one request of the app (`app`)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from fastapi.responses import StreamingResponse

from ..runtime.engine import StreamChunk
from .aio import aiterate
from .tools import ToolCallStream, parse_tool_calls

log = logging.getLogger(__name__)


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached`: prompt tokens restored from the prefix cache, not prefilled."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def _json_content(text: str) -> str:
    """JSON mode: the first complete JSON object of the reply, else the reply as it is."""
    start = text.find("{")
    if start == -1:
        return text
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return text
    return text[start:end]


def _openai_calls(calls) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{c.id}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for c in calls
    ]  # fmt: skip


class Reply:
    """Engine chunks -> OpenAI response objects (one request)."""

    def __init__(self, model: str, kind: str, prompt_tokens: int, prefill: str, tools: bool, response_format):
        self.model = model
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.prefill = prefill
        self.tools = tools
        self.json_mode = response_format is not None
        self.completion_tokens = 0
        self.cached_tokens = 0

    def _usage(self) -> dict[str, Any]:
        return _usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    async def _chunks(self, chunks):
        if chunks is None:
            yield StreamChunk("", [], "stop", {})
            return
        it = aiterate(chunks)
        try:
            async for chunk in it:
                self.completion_tokens += len(chunk.token_ids)
                if chunk.stats:
                    self.cached_tokens = int(chunk.stats.get("prefix_cache_hit_tokens", 0))
                yield chunk
        finally:
            await it.aclose()

    async def _all(self, chunks) -> tuple[str, str]:
        parts, finish = [], "stop"
        async for chunk in self._chunks(chunks):
            parts.append(chunk.text)
            if chunk.finish_reason:
                finish = chunk.finish_reason
        return self.prefill + "".join(parts), finish

    async def collect_chat(self, chunks) -> dict[str, Any]:
        text, finish = await self._all(chunks)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tools:
            content, calls, invalid = parse_tool_calls(text)
            if calls and not invalid:
                message = {"role": "assistant", "content": content or None, "tool_calls": _openai_calls(calls)}
                finish = "tool_calls" if finish == "stop" else finish
        elif self.json_mode:
            message["content"] = _json_content(text)
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**self._base("chat.completion"), "choices": [choice],
                "usage": self._usage()}  # fmt: skip

    async def collect_text(self, chunks) -> dict[str, Any]:
        text, finish = await self._all(chunks)
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice],
                "usage": self._usage()}  # fmt: skip

    def _chat_chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    async def stream_chat(self, chunks, include_usage: bool):
        yield self._chat_chunk({"role": "assistant", "content": ""})
        calls = ToolCallStream() if self.tools else None
        pending = self.prefill
        async for chunk in self._chunks(chunks):
            text, pending = pending + chunk.text, ""
            if calls is not None:
                text = calls.push(text)
            if text:
                yield self._chat_chunk({"content": text})
            if chunk.finish_reason is None:
                continue
            finish = chunk.finish_reason
            if calls is not None:
                tail, found, invalid = calls.finish()
                if tail:
                    yield self._chat_chunk({"content": tail})
                if found and not invalid:
                    deltas = [{"index": i, **c} for i, c in enumerate(_openai_calls(found))]
                    yield self._chat_chunk({"tool_calls": deltas})
                    finish = "tool_calls" if finish == "stop" else finish
                elif invalid:  # not a call after all: hand the text over as content
                    yield self._chat_chunk({"content": calls.text[calls.emitted :] or invalid[0].raw})
            yield self._chat_chunk({}, finish)
        if include_usage:
            yield {**self._base("chat.completion.chunk"), "choices": [],
                   "usage": self._usage()}  # fmt: skip

    async def stream_text(self, chunks, include_usage: bool):
        async for chunk in self._chunks(chunks):
            if chunk.text or chunk.finish_reason:
                choice = {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason, "logprobs": None}
                yield {**self._base("text_completion"), "choices": [choice]}
        if include_usage:
            yield {**self._base("text_completion"), "choices": [],
                   "usage": self._usage()}  # fmt: skip


def sse(events) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as exc:  # a failure after the headers went out: an error event, then the end
            log.exception("stream failed")
            err = {"error": {"message": str(exc) or type(exc).__name__, "type": "server_error", "param": None,
                             "code": None}}  # fmt: skip
            yield f"data: {json.dumps(err)}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
