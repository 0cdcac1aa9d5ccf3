"""Pure next-token selection: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,  # [V]
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits.float()
    # shifted first, and the temperature a normal float32, so a tiny one gives -inf (greedy), never inf - inf or 0/0
    logits = (logits - logits.max()) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        keep[0] = True  # the top token, also for a top_p that rounds to 0 in float32
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
