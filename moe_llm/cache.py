"""ExpertCache: a fixed pool of device slots per MoE layer, managed as an LRU.

The pool is allocated once: ``slots_per_layer`` slots of ``fmt.nbytes`` bytes for
every MoE layer. A miss copies the expert's host buffer into a free or
least-recently-used slot. On CUDA every copy runs on one dedicated stream, in
the order issued; each slot has a *ready* event (copy done; the compute stream
waits on it only when it uses the slot) and a *released* event (last compute
that read the slot; a copy waits on it before overwriting). On CPU the same
bookkeeping runs with plain synchronous copies, so the policy is testable
anywhere.

``retain=False`` gives the "no cache" ablation: a slot is dropped right after use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch

from .stats import Stats
from .store import ExpertStore


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        device: torch.device,
        slots_per_layer: int,
        stats: Stats | None = None,
        retain: bool = True,
    ):
        if slots_per_layer < 1:
            raise ValueError("slots_per_layer must be >= 1")
        self.store = store
        self.device = torch.device(device)
        self.slots_per_layer = min(slots_per_layer, store.num_experts)
        self.retain = retain
        self.stats = stats if stats is not None else Stats()
        self.layers = list(store.layers)
        n = len(self.layers) * self.slots_per_layer
        nbytes = store.fmt.nbytes
        self.pool = torch.empty(n, nbytes, dtype=torch.uint8, device=self.device)  # [slots, bytes]
        self._views = [store.fmt.layout.views(self.pool[i]) for i in range(n)]
        self._owner: list[tuple[int, int] | None] = [None] * n
        self._lru: dict[int, OrderedDict[int, int]] = {layer: OrderedDict() for layer in self.layers}
        self._free: dict[int, list[int]] = {
            layer: list(range(i * self.slots_per_layer, (i + 1) * self.slots_per_layer))[::-1]
            for i, layer in enumerate(self.layers)
        }
        self._prefetched: set[tuple[int, int]] = set()
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in range(n)]
            self._released = [torch.cuda.Event() for _ in range(n)]

    # -- queries -------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self._owner)

    @property
    def nbytes(self) -> int:
        return self.pool.numel()

    def resident(self, layer: int) -> list[int]:
        """Experts of `layer` on the device, least recently used first."""
        return list(self._lru[layer])

    def is_resident(self, layer: int, expert: int) -> bool:
        return expert in self._lru[layer]

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return self._views[slot]

    # -- policy --------------------------------------------------------------
    def _victim(self, layer: int, protect: Iterable[int], force: bool) -> int | None:
        if self._free[layer]:
            return self._free[layer].pop()
        protect = set(protect)
        lru = self._lru[layer]
        choice = next((e for e in lru if e not in protect), None)
        if choice is None:
            if not force:
                return None
            choice = next(iter(lru))
        slot = lru.pop(choice)
        self._owner[slot] = None
        self.stats.evictions += 1
        if (layer, choice) in self._prefetched:
            self._prefetched.discard((layer, choice))
            self.stats.prefetch_wasted += 1
        return slot

    def _load(self, layer: int, expert: int, slot: int) -> None:
        src = self.store.buffer(layer, expert)
        if self.cuda:
            stream = self.copy_stream
            with torch.cuda.stream(stream):
                stream.wait_event(self._released[slot])  # compute has finished reading the slot
                self.pool[slot].copy_(src, non_blocking=True)
                self._ready[slot].record(stream)
        else:
            self.pool[slot].copy_(src)
        self._owner[slot] = (layer, expert)
        self._lru[layer][expert] = slot
        self.stats.bytes_to_device += src.numel()

    def acquire(self, layer: int, expert: int, protect: Iterable[int] = ()) -> int:
        """Slot holding (layer, expert), loading it on a miss. Experts in `protect`
        are evicted only if every slot of the layer is protected."""
        lru = self._lru[layer]
        slot = lru.get(expert)
        if slot is not None:
            lru.move_to_end(expert)
            self.stats.cache_hits += 1
            if (layer, expert) in self._prefetched:
                self._prefetched.discard((layer, expert))
                self.stats.prefetch_used += 1
            return slot
        self.stats.cache_misses += 1
        slot = self._victim(layer, protect, force=True)
        self._load(layer, expert, slot)
        return slot

    def prefetch(self, layer: int, experts: Iterable[int], keep: Iterable[int] = ()) -> int:
        """Start copying `experts` of `layer` ahead of use, most likely first. Never
        evicts one of `experts`, or of `keep`, to make room for another. Returns
        copies issued."""
        experts = list(dict.fromkeys(experts))
        protect = set(experts).union(keep)
        issued = 0
        lru = self._lru[layer]
        for e in reversed(experts):  # least likely first, so the most likely ends up most recent
            if e in lru:
                lru.move_to_end(e)
        for e in experts:
            if e in lru:
                continue
            slot = self._victim(layer, protect, force=False)
            if slot is None:
                break
            self._load(layer, e, slot)
            self._prefetched.add((layer, e))
            issued += 1
        self.stats.prefetch_issued += issued
        return issued

    def wait(self, slot: int) -> None:
        """Make the current stream wait until `slot` holds its expert."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])

    def release(self, slot: int) -> None:
        """The current stream has enqueued its last read of `slot`."""
        if self.cuda:
            self._released[slot].record(torch.cuda.current_stream(self.device))
        if not self.retain:
            owner = self._owner[slot]
            if owner is not None:
                layer, expert = owner
                del self._lru[layer][expert]
                self._owner[slot] = None
                self._free[layer].append(slot)

    def synchronize(self) -> None:
        """Fence every in-flight copy (used after cancellation and before teardown)."""
        if self.cuda:
            self.copy_stream.synchronize()

    def reset(self) -> None:
        """Drop every resident expert (slots stay allocated)."""
        self.synchronize()
        for i, layer in enumerate(self.layers):
            self._lru[layer].clear()
            self._free[layer] = list(range(i * self.slots_per_layer, (i + 1) * self.slots_per_layer))[::-1]
        self._owner = [None] * len(self._owner)
        self._prefetched.clear()
