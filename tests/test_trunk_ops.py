"""Which trunk modules get the one-launch decode kernels (`kernels.trunk_ops.install`), and
that a patched module computes exactly transformers' forward wherever the kernels do not
apply (CPU rows here; the kernels themselves are checked in tests/test_gpu_kernels.py)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_llm.experts  # noqa: F401  (before moe_llm.kernels: the package's import order)
from moe_llm.kernels import trunk_ops


def _model(model_type: str, **extra):
    cfg = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, num_experts_per_tok=2, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _named(model, suffix: str):
    return [m for m in model.modules() if type(m).__name__.endswith(suffix)]


def test_mixtral_norms_and_routers_are_patched_once_and_compute_the_same_off_cuda():
    model = _model("mixtral", num_local_experts=4)
    norms, routers = _named(model, "RMSNorm"), _named(model, "TopKRouter")
    assert len(norms) == 2 * 2 + 1 and len(routers) == 2  # two per layer and the final norm; one per layer
    for m in norms + routers:
        m.weight.data = torch.randn(m.weight.shape)
    x = torch.randn(3, 5, 64)
    before = [m(x) for m in norms] + [m(x.reshape(-1, 64)) for m in routers]
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]  # q, k, v, o per layer; the head
    attention = _named(model, "Attention")
    assert trunk_ops.install(model) == {
        "norm": len(norms), "router": len(routers), "rows": len(linears), "attention": len(attention),
    }  # fmt: skip
    assert all("forward" in vars(m) for m in norms + routers + linears + attention)
    assert trunk_ops.install(model) == {"norm": 0, "router": 0, "rows": 0, "attention": 0}  # idempotent
    after = [m(x) for m in norms] + [m(x.reshape(-1, 64)) for m in routers]
    for got, want in zip(after, before, strict=True):
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):  # fmt: skip
            assert torch.equal(g, w)  # CPU rows: transformers' own forward
    one = x[:1, :1]
    assert torch.equal(norms[0](one), type(norms[0]).forward(norms[0], one))


def test_modules_with_other_formulas_keep_their_forward():
    model = _model("gpt_oss", num_local_experts=4, layer_types=["full_attention", "full_attention"])
    counts = trunk_ops.install(model)
    assert (counts["norm"], counts["router"]) == (0, 0) and counts["rows"] > 0  # GPT-OSS: other norm, biased router
    assert counts["attention"] == 0  # its own rotary formula
    qwen = _model("qwen3_moe", num_experts=4, moe_intermediate_size=32)
    counts = trunk_ops.install(qwen)
    assert counts["router"] == 0  # norm_topk_prob: another router formula
    assert counts["norm"] == len([m for m in _named(qwen, "RMSNorm") if "forward" in vars(m)]) > 0


def test_inside_decode_rows_each_row_reads_only_its_own_window():
    """Batched decode rows (`kernels.rows`): attention runs once per row over that row's own
    window of the padded keys (what lies past it never matters), and patched modules give each
    row its lone result."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from moe_llm.kernels import rows

    model = _model("mixtral", num_local_experts=4)
    trunk_ops.install(model)
    attn = model.model.layers[0].self_attn
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    torch.manual_seed(1)
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 3:] = False
    alone = [
        sdpa(attn, q[:1], k[:1, :, :4], v[:1, :, :4], None, scaling=0.25)[0],
        sdpa(attn, q[1:], k[1:, :, :5], v[1:, :, :5], mask[1:, ..., :5], scaling=0.25)[0],
    ]
    k[0, :, 4:] = 1e4  # past row 0's window: it must not be read
    with rows.decode_rows([4, 5], [False, True]):
        got, _ = sdpa(attn, q, k, v, mask, scaling=0.25)
        x = torch.randn(2, 1, 64)
        for module in (model.model.layers[0].input_layernorm, attn.q_proj, model.lm_head):
            batch = module(x)
            for b in range(2):
                assert torch.equal(batch[b : b + 1], type(module).forward(module, x[b : b + 1]))
    assert torch.equal(got, torch.cat(alone))
    assert not torch.equal(sdpa(attn, q, k, v, mask, scaling=0.25)[0], got)  # outside: one call over all keys


def test_marked_attention_computes_transformers_forward_off_cuda():
    """An installed model's attention is marked (its file's rotary is Mixtral's), and off CUDA
    a marked call is transformers' forward to the bit: the rotary kernel takes only decoded
    positions on CUDA."""
    from transformers.models.mixtral import modeling_mixtral as mx

    model = _model("mixtral", num_local_experts=4)
    attn = model.model.layers[0].self_attn
    torch.manual_seed(2)
    for n in (1, 5):  # a decoded position (with a mask, as graph decode passes one) and a prompt
        h = torch.randn(1, n, 64)
        cos, sin = model.model.rotary_emb(h, torch.arange(n)[None] + 3)
        mask = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
        want = type(attn).forward(attn, h, (cos, sin), mask)[0]
        trunk_ops.install(model, kernels=True)
        assert "forward" in vars(attn) and mx.apply_rotary_pos_emb._moe_llm_rotary
        assert torch.equal(attn(h, (cos, sin), mask)[0], want)
