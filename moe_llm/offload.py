"""Offloaded experts inside the transformers trunk.

Each MoE layer's ``mlp.experts`` is replaced by `OffloadedExperts`, which keeps the
transformers call ``forward(hidden_states[T,H], top_k_index[T,k], top_k_weights[T,k])``
and hands the work to one shared `OffloadRuntime`:

1. one device->host sync per layer reads the routed experts (and the prefetch guess);
2. routed experts already resident go first, misses are copied into slots;
3. the next layer's guesses are queued on the copy stream behind them;
4. each expert's tokens run through `kernels.expert_mlp`; when a layer needs more
   experts than it has slots (prefill), slots are recycled in order, and the copy
   stream waits on each slot's release event, so copies and compute pipeline.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import ExpertCache
from .expert_format import ExpertFormat
from .kernels import ActFn, expert_mlp
from .prefetch import Prefetcher


class OffloadRuntime:
    def __init__(self, cache: ExpertCache, fmt: ExpertFormat, act_fn: ActFn, prefetcher: Prefetcher | None):
        self.cache = cache
        self.fmt = fmt
        self.act_fn = act_fn
        self.prefetcher = prefetcher

    def forward(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        T, k = top_k_index.shape
        cache, pf = self.cache, self.prefetcher
        flat = top_k_index.reshape(-1)  # [T*k]
        guess = pf.guess(layer, hidden) if pf is not None else None
        # the one host sync of this layer
        host = (flat if guess is None else torch.cat([flat, guess.to(flat.dtype)])).tolist()
        routed, guessed = host[: T * k], host[T * k :]
        counts: dict[int, int] = {}
        for e in routed:
            counts[e] = counts.get(e, 0) + 1
        if pf is not None:
            pf.observe(layer, set(counts))

        order = sorted(counts, key=lambda e: (not cache.is_resident(layer, e), e))  # hits first
        offsets, start = {}, 0
        for e in sorted(counts):  # argsort groups positions by ascending expert id
            offsets[e] = (start, start + counts[e])
            start += counts[e]
        perm = torch.argsort(flat, stable=True)  # [T*k], positions grouped by expert
        tokens = perm // k  # [T*k] token of each position
        weights = top_k_weights.reshape(-1)[perm]  # [T*k]

        K = cache.slots_per_layer
        slots = {}
        for i, e in enumerate(order[:K]):
            slots[e] = cache.acquire(layer, e, protect=order[i + 1 :])
        if guess is not None:
            pf.issue(layer, guessed, decode=T == 1)

        out = torch.zeros_like(hidden)  # [T, H]
        for i, e in enumerate(order):
            if e not in slots:
                slots[e] = cache.acquire(layer, e, protect=order[i + 1 :])
            slot = slots[e]
            cache.wait(slot)
            a, b = offsets[e]
            tok = tokens[a:b]
            y = expert_mlp(hidden[tok], cache.views(slot), self.fmt, self.act_fn)  # [n, H]
            y = y * weights[a:b, None].to(y.dtype)
            out.index_add_(0, tok, y.to(out.dtype))
            cache.release(slot)
        return out


class OffloadedExperts(nn.Module):
    """Drop-in replacement for a transformers experts module (no parameters)."""

    def __init__(self, layer_idx: int, runtime: OffloadRuntime, num_experts: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.runtime = runtime
        self.num_experts = num_experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.runtime.forward(self.layer_idx, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, offloaded"
