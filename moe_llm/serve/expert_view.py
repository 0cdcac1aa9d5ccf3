"""Live view of the expert cache for the web page: residency and per-expert use counts.

Use counts come from a forward pre-hook on each offloaded experts module that adds the
step's ``top_k_index`` into a [moe layers, experts] counter on the model's device. It is
one device op, so it also runs inside a captured decode graph and never syncs; the
counter is read only when the page asks. Install it before the first request, so graphs
are captured with it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from ..experts.runtime import OffloadedExperts
from ..runtime.engine import Engine


class ExpertView:
    _views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    @classmethod
    def of(cls, engine: Engine) -> ExpertView:
        """The engine's view (one per engine: apps sharing an engine share its counters)."""
        with cls._lock:
            view = cls._views.get(engine)
            if view is None:
                view = cls._views[engine] = cls(engine)
            return view

    def __init__(self, engine: Engine):
        self._engine = weakref.ref(engine)  # the class-level map must not keep engines alive
        cache = engine.cache
        self.layers = list(cache.layers)
        self.num_experts = cache.num_experts
        self.uses = torch.zeros(len(self.layers), self.num_experts, dtype=torch.long, device=engine.device)
        self._handles = []
        row = {layer: i for i, layer in enumerate(self.layers)}
        for module in engine.model.modules():
            if isinstance(module, OffloadedExperts):
                self._handles.append(module.register_forward_pre_hook(self._hook(row[module.layer_idx])))

    def _hook(self, row: int):
        uses = self.uses[row]

        def count(module, args):
            top_k_index = args[1]  # [T, k]
            flat = top_k_index.reshape(-1)
            uses.index_add_(0, flat, torch.ones_like(flat))

        return count

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state(self) -> dict[str, Any]:
        eng = self._engine()
        cache = eng.cache
        resident = sorted(cache.keys())
        stats = eng.stats_dict()
        return {
            "model": eng.model_name,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "slots": cache.num_slots,
            "resident": [list(k) for k in resident],
            "per_layer": {str(k): v for k, v in cache.per_layer().items()},
            "uses": self.uses.tolist(),
            "stats": {
                k: stats.get(k)
                for k in (
                    "tokens_generated",
                    "recent_tokens_per_second",
                    "tokens_per_second",
                    "hit_rate",
                    "cache_hits",
                    "cache_misses",
                    "bytes_to_device",
                    "bytes_from_host",
                    "active_requests",
                    "queue_depth",
                    "prefix_cache_hit_tokens",
                    "time_to_first_token_avg_s",
                    "batch_mode",
                )
            },  # fmt: skip
        }
