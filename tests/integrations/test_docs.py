"""The Python snippets in docs/langchain.md and docs/llama_index.md run, in order, on a tiny checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from llama_index.core import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def snippets(name: str, model_dir: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)
    assert blocks, f"no python snippets in {name}"
    code = "\n".join(blocks)
    code, n = re.subn(r'^MODEL_DIR = ".*"', f"MODEL_DIR = {str(model_dir)!r}", code, flags=re.M)
    assert n == 1, "the snippets should set MODEL_DIR once"
    # CI speed: keep the tiny model unquantized (quantizing on CPU is slow) and the replies short
    code = re.sub(r"(experts_bits|attn_bits)=\d", r"\1=None", code)
    return re.sub(r"(max_tokens|max_new_tokens)=\d+", r"\1=8", code)


@pytest.mark.parametrize("doc", ["langchain.md", "llama_index.md"])
def test_doc_snippets_run(doc, tiny_mixtral, capsys):
    saved = (Settings._llm, Settings._embed_model, Settings._callback_manager)
    try:
        exec(compile(snippets(doc, tiny_mixtral), doc, "exec"), {"__name__": "__doc_snippets__"})
    finally:
        Settings._llm, Settings._embed_model, Settings._callback_manager = saved
    assert capsys.readouterr().out  # the snippets print what they produce
