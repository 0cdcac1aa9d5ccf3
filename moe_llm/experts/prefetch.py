"""PromptPrefetcher: a prompt's next MoE layer copied while the current one computes.

A prompt needs nearly every expert of every layer. While layer L runs, layer
L+1's router is applied to layer L's (normalised) hidden state; the guess is
L+1's experts ranked by how many tokens pick them. They fill free slots, evicting
only what no token is predicted to pick and nothing of layer L (a long prompt
needs every expert: evicting one for another only adds a copy). The hidden state
entering L's MoE block is ``x / rms(x) * w_L``; rescaling by ``w_{L+1} / w_L``
(the two post-attention norm weights) gives what L+1's norm would produce from
the same residual, which sharpens the guess at no cost.

These copies are queued after layer L's own on-demand copies, which are on the
critical path; the copy engine then stays busy while L finishes and L+1 attends
and routes. A long prompt (one that routes to every expert, see `prompt_start`)
also queues every expert of L+2 into free slots (evicting nothing: a victim that
recent could still be in use), so the copy queue stays two layers deep: the
host's per-layer enqueue time (a few ms of Python and launches for a 1024-token
layer) then never leaves the link idle (measured on the H200: one copy-engine gap
of ~2 ms per layer with one layer of look-ahead). Decode needs no such guess: its misses are read in place and the
cache admits experts after each step (`ExpertsRuntime.end_step`).
"""

from __future__ import annotations

import torch

from .cache import ExpertCache


class PromptPrefetcher:
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
        self.per_token = min(guesses, cache.num_experts)  # router top-k counted per token
        self._long = False  # the prompt under way routes to every expert of every layer

    def guess(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Device tensor: the next MoE layer's experts ranked by how many of the prompt's tokens
        pick them, then how many are picked at all. hidden: [T, H] entering `layer`'s experts."""
        nxt = self.next_layer.get(layer)
        if nxt is None or hidden.shape[0] < 2:
            return None
        ratio = self.norm_ratio.get(layer)
        logits = torch.nn.functional.linear(hidden if ratio is None else hidden * ratio, self.routers[nxt])  # [T, E]
        picked = torch.topk(logits, self.per_token, dim=-1).indices  # [T, guesses]
        counts = torch.zeros(logits.shape[-1], dtype=torch.int64, device=logits.device)  # [E]
        counts.scatter_add_(0, picked.reshape(-1), torch.ones_like(picked.reshape(-1)))  # bincount syncs on CUDA
        ranked = torch.argsort(counts, descending=True, stable=True)
        return torch.cat([ranked, (counts > 0).sum().reshape(1)])

    def issue(self, layer: int, guessed: list[int]) -> int:
        """Copy the guessed experts of the layer after `layer`; `guessed` as `guess` returned it."""
        nxt = self.next_layer[layer]
        ranked, needed = guessed[:-1], guessed[-1]
        n = self.cache.num_experts
        keep = [(nxt, e) for e in ranked[:needed]] + [(layer, e) for e in range(n)]
        issued = self.cache.prefetch(nxt, ranked[:needed], keep=keep)
        after = self.next_layer.get(nxt)
        if self._long and after is not None:  # two layers deep: all of L+2, behind L+1's guess,
            issued += self.cache.prefetch(after, range(n), keep=self.cache.keys())  # into free slots only
        return issued

    def prompt_start(self, tokens: int, top_k: int) -> int:
        """Before a prompt's forward: a long prompt routes to every expert of the first MoE layer
        (uniform routing leaves one unused with probability below 2% once tokens * top_k >= 4 *
        experts), so start copying them, and the second MoE layer's, into free slots while the
        trunk embeds and attends. Evicts nothing. Returns copies issued."""
        n = self.cache.num_experts
        self._long = tokens * top_k >= 4 * n and bool(self.cache.layers)
        if not self._long:
            return 0
        first = self.cache.layers[0]
        issued = self.cache.prefetch(first, range(n), keep=self.cache.keys())
        second = self.next_layer.get(first)
        if second is not None:  # the look-ahead `issue` keeps from then on
            issued += self.cache.prefetch(second, range(n), keep=self.cache.keys())
        return issued
