"""Tool-call rendering and parsing (`moe_llm.serve.tools`), pure functions on text and the tiny tokenizer."""

from __future__ import annotations

import json

import pytest

from moe_llm.serve.tools import (
    ToolCallStream,
    forced_prefill,
    merge_consecutive,
    normalize_tool_choice,
    parse_tool_calls,
    render_chat,
)

ADD = {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}  # fmt: skip
NOW = {"type": "function", "function": {"name": "now", "description": "Time.", "parameters": {"type": "object", "properties": {}}}}  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        'Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        'Sure. [TOOL_CALLS] {"name": "add", "arguments": {"a": 1, "b": 2}}',
        'Sure. [TOOL_CALLS] [{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}] trailing noise',
        'Sure. [TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}',
        'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    ],
)
def test_parse_formats(text):
    content, calls, invalid = parse_tool_calls(text)
    assert content == "Sure." and not invalid
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert len(calls[0].id) == 9


def test_parse_plain_text_and_invalid():
    assert parse_tool_calls("no calls here") == ("no calls here", [], [])
    content, calls, invalid = parse_tool_calls('x [TOOL_CALLS] [{"name": "add", "arguments": {"a": ')
    assert content == "x" and calls == [] and invalid[0].name == "add" and "JSONDecodeError" in invalid[0].error
    _, calls, invalid = parse_tool_calls('[TOOL_CALLS] [{"arguments": {}}]')
    assert calls == [] and "name" in invalid[0].error


def test_stream_holds_back_partial_markers():
    stream = ToolCallStream()
    out = [stream.push(d) for d in ["Hello ", "[TOOL", "_CALLS] [{", '"name": "now", "arguments": {}}]']]
    assert out == ["Hello ", "", "", ""]
    tail, calls, invalid = stream.finish()
    assert tail == "" and [c.name for c in calls] == ["now"] and not invalid


def test_stream_releases_a_false_alarm():
    stream = ToolCallStream()
    assert stream.push("a [TOO") == "a "
    assert stream.push("K] b") == "[TOOK] b"
    assert stream.push(" <tool") == " "
    assert stream.finish() == ("<tool", [], [])


def test_tool_choice_and_prefill():
    assert normalize_tool_choice("required") == normalize_tool_choice(True) == "any"
    assert normalize_tool_choice({"type": "function", "function": {"name": "add"}}) == "add"
    assert forced_prefill([ADD], None) == ("", False)
    assert forced_prefill([ADD], "any") == ('[TOOL_CALLS] [{"name": "add", "arguments": ', False)
    assert forced_prefill([ADD, NOW], "any") == ('[TOOL_CALLS] [{"name": "', False)
    assert forced_prefill([ADD, NOW], "now") == ('[TOOL_CALLS] [{"name": "now", "arguments": {}}]', True)


def test_merge_consecutive_keeps_tool_turns_apart():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
            {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]  # fmt: skip
    assert merge_consecutive(msgs) == [{"role": "user", "content": "a\n\nb"}, *msgs[2:]]


def test_render_chat_without_native_tools(engine):
    tok = engine.tokenizer
    history = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                              "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
    ]  # fmt: skip
    prompt = render_chat(tok, history, tools=[ADD], tool_choice="add")
    text = tok.decode(prompt.token_ids)
    assert "<<SYS>>You can call these tools" in text and json.dumps(ADD["function"]) in text
    assert '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]' in text
    assert '[TOOL_RESULTS] {"call_id": "c1", "content": "3"}' in text
    assert text.endswith('[/INST][TOOL_CALLS] [{"name": "add", "arguments": ') and not prompt.complete
    assert render_chat(tok, history[:1], tools=[ADD], tool_choice="none").token_ids == engine.encode(history[:1])


def test_render_chat_native_tools_and_strict_templates(engine):
    class Strict:  # a template that knows tools and rejects system messages (like Mixtral's)
        chat_template = (
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
            "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        )

        def apply_chat_template(self, *args, **kwargs):
            return engine.tokenizer.apply_chat_template(*args, chat_template=self.chat_template, **kwargs)

        def __call__(self, *args, **kwargs):
            return engine.tokenizer(*args, **kwargs)

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = engine.tokenizer.decode(render_chat(Strict(), msgs, tools=[ADD]).token_ids)
    assert text.startswith("[AVAILABLE_TOOLS]") and "[user]S\n\nU" in text and "You can call" not in text
