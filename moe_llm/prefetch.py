"""Prefetcher: speculative expert loading one MoE layer ahead.

While layer L runs, layer L+1's router is applied to layer L's (normalised)
hidden state; its top guesses are copied into layer L+1's slots on the copy
stream, so they overlap layer L's compute. The hidden state entering L's MoE
block is ``x / rms(x) * w_L``; rescaling by ``w_{L+1} / w_L`` (the two
post-attention norm weights) gives what L+1's norm would produce from the same
residual, which sharpens the guess at no cost.

Bookkeeping: ``prefetch_issued`` / ``prefetch_used`` / ``prefetch_wasted`` live in
the cache; recall (fraction of routed experts that were guessed) is recorded
here for decode steps.
"""

from __future__ import annotations

import torch

from .cache import ExpertCache


class Prefetcher:
    def __init__(
        self,
        cache: ExpertCache,
        routers: dict[int, torch.Tensor],  # MoE layer -> router weight [E, H]
        norm_ratio: dict[int, torch.Tensor | None],  # layer L -> w_{next} / w_L, or None
        next_layer: dict[int, int],  # MoE layer -> next MoE layer
        guesses: int,
    ):
        self.cache = cache
        self.routers = routers
        self.norm_ratio = norm_ratio
        self.next_layer = next_layer
        self.guesses = guesses
        self._pending: dict[int, set[int]] = {}

    def guess(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Device tensor of expert ids for the next MoE layer, most likely first.
        hidden: [T, H] as it enters layer `layer`'s experts."""
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return None
        ratio = self.norm_ratio.get(layer)
        h = hidden if ratio is None else hidden * ratio
        logits = torch.nn.functional.linear(h, self.routers[nxt])  # [T, E]
        if logits.shape[0] == 1:
            n = min(self.guesses, logits.shape[1])
            return torch.topk(logits[0], n).indices
        # prefill: rank experts by total routing mass, fill every slot of the layer
        mass = torch.softmax(logits.float(), dim=-1).sum(dim=0)  # [E]
        return torch.topk(mass, min(self.cache.slots_per_layer, mass.numel())).indices

    def issue(self, layer: int, guessed: list[int], decode: bool) -> None:
        nxt = self.next_layer[layer]
        if decode:
            self._pending[nxt] = set(guessed)
        self.cache.prefetch(nxt, guessed)

    def observe(self, layer: int, routed: set[int]) -> None:
        """Score the guess made for `layer` against what it actually routed to."""
        guessed = self._pending.pop(layer, None)
        if guessed is None or not routed:
            return
        stats = self.cache.stats
        stats.prefetch_recall_sum += len(guessed & routed) / len(routed)
        stats.prefetch_recall_n += 1

    def clear(self) -> None:
        self._pending.clear()
