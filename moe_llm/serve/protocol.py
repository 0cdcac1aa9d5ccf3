"""OpenAI request bodies as pydantic models, and their translation to engine calls.

Fields that OpenAI clients send routinely but that change nothing here (`user`, `store`,
`metadata`, ...) are accepted; fields that would change the answer in a way this server
cannot honour (`n` > 1, `logprobs`, penalties, `logit_bias`) are refused with a 400 rather
than silently ignored; anything else is an unknown field (422).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class UnsupportedError(ValueError):
    """A valid OpenAI option this server does not implement (400, with the parameter)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """Raise ValueError naming `where` unless `schema` is shaped as a JSON schema: an object (or
    a boolean) whose `type` is a JSON type name or a list of them, whose `required` is a list of
    names, and whose subschemas are shaped the same. (The schema is shown to the model, not
    enforced; a malformed one is a client error.)"""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON schema object")
    if depth > 32:
        raise ValueError(f"{where} nests deeper than 32 levels")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in JSON_TYPES for k in kinds):
            raise ValueError(f"{where}: 'type' must be one of {', '.join(sorted(JSON_TYPES))} (or a list of them)")
    req = schema.get("required", [])
    if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
        raise ValueError(f"{where}: 'required' must be a list of names")
    for key in _SUBSCHEMA_MAPS:
        sub = schema.get(key, {})
        if not isinstance(sub, dict):
            raise ValueError(f"{where}: '{key}' must map names to JSON schemas")
        for name, s in sub.items():
            check_schema(s, f"{where}.{key}.{name}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        sub = schema.get(key, [])
        if not isinstance(sub, list):
            raise ValueError(f"{where}: '{key}' must be a list of JSON schemas")
        for i, s in enumerate(sub):
            check_schema(s, f"{where}.{key}.{i}", depth + 1)
    for key in _SUBSCHEMAS:
        if key in schema:
            sub = schema[key]
            for i, s in enumerate(sub) if isinstance(sub, list) and key == "items" else [(None, sub)]:
                check_schema(s, f"{where}.{key}" + ("" if i is None else f".{i}"), depth + 1)


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOOL_NAME.match(v):
            raise ValueError("a function name is 1-64 letters, digits, '_', '-' or '.'")
        return v

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if v.get("type", "object") != "object":
            raise ValueError("function parameters must be a JSON schema of type 'object'")
        props = v.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(p, dict) for p in props.values()):
            raise ValueError("function parameters 'properties' must map names to JSON schemas")
        check_schema(v, "function parameters")  # 'required', types and the subschemas
        return v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolCallFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients add fields such as "name", "refusal", "annotations"

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedError("messages", f"content part of type {part.get('type')!r} is not supported")
            parts.append(part["text"])
        return "".join(parts)

    def to_engine(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        d: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        raise UnsupportedError("messages", "tool call arguments must be a JSON object") from None
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            d["name"] = self.name
        return d


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
            check_schema(schema, "response_format json_schema.schema")
        return self


class _Sampling(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4 or any(s == "" for s in items):
            raise ValueError("stop takes up to 4 non-empty strings")
        return items

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise UnsupportedError("n", "n > 1 is not supported")
        if self.logprobs:
            raise UnsupportedError("logprobs", "logprobs are not supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise UnsupportedError(name, f"{name} is not supported")
        if self.logit_bias:
            raise UnsupportedError("logit_bias", "logit_bias is not supported")

    def options(self, max_tokens: int | None, default_max: int) -> dict[str, Any]:
        return dict(
            max_new_tokens=max_tokens or default_max,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            seed=self.seed,
            stop=list(self.stop or []),
        )


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("messages must not be empty")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError("tool_choice is 'none', 'auto', 'required' or {'type': 'function', 'function': {...}}")
        if isinstance(v, dict):
            fn = v.get("function")
            if v.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError("tool_choice object must be {'type': 'function', 'function': {'name': ...}}")
        return v

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def check_tool_choice(self) -> None:
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            if name not in {t.function.name for t in self.tools or []}:
                raise UnsupportedError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        elif self.tool_choice == "required" and not self.tools:
            raise UnsupportedError("tool_choice", "tool_choice 'required' needs tools")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if all(isinstance(s, str) for s in v):
                if len(v) != 1:
                    raise ValueError("one prompt per request (a list of several prompts is not supported)")
                return v[0]
        return v

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise UnsupportedError("echo", "echo is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedError("best_of", "best_of > 1 is not supported")
        if self.suffix:
            raise UnsupportedError("suffix", "suffix is not supported")
