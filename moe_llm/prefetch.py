"""Prefetcher: speculative expert loading one MoE layer ahead.

While layer L runs, layer L+1's router is applied to layer L's (normalised)
hidden state; its top guesses are copied into layer L+1's slots on the copy
stream, so they overlap layer L's compute. The hidden state entering L's MoE
block is ``x / rms(x) * w_L``; rescaling by ``w_{L+1} / w_L`` (the two
post-attention norm weights) gives what L+1's norm would produce from the same
residual, which sharpens the guess at no cost.

With ``depth=2`` a decode step also guesses the layer after next. Those copies
are issued only when the next layer's guesses are all resident already, i.e.
when the copy stream would otherwise run dry until the next layer's routing is
known; they never delay a copy that the next layer needs.

For a prompt, the guess is the next layer's experts ranked by how many tokens
pick them; they fill its free slots, evicting only experts no token is predicted
to pick (a long prompt needs every expert: evicting one for another only adds
a copy). These copies are queued after the current layer's own slot-recycling
copies, which are on the critical path; then the copy engine stays busy while
the current layer finishes and the next one attends and routes.

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
        depth: int = 1,
    ):
        self.cache = cache
        self.routers = routers
        self.per_layer = min(guesses, cache.store.num_experts)  # ids guessed per layer ahead
        self.depth = depth
        self._pending: dict[int, set[int]] = {}
        # layer -> [(target layer, norm ratio from layer to target)] for 1..depth layers ahead
        self._targets: dict[int, list[tuple[int, torch.Tensor | None]]] = {}
        for layer in next_layer:
            chain, cur, ratio, known = [], layer, None, True
            while len(chain) < depth and cur in next_layer:
                r = norm_ratio.get(cur)
                known = known and r is not None
                ratio = (r if ratio is None else ratio * r) if known else None
                cur = next_layer[cur]
                chain.append((cur, ratio))
            self._targets[layer] = chain

    def guess(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Device tensor of expert ids to prefetch, most likely first.

        One token: `guesses` ids for each of the next `depth` MoE layers. A prompt:
        the next MoE layer's experts ranked by how many of the prompt's tokens pick
        them (top-`guesses` of the next router), then how many experts are picked at
        all; a long prompt needs every expert, and none of those should be evicted
        for another. hidden: [T, H] as it enters layer `layer`'s experts."""
        targets = self._targets.get(layer)
        if not targets:
            return None
        if hidden.shape[0] > 1:
            nxt, ratio = targets[0]
            logits = torch.nn.functional.linear(hidden if ratio is None else hidden * ratio, self.routers[nxt])
            picked = torch.topk(logits, self.per_layer, dim=-1).indices  # [T, guesses]
            counts = torch.zeros(logits.shape[-1], dtype=torch.int64, device=logits.device)  # [E]
            counts.scatter_add_(0, picked.reshape(-1), torch.ones_like(picked.reshape(-1)))  # bincount syncs on CUDA
            ranked = torch.argsort(counts, descending=True, stable=True)
            return torch.cat([ranked, (counts > 0).sum().reshape(1)])
        picks = []
        for nxt, ratio in targets:
            logits = torch.nn.functional.linear(hidden if ratio is None else hidden * ratio, self.routers[nxt])
            picks.append(torch.topk(logits[0], self.per_layer).indices)
        return picks[0] if len(picks) == 1 else torch.cat(picks)

    def ids_per_token(self) -> int:
        """How many ids `guess` returns for one token (at most)."""
        return self.per_layer * self.depth

    def issue(self, layer: int, guessed: list[int], decode: bool) -> None:
        targets = self._targets[layer]
        nxt = targets[0][0]
        if not decode:  # fill the next layer's slots; evict only experts no token is predicted to pick
            ranked, needed = guessed[:-1], guessed[-1]
            self.cache.prefetch(nxt, ranked[: min(needed, self.cache.slots_per_layer)], keep=ranked[:needed])
            return
        n = self.per_layer
        self._pending[nxt] = set(guessed[:n])
        issued = self.cache.prefetch(nxt, guessed[:n])
        if issued == 0 and len(targets) > 1:  # the copy stream would idle: look one layer further
            self.cache.prefetch(targets[1][0], guessed[n : 2 * n])

    def prompt_start(self, tokens: int, top_k: int) -> int:
        """Before a prompt's forward: a long prompt routes to every expert of the first
        MoE layer (uniform routing leaves one unused with probability below 2% once
        tokens * top_k >= 4 * experts), so start copying them into its free slots
        while the trunk embeds and attends. Evicts nothing. Returns copies issued."""
        n = self.cache.store.num_experts
        if tokens * top_k < 4 * n:
            return 0
        first = self.cache.layers[0]
        return self.cache.prefetch(first, range(min(n, self.cache.slots_per_layer)), keep=range(n))

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
