"""Chat templates: a base checkpoint (no template) chats through the generic ChatML template with
one warning per engine, `chat_template=` overrides the checkpoint's, and a bad one fails at
configuration time."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import moe_llm
from moe_llm.config import EngineConfig
from moe_llm.errors import ConfigError
from moe_llm.serve.tools import GENERIC_STOP, render_chat

pytestmark = pytest.mark.usefixtures("one_thread")

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
GENERIC_TEXT = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
ANGLE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
ADD = {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}  # fmt: skip


def _generic_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "no chat template" in r.getMessage()]


def test_base_checkpoint_chats_with_the_generic_template_and_warns_once(tiny_base_mixtral, caplog):
    engine = moe_llm.load(tiny_base_mixtral, device="cpu", cache_per_layer=2)
    assert engine.chat_template_source == "generic"
    with caplog.at_level(logging.WARNING, logger="moe_llm"):
        assert engine.tokenizer.decode(engine.encode(MSGS)) == GENERIC_TEXT
        first = engine.generate(MSGS, max_new_tokens=6)
        for _ in engine.stream(MSGS, max_new_tokens=2):
            pass
    assert first.prompt_tokens == len(engine.encode(MSGS)) and first.token_ids
    assert len(_generic_warnings(caplog)) == 1
    assert engine.generate("plain text still works", max_new_tokens=2).token_ids


def test_generic_template_ends_a_turn_at_its_markers(tiny_base_engine):
    prompt = tiny_base_engine.chat_prompt(MSGS)
    assert prompt.stop == GENERIC_STOP == ("<|im_end|>", "<|im_start|>")
    assert tiny_base_engine.tokenizer.decode(prompt.token_ids) == GENERIC_TEXT


def test_tool_calls_render_through_the_generic_template(tiny_base_engine):
    history = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
    ]  # fmt: skip
    prompt = render_chat(tiny_base_engine.tokenizer, history, tools=[ADD], tool_choice="add")
    text = tiny_base_engine.tokenizer.decode(prompt.token_ids)
    assert text.startswith("<s><|im_start|>system\nYou can call these tools")
    assert '<|im_start|>assistant\n[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]<|im_end|>' in text
    assert '<|im_start|>user\n[TOOL_RESULTS] {"call_id": "c1", "content": "3"}<|im_end|>' in text
    assert text.endswith('<|im_start|>assistant\n[TOOL_CALLS] [{"name": "add", "arguments": ')


def test_checkpoint_template_is_used_as_is(tiny_engine):
    assert tiny_engine.chat_template_source == "checkpoint"
    assert tiny_engine.chat_prompt(MSGS).stop == ()
    assert "<<SYS>>Be brief.<</SYS>>" in tiny_engine.tokenizer.decode(tiny_engine.encode(MSGS))


def test_chat_template_option_overrides_the_checkpoint(tiny_mixtral, caplog):
    with caplog.at_level(logging.WARNING, logger="moe_llm"):
        engine = moe_llm.load(tiny_mixtral, device="cpu", cache_per_layer=2, chat_template=ANGLE)
        assert engine.chat_template_source == "option"
        assert engine.tokenizer.decode(engine.encode(MSGS)) == "<system>Be brief.<user>Hi<assistant>"
    assert not _generic_warnings(caplog)


def test_chat_template_option_reads_a_jinja_file(tmp_path):
    path = tmp_path / "angle.jinja"
    path.write_text(ANGLE)
    assert EngineConfig.build(chat_template=str(path)).chat_template == ANGLE
    assert EngineConfig.build(chat_template=ANGLE).chat_template == ANGLE


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("{% for m in messages %}{{ m['content'] }}", "chat_template is not a valid Jinja template"),
        ("/no/such/template.jinja", "chat_template file not found: /no/such/template.jinja"),
        ("", "chat_template must not be empty"),
    ],
)
def test_bad_chat_template_is_a_config_error(value, fragment):
    with pytest.raises(ConfigError, match="^" + fragment.replace(".", r"\.")):
        EngineConfig.build(chat_template=value)


def test_chat_template_that_cannot_render_fails_at_load(tiny_mixtral):
    with pytest.raises(ConfigError, match="chat_template cannot render a conversation"):
        moe_llm.load(tiny_mixtral, device="cpu", chat_template="{{ raise_exception('nope') }}")


def test_chat_template_from_the_environment(tmp_path):
    from moe_llm.settings import resolve_engine_config

    path = tmp_path / "angle.jinja"
    path.write_text(ANGLE)
    cfg = resolve_engine_config(environ={"MOE_LLM_CHAT_TEMPLATE": str(path)}, path=None)
    assert cfg.chat_template == ANGLE


def test_cli_chat_on_a_base_checkpoint(tiny_base_mixtral):
    """`moe-llm chat` used to refuse a model without a chat template; now it chats, warning once."""
    argv = [sys.executable, "-m", "moe_llm", "chat", str(tiny_base_mixtral), "-n", "3", "--cache-per-layer", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, input="hello\nagain\n/exit\n", capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" tok/s · ") == 2  # a status line after each of the two replies
    assert proc.stderr.count("has no chat template; chat uses the generic ChatML template") == 1
