"""Text that is not valid UTF-8 (lone surrogates, e.g. argv decoded with surrogateescape) is an
`InputError` with one line naming the position, for plain prompts and chat messages, through the
API and the CLI; the engine keeps serving afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe_llm.errors import InputError
from moe_llm.serve.tools import render_chat

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = b"\xff\xfe\x80abc"
BAD = RAW.decode("utf-8", "surrogateescape")  # '\udcff\udcfe\udc80abc'
GOOD = "The quick brown fox"


@pytest.fixture(scope="module")
def reference(tiny_engine):
    return tiny_engine.generate(GOOD, max_new_tokens=8).token_ids


@pytest.mark.parametrize(
    "prompt, message",
    [
        (BAD, "prompt is not valid UTF-8 text (lone surrogate at position 0)"),
        ("ok " + BAD, "prompt is not valid UTF-8 text (lone surrogate at position 3)"),
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" + BAD}],
            "chat message 2 is not valid UTF-8 text (lone surrogate at position 1)",
        ),
    ],
    ids=["prompt", "prompt-offset", "chat-message"],
)
def test_lone_surrogates_are_an_input_error_and_the_engine_keeps_serving(tiny_engine, reference, prompt, message):
    for call in (tiny_engine.encode, tiny_engine.generate, tiny_engine.stream):
        with pytest.raises(InputError) as exc:
            call(prompt)
        assert str(exc.value) == message
    assert tiny_engine.generate(GOOD, max_new_tokens=8).token_ids == reference


def test_token_counting_and_tool_rendering_refuse_lone_surrogates(tiny_engine):
    with pytest.raises(InputError, match=r"^text to tokenize is not valid UTF-8 text \(lone surrogate at position 0"):
        tiny_engine.count_tokens(BAD)
    tool = {"type": "function", "function": {"name": "f", "description": BAD, "parameters": {"type": "object"}}}
    with pytest.raises(InputError, match="^prompt is not valid UTF-8 text"):
        render_chat(tiny_engine.tokenizer, [{"role": "user", "content": "hi"}], tools=[tool])


def test_cli_generate_exits_2_with_one_line(tiny_mixtral, capsys):
    from moe_llm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tiny_mixtral), "-p", BAD, "--max-new-tokens", "2", "--cache-per-layer", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip().splitlines() == ["error: prompt is not valid UTF-8 text (lone surrogate at position 0)"]


def test_cli_argv_bytes_that_are_not_utf8(tiny_mixtral):
    """The real path: the OS hands Python bytes, which it decodes with surrogateescape."""
    argv = [sys.executable, "-m", "moe_llm", "generate", str(tiny_mixtral), "-p", RAW, "--max-new-tokens", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", LC_ALL="C.UTF-8")
    proc = subprocess.run(argv, capture_output=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr.decode(errors="replace")
    lines = proc.stderr.decode().strip().splitlines()
    assert lines == ["error: prompt is not valid UTF-8 text (lone surrogate at position 0)"]
