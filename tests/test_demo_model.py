"""The trained demo MoE shipped in the package: it loads, decodes deterministically, and keeps its measured quality.

Thresholds come from docs/fidelity.md (measured on `moe_llm/data/demo/heldout.txt`, window 512, stride 256,
CPU fp32): unquantized perplexity 9.46, 2-bit experts 11.82 (ratio 1.25).
"""

from __future__ import annotations

import json

import pytest
import torch

import moe_llm
from moe_llm.defaults import default_model_dir, shipped_demo_dir
from moe_llm.eval.evaluate import perplexity, tokenize_text

DEMO = shipped_demo_dir()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo model is not installed")

PPL_MAX = 11.0  # measured 9.46
RATIO_2BIT_MAX = 1.40  # measured 1.25 (2-bit experts, unquantized attention)


@pytest.fixture(scope="module")
def demo_engine():
    return moe_llm.load(DEMO, device="cpu")


@pytest.fixture(scope="module")
def heldout_ids(demo_engine):
    return tokenize_text(demo_engine, (DEMO / "heldout.txt").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def demo_ppl(demo_engine, heldout_ids):
    return perplexity(demo_engine, heldout_ids, window=512, stride=256)


def test_demo_is_the_default_and_is_a_small_trained_mixtral():
    path, is_random = default_model_dir()
    assert path == DEMO and not is_random
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["max_position_embeddings"] >= 2048
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 50 * 10**6


def test_demo_matches_transformers(demo_engine):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    ids = demo_engine.encode("import os\n\n\ndef main():\n")
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert torch.allclose(demo_engine.logits(ids), want, atol=1e-4)


def test_greedy_generation_is_deterministic_and_looks_like_python(demo_engine):
    prompt = "import os\n\n\ndef "
    a = demo_engine.generate(prompt, max_new_tokens=24, temperature=0.0)
    b = demo_engine.generate(prompt, max_new_tokens=24, temperature=0.0)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert len(a.token_ids) > 0
    assert any(word in a.text for word in ("(", "return", "self", "import", ":"))


def test_chat_template_is_mixtral_style(demo_engine):
    text = demo_engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "[INST] hi [/INST]" in text


def test_heldout_perplexity_under_threshold(demo_ppl, heldout_ids):
    assert demo_ppl.tokens == len(heldout_ids) - 1 > 500
    assert 1.0 < demo_ppl.perplexity < PPL_MAX


def test_two_bit_experts_stay_close(demo_ppl, heldout_ids):
    engine = moe_llm.load(DEMO, device="cpu", experts_bits=2)
    two_bit = perplexity(engine, heldout_ids, window=512, stride=256)
    assert two_bit.perplexity > demo_ppl.perplexity  # quantization costs something...
    assert two_bit.perplexity / demo_ppl.perplexity < RATIO_2BIT_MAX  # ...but a bounded amount
