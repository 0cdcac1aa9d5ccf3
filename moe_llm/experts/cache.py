"""ExpertCache: one global pool of device slots for the experts of every MoE layer.

Any layer may hold any number of slots, down to a small floor per layer; which
expert leaves is the policy's choice (`policy`). Next to the slots the cache keeps
a device table ``table[row(layer), expert]`` of int64 byte offsets from the pool's
start: to the slot when the expert is resident, to its pinned host buffer otherwise
(one address space: UVA). The decode kernels read
experts through that table, so a miss is read in place over the link (zero-copy)
and nothing waits for the host.

Streams and events (CUDA), so that no kernel ever reads a slot being overwritten:
- copies run on ``copy_stream`` in issue order; after a copy the table entry is
  pointed at the slot on the same stream, then ``ready[slot]`` is recorded;
- an eviction points the victim's entry back at host RAM on ``table_stream``, after
  ``released[slot]`` (the last prompt compute that read the slot), the last decode step
  enqueued (``step_enqueued``: a decode step may still be in flight, run ahead, when the
  host admits for the step before it) and ``ready[slot]`` (its own admission), then
  the copy into that slot waits for the repoint (so for those steps too);
- before a decode step the compute stream waits for ``table_stream`` (repoints are
  tiny and never queue behind copies), so the step sees every eviction.
On CPU the same bookkeeping runs with plain copies, so policy and table semantics
are testable anywhere.

Decode steps are numbered as they begin (``before_step``), and a step's hits are judged
as of its beginning, since with a step in flight the host changes the cache before it
observes that step: a step reads a slot whose copy was known complete before it began,
and, until the repoint that waits for it, the slot of an expert evicted after it began.

A decode admission that must evict goes through the policy (is the candidate worth its victim?)
and then the admission gate (`admission.AdmissionGate`: do such swaps pay on this routing?).

``retain=False`` gives the "no cache" ablation: a slot is dropped right after use.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..runtime.stats import Stats
from .admission import AdmissionGate
from .policy import Key, make_policy
from .store import ExpertStore


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        device: torch.device,
        slots: int,
        stats: Stats | None = None,
        retain: bool = True,
        policy: str = "lru",
        floor: int = 1,
        max_pending: int = 4,
    ):
        if slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        self.store = store
        self.device = torch.device(device)
        self.layers = list(store.layers)
        self.num_experts = store.num_experts
        self.retain = retain
        self.stats = stats if stats is not None else Stats()
        self.policy = make_policy(policy)
        self.gate = AdmissionGate()  # decode admissions that evict: only while they pay
        n = min(slots, len(self.layers) * self.num_experts)
        self.floor = max(0, min(floor, n // max(len(self.layers), 1)))
        self.max_pending = max_pending  # decode admissions in flight at once: they share the link with misses
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        nbytes = store.fmt.nbytes
        self.pool = torch.empty(n, nbytes, dtype=torch.uint8, device=self.device)  # [slots, bytes]
        self._views = [store.fmt.layout.views(self.pool[i]) for i in range(n)]
        self._owner: list[Key | None] = [None] * n
        self._where: dict[Key, int] = {}
        self._count = dict.fromkeys(self.layers, 0)  # resident experts per layer
        self._free = list(range(n))[::-1]
        self._pending: dict[int, Key] = {}  # slot -> key whose copy may still be in flight
        self._prefetched: set[Key] = set()
        self.steps = 0  # decode steps begun
        self._first_read = [0] * n  # per slot: the first step that reads it (its copy known complete)
        self._gone: dict[Key, tuple[int, int]] = {}  # evicted: the (first, last) steps that read its slot
        self.cuda = self.device.type == "cuda"
        self.table: torch.Tensor | None = None
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.table_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in range(n)]
            self._released = [torch.cuda.Event() for _ in range(n)]
            self._repointed = [torch.cuda.Event() for _ in range(n)]
            self._last_step = torch.cuda.Event()  # recorded after each decode step is enqueued
            base = self.pool.data_ptr()  # table entries are byte offsets from the pool (UVA)
            self._host = torch.tensor(
                [[store.address(layer, e) - base for e in range(self.num_experts)] for layer in self.layers],
                dtype=torch.int64,
            )  # [L, E]
            self.table = self._host.to(self.device)  # [L, E] every expert starts in host RAM
            self._slot_addr = [i * nbytes for i in range(n)]

    # -- queries -------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self._owner)

    @property
    def nbytes(self) -> int:
        return self.pool.numel()

    def resident(self, layer: int) -> list[int]:
        """Experts of `layer` that hold a slot."""
        return sorted(e for (lay, e) in self._where if lay == layer)

    def keys(self) -> set[Key]:
        """Every resident (layer, expert)."""
        return set(self._where)

    def per_layer(self) -> dict[int, int]:
        return dict(self._count)

    def is_resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._where

    def _read_slot(self, key: Key, step: int) -> bool:
        """Whether decode step `step` read `key` from a slot (not from host RAM)."""
        slot = self._where.get(key)
        if slot is not None and slot not in self._pending and self._first_read[slot] <= step:
            return True
        span = self._gone.get(key)
        return span is not None and span[0] <= step <= span[1]

    def slot_of(self, layer: int, expert: int) -> int | None:
        return self._where.get((layer, expert))

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return self._views[slot]

    def consistent(self) -> bool:
        """Every slot is free xor owned by one resident expert, and the per-layer counts agree."""
        owned = [(slot, key) for slot, key in enumerate(self._owner) if key is not None]
        counts = dict.fromkeys(self.layers, 0)
        for _, key in owned:
            counts[key[0]] += 1
        return (
            sorted(self._free + [slot for slot, _ in owned]) == list(range(self.num_slots))
            and {key: slot for slot, key in owned} == self._where
            and counts == self._count
        )

    def table_row(self, layer: int) -> torch.Tensor:
        return self.table[self.row[layer]]

    # -- victims ---------------------------------------------------------------
    def _evictable(self, key: Key, protect: set, floors: bool) -> bool:
        slot = self._where[key]
        if key in protect or slot in self._pending and not self._poll(slot):
            return False
        return not floors or self._count[key[0]] > self.floor

    def _pick_victim(self, protect: set, force: bool) -> Key | None:
        for floors in (True, False) if force else (True,):
            for key in self.policy.victims():
                if self._evictable(key, protect, floors):
                    return key
        if force:  # every resident expert is protected: take the oldest anyway (prefill recycling)
            return next(iter(self.policy.victims()), None)
        return None

    def _evict(self, key: Key) -> int:
        slot = self._where.pop(key)
        self._owner[slot] = None
        self._count[key[0]] -= 1
        self.policy.evicted(key)
        self.stats.evictions += 1
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.prefetch_wasted += 1
        if slot not in self._pending and self._first_read[slot] <= self.steps:
            self._gone[key] = (self._first_read[slot], self.steps)  # steps begun so far read the slot
        if self.cuda:
            ts = self.table_stream
            ts.wait_event(self._released[slot])  # the forward that last acquired the slot has read it
            ts.wait_event(self._last_step)  # and so has every decode step enqueued
            ts.wait_event(self._ready[slot])  # and its own admission has landed in the table
            with torch.cuda.stream(ts):
                layer, e = key
                self.table[self.row[layer], e].fill_(int(self._host[self.row[layer], e]))
                self._repointed[slot].record(ts)
            self._pending.pop(slot, None)
        return slot

    def _take_slot(self, protect: set, force: bool, candidate: Key | None = None) -> int | None:
        if self._free:
            return self._free.pop()
        victim = self._pick_victim(protect, force)
        if victim is None:
            return None
        if candidate is not None:  # a decode admission: worth its victim to the policy, and paying?
            if not self.policy.admit(candidate, victim):
                return None
            if not self.gate.allow():
                self.stats.admissions_held += 1
                return None
            self.gate.trial(candidate, victim)
        return self._evict(victim)

    def _load(self, key: Key, slot: int) -> None:
        layer, e = key
        src = self.store.buffer(layer, e)
        if self.cuda:
            stream = self.copy_stream
            with torch.cuda.stream(stream):
                stream.wait_event(self._repointed[slot])  # no step reads the slot through the old entry any more
                stream.wait_event(self._released[slot])
                self.pool[slot].copy_(src, non_blocking=True)
                self.table[self.row[layer], e].fill_(self._slot_addr[slot])
                self._ready[slot].record(stream)
            self._pending[slot] = key
        else:
            self.pool[slot].copy_(src)
            self._first_read[slot] = self.steps + 1
        self._owner[slot] = key
        self._where[key] = slot
        self._count[layer] += 1
        self.policy.admitted(key)
        self.stats.bytes_to_device += src.numel()

    def _poll(self, slot: int) -> bool:
        """True once `slot`'s copy has completed (forgets it as pending)."""
        if slot in self._pending and self._ready[slot].query():
            self._landed(slot)
        return slot not in self._pending

    def _landed(self, slot: int) -> None:
        """`slot`'s copy is known complete: decode steps that begin from now on read it."""
        del self._pending[slot]
        self._first_read[slot] = self.steps + 1

    def poll(self) -> None:
        for slot in list(self._pending):
            self._poll(slot)

    # -- prefill: copies on demand ------------------------------------------------
    def acquire(self, layer: int, expert: int, protect: Iterable[int] = ()) -> int:
        """Slot holding (layer, expert), loading it on a miss. Experts of `layer` in `protect`
        are evicted only if nothing else can be."""
        key = (layer, expert)
        self.policy.touch(key)
        slot = self._where.get(key)
        if slot is not None:
            self.stats.cache_hits += 1
            if key in self._prefetched:
                self._prefetched.discard(key)
                self.stats.prefetch_used += 1
            return slot
        self.stats.cache_misses += 1
        slot = self._take_slot({(layer, e) for e in protect}, force=True)
        self._load(key, slot)
        return slot

    def prefetch(self, layer: int, experts: Iterable[int], keep: Iterable[Key] = ()) -> int:
        """Start copying `experts` of `layer` ahead of use, most likely first. Never evicts one
        of them, or a key in `keep`, to make room for another. Returns copies issued."""
        experts = list(dict.fromkeys(experts))
        protect = {(layer, e) for e in experts} | set(keep)
        issued = 0
        for e in experts:
            key = (layer, e)
            if key in self._where:
                self.policy.touch(key)
                continue
            slot = self._take_slot(protect, force=False)
            if slot is None:
                break
            self._load(key, slot)
            self._prefetched.add(key)
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
            key = self._owner[slot]
            if key is not None:
                self._evict(key)
                self._free.append(slot)

    # -- decode: misses read in place, admissions after the step ------------------
    def before_step(self) -> None:
        """Before a decode step is enqueued: it must see every eviction issued so far. Numbers
        the step (`steps`)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.table_stream)
            self.poll()
        self.steps += 1

    def step_enqueued(self) -> None:
        """A decode step has just been enqueued on the current stream (CUDA): evictions wait
        for it, since the host may admit while it runs."""
        self._last_step.record(torch.cuda.current_stream(self.device))

    def observe(self, routed: list[Key], step: int | None = None) -> tuple[int, int]:
        """Decode step `step` (default: one that read the cache as it is now) used `routed`
        (distinct keys): count hits (read from a slot) and misses (read from host RAM), and
        tell the policy. Steps are observed in order. Returns (hits, misses)."""
        step = self.steps + 1 if step is None else step
        hits = 0
        for key in routed:
            self.policy.touch(key)
            hit = self._read_slot(key, step)
            self.gate.seen(key, hit)
            if hit:
                hits += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch_used += 1
        misses = len(routed) - hits
        self.stats.cache_hits += hits
        self.stats.cache_misses += misses
        self.stats.bytes_from_host += misses * self.store.fmt.nbytes
        self.policy.tick()
        self.gate.tick()
        if self._gone:  # later steps began after these evictions
            self._gone = {key: span for key, span in self._gone.items() if span[1] > step}
        return hits, misses

    def admit(self, key: Key, protect: set, evict: bool = True) -> bool:
        """After a step: copy `key` into a slot for the steps that follow, if few enough copies
        are in flight and a slot is free or (with `evict`) the policy finds it worth its victim.
        True if a copy was issued."""
        if not self.retain or key in self._where or not (evict or self._free):
            return False
        if self.cuda and len(self._pending) >= self.max_pending:
            self.poll()
            if len(self._pending) >= self.max_pending:
                return False
        slot = self._take_slot(protect, force=False, candidate=key)
        if slot is None:
            return False
        self._load(key, slot)
        self._prefetched.add(key)
        self.stats.prefetch_issued += 1
        return True

    # -- lifetime ------------------------------------------------------------------
    def synchronize(self) -> None:
        """Fence every in-flight copy and table update (after cancellation, before teardown)."""
        if self.cuda:
            self.copy_stream.synchronize()
            self.table_stream.synchronize()
            for slot in list(self._pending):
                self._landed(slot)

    def reset(self) -> None:
        """Drop every resident expert (slots stay allocated; every entry points at host RAM)."""
        self.synchronize()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self.table.copy_(self._host)
        self._owner = [None] * len(self._owner)
        self._where.clear()
        self._count = dict.fromkeys(self.layers, 0)
        self._free = list(range(len(self._owner)))[::-1]
        self._prefetched.clear()
        self._gone.clear()
        self.policy.clear()
        self.gate.clear()
