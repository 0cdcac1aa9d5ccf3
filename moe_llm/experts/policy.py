"""Replacement policies of the global expert cache: which resident expert to evict, and
whether a missed expert is worth a copy at all.

A policy sees keys ``(layer, expert)``. The cache tells it about every use
(`touch`), every admission and eviction, and asks it for a victim among the keys
it may evict. ``admit(candidate, victim)`` lets a policy refuse a copy: with
zero-copy misses a miss costs no copy, so an admission only pays off if the
candidate will be used more often than the expert it displaces.

- ``lru``: evict the least recently used; admit every miss.
- ``lfu``: frequency with exponential decay (a half-life in steps); evict the
  least frequent, admit only a candidate more frequent than its victim (the
  TinyLFU rule). Under near-uniform routing it stops copying once the cache is
  warm, instead of trading equally useful experts over the link.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

Key = tuple[int, int]


class LRUPolicy:
    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()  # resident keys, least recent first

    def touch(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def tick(self) -> None:
        """One decode step has passed."""

    def admitted(self, key: Key) -> None:
        self._order[key] = None

    def evicted(self, key: Key) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterable[Key]:
        """Resident keys, best victim first."""
        return iter(self._order)

    def admit(self, candidate: Key, victim: Key) -> bool:
        return True

    def clear(self) -> None:
        self._order.clear()


class LFUPolicy:
    name = "lfu"

    def __init__(self, half_life: float = 64.0):
        self._decay = 0.5 ** (1.0 / half_life)
        self._scale = 1.0  # counts are stored divided by the decay so far (lazy decay)
        self._count: dict[Key, float] = {}
        self._resident: set[Key] = set()

    def _score(self, key: Key) -> float:
        return self._count.get(key, 0.0) * self._scale

    def touch(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0.0) + 1.0 / self._scale

    def tick(self) -> None:
        self._scale *= self._decay
        if self._scale < 1e-30:  # renormalise before the stored counts overflow
            self._count = {k: v * self._scale for k, v in self._count.items()}
            self._scale = 1.0

    def admitted(self, key: Key) -> None:
        self._resident.add(key)

    def evicted(self, key: Key) -> None:
        self._resident.discard(key)

    def victims(self) -> Iterable[Key]:
        return iter(sorted(self._resident, key=lambda k: (self._score(k), k)))

    def admit(self, candidate: Key, victim: Key) -> bool:
        return self._score(candidate) > self._score(victim)

    def clear(self) -> None:
        self._count.clear()
        self._resident.clear()
        self._scale = 1.0


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}") from None
