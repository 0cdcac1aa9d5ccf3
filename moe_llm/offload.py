"""Offloaded experts inside the transformers trunk.

Each MoE layer's ``mlp.experts`` is replaced by `OffloadedExperts`, which keeps the
transformers call ``forward(hidden_states[T,H], top_k_index[T,k], top_k_weights[T,k])``
and hands the work to one shared `OffloadRuntime`:

1. one device->host sync per layer reads the routed experts (and the prefetch guess);
   nothing else in the layer waits for the device;
2. routed experts already resident go first, misses are copied into slots;
3. the next layer's guesses are queued on the copy stream behind them;
4. decode (one token, CUDA, quantized experts): each routed expert is two fused
   dequant-GEMV launches into buffers allocated once, and one launch combines them;
   otherwise (prefill, CPU) each expert's tokens run through `kernels.expert_mlp`.
   When a layer needs more experts than it has slots (prefill), slots are
   recycled in order and the copy stream waits on each slot's release event, so
   copies and compute pipeline; the next layer's prompt prefetch is queued after
   those copies, keeping the copy engine busy across the layer boundary.

Every routed (token, k) position gets its own output row, and the rows are
summed in k order, so the result does not depend on the order in which experts
were computed (which depends on what the cache held).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import ExpertCache
from .expert_format import ExpertFormat
from .kernels import ActFn, expert_mlp, fast_path, matrix_views
from .prefetch import Prefetcher


def _is_silu(act_fn: ActFn) -> bool:
    probe = torch.linspace(-4.0, 4.0, 17)
    try:
        return bool(torch.allclose(act_fn(probe), F.silu(probe), atol=1e-6))
    except Exception:  # an activation that rejects a plain CPU tensor: use the generic path
        return False


class OffloadRuntime:
    def __init__(self, cache: ExpertCache, fmt: ExpertFormat, act_fn: ActFn, prefetcher: Prefetcher | None, top_k: int):
        self.cache = cache
        self.top_k = top_k
        self.hook = None  # set by decode_graph.GraphDecoder while it captures
        self.fmt = fmt
        self.act_fn = act_fn
        self.prefetcher = prefetcher
        self._fused_glu = _is_silu(act_fn)  # the decode kernel fuses silu(gate) * up
        # allocated on first use, then reused for every token
        self._decode_ws = None  # DecodeWorkspace: h [k, I], down partials [k, split, H]
        self._decode_out: dict[int, torch.Tensor] = {}  # layer -> [1, H]
        self._dequant_ws: torch.Tensor | None = None  # prefill: one expert's matrices, dequantized
        self._slot_mats: dict[int, tuple[dict, dict]] = {}
        self._fast: dict[str, object] = {}  # device type -> Triton kernels or None

    def _fast_path(self, hidden: torch.Tensor):
        kind = hidden.device.type
        if kind not in self._fast:
            self._fast[kind] = fast_path(hidden, self.fmt)
        return self._fast[kind]

    def ids_per_token(self) -> int:
        """Length of `route_ids` for one token: top-k routed ids, then the guesses."""
        return self.top_k + (self.prefetcher.ids_per_token() if self.prefetcher is not None else 0)

    def prompt_start(self, tokens: int) -> None:
        """Called before a prompt of `tokens` tokens runs through the trunk."""
        if self.prefetcher is not None and tokens > 1:
            self.prefetcher.prompt_start(tokens, self.top_k)

    def route_ids(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """Device tensor of what the host needs to read: routed ids [T*k], then the
        prefetch guess for the next MoE layer (if any)."""
        flat = top_k_index.reshape(-1)
        guess = self.prefetcher.guess(layer, hidden) if self.prefetcher is not None else None
        return flat if guess is None else torch.cat([flat, guess.to(flat.dtype)])

    def forward(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.hook is not None:  # CUDA-graph capture (see decode_graph)
            return self.hook(layer, hidden, top_k_index, top_k_weights)
        host = self.route_ids(layer, hidden, top_k_index).tolist()  # the one host sync of this layer
        return self.after_route(layer, hidden, host, top_k_index, top_k_weights)

    def after_route(self, layer, hidden, host: list[int], top_k_index, top_k_weights, out=None) -> torch.Tensor:
        """Everything after the host has read the routed ids (and guesses): cache
        bookkeeping, copies, prefetch, expert compute. With `out`, the result lands there."""
        T, k = top_k_index.shape
        cache, pf = self.cache, self.prefetcher
        routed, guessed = host[: T * k], host[T * k :]
        counts: dict[int, int] = {}
        for e in routed:
            counts[e] = counts.get(e, 0) + 1
        if pf is not None:
            pf.observe(layer, set(counts))

        order = sorted(counts, key=lambda e: (not cache.is_resident(layer, e), e))  # hits first
        K = cache.slots_per_layer
        slots = {}
        for i, e in enumerate(order[:K]):
            slots[e] = cache.acquire(layer, e, protect=order[i + 1 :])
        decode = T == 1
        if pf is not None and guessed and decode:
            pf.issue(layer, guessed, decode=True)

        tk = self._fast_path(hidden) if decode and self._fused_glu else None
        if tk is not None:
            y = self._decode(tk, layer, hidden, routed, top_k_weights, order, slots)
        else:
            y = self._grouped(layer, hidden, top_k_index.reshape(-1), top_k_weights, counts, order, slots)
        if pf is not None and guessed and not decode:
            # behind this layer's recycled-slot copies on the copy stream: they are on the
            # critical path, and the next layer's copies then keep the copy engine busy
            # while this layer finishes and the next one attends and routes
            pf.issue(layer, guessed, decode=False)
        if out is not None and y is not out:
            out.copy_(y)
            return out
        return y

    def decode_out(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The persistent [1, H] output buffer of `layer` for one-token steps."""
        out = self._decode_out.get(layer)
        if out is None:
            out = self._decode_out[layer] = torch.empty_like(hidden)
        return out

    def _slot(self, layer: int, order: list[int], i: int, slots: dict[int, int]) -> int:
        e = order[i]
        if e not in slots:  # more routed experts than slots: recycle, behind the release events
            slots[e] = self.cache.acquire(layer, e, protect=order[i + 1 :])
        slot = slots[e]
        self.cache.wait(slot)
        return slot

    def _decode(self, tk, layer, hidden, routed, top_k_weights, order, slots) -> torch.Tensor:
        """One token: fused dequant-GEMVs into preallocated buffers, no host sync."""
        if self._decode_ws is None:
            specs = self.fmt.specs
            self._decode_ws = tk.DecodeWorkspace(len(routed), specs["gate_up_proj"], specs["down_proj"], hidden.device)
        ws = self._decode_ws
        out = self.decode_out(layer, hidden)
        x = hidden.reshape(-1)  # [H]
        position = {e: j for j, e in enumerate(routed)}
        for i, e in enumerate(order):
            slot = self._slot(layer, order, i, slots)
            mats = self._slot_mats.get(slot)
            if mats is None:
                views = self.cache.views(slot)
                mats = self._slot_mats[slot] = (matrix_views(views, "gate_up_proj"), matrix_views(views, "down_proj"))
            ws.expert(position[e], x, mats[0], mats[1], self.fmt)
            self.cache.release(slot)
        tk.combine(ws.part, top_k_weights.reshape(-1), out.view(-1))
        return out

    def _grouped(self, layer, hidden, flat, top_k_weights, counts, order, slots) -> torch.Tensor:
        """Any number of tokens: each expert's tokens in one batch (dequantize + GEMM)."""
        T, H = hidden.shape
        k = flat.numel() // T
        offsets, start = {}, 0
        for e in sorted(counts):  # argsort groups positions by ascending expert id
            offsets[e] = (start, start + counts[e])
            start += counts[e]
        perm = torch.argsort(flat, stable=True)  # [T*k] positions grouped by expert
        tokens = perm // k  # [T*k] token of each position
        weights = top_k_weights.reshape(-1)[perm].float()  # [T*k]
        workspace = self._workspace(hidden)
        rows = torch.empty(T * k, H, dtype=torch.float32, device=hidden.device)  # one row per position
        for i, e in enumerate(order):
            slot = self._slot(layer, order, i, slots)
            a, b = offsets[e]
            y = expert_mlp(hidden[tokens[a:b]], self.cache.views(slot), self.fmt, self.act_fn, workspace)  # [n, H]
            rows.index_copy_(0, perm[a:b], y.float() * weights[a:b, None])
            self.cache.release(slot)
        return rows.view(T, k, H).sum(dim=1).to(hidden.dtype)

    def _workspace(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._dequant_ws is None and self._fast_path(hidden) is not None:
            n = 2 * self.fmt.intermediate * self.fmt.hidden
            self._dequant_ws = torch.empty(n, dtype=self.fmt.dtype, device=hidden.device)
        return self._dequant_ws


class OffloadedExperts(nn.Module):
    """Drop-in replacement for a transformers experts module (no parameters)."""

    def __init__(self, layer_idx: int, runtime: OffloadRuntime, num_experts: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.runtime = runtime
        self.num_experts = num_experts
        self.act_fn = runtime.act_fn  # as on the module it replaces

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.runtime.forward(self.layer_idx, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, num_experts={self.num_experts}, offloaded"
