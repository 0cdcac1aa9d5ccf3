"""GPT-OSS: biased experts with gate/up interleaved and transposed, a clamped SwiGLU, attention
sinks and sliding-window layers, and checkpoints as shipped (MXFP4 experts).

transformers builds the tiny checkpoint (`moe_llm.tiny.make_tiny`, sliding window 4 < the
prompt) and is the oracle: unquantized, the engine's greedy tokens and logits equal
transformers' (also tests/test_families.py); an MXFP4 copy (`tiny.to_mxfp4`) loads expert
by expert and equals transformers loading the same MXFP4 directory (which dequantizes it);
quantized, the tokens do not depend on the cache size, the policy or prefetch; and the
compiled expert kernels (Triton decode, the C CPU kernel) are never given these experts.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import moe_llm
from moe_llm.checkpoint.arch import FAMILIES, contract_problem
from moe_llm.errors import ConfigError
from moe_llm.tiny import make_tiny, to_mxfp4

PROMPT = "The quick brown fox jumps over the lazy dog"
NEW = 12


@pytest.fixture(autouse=True)
def _quiet(one_thread, caplog):
    caplog.set_level(logging.ERROR)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    bf16 = make_tiny(root / "bf16", "gpt_oss", seed=2)  # a seed whose 2/3/4-bit runs do not stop at EOS early
    # a limit the tiny model's gate/up values cross, and another alpha: both clamps act end to end
    clamped = make_tiny(root / "clamped", "gpt_oss", seed=2, overrides={"swiglu_limit": 0.5, "swiglu_alpha": 1.2})
    return {"bf16": bf16, "mxfp4": to_mxfp4(bf16, root / "mxfp4"), "clamped": clamped}


def transformers_greedy(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        logits = model(ids).logits[0]
    return model, ids[0].tolist(), out[0, ids.shape[1] :].tolist(), logits


def test_clamped_swiglu_is_transformers_gate():
    """Our activation on (gate, up) halves is GptOssExperts._apply_gate on interleaved rows, both
    clamps active (values well past the limit), with the config's alpha and limit."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from moe_llm.experts.compute import clamped_swiglu

    with torch.device("meta"):
        experts = GptOssExperts(GptOssConfig(hidden_size=64, intermediate_size=32, swiglu_limit=3.0, swiglu_alpha=1.5))
    gate_up = torch.randn(5, 64) * 6  # interleaved: g0, u0, g1, u1, ...
    assert (gate_up.abs() > 3.0).sum() > 20
    want = experts._apply_gate(gate_up)
    assert torch.equal(clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], alpha=1.5, limit=3.0), want)


def test_the_map_declares_the_layout_transformers_uses():
    from moe_llm.checkpoint.model import build_skeleton
    from moe_llm.tiny import tiny_config

    experts = build_skeleton(tiny_config("gpt_oss", 512), torch.float32).model.layers[0].mlp.experts
    layout = FAMILIES["gpt_oss"].layout
    assert contract_problem(experts, layout) is None
    assert not layout.plain and layout.geometry(experts.gate_up_proj.shape) == (8, 256, 64)
    assert "without a declared expert layout" in contract_problem(experts)  # the default layout refuses it


@pytest.mark.parametrize("which", ["bf16", "clamped"])
def test_sliding_window_and_sinks_through_the_engine_equal_transformers(dirs, which):
    """2 of 8 expert slots per layer; the prompt is longer than the sliding window."""
    model, prompt, ref, ref_logits = transformers_greedy(dirs[which])
    assert len(prompt) > model.config.sliding_window and "sliding_attention" in model.config.layer_types
    engine = moe_llm.load(dirs[which], cache_per_layer=2)
    math = engine.fmt.compute
    assert dict(math.act_args) == {"alpha": model.config.swiglu_alpha, "limit": model.config.swiglu_limit}
    got = engine.generate(prompt, max_new_tokens=NEW).token_ids
    assert got == ref[: len(got)] and len(got) >= 4, (got, ref)
    assert engine.stats.cache_misses > 0
    assert torch.allclose(engine.logits(prompt), ref_logits, atol=1e-4, rtol=1e-4)


def test_mxfp4_checkpoint_loads_expert_by_expert_and_equals_transformers(dirs, monkeypatch):
    from safetensors import safe_open

    from moe_llm.checkpoint.qformat import mxfp4

    with safe_open(str(dirs["mxfp4"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    pre = "model.layers.0.mlp.experts."
    assert {pre + "gate_up_proj_blocks", pre + "down_proj_scales", pre + "gate_up_proj_bias"} <= keys
    assert pre + "gate_up_proj" not in keys

    shapes, real = [], mxfp4.dequantize
    monkeypatch.setattr(mxfp4, "dequantize", lambda b, s, *a: shapes.append(tuple(b.shape)) or real(b, s, *a))
    engine = moe_llm.load(dirs["mxfp4"], cache_per_layer=2)
    assert len(shapes) == 2 * 2 * 8 and {len(s) for s in shapes} == {3}  # one expert's matrix per call

    model, prompt, ref, ref_logits = transformers_greedy(dirs["mxfp4"])  # transformers dequantizes on CPU
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    got = engine.generate(prompt, max_new_tokens=NEW).token_ids
    assert got == ref[: len(got)] and len(got) >= 4, (got, ref)
    assert torch.allclose(engine.logits(prompt), ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_tokens_do_not_depend_on_cache_policy_or_prefetch(dirs, bits):
    src = dirs["mxfp4"]  # re-quantized to HQQ expert by expert, straight from MXFP4
    reference = moe_llm.load(src, experts_bits=bits, cache_per_layer=8, prefetch=False)
    want = reference.generate(PROMPT, max_new_tokens=NEW).token_ids
    assert len(want) == NEW and reference.stats.evictions == 0  # a slot for every expert
    for cache in (1, 3):
        for policy in ("lru", "lfu"):
            for prefetch in (True, False):
                engine = moe_llm.load(
                    src, experts_bits=bits, cache_per_layer=cache, cache_policy=policy, prefetch=prefetch
                )
                assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == want, (cache, policy, prefetch)
                assert engine.stats.cache_misses > 0


def test_biased_experts_never_reach_the_compiled_kernels(dirs, tiny_mixtral):
    """On CPU the default cpu_experts='auto' leaves them to torch (the C kernel knows bias-free
    SiLU only), 'all' is one line of refusal, and the Triton decode dispatch is not built."""
    from moe_llm.experts.runtime import _device_kernels, kernels_compute

    engine = moe_llm.load(dirs["bf16"], experts_bits=2, cache_per_layer=2, cpu_experts="auto")
    rt = engine.runtime
    assert not kernels_compute(engine.fmt, rt.act_fn) and rt.cpu_road == "off" and rt.mode == "host"
    assert _device_kernels(SimpleNamespace(cuda=True), engine.fmt, rt.act_fn) is None
    off = moe_llm.load(dirs["bf16"], experts_bits=2, cache_per_layer=2, cpu_experts="off")
    assert engine.generate(PROMPT, max_new_tokens=NEW).token_ids == off.generate(PROMPT, max_new_tokens=NEW).token_ids
    with pytest.raises(ConfigError) as exc:
        moe_llm.load(dirs["bf16"], experts_bits=2, cache_per_layer=2, cpu_experts="all")
    assert "needs bias-free SiLU experts" in str(exc.value) and "\n" not in str(exc.value)
    mixtral = moe_llm.load(tiny_mixtral, experts_bits=2, cache_per_layer=2)
    assert kernels_compute(mixtral.fmt, mixtral.runtime.act_fn)  # plain SiLU experts keep their kernels


def test_quantize_once_keeps_the_biases(dirs, tmp_path):
    """`moe-llm quantize` of the MXFP4 checkpoint: each expert's buffer holds its biases, and the
    directory gives the tokens of quantizing at load time."""
    from moe_llm.checkpoint.qformat import quantize_checkpoint

    manifest = quantize_checkpoint(dirs["mxfp4"], tmp_path / "q4", experts_bits=4, attn_bits=None)
    names = [entry[0] for entry in manifest.experts.layout]
    assert "gate_up_proj_bias" in names and "down_proj_bias" in names
    stored = moe_llm.load(tmp_path / "q4", cache_per_layer=2)
    direct = moe_llm.load(dirs["mxfp4"], experts_bits=4, attn_bits=None, cache_per_layer=2)
    want = direct.generate(PROMPT, max_new_tokens=NEW).token_ids
    assert stored.generate(PROMPT, max_new_tokens=NEW).token_ids == want and want
    bias = stored.cache.store.views(1, 5)["down_proj_bias"]
    from safetensors import safe_open

    with safe_open(str(dirs["mxfp4"] / "model.safetensors"), "pt") as f:
        assert torch.equal(bias, f.get_tensor("model.layers.1.mlp.experts.down_proj_bias")[5])
