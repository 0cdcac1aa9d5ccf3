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
    from moe_llm.kernels.triton_attention import decode_attention, supported
    torch.manual_seed(0)
    for B, HQ, HK, W, D in [(1, 32, 8, 130, 128), (2, 8, 2, 64, 64), (1, 4, 4, 200, 32), (2, 12, 1, 70, 16)]:
        q = torch.randn(B, HQ, 1, D).half()
        k = torch.randn(B, HK, W + 9, D).half()[:, :, :W]  # a window of a longer cache
        v = torch.randn(B, HK, W, D).half()
        last = torch.tensor([W - 1 - 3 * b for b in range(B)]).view(B, 1)
        valid = (torch.arange(W)[None, :] <= last).view(B, 1, 1, W)
        per_head = valid.expand(B, HQ, 1, W) & (torch.rand(B, HQ, 1, W) > 0.3)
        per_head[..., 0] = True
        for mask in (valid, per_head, None):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.125, enable_gqa=True,
                                                 attn_mask=mask)
            got = decode_attention(q, k, v, mask, 0.125)
            assert got.shape == (B, 1, HQ, D) and got.dtype == torch.float16
            torch.testing.assert_close(got.float(), ref.transpose(1, 2), rtol=2e-3, atol=2e-3)
        # a row's bits: the same alone as in its batch
        alone = decode_attention(q[1:], k[1:].contiguous(), v[1:].contiguous(), valid[1:], 0.125) if B > 1 else None
        assert alone is None or torch.equal(alone, decode_attention(q, k, v, valid, 0.125)[1:])
        additive = torch.where(valid, 0.0, float("-inf")).half()
        assert not supported(q, k, v, additive)  # transformers' SDPA computes an additive mask
    # a row's bits depend only on the keys it may read: its window cut at its last key, or wider,
    # whatever the window's unreadable keys hold (a static cache's stale bytes, even NaN)
    q, k, v = torch.randn(1, 8, 1, 64).half(), torch.randn(1, 2, 300, 64).half(), torch.randn(1, 2, 300, 64).half()
    pos = 150
    cut = decode_attention(q, k[:, :, : pos + 1], v[:, :, : pos + 1], None, 0.125)
    k[:, :, pos + 1 :], v[:, :, pos + 1 :] = float("nan"), float("nan")
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


# positions around every split and window edge of a 1,152-position static cache, and between
_POSITIONS = sorted({*range(40, 1152, 29), *(e + o for e in (64, 128, 256, 512, 1024) for o in (-2, -1, 0, 1))})


@pytest.mark.gpu
def test_a_row_has_the_same_bits_on_every_decode_path():
    """Mixtral-8x7B's geometry, at positions across the static cache: the graph decoder reads a
    window of the 1,152-position static cache under a bool mask (stale bytes past the position);
    the fused step reads the same row sliced out of a batch's keys (other strides, the mask a
    row of the batch's) beside other rows; an eager decode reads exactly its keys with no mask.
    Same bits on every path, from one compiled kernel."""
    from moe_llm.kernels import triton_attention as ta
    from moe_llm.runtime.decode_graph import window_for

    for kernel in (ta._attention_split_kernel, ta._attention_merge_kernel):
        kernel.device_caches.clear()  # other tests compiled other geometries
    gen = torch.Generator("cuda").manual_seed(0)
    sk, sv = _rand(gen, 1, 8, 1152, 128), _rand(gen, 1, 8, 1152, 128)
    width = 1152
    bk, bv = _rand(gen, 3, 8, width, 128), _rand(gen, 3, 8, width, 128)
    bk[1], bv[1] = sk[0], sv[0]
    ar = torch.arange(width, device="cuda")
    for pos in _POSITIONS:
        q = _rand(gen, 3, 32, 1, 128)
        w = window_for(pos, 1152)
        lone = ta.decode_attention(q[1:2], sk[:, :, :w], sv[:, :, :w], (ar[:w] <= pos).view(1, 1, 1, w), 0.088)
        eager = ta.decode_attention(q[1:2], sk[:, :, : pos + 1], sv[:, :, : pos + 1], None, 0.088)
        mask = (ar[None, :] <= torch.tensor([[7], [pos], [width - 1]], device="cuda"))[:, None, None, :]
        fused = ta.decode_attention(q[1:2], bk[1:2, :, :w], bv[1:2, :, :w], mask[1:2, ..., :w], 0.088)
        batch = ta.decode_attention(q, bk, bv, mask, 0.088)[1:2]
        assert torch.equal(lone, eager), pos
        assert torch.equal(lone, fused), pos
        assert torch.equal(lone, batch), pos
    for kernel in (ta._attention_split_kernel, ta._attention_merge_kernel):
        compiled = kernel.device_caches[torch.cuda.current_device()][0]
        assert len(compiled) == 1, (kernel.fn.__name__, len(compiled))
