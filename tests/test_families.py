"""Every MoE family of the installed transformers, against transformers as the oracle.

For each family a tiny random checkpoint is built by transformers itself (tiny config,
`from_config`, `save_pretrained`; `moe_llm.tiny.make_tiny`), and either the engine's
greedy tokens and logits equal transformers' with quantization off and an expert cache
smaller than the model (2 slots per layer of 8 experts), or `moe_llm.load` refuses with
one line saying why. docs/families.md holds the same table.
"""

from __future__ import annotations

import logging
import pathlib

import pytest
import torch

import moe_llm
from moe_llm.checkpoint.arch import FAMILIES, GENERIC_VERIFIED
from moe_llm.errors import MoeLLMError
from moe_llm.tiny import TINY_LAYERS, make_tiny

PROMPT = "The quick brown fox jumps over"
NEW = 8

# family -> None (tokens equal transformers') or the refusal's text
DECLARED = {
    "mixtral": None,
    "qwen2_moe": None,
    "qwen3_moe": None,
    "olmoe": None,
    "deepseek_v2": None,
    "deepseek_v3": None,
    "phimoe": None,
    "granitemoe": None,
    "granitemoeshared": None,
    "granitemoehybrid": None,
    "hunyuan_v1_moe": None,
    "gpt_oss": None,
}
GENERIC = {
    **dict.fromkeys(sorted(GENERIC_VERIFIED)),
    "aria_text": "aria_text: biased or transposed experts are not supported without a declared expert layout",
    "deepseek_v4": "deepseek_v4: experts with their own gate activation (DeepseekV4Experts._apply_gate)",
    "hy_v4": "hy_v4: experts with their own gate activation (HYV4Experts._apply_gate)",
    "minimax_m3_vl_text": "experts with their own gate activation (MiniMaxM3VLExperts._apply_gate)",
    "minimax": "minimax: a KV cache class of its own (MiniMaxCache) is not supported",
    "nemotron_h": "nemotron_h: experts without gate_up_proj (NemotronHExperts: up/down only) are not supported",
    "zaya": "zaya: the MoE block ZayaSparseMoeBlock has no router with an (experts, hidden) weight",
    "inkling_text": "inkling_text: the MoE block InklingMoE has no router with an (experts, hidden) weight",
    "lara_mini": "tensor model.layers.0.linear_attn.in_proj_qkv.weight is missing from the checkpoint",
}
# MoE model types transformers ships that no test covers, and why (docs/families.md)
UNTESTED = {
    "bailing_hybrid": "transformers' own generate fails on the tiny config (no attention layer in the cache)",
    "kimi_linear": "transformers' own generate fails on the tiny config (no attention layer in the cache)",
    "beam": "transformers' own forward fails on the tiny config (top-k out of range)",
    "qwen4_exp_text": "the tiny config does not build (head dims left None)",
    "dots3_note_text": "per-layer config attributes: the tiny config does not build",
    "gemma4_text": "per-layer config attributes: the tiny config does not build",
    "inkling2_text": "the tiny config does not build (negative vocabulary padding)",
    "inkling2_loop_text": "the tiny config does not build (negative vocabulary padding)",
}
LAYERS = {**TINY_LAYERS, "flint": 4, "qwen3_5_moe_text": 4}


def hf_greedy(path: pathlib.Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        logits = model(ids).logits[0]
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist(), logits


def check_family(path: pathlib.Path, want: str | None, reference=None):
    if want is not None:
        with pytest.raises(MoeLLMError) as exc:
            moe_llm.load(path, cache_per_layer=2)
        msg = str(exc.value)
        assert want in msg and "\n" not in msg, msg
        return None
    prompt_ids, ref_tokens, ref_logits = reference or hf_greedy(path)
    engine = moe_llm.load(path, cache_per_layer=2)  # 2 of 8 experts per layer: the cache is smaller than the model
    got = [t for chunk in engine.stream(prompt_ids, max_new_tokens=NEW) for t in chunk.token_ids]
    stop = next((i for i, t in enumerate(ref_tokens) if t in engine.eos_ids), len(ref_tokens))
    assert got == ref_tokens[:stop] and got, (got, ref_tokens)
    assert engine.stats.cache_misses > 0
    assert torch.allclose(engine.logits(prompt_ids), ref_logits, atol=1e-4, rtol=1e-4)
    return prompt_ids, ref_tokens, ref_logits


@pytest.fixture(autouse=True)
def _quiet(one_thread, caplog):
    caplog.set_level(logging.ERROR)


@pytest.mark.parametrize("family", sorted(DECLARED))
def test_declared_family_matches_transformers_or_refuses(tmp_path, family):
    path = make_tiny(tmp_path / "per-expert", family, layers=TINY_LAYERS.get(family, 2))
    ref = check_family(path, DECLARED[family])
    if ref is not None:  # transformers 5.x's fused tensors load identically
        fused = make_tiny(tmp_path / "fused", family, layers=TINY_LAYERS.get(family, 2), fused=True)
        check_family(fused, None, ref)


@pytest.mark.parametrize("family", sorted(GENERIC))
def test_generic_family_matches_transformers_or_refuses(tmp_path, family):
    check_family(make_tiny(tmp_path / family, family, layers=LAYERS.get(family, 2)), GENERIC[family])


def test_every_moe_family_of_transformers_is_tested_or_listed():
    """The MoE causal LMs transformers ships (experts classes under @use_experts_implementation)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLM

    root = pathlib.Path(transformers.__file__).parent / "models"
    dirs = {f.parent.name for f in root.glob("*/modeling_*.py") if "@use_experts_implementation" in f.read_text()}
    shipped = {t for t in CLM if t in dirs or t.removesuffix("_text") in dirs}
    composite = {t for t in shipped if f"{t}_text" in shipped}  # their text model is the one tested
    assert shipped - composite - set(DECLARED) - set(GENERIC) - set(UNTESTED) == set()
    assert set(FAMILIES) == set(DECLARED)


EQUAL = sorted(f for f, want in {**DECLARED, **GENERIC}.items() if want is None)


@pytest.mark.parametrize("family", EQUAL)
def test_graph_decode_trunk_equals_transformers_or_names_why_not(tmp_path, family):
    """CUDA-graph decode calls the decoder layers itself (static KV, explicit mask): run that
    trunk eagerly here; where it cannot compute what transformers computes, `unsupported_reason`
    must say so (the engine then decodes eagerly), never differ silently."""
    from moe_llm.runtime.decode_graph import GraphDecoder, unsupported_reason

    engine = moe_llm.load(make_tiny(tmp_path / family, family, layers=LAYERS.get(family, 2)), cache_per_layer=2)
    if unsupported_reason(engine.model, engine.hf_config) is not None:
        return
    prompt = moe_llm.tiny.train_tokenizer()(PROMPT)["input_ids"]
    dec = GraphDecoder(engine.model, engine.hf_config, engine.runtime, torch.device("cpu"), 512)
    kv = engine._new_kv()
    dec.prefill_cache(kv)
    with torch.inference_mode():
        out = engine.model(input_ids=torch.tensor([prompt]), use_cache=True, **{engine._kv_arg: kv})
    dec.begin(kv, len(prompt))
    toks, steps = [int(out.logits[0, -1].argmax())], []
    for i in range(4):
        steps.append(dec.step_eager(toks[-1], len(prompt) + i).float())
        toks.append(int(steps[-1].argmax()))
    full = engine.logits(prompt + toks[:-1])[len(prompt) :].float()
    assert torch.allclose(torch.stack(steps), full, atol=1e-4, rtol=1e-4)
