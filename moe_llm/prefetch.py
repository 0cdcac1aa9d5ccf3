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
        self.norm_ratio = norm_ratio
        self.next_layer = next_layer
        self.guesses = guesses
        self.per_layer = min(guesses, cache.store.num_experts)  # ids guessed per layer ahead
        self.depth = depth
        self._pending: dict[int, set[int]] = {}
        # layer -> [(target layer, norm ratio from layer to target)] for 1..depth layers ahead
        self._targets: dict[int, list[tuple[int, torch.Tensor | None]]] = {}
        for layer in next_layer:
            chain, cur, ratio, known = [], layer, None, True
            while len(chain) < max(depth, 2) and cur in next_layer:
                r = norm_ratio.get(cur)
                known = known and r is not None
                ratio = (r if ratio is None else ratio * r) if known else None
                cur = next_layer[cur]
                chain.append((cur, ratio))
            self._targets[layer] = chain

    def guess(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Device tensor of expert ids to prefetch, most likely first: for one token,
        `guesses` ids for each of the next `depth` MoE layers; for a prompt, the
        experts of each of the next two MoE layers ranked by routing mass, one per
        slot (a long prompt needs every expert, so guesses are rarely wasted, and the
        layer after next keeps the copy streams busy across each layer's routing
        sync). hidden: [T, H] as it enters layer `layer`'s experts."""
        targets = self._targets.get(layer)
        if not targets:
            return None
        if hidden.shape[0] > 1:
            picks = []
            for nxt, ratio in targets:
                logits = torch.nn.functional.linear(hidden if ratio is None else hidden * ratio, self.routers[nxt])
                mass = torch.softmax(logits.float(), dim=-1).sum(dim=0)  # [E]
                picks.append(torch.topk(mass, min(self.cache.slots_per_layer, mass.numel())).indices)
            return torch.cat(picks)
        picks = []
        for nxt, ratio in targets[: self.depth]:
            logits = torch.nn.functional.linear(hidden if ratio is None else hidden * ratio, self.routers[nxt])
            picks.append(torch.topk(logits[0], self.per_layer).indices)
        return picks[0] if len(picks) == 1 else torch.cat(picks)

    def ids_per_token(self) -> int:
        """How many ids `guess` returns for one token (at most)."""
        return self.per_layer * self.depth

    def issue(self, layer: int, guessed: list[int], decode: bool) -> None:
        targets = self._targets[layer]
        nxt = targets[0][0]
        if not decode:
            k = min(self.cache.slots_per_layer, self.cache.store.num_experts)
            for i, (target, _) in enumerate(targets):
                self.cache.prefetch(target, guessed[i * k : (i + 1) * k], side=True)
            return
        n = self.per_layer
        self._pending[nxt] = set(guessed[:n])
        issued = self.cache.prefetch(nxt, guessed[:n])
        if issued == 0 and len(targets) > 1:  # the copy stream would idle: look one layer further
            self.cache.prefetch(targets[1][0], guessed[n : 2 * n])

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
