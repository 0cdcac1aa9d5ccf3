"""Architecture maps: checkpoint keys of both naming schemes, the generic map read off a
skeleton, the experts contract check, what the loader takes from a map (saved buffers,
16-bit routers) and the KV the planner counts for multi-head latent attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_llm
from moe_llm.checkpoint.arch import FAMILIES, arch_for_type, contract_problem, resolve_arch
from moe_llm.checkpoint.model import build_skeleton
from moe_llm.planning import model_kv_bytes, plan_model
from moe_llm.tiny import make_tiny, tiny_config


def test_old_and_fused_expert_keys_map_to_layer_expert_and_role():
    mixtral = arch_for_type("mixtral").keys
    assert mixtral.classify("model.layers.3.block_sparse_moe.experts.5.w3.weight") == ("per_expert", 3, 5, "up")
    assert mixtral.classify("model.layers.0.mlp.experts.gate_up_proj") == ("fused", 0, None, "gate_up")
    assert mixtral.classify("model.layers.0.block_sparse_moe.gate.weight") is None
    assert mixtral.canonical("model.layers.0.block_sparse_moe.gate.weight") == "model.layers.0.mlp.gate.weight"
    granite = arch_for_type("granitemoe").keys
    assert granite.classify("model.layers.1.block_sparse_moe.input_linear.weight") == ("fused", 1, None, "gate_up")
    assert granite.canonical("model.layers.1.block_sparse_moe.router.layer.weight").endswith("router.weight")
    phimoe = arch_for_type("phimoe").keys
    assert phimoe.canonical("model.layers.2.block_sparse_moe.gate.weight") == "model.layers.2.mlp.router.weight"


def test_a_family_without_a_map_takes_transformers_own_key_renames():
    keys = arch_for_type("exaone_moe").keys  # generic; transformers moves this bias into the router
    assert (
        keys.canonical("model.layers.1.mlp.e_score_correction_bias")
        == "model.layers.1.mlp.gate.e_score_correction_bias"
    )
    assert keys.classify("model.layers.1.mlp.experts.7.down_proj.weight") == ("per_expert", 1, 7, "down")


def test_the_generic_map_reads_its_paths_off_the_skeleton():
    assert arch_for_type("jamba").generic and not arch_for_type("mixtral").generic
    model = build_skeleton(tiny_config("jamba", 512, layers=4), torch.float32)
    arch = resolve_arch(model, model.config)
    assert (arch.block, arch.router, arch.norm) == ("feed_forward", "router", "pre_ff_layernorm")
    assert arch.router_weight(arch.decoder_layers(model)[1]).shape == (8, 64)
    lite = build_skeleton(tiny_config("glm4_moe_lite", 512, layers=3), torch.float32)
    ds = resolve_arch(lite, lite.config)
    assert ds.kv_layout == "latent" and ds.router_spec.correction_bias == "e_score_correction_bias"


def test_every_declared_map_names_a_transformers_class():
    import transformers

    for arch in FAMILIES.values():
        assert hasattr(transformers, arch.hf_class), arch.hf_class


def test_experts_outside_the_contract_are_named_in_one_line():
    class Plain(nn.Module):
        pass

    assert "does not follow transformers' experts contract" in contract_problem(Plain())
    model = build_skeleton(tiny_config("gpt_oss", 512), torch.float32)
    experts = model.model.layers[0].mlp.experts
    assert (
        contract_problem(experts) == "biased or transposed experts are not supported without a declared expert layout"
    )
    assert contract_problem(experts, FAMILIES["gpt_oss"].layout) is None  # its map declares them
    assert (
        contract_problem(build_skeleton(tiny_config("mixtral", 512), torch.float32).model.layers[0].mlp.experts) is None
    )


def test_saved_buffers_reach_the_trunk(tmp_path, one_thread):
    """DeepSeek-V3's e_score_correction_bias is a buffer: the loader reads it (it once stayed zero)."""
    from safetensors import safe_open

    path = make_tiny(tmp_path / "ds3", "deepseek_v3", layers=3)
    engine = moe_llm.load(path, cache_per_layer=2)
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        want = f.get_tensor(key)
    got = engine.model.get_buffer(key)
    assert torch.equal(got, want) and want.abs().sum() > 0


def test_routers_stay_16_bit_when_dense_layers_are_quantized(tmp_path, one_thread):
    from moe_llm.runtime.quant_linear import QuantLinear

    engine = moe_llm.load(make_tiny(tmp_path / "hy", "hunyuan_v1_moe"), cache_per_layer=2, attn_bits=4)
    layer = engine.model.model.layers[0]
    assert type(layer.mlp.gate.wg) is nn.Linear  # the router is an nn.Linear here
    assert isinstance(layer.self_attn.q_proj, QuantLinear)


@pytest.mark.parametrize("name,layers", [("deepseek-v3", 61), ("deepseek-v2-lite", 27)])
def test_mla_kv_is_the_compressed_latent(tmp_path, name, layers):
    import shutil

    from transformers import AutoConfig

    from moe_llm.planning import known_model

    shutil.copyfile(known_model(name).path, tmp_path / "config.json")
    cfg = AutoConfig.from_pretrained(tmp_path)
    kv = model_kv_bytes(cfg, arch_for_type(cfg.model_type), 4096, 2)  # bf16, 4096 tokens
    assert kv == layers * (512 + 64) * 4096 * 2  # not 2 x 128 heads x 64 x 4096 x 2 (7.6 GiB for V3)
    assert plan_model(name).plan.kv_bytes in (kv, 2 * kv)  # graph decode may hold a static copy too


def test_mla_kv_formula_matches_what_transformers_caches(one_thread):
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = tiny_config("deepseek_v3", 512, layers=3)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    kv = DynamicCache(config=cfg)
    n = 5
    with torch.no_grad():
        model(torch.arange(n)[None], past_key_values=kv, use_cache=True)
    cached = sum(layer.keys.numel() + layer.values.numel() for layer in kv.layers) * 4  # fp32 bytes
    arch = resolve_arch(build_skeleton(cfg, torch.float32), cfg)
    assert model_kv_bytes(cfg, arch, n, 4) == cached


def _mxfp4_copy(src, dst, gen: torch.Generator):
    """`src` (a tiny GPT-OSS in transformers' bf16 layout) with its experts as random MXFP4 blocks/scales."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, k_in, n_out = state.pop(key).shape  # transformers: (E, in, out)
        state[f"{key}_blocks"] = torch.randint(0, 256, (e, n_out, k_in // 32, 16), dtype=torch.uint8, generator=gen)
        state[f"{key}_scales"] = torch.randint(118, 130, (e, n_out, k_in // 32), dtype=torch.uint8, generator=gen)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return state


def test_mxfp4_experts_are_read_one_at_a_time_in_the_canonical_layout(tmp_path, one_thread):
    """GPT-OSS MXFP4 experts dequantize expert by expert to what transformers dequantizes for the
    whole layer, then take our layout (gate rows, then up rows), ready to re-quantize (loading
    and running such a checkpoint: tests/test_gpt_oss.py)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moe_llm.checkpoint.source import Checkpoint
    from moe_llm.experts.format import ExpertFormat

    bf16 = make_tiny(tmp_path / "bf16", "gpt_oss", fused=True, overrides={"hidden_size": 64, "intermediate_size": 64})
    state = _mxfp4_copy(bf16, tmp_path / "mxfp4", torch.Generator().manual_seed(0))
    ckpt = Checkpoint(tmp_path / "mxfp4")
    assert ckpt.moe_layers() == [0, 1] and ckpt.is_fused(0) and ckpt.num_experts(0) == 8
    pre = "model.layers.1.mlp.experts"
    gate_up_hf = convert_moe_packed_tensors(state[f"{pre}.gate_up_proj_blocks"], state[f"{pre}.gate_up_proj_scales"])
    down_hf = convert_moe_packed_tensors(state[f"{pre}.down_proj_blocks"], state[f"{pre}.down_proj_scales"])
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for e in (0, 5):
        gate_up, down = ckpt.expert(1, e)
        assert gate_up.shape == (128, 64) and torch.equal(down, down_hf[e].T)
        both = x @ gate_up_hf[e]  # transformers' GPT-OSS: gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        assert torch.equal(x @ gate_up[:64].T, both[..., ::2]) and torch.equal(x @ gate_up[64:].T, both[..., 1::2])
        fmt = ExpertFormat.build(64, 64, 4, torch.float32)
        q = fmt.encode(gate_up.float(), down.float())  # re-quantized to our format, one expert at a time
        assert set(q) == {s.name for s in fmt.layout.specs}

    from safetensors.torch import load_file

    ref = load_file(str(bf16 / "model.safetensors"))  # transformers' own (E, H, 2I) layout reads the same way
    gu, d = Checkpoint(bf16).expert(0, 3)
    w = ref["model.layers.0.mlp.experts.gate_up_proj"][3].T
    assert torch.equal(gu, torch.cat([w[0::2], w[1::2]])) and torch.equal(
        d, ref["model.layers.0.mlp.experts.down_proj"][3].T
    )
