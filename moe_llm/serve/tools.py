"""Chat prompts with tools, and tool calls parsed back out of model text.

Both adapters (LangChain, LlamaIndex) render chat messages here. A chat
template that knows about tools (it mentions `tools`) gets them natively through
`apply_chat_template(tools=...)`; otherwise the tool schemas go into the system
message and the model is asked to answer in Mistral's format,
`[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`. `parse_tool_calls` reads
that format and Hermes/Qwen's `<tool_call>{...}</tool_call>`. A forced tool
choice prefills the start of the call, so the model only writes the arguments.

A tokenizer without a chat template (base checkpoints such as Mixtral-8x7B-v0.1)
renders with `GENERIC_CHAT_TEMPLATE`, a plain ChatML layout (llama.cpp's
fallback too); a reply then also ends at its turn markers (`GENERIC_STOP`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

log = logging.getLogger(__name__)

MISTRAL = "[TOOL_CALLS]"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MARKERS = (MISTRAL, HERMES_OPEN)
_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_MISTRAL_V11 = re.compile(r"\s*([A-Za-z_][\w.\-]*)\[ARGS\]")

# ChatML; it does not mention tools, so tools go into the system turn as text (see render_chat)
GENERIC_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERIC_STOP = ("<|im_end|>", "<|im_start|>")  # a base model does not end the turn with EOS


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:9])

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class InvalidToolCall:
    raw: str  # the unparsed text after the marker
    error: str
    name: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:9])


@dataclass
class ChatPrompt:
    token_ids: list[int]
    prefill: str = ""  # assistant text already placed in the prompt; the output continues it
    complete: bool = False  # the prefill is the whole reply (a forced call of a tool without parameters)
    stop: tuple[str, ...] = ()  # strings that end the reply besides EOS (the generic template's turn markers)


# -- templates and text ------------------------------------------------------------------


def ensure_utf8(text: str, what: str = "prompt") -> str:
    """`text`, or InputError if it cannot be encoded as UTF-8 (lone surrogates, e.g. from
    argv decoded with surrogateescape); the tokenizer would fail with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} is not valid UTF-8 text (lone surrogate at position {exc.start})") from None
    return text


def _compile(template: str) -> None:
    """Compile as transformers does (its sandbox and extensions), raising jinja2's errors."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without the helper: plain sandboxed jinja
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]).from_string(
            template
        )
        return
    _compile_jinja_template(template)


def read_chat_template(value: str) -> str:
    """A chat template given as Jinja text or as a path to a file holding it -> the Jinja text,
    compiled once to check it (ValueError with a one-line reason)."""
    if not value.strip():
        raise ValueError("chat_template must not be empty")
    text = value
    if "{{" not in value and "{%" not in value:  # no Jinja markup: a path
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"chat_template file not found: {value} (give a Jinja string or a .jinja file)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"chat_template file {value} cannot be read: {exc}") from None
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        _compile(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"chat_template is not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
    except TemplateError as exc:
        raise ValueError(f"chat_template is not a valid Jinja template: {exc}") from None
    return text


def check_renders(tokenizer) -> None:
    """Render a one-message conversation with the tokenizer's template (ValueError if it cannot)."""
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises many types, raise_exception() among them
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"chat_template cannot render a conversation: {reason}") from None


# -- rendering -----------------------------------------------------------------------


def template_supports_tools(tokenizer) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return "tool_use" in template or any("tools" in t for t in template.values())
    return bool(template) and "tools" in template


def merge_consecutive(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join adjacent messages of one role (strict templates require alternation)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        prev = out[-1] if out else None
        mergeable = prev is not None and prev["role"] == m["role"] and m["role"] in ("system", "user", "assistant")
        if mergeable and not prev.get("tool_calls") and not m.get("tool_calls"):
            prev["content"] = "\n\n".join(s for s in (prev["content"], m["content"]) if s)
        else:
            out.append(dict(m))
    return out


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prepend a leading system message to the first user message (templates without a system role)."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def tool_instructions(tools: list[dict[str, Any]], tool_choice: str | None) -> str:
    """System text describing the tools and the call format, for templates without tool support."""
    specs = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
    text = (
        f"You can call these tools (JSON schemas): {specs}\n"
        f'To call tools, reply with {MISTRAL} followed by a JSON list, e.g. {MISTRAL} [{{"name": "tool_name", '
        '"arguments": {"arg": "value"}}]. Tool results come back in [TOOL_RESULTS] messages.'
    )
    if tool_choice == "any":
        text += " You must call a tool."
    elif tool_choice:
        text += f" You must call the tool {tool_choice!r}."
    return text


def _inline_tool_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls -> Mistral text; tool results -> user turns (plain templates)."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            content = " ".join(s for s in (m["content"], f"{MISTRAL} {json.dumps(calls, ensure_ascii=False)}") if s)
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            result = {"call_id": m.get("tool_call_id"), "content": m["content"]}
            out.append({"role": "user", "content": f"[TOOL_RESULTS] {json.dumps(result, ensure_ascii=False)}"})
        else:
            out.append(m)
    return out


def forced_prefill(tools: list[dict[str, Any]], tool_choice: str | None) -> tuple[str, bool]:
    """(start of the reply that a forced tool choice fixes, whether that already is the whole reply)."""
    if not tools or tool_choice in (None, "auto", "none"):
        return "", False
    specs = {t.get("function", t)["name"]: t.get("function", t) for t in tools}
    if tool_choice == "any" and len(specs) > 1:
        return f'{MISTRAL} [{{"name": "', False
    name = next(iter(specs)) if tool_choice == "any" else tool_choice
    start = f'{MISTRAL} [{{"name": {json.dumps(name)}, "arguments": '
    if not (specs[name].get("parameters") or {}).get("properties"):
        return start + "{}}]", True  # a tool without parameters: nothing left for the model to choose
    return start, False


def json_instructions(response_format: dict[str, Any]) -> str:
    """System text for JSON mode; `{"type": "json_schema", "json_schema": {"schema": ...}}` adds a schema."""
    text = "Reply with a single JSON object and nothing else."
    schema = (response_format.get("json_schema") or {}).get("schema")
    if schema:
        text += f" It must match this JSON schema: {json.dumps(schema, ensure_ascii=False)}"
    return text


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | None = None,
    response_format: dict[str, Any] | None = None,
) -> ChatPrompt:
    """Chat messages (OpenAI-style dicts) + optional OpenAI-format tools -> prompt token ids.

    `response_format` ({"type": "json_object"} or "json_schema") asks for a JSON
    reply and prefills its opening brace.
    """
    for i, m in enumerate(messages, 1):
        if isinstance(m.get("content"), str):
            ensure_utf8(m["content"], f"chat message {i}")
    template = tokenizer.chat_template or GENERIC_CHAT_TEMPLATE  # a base checkpoint's tokenizer has none
    tool_choice = normalize_tool_choice(tool_choice)
    tools = tools if tools and tool_choice != "none" else None
    native = bool(tools) and template_supports_tools(tokenizer)
    msgs = [dict(m) for m in messages]
    prefill, complete = "", False
    if tools and not native:
        msgs = _inline_tool_turns(msgs)
        msgs.insert(0, {"role": "system", "content": tool_instructions(tools, tool_choice)})
        prefill, complete = forced_prefill(tools, tool_choice)
    elif not native:
        msgs = _inline_tool_turns(msgs)
    if response_format and response_format.get("type") in ("json_object", "json_schema"):
        msgs.insert(0, {"role": "system", "content": json_instructions(response_format)})
        prefill = prefill or "{"
    msgs = merge_consecutive(msgs)
    kwargs: dict[str, Any] = {"tools": tools} if native else {}
    if not tokenizer.chat_template:
        kwargs["chat_template"] = template
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # jinja raise_exception(), e.g. "roles must alternate": no system role
        if not msgs or msgs[0]["role"] != "system":
            raise
        log.debug("chat template rejected a system message (%s); folding it into the first user turn", exc)
        msgs = fold_system(msgs)
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    ids = list(tokenizer(ensure_utf8(text + prefill), add_special_tokens=False)["input_ids"])
    return ChatPrompt(ids, prefill, complete, GENERIC_STOP if template == GENERIC_CHAT_TEMPLATE else ())


def normalize_tool_choice(tool_choice: Any) -> str | None:
    """LangChain/OpenAI tool_choice forms -> None, 'auto', 'none', 'any' or a tool name."""
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True or tool_choice == "required":
        return "any"
    if isinstance(tool_choice, dict):
        return tool_choice.get("function", tool_choice).get("name")
    return str(tool_choice)


# -- parsing -------------------------------------------------------------------------


def find_marker(text: str) -> int:
    """Index of the first tool-call marker in text, or -1."""
    hits = [i for i in (text.find(m) for m in MARKERS) if i != -1]
    return min(hits) if hits else -1


def _as_call(obj: Any) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a tool call needs a string 'name'")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return ToolCall(obj["name"], args, **({"id": str(obj["id"])} if obj.get("id") else {}))


def _parse_mistral(body: str) -> list[ToolCall]:
    m = _MISTRAL_V11.match(body)
    if m:  # v11 tokenizers: [TOOL_CALLS]name[ARGS]{...}
        args, _ = json.JSONDecoder().raw_decode(body[m.end() :].lstrip())
        return [_as_call({"name": m.group(1), "arguments": args})]
    value, _ = json.JSONDecoder().raw_decode(body.lstrip())
    return [_as_call(v) for v in (value if isinstance(value, list) else [value])]


def _parse_hermes(body: str) -> list[ToolCall]:
    calls = []
    for part in body.split(HERMES_OPEN):
        part = part.split(HERMES_CLOSE)[0].strip()
        if part:
            calls.append(_as_call(json.loads(part)))
    return calls


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Model output -> (content before the first call, parsed calls, unparsable calls)."""
    pos = find_marker(text)
    if pos == -1:
        return text, [], []
    content, rest = text[:pos].rstrip(), text[pos:]
    try:
        if rest.startswith(MISTRAL):
            return content, _parse_mistral(rest[len(MISTRAL) :]), []
        return content, _parse_hermes(rest[len(HERMES_OPEN) :]), []
    except (ValueError, KeyError, TypeError) as exc:
        name = _NAME.search(rest)
        error = f"{type(exc).__name__}: {exc}"
        return content, [], [InvalidToolCall(raw=rest, error=error, name=name.group(1) if name else None)]


class ToolCallStream:
    """Streams content deltas, holding back a possible marker and everything after one.

    Feed text deltas with `push`; `finish` returns the held-back tail (if no call
    followed) and the parsed calls.
    """

    def __init__(self, prefill: str = ""):
        self.text = prefill
        self.emitted = 0  # characters of self.text handed out as content
        self.in_call = find_marker(prefill) != -1

    def push(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        pos = find_marker(self.text)
        if pos != -1:
            self.in_call = True
            return self._emit(pos)
        hold = 0
        for m in MARKERS:
            for n in range(min(len(m) - 1, len(self.text)), 0, -1):
                if self.text.endswith(m[:n]):
                    hold = max(hold, n)
                    break
        return self._emit(len(self.text) - hold)

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted : max(upto, self.emitted)]
        self.emitted = max(upto, self.emitted)
        return delta

    def finish(self) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
        """(remaining content, calls, invalid calls) once generation has ended."""
        content, calls, invalid = parse_tool_calls(self.text)
        if not (calls or invalid):
            return self._emit(len(self.text)), [], []
        tail = content[self.emitted :] if len(content) > self.emitted else ""
        self.emitted = len(self.text)
        return tail, calls, invalid
