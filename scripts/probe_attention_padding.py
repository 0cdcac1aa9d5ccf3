"""Whether attention over a row's keys gives the same bits when the keys are padded to a wider
window under a mask (what a batched decode step would read), on this GPU:

    python scripts/probe_attention_padding.py

For one decoded query (Mixtral's 32 heads, 8 KV heads, head dim 128, bf16), through
transformers' sdpa attention, compares the graph decoder's window (256, 512, ...) with wider
windows and with batches of rows, and prints one line per case: equal or the largest difference.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward


class _Module:
    num_key_value_groups = 4
    is_causal = True
    training = False


def attend(q, k, v, mask):
    return sdpa_attention_forward(_Module(), q, k, v, mask, scaling=128**-0.5)[0]


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    for pos in (37, 300, 700):
        q = torch.randn(1, 32, 1, 128, device=dev).to(torch.bfloat16)
        keys = torch.randn(1, 8, 2048, 128, device=dev).to(torch.bfloat16)
        vals = torch.randn(1, 8, 2048, 128, device=dev).to(torch.bfloat16)
        w0 = 256
        while w0 < pos + 1:
            w0 *= 2
        valid = torch.arange(2048, device=dev) <= pos
        ref = attend(q, keys[:, :, :w0], vals[:, :, :w0], valid[:w0].view(1, 1, 1, w0))
        nomask = attend(q, keys[:, :, : pos + 1], vals[:, :, : pos + 1], None)
        print(f"pos {pos}: window {w0} vs its positions unmasked: {_cmp(ref, nomask)}")
        for w in (w0 * 2, w0 * 4, pos + 1 + 3):
            if w > 2048 or w < pos + 1:
                continue
            got = attend(q, keys[:, :, :w], vals[:, :, :w], valid[:w].view(1, 1, 1, w))
            print(f"pos {pos}: window {w0} vs {w}: {_cmp(ref, got)}")
        for B in (2, 4, 8):
            qb = torch.cat([q] + [torch.randn_like(q) for _ in range(B - 1)])
            kb = torch.cat([keys[:, :, :w0]] + [torch.randn_like(keys[:, :, :w0]) for _ in range(B - 1)])
            vb = torch.cat([vals[:, :, :w0]] + [torch.randn_like(vals[:, :, :w0]) for _ in range(B - 1)])
            mb = valid[:w0].view(1, 1, 1, w0).expand(B, 1, 1, w0).contiguous()
            got = attend(qb, kb, vb, mb)[:1]
            print(f"pos {pos}: window {w0}, row 0 of a batch of {B}: {_cmp(ref, got)}")


def _cmp(a, b) -> str:
    if torch.equal(a, b):
        return "equal"
    return f"differ (max {float((a.float() - b.float()).abs().max()):.3g})"


if __name__ == "__main__":
    main()
