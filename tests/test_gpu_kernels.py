"""The Triton kernels agree with the reference `compact.dequantize` (GPU only).

Small matrices are quantized by hqq (the real path); Mixtral-8x7B-sized ones use
random codes with crafted meta (what `moe-llm bench` moves), covering decode
(fused dequant-GEMV, split-K, fused GLU) and prefill (dequantize + GEMM).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_llm.experts.format import ExpertFormat
from moe_llm.quant import QuantSpec, compact, pick_group_size

pytestmark = pytest.mark.gpu

SMALL = [(256, 64), (64, 128), (96, 512)]
LARGE = [(28672, 4096), (4096, 14336)]  # Mixtral-8x7B gate_up and down


@pytest.fixture(scope="module")
def tk():
    from moe_llm.kernels import triton_kernels

    kernels = triton_kernels()
    assert kernels is not None, "Triton kernels failed to import on a CUDA machine"
    return kernels


def _matrix(bits: int, shape: tuple[int, int], seed: int = 0):
    out_f, in_f = shape
    spec = QuantSpec(bits, pick_group_size(bits, in_f), out_f, in_f)
    if shape in LARGE:
        from moe_llm.bench.synthetic import random_compact

        gen = torch.Generator("cuda").manual_seed(seed)
        return random_compact(spec, "cuda", gen), spec
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f, device="cuda") * 0.02
    return compact.quantize(w, bits, spec.group_size), spec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SMALL + LARGE)
def test_dequantize_kernel_matches_reference(tk, bits, shape):
    t, spec = _matrix(bits, shape)
    assert tk.supported_spec(spec)
    ref = compact.dequantize(t, spec, torch.float32)
    got32 = tk.dequantize(t, spec, torch.float32)
    torch.testing.assert_close(got32, ref, rtol=1e-5, atol=1e-7)
    got16 = tk.dequantize(t, spec, torch.bfloat16)
    torch.testing.assert_close(got16.float(), ref, rtol=2**-8, atol=1e-7)  # bf16 rounding of the same values
    assert torch.isfinite(ref).all() and 0.005 < float(ref.std()) < 0.05


def _int8_x(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x as the GEMV sees it: int8 per block of the kernel's activation block, back in float32."""
    from moe_llm.kernels import triton_gemv as tg

    qb = tg.activation_block(spec, tg.block_p(spec, tg.INT8_BLOCK_P))
    xb = x.float().view(-1, qb)
    amax = xb.abs().amax(dim=1, keepdim=True)
    # 127 / amax as one division, as the kernel rounds it (torch computes `127.0 / amax` as
    # amax.reciprocal() * 127: two roundings, which move a code by one now and then)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return (q * (amax / 127.0)).view(-1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SMALL + LARGE)
def test_gemv_matches_reference(tk, bits, shape):
    """The int8 GEMV is the dequantized matrix times the int8 activations (its exact sums differ
    from float32 ones only in rounding), whole or as K-split partials."""
    t, spec = _matrix(bits, shape)
    ref_w = compact.dequantize(t, spec, torch.float32)
    x = torch.randn(spec.in_features, device="cuda").to(torch.bfloat16)
    want = (ref_w.double() @ _int8_x(x, spec).double()).float()
    split = 2 if shape in LARGE else 1
    part = torch.empty(split, spec.out_features, device="cuda")
    tk.gemv(x, t, spec, part, split=split)
    # the same codes as the kernel's: the CPU kernel, whose arithmetic the GPU's repeats to the
    # bit, is within 3e-7 of this reference over these shapes
    assert _rel(part.sum(0), want) < 1e-4
    y = tk.linear(x.view(1, 1, -1), t, spec, torch.bfloat16)  # one token through a QuantLinear
    assert y.shape == (1, 1, spec.out_features) and _rel(y.view(-1), want) < 1e-2
    assert _rel(y.view(-1), ref_w @ x.float()) < 2e-2  # and close to the float product


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [(256, 64, 64), (4096, 1024, 1024), (40, 8)])
def test_gemv_group_is_each_matrix_alone(tk, bits, rows):
    """One launch over several matrices of one input (q, k, v) gives every row as the int8
    GEMV of its matrix alone, to the bit, and close to the dequantized product."""
    from moe_llm.kernels import triton_gemv as tg

    k = 4096 if rows[0] >= 1024 else 128
    mats = [_matrix(bits, (n, k), seed=i) for i, n in enumerate(rows)]
    group = tk.GemvGroup([t for t, _ in mats], [s for _, s in mats])
    x = torch.randn(k, device="cuda").to(torch.bfloat16)
    outs = group(x, torch.bfloat16)
    for (t, spec), y in zip(mats, outs, strict=True):
        alone = torch.empty(spec.out_features, dtype=torch.bfloat16, device="cuda")
        tk.gemv(x, t, spec, alone, split=1, quant=tg._quantized(x, spec), bn=tg.INT8_BLOCK_N)
        assert torch.equal(y.view(-1), alone)
        assert _rel(y, compact.dequantize(t, spec, torch.float32) @ x.float()) < 2e-2


def test_shared_input_projections_take_one_launch(tk):
    """Linked q/k/v QuantLinears return the group's rows for one token, whatever the order of
    the calls and inputs, and their own per-token math for many tokens."""
    from moe_llm.runtime.quant_linear import QuantLinear, share_inputs

    torch.manual_seed(0)
    attn = torch.nn.Module()
    for name, n in (("q_proj", 256), ("k_proj", 64), ("v_proj", 64)):
        w = torch.randn(n, 128, device="cuda") * 0.02
        setattr(attn, name, QuantLinear.from_linear(w, torch.randn(n, device="cuda"), 4, torch.bfloat16, "cuda"))
    assert share_inputs(attn) == 1
    group = attn.q_proj.shared[0]
    x, x2 = (torch.randn(1, 1, 128, device="cuda").to(torch.bfloat16) for _ in range(2))
    want = [o + m.bias for o, m in zip(group.gemv(x.view(-1), torch.bfloat16), group.members, strict=True)]
    want2 = [o + m.bias for o, m in zip(group.gemv(x2.view(-1), torch.bfloat16), group.members, strict=True)]
    want, want2 = [w.view(-1) for w in want], [w.view(-1) for w in want2]
    assert torch.equal(attn.q_proj(x).view(-1), want[0])
    assert torch.equal(attn.k_proj(x2).view(-1), want2[1])  # another input: the group runs again
    assert torch.equal(attn.v_proj(x).view(-1), want[2])
    assert torch.equal(attn.k_proj(x).view(-1), want[1])
    assert torch.equal(attn.q_proj(x).view(-1), want[0])  # q's rows of the last launch
    assert group._x is None  # every member took its rows: nothing held between tokens
    many = torch.randn(1, 5, 128, device="cuda").to(torch.bfloat16)
    y = attn.k_proj(many)
    ref = many.float() @ compact.dequantize(attn.k_proj.tensors(), attn.k_proj.spec, torch.float32).T
    assert y.shape == (1, 5, 64) and _rel(y - attn.k_proj.bias, ref) < 2e-2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(256, 64), (28672, 4096)])
def test_fused_glu_gemv_matches_reference(tk, bits, shape):
    t, spec = _matrix(bits, shape)
    ref = compact.dequantize(t, spec, torch.float32) @ torch.ones(spec.in_features, device="cuda")
    x = torch.ones(spec.in_features, device="cuda", dtype=torch.bfloat16)
    n = spec.out_features // 2
    want = F.silu(ref[:n]) * ref[n:]
    h = torch.empty(n, device="cuda")
    tk.gemv(x, t, spec, h, glu=True)  # int8 x: ones are exact
    assert _rel(h, want) < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("geometry", [(64, 128), (4096, 14336)])
def test_expert_decode_and_prefill_match_reference(tk, bits, geometry):
    from moe_llm.bench.synthetic import random_expert
    from moe_llm.kernels import expert_mlp, matrix_views

    hidden, inter = geometry
    fmt = ExpertFormat.build(hidden, inter, bits, torch.bfloat16)
    buf = random_expert(fmt, "cuda", torch.Generator("cuda").manual_seed(1))
    views = fmt.layout.views(buf)
    gu = compact.dequantize(matrix_views(views, "gate_up_proj"), fmt.specs["gate_up_proj"], torch.float32)
    dn = compact.dequantize(matrix_views(views, "down_proj"), fmt.specs["down_proj"], torch.float32)
    x = torch.randn(64, hidden, device="cuda").to(torch.bfloat16)
    gate, up = F.linear(x.float(), gu).chunk(2, dim=-1)
    want = F.linear(F.silu(gate) * up, dn)  # [64, H] fp32 reference

    # decode: the routed-experts kernel, both positions on this expert (read through a table)
    from moe_llm.kernels.triton_moe import MoeDecode

    table = torch.zeros(1, dtype=torch.int64, device="cuda")  # offset 0 from the buffer itself
    idx = torch.zeros(2, dtype=torch.long, device="cuda")
    w = torch.tensor([0.75, 0.25], device="cuda")
    out = torch.empty(hidden, device="cuda", dtype=torch.bfloat16)
    MoeDecode(fmt, 2, torch.device("cuda"))(x[0], idx, w, table, buf, out)
    # int8 activations (per 32 columns, as llama.cpp's Q8_1) add about 1-2% relative error on
    # random experts
    assert _rel(out, want[0]) < 5e-2

    # prefill: dequantize into a workspace + bf16 GEMM
    workspace = torch.empty(2 * hidden * inter, device="cuda", dtype=torch.bfloat16)
    y = expert_mlp(x, views, fmt, F.silu, workspace)
    assert _rel(y, want) < 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [64, 4096, 5120])
def test_one_launch_rmsnorm_matches_transformers(dtype, n):
    """The decode RMSNorm (`triton_trunk`) against transformers' forward: only the order of
    the sum of squares differs, so results agree to the last bit but for rare roundings."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from moe_llm.kernels import trunk_ops

    gen = torch.Generator("cuda").manual_seed(n)
    norm = MixtralRMSNorm(n, eps=1e-5).to("cuda", dtype)
    norm.weight.data = torch.randn(n, device="cuda", generator=gen).to(dtype)
    x = (torch.randn(1, 1, n, device="cuda", generator=gen) * 3).to(dtype)
    want = norm(x)
    assert trunk_ops.install(norm)["norm"] == 1
    got = norm(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    if dtype == torch.bfloat16:  # rounding to bf16 hides the sum's order but for rare elements
        assert (got == want).float().mean() > 0.99
    rows = torch.randn(3, n, device="cuda", generator=gen).to(dtype)
    assert torch.equal(norm(rows), MixtralRMSNorm.forward(norm, rows))  # prompts: transformers' forward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (4, 1, 64)])
def test_one_launch_rotary_is_transformers_to_the_bit(dtype, heads, kv_heads, dim):
    """The decode rotary kernel against transformers' `apply_rotary_pos_emb` on the layout
    attention passes ([B, 1, H, D] transposed), for B = 1 and 3 rows at their own positions
    and for cos/sin shared by the rows: equal to the bit, each row as alone."""
    import inspect

    from transformers import MixtralConfig
    from transformers.models.mixtral import modeling_mixtral as mx

    from moe_llm.kernels import triton_trunk as tt

    apply = inspect.unwrap(mx.apply_rotary_pos_emb)
    cfg = MixtralConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    rotary = mx.MixtralRotaryEmbedding(cfg).to("cuda")
    gen = torch.Generator("cuda").manual_seed(heads)
    for pos in ([[7]], [[5], [900], [3000]]):
        B = len(pos)
        q = (torch.randn(B, 1, heads, dim, device="cuda", generator=gen) * 4).to(dtype).transpose(1, 2)
        k = (torch.randn(B, 1, kv_heads, dim, device="cuda", generator=gen) * 4).to(dtype).transpose(1, 2)
        q[0, 0, 0, :3] = 0.0  # zeros keep their sign as transformers' negation gives it
        cos, sin = rotary(q, torch.tensor(pos, device="cuda"))
        for c, s in ((cos, sin), (cos[:1], sin[:1])):
            assert tt.rotary_supported(q, k, c, s)
            got, want = tt.rotary_rows(q, k, c, s), apply(q, k, c, s)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                bits = torch.int32 if dtype == torch.float32 else torch.int16  # -0.0 and 0.0 differ
                assert torch.equal(g.contiguous().view(bits), w.contiguous().view(bits))
        for b in range(B):
            alone = tt.rotary_rows(q[b : b + 1], k[b : b + 1], cos[b : b + 1], sin[b : b + 1])
            assert torch.equal(alone[0], tt.rotary_rows(q, k, cos, sin)[0][b : b + 1])
    assert not tt.rotary_supported(q, k, cos.float(), sin.float()) or dtype == torch.float32  # mixed dtypes


def test_marked_mixtral_attention_decodes_with_one_rotary_launch():
    """An installed tiny Mixtral's attention on CUDA: a decoded position under a mask (as graph
    decode passes it) takes the rotary kernel, whose bits are transformers' rotary, and packed
    grouped-query attention (`triton_attention.decode_attention`), close to transformers' repeated heads;
    a prompt takes transformers' functions, to the bit."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM

    from moe_llm.kernels import triton_trunk, trunk_ops

    cfg = MixtralConfig(hidden_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=64, num_local_experts=4)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).to("cuda", torch.bfloat16)
    attn = model.model.layers[0].self_attn
    gen = torch.Generator("cuda").manual_seed(1)
    W = 256
    h1 = torch.randn(1, 1, 512, device="cuda", generator=gen).to(torch.bfloat16)
    hp = torch.randn(1, 5, 512, device="cuda", generator=gen).to(torch.bfloat16)
    pe1 = model.model.rotary_emb(h1, torch.tensor([[40]], device="cuda"))
    pep = model.model.rotary_emb(hp, torch.arange(5, device="cuda")[None])
    k = torch.randn(1, 2, W, 64, device="cuda", generator=gen).to(torch.bfloat16)

    class KV:  # a static window: the new key and value at position 40, attention reads all W
        def update(self, key, value, layer_idx, *args, **kwargs):
            kk, vv = k.clone(), k.flip(-1).clone()
            kk[:, :, 40:41], vv[:, :, 40:41] = key, value
            return kk, vv

    mask = (torch.arange(W, device="cuda") <= 40).view(1, 1, 1, W)
    causal = torch.ones(1, 1, 5, 5, dtype=torch.bool, device="cuda").tril()
    want1 = type(attn).forward(attn, h1, pe1, mask, KV())[0]
    wantp = type(attn).forward(attn, hp, pep, causal)[0]
    assert trunk_ops.install(model)["attention"] == 1
    calls = []
    rotary = triton_trunk.rotary_rows
    triton_trunk.rotary_rows = lambda *a: calls.append(1) or rotary(*a)
    supported = triton_trunk.rotary_supported
    try:
        got1 = attn(h1, pe1, mask, KV())[0]
        gotp = attn(hp, pep, causal)[0]
        triton_trunk.rotary_supported = lambda *a: False  # transformers' rotary, the same attention
        ref1 = attn(h1, pe1, mask, KV())[0]
    finally:
        triton_trunk.rotary_rows, triton_trunk.rotary_supported = rotary, supported
    assert calls == [1]
    assert torch.equal(got1, ref1) and torch.equal(gotp, wantp)
    torch.testing.assert_close(got1, want1, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("experts,top_k,hidden", [(8, 2, 4096), (4, 2, 64), (64, 8, 2048)])
def test_one_launch_router_matches_transformers(dtype, experts, top_k, hidden):
    """Mixtral's router in one launch: the same experts with the same weights to float
    rounding, where the k-th and the next logit are not a near tie."""
    from types import SimpleNamespace

    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from moe_llm.kernels import trunk_ops

    cfg = SimpleNamespace(num_experts_per_tok=top_k, num_local_experts=experts, hidden_size=hidden)
    router = MixtralTopKRouter(cfg).to("cuda", dtype)
    gen = torch.Generator("cuda").manual_seed(experts * hidden)
    router.weight.data = (torch.randn(experts, hidden, device="cuda", generator=gen) * 0.05).to(dtype)
    assert trunk_ops.install(router)["router"] == 1
    checked = 0
    for _ in range(20):
        x = torch.randn(1, hidden, device="cuda", generator=gen).to(dtype)
        want_logits, want_scores, want_idx = MixtralTopKRouter.forward(router, x)
        ranked = want_logits.float().sort(descending=True).values[0]
        if ranked[top_k - 1] - ranked[top_k] < (0.05 if dtype == torch.bfloat16 else 1e-3):
            continue  # a near tie: the order of the dot products may pick the other expert
        logits, scores, idx = router(x)
        assert logits.dtype == want_logits.dtype and scores.dtype == torch.float32 and idx.dtype == torch.int64
        torch.testing.assert_close(logits.float(), want_logits.float(), rtol=2e-2, atol=1e-2)
        # the same experts with the same weights; two of them may swap places where their
        # logits tie (the combine then sums them in the other order)
        got_w = dict(zip(idx[0].tolist(), scores[0].tolist(), strict=True))
        want_w = dict(zip(want_idx[0].tolist(), want_scores[0].tolist(), strict=True))
        assert got_w.keys() == want_w.keys()
        for e, w in want_w.items():
            assert abs(got_w[e] - w) <= 1e-4 + 1e-3 * w
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_row_kernels_compute_each_row_as_alone(tk, bits):
    """Batched decode rows (`kernels.rows`): the int8 GEMVs, the q/k/v group, the
    norm and the router give each of B rows the bits of that row's lone launch."""
    from moe_llm.kernels import triton_trunk as tt

    B = 5
    t, spec = _matrix(bits, (4096, 1024))
    head, hspec = _matrix(bits, (8192, 1024), seed=1)
    x = torch.randn(B, 1, 1024, device="cuda").to(torch.bfloat16)
    for tensors, sp in ((t, spec), (head, hspec)):
        batch = tk.linear(x, tensors, sp, torch.bfloat16)
        assert batch.shape == (B, 1, sp.out_features)
        for b in range(B):
            assert torch.equal(batch[b], tk.linear(x[b : b + 1], tensors, sp, torch.bfloat16)[0])
    mats = [_matrix(bits, (n, 1024), seed=i) for i, n in enumerate((1024, 256, 256))]
    group = tk.GemvGroup([m for m, _ in mats], [s_ for _, s_ in mats])
    outs = group(x.view(B, -1), torch.bfloat16)
    for b in range(B):
        for got, want in zip(outs, group(x[b].view(-1), torch.bfloat16), strict=True):
            assert torch.equal(got[b], want.view(-1))
    w = torch.randn(1024, device="cuda").to(torch.bfloat16)
    normed = tt.rmsnorm_rows(x, w, 1e-5)
    router_w = torch.randn(8, 1024, device="cuda").to(torch.bfloat16)
    routed = tt.topk_router_rows(x.view(B, -1), router_w, 2)
    for b in range(B):
        assert torch.equal(normed[b], tt.rmsnorm_rows(x[b : b + 1], w, 1e-5)[0])
        alone = tt.topk_router_rows(x[b].view(1, -1), router_w, 2)
        assert all(torch.equal(r[b], a[0]) for r, a in zip(routed, alone, strict=True))
