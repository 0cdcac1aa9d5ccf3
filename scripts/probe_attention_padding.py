"""Whether attention over a row's keys gives the same bits when the keys are padded to a wider
window under a mask, or batched with other rows (what a batched decode step reads), on this GPU:

    python scripts/probe_attention_padding.py

For one decoded query (Mixtral's 32 heads, 8 KV heads, head dim 128, bf16) through
transformers' sdpa attention (the kernel PyTorch picks; on the H200 cuDNN's), compares the graph decoder's window (256, 512, ...) with wider windows,
with its positions unmasked, and with row 0 of batches; prints one line per case (equal, or
the largest difference) and the host time of one call.
"""

from __future__ import annotations

import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward


class _Module:
    num_key_value_groups = 4
    is_causal = True
    training = False


def attend(q, k, v, mask):
    return sdpa_attention_forward(_Module(), q, k, v, mask, scaling=128**-0.5)[0]


def cases(dev: str) -> None:
    torch.manual_seed(0)
    for pos in (37, 300, 700, 1500):
        q = torch.randn(1, 32, 1, 128, device=dev).to(torch.bfloat16)
        keys = torch.randn(1, 8, 4096, 128, device=dev).to(torch.bfloat16)
        vals = torch.randn(1, 8, 4096, 128, device=dev).to(torch.bfloat16)
        w0 = 256
        while w0 < pos + 1:
            w0 *= 2
        valid = torch.arange(4096, device=dev) <= pos
        ref = attend(q, keys[:, :, :w0], vals[:, :, :w0], valid[:w0].view(1, 1, 1, w0))
        out = [f"pos {pos} (window {w0}):"]
        nomask = attend(q, keys[:, :, : pos + 1], vals[:, :, : pos + 1], None)
        out.append(f"unmasked {_cmp(ref, nomask)}")
        for w in (w0 * 2, w0 * 4, pos + 1 + 7):
            if w <= 4096 and w >= pos + 1:
                got = attend(q, keys[:, :, :w], vals[:, :, :w], valid[:w].view(1, 1, 1, w))
                out.append(f"width {w} {_cmp(ref, got)}")
        for B in (2, 4, 8):
            W = 2 * w0  # the batch padded wider than this row's window
            qb = torch.cat([q] + [torch.randn_like(q) for _ in range(B - 1)])
            kb = torch.cat([keys[:, :, :W]] + [torch.randn_like(keys[:, :, :W]) for _ in range(B - 1)])
            vb = torch.cat([vals[:, :, :W]] + [torch.randn_like(vals[:, :, :W]) for _ in range(B - 1)])
            mb = torch.ones(B, 1, 1, W, dtype=torch.bool, device=dev)
            mb[0] = valid[:W].view(1, 1, W)
            got = attend(qb, kb, vb, mb)[:1]
            out.append(f"batch {B} {_cmp(ref, got)}")
        print("  ".join(out), flush=True)
    q = torch.randn(4, 32, 1, 128, device=dev).to(torch.bfloat16)
    k = torch.randn(4, 8, 512, 128, device=dev).to(torch.bfloat16)
    m = torch.ones(4, 1, 1, 512, dtype=torch.bool, device=dev)
    for _ in range(3):
        attend(q, k, k, m)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        attend(q, k, k, m)
    host = (time.perf_counter() - t0) / 200
    torch.cuda.synchronize()
    print(f"host time of one call (4 rows, 512 keys): {host * 1e6:.0f} us", flush=True)


def _cmp(a, b) -> str:
    if torch.equal(a, b):
        return "equal"
    return f"DIFFER({float((a.float() - b.float()).abs().max()):.2g})"


def main() -> None:
    cases("cuda")


if __name__ == "__main__":
    main()
