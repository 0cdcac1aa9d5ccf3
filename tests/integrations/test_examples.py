"""The examples run as scripts on a tiny checkpoint, and the agent really dispatches a parsed tool call."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from langchain_core.messages import AIMessage, ToolMessage
from langchain_moe_llm import ChatMoeLLM

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = ["langchain_rag.py", "llamaindex_query.py", "agent.py"]


def test_examples_run_as_scripts(tiny_mixtral):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--model", str(tiny_mixtral), "--max-tokens", "8", "--device", "cpu"]
    # started together: most of each run is interpreter start-up and imports
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in SCRIPTS
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
        assert out.startswith("Q: ") and "\nA: " in out, f"{name} printed:\n{out}"
        if name == "llamaindex_query.py":
            assert "2 sources; tokens:" in out and "8 completion" in out


def _load_agent():
    spec = importlib.util.spec_from_file_location("agent_example", EXAMPLES / "agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agent_executes_the_parsed_tool_call(scripted, capsys):
    agent = _load_agent()
    engine = scripted(
        [
            'I will compute it. [TOOL_CALLS] [{"name": "expert_memory_gib", "arguments": {"params_billion": 45, "bits": 2.5}}]',
            "45 billion expert parameters at 2.5 bits take about 13.1 GiB.",
        ]
    )
    chat = ChatMoeLLM(engine=engine, max_tokens=256)
    conversation = agent.run_agent(chat, "How many GiB do 45 billion expert parameters take at 2.5 bits?")
    _, call, result, answer = conversation
    assert isinstance(call, AIMessage) and call.tool_calls[0]["args"] == {"params_billion": 45, "bits": 2.5}
    assert isinstance(result, ToolMessage) and result.content == "13.1"  # the real tool ran
    assert result.tool_call_id == call.tool_calls[0]["id"]
    assert answer.content.endswith("13.1 GiB.") and not answer.tool_calls
    assert '"content": "13.1"' in engine.prompts[1]  # the result went back to the model
    assert "tool expert_memory_gib" in capsys.readouterr().out


def test_agent_reports_unknown_tools(scripted):
    agent = _load_agent()
    engine = scripted(['[TOOL_CALLS] [{"name": "launch_rocket", "arguments": {}}]', "Sorry."])
    conversation = agent.run_agent(ChatMoeLLM(engine=engine, max_tokens=256), "Launch it.")
    assert conversation[2].status == "error" and "unknown tool" in conversation[2].content
    assert conversation[-1].content == "Sorry."
