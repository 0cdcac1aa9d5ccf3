"""Decode attention (`kernels.triton_attention`): one query position over grouped key/value
heads, against SDPA in float32, and the same bits for a row whatever its strides, its batch or
its mask's form (what lets a batched row decode to its lone tokens). The GPU tests run the
compiled kernel; the interpreter test runs the same kernel in Triton's interpreter on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import moe_llm.experts  # noqa: F401  (before moe_llm.kernels: the package's import order)

_INTERPRETED = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    import moe_llm.experts  # the package's import order
    from moe_llm.kernels.triton_attention import decode_attention
    torch.manual_seed(0)
    for B, HQ, HK, W, D in [(1, 32, 8, 130, 128), (2, 8, 2, 64, 64), (1, 4, 4, 200, 32), (2, 12, 1, 70, 16)]:
        q = torch.randn(B, HQ, 1, D).half()
        k = torch.randn(B, HK, W + 9, D).half()[:, :, :W]  # a window of a longer cache
        v = torch.randn(B, HK, W, D).half()
        last = torch.tensor([W - 1 - 3 * b for b in range(B)]).view(B, 1)
        valid = (torch.arange(W)[None, :] <= last).view(B, 1, 1, W)
        additive = torch.where(valid, 0.0, float("-inf")).half()
        per_head = valid.expand(B, HQ, 1, W) & (torch.rand(B, HQ, 1, W) > 0.3)
        per_head[..., 0] = True
        for mask in (valid, additive, per_head, None):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.125, enable_gqa=True,
                                                 attn_mask=mask.float() if mask is additive else mask)
            got = decode_attention(q, k, v, mask, 0.125)
            assert got.shape == (B, 1, HQ, D) and got.dtype == torch.float16
            torch.testing.assert_close(got.float(), ref.transpose(1, 2), rtol=2e-3, atol=2e-3)
        # a row's bits: the same alone as in its batch, and with a bool mask as with an additive one
        alone = decode_attention(q[1:], k[1:].contiguous(), v[1:].contiguous(), valid[1:], 0.125) if B > 1 else None
        assert alone is None or torch.equal(alone, decode_attention(q, k, v, valid, 0.125)[1:])
        assert torch.equal(decode_attention(q, k, v, valid, 0.125), decode_attention(q, k, v, additive, 0.125))
    # a row's bits depend only on the keys it may read: its window cut at its last key, or wider
    q, k, v = torch.randn(1, 8, 1, 64).half(), torch.randn(1, 2, 300, 64).half(), torch.randn(1, 2, 300, 64).half()
    pos = 150
    cut = decode_attention(q, k[:, :, : pos + 1], v[:, :, : pos + 1], None, 0.125)
    for w in (192, 256, 300):
        valid = (torch.arange(w) <= pos).view(1, 1, 1, w)
        assert torch.equal(cut, decode_attention(q, k[:, :, :w], v[:, :, :w], valid, 0.125)), w
    print("ok")
    """
)


def test_decode_attention_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _rand(gen, *shape):
    return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (64, 8, 64), (16, 16, 128), (32, 4, 128)])
@pytest.mark.parametrize("w", [1, 63, 256, 1024, 4096])
def test_decode_attention_is_sdpa(hq, hk, d, w):
    from moe_llm.kernels.triton_attention import decode_attention

    gen = torch.Generator("cuda").manual_seed(w)
    q, k, v = _rand(gen, 2, hq, 1, d), _rand(gen, 2, hk, w, d), _rand(gen, 2, hk, w, d)
    valid = torch.arange(w, device="cuda")[None, :] <= torch.tensor([[w - 1], [w // 2]], device="cuda")
    valid = valid.view(2, 1, 1, w)
    for mask in (valid, None):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=d**-0.5,
                                             enable_gqa=True)  # fmt: skip
        got = decode_attention(q, k, v, mask, d**-0.5)
        torch.testing.assert_close(got.float(), ref.transpose(1, 2), rtol=1.6e-2, atol=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("lone_w, batch_w", [(1024, 1024), (256, 512), (256, 2048)])
def test_a_row_has_the_same_bits_alone_batched_and_strided(lone_w, batch_w):
    """Mixtral-8x7B's geometry: a lone decode reads a window of a 1,152-position static cache
    under a bool mask; the same row in a batch reads a slice of the batch's keys (another head
    stride), and other rows beside it; an eager decode reads its keys up to its position with
    no mask. Same bits, also with an additive mask."""
    from moe_llm.kernels.triton_attention import decode_attention

    gen = torch.Generator("cuda").manual_seed(0)
    sk, sv = _rand(gen, 1, 8, 1152, 128), _rand(gen, 1, 8, 1152, 128)
    q = _rand(gen, 3, 32, 1, 128)
    pos = lone_w - 5
    lone_mask = (torch.arange(lone_w, device="cuda") <= pos).view(1, 1, 1, lone_w)
    want = decode_attention(q[:1], sk[:, :, :lone_w], sv[:, :, :lone_w], lone_mask, 0.088)
    bk, bv = _rand(gen, 3, 8, batch_w, 128), _rand(gen, 3, 8, batch_w, 128)
    bk[0, :, :lone_w], bv[0, :, :lone_w] = sk[0, :, :lone_w], sv[0, :, :lone_w]
    mask = torch.arange(batch_w, device="cuda")[None, :] <= torch.tensor([[pos], [batch_w - 1], [7]], device="cuda")
    mask = mask[:, None, None, :]
    row = decode_attention(q[:1], bk[:1, :, :lone_w], bv[:1, :, :lone_w], mask[:1, ..., :lone_w], 0.088)
    assert torch.equal(row, want)
    if lone_w == batch_w:
        assert torch.equal(decode_attention(q, bk, bv, mask, 0.088)[:1], want)
    full = torch.ones(1, 1, 1, lone_w, dtype=torch.bool, device="cuda")  # a row decoded without a mask
    lone_k, lone_v = sk[:, :, :lone_w], sv[:, :, :lone_w]
    assert torch.equal(
        decode_attention(q[:1], lone_k, lone_v, None, 0.088), decode_attention(q[:1], lone_k, lone_v, full, 0.088)
    )
    cut = decode_attention(q[:1], sk[:, :, : pos + 1], sv[:, :, : pos + 1], None, 0.088)  # an eager decode's keys
    assert torch.equal(cut, want)
    additive = torch.where(lone_mask, 0.0, float("-inf")).to(torch.bfloat16)
    assert torch.equal(decode_attention(q[:1], sk[:, :, :lone_w], sv[:, :, :lone_w], additive, 0.088), want)
