"""`moe-llm chat` under a pseudo-terminal: two turns, /stats, an interrupted reply (Ctrl-C
stops the reply, not the session), another turn, then /exit."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = ">>> "
STATUS = r"\d+ tokens · [\d.]+ tok/s · cache hit \d+%"


@pytest.fixture
def chat(tiny_mixtral):
    env = dict(os.environ, NO_COLOR="1", COLUMNS="160", TERM="xterm", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "moe_llm", "chat", str(tiny_mixtral), "--max-new-tokens", "12", "--cache-per-layer", "2"],
        env=env, encoding="utf-8", timeout=120, dimensions=(40, 160),
    )  # fmt: skip
    yield child
    if child.isalive():
        child.terminate(force=True)


def turn(child, text: str) -> str:
    child.sendline(text)
    child.expect(STATUS)
    status = child.after
    child.expect(PROMPT)
    return status


def test_two_turns_stats_and_an_interrupted_reply(chat):
    chat.expect(PROMPT)
    assert turn(chat, "Hello there")
    assert turn(chat, "Tell me more about experts")

    chat.sendline("/stats")
    chat.expect(r"cache hits / misses\s*│\s*(\d+) / (\d+)")
    hits, misses = int(chat.match.group(1)), int(chat.match.group(2))
    assert hits + misses > 0
    chat.expect(PROMPT)

    chat.sendline("/set max_new_tokens 3000")
    chat.expect("max_new_tokens = 3000")
    chat.expect(PROMPT)
    chat.sendline("Write a very long story")
    chat.expect("Write a very long story\r\n")
    chat.read_nonblocking(size=1, timeout=60)  # the reply has started streaming
    chat.sendintr()
    chat.expect(r"\[interrupted\]")
    chat.expect(r"(\d+) tokens · [\d.]+ tok/s")
    assert int(chat.match.group(1)) < 3000
    chat.expect(PROMPT)

    chat.sendline("/set max_new_tokens 6")
    chat.expect(PROMPT)
    assert turn(chat, "Still there?")  # the session survived the interrupt
    chat.sendline("/reset")
    chat.expect("history cleared")
    chat.expect(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_history_goes_through_the_chat_template_and_is_trimmed_to_the_context(tiny_mixtral):
    import io

    from rich.console import Console

    import moe_llm
    from moe_llm.cli.chat import ChatSession
    from moe_llm.errors import InputError

    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2, max_context=96)
    out = io.StringIO()
    session = ChatSession(engine, Console(file=out, width=120), "Be brief.", {"max_new_tokens": 6})
    session.reply("first question")
    session.reply("second question")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    text = engine.tokenizer.decode(engine.encode(session.messages()))
    assert "<<SYS>>Be brief.<</SYS>>" in text and "[INST] first question [/INST]" in text
    assert text.index("first question") < text.index("second question")
    for i in range(6):  # outgrow the 96-token context: the oldest turns go, the newest stay
        session.reply(f"question number {i} with a few more words in it")
    assert "oldest turns dropped" in out.getvalue()
    assert len(engine.encode(session.messages())) < engine.context_length
    assert session.history[-2]["content"].startswith("question number 5")
    with pytest.raises(InputError, match="max_new_tokens must be at least 1"):
        session.command("/set max_new_tokens 0")
    with pytest.raises(InputError, match="longer than the model's context"):
        session.reply("word " * 200)
