"""AdmissionGate: decode admissions evict only while they pay for their copies.

After a decode step the cache copies missed experts into slots for the steps that follow
(`ExpertCache.admit`). Once the pool is full, each copy evicts a victim. The copy pays when the
admitted expert is used more than the victim would have been: the hits it brings, less the
victim's later requests (misses now), must beat the copy's own cost. That cost is one expert's
bytes over the link, which the GPU's share of every miss also crosses.

- Under near-uniform routing both sides are equal, so every copy is a loss. Random weights
  route that way, and so do the benchmark's synthetic models. Measured on the H200 at 12 GiB,
  with `auto`'s search on the same tables in both rows: 64.96 tok/s with LRU's admissions
  (113 MB of copies a token), 73.70 without them, for 0.26 more misses a token of 14
  (`benchmarks/results/h200-search-7b41694.json`, rows `full` and `no-prefetch`).
- Trained routers are skewed, and they repeat across tokens, so there the copies pay.

The gate measures which case it is in. Each admission that evicts is a trial over the next
HORIZON decode steps. It scores +1 for every step that hits the admitted expert, -1 for every
step that routes to the victim (kept, it would have been a hit; copied back, it cost another
copy), and -1 for the copy. While the last WINDOW
finished trials sum above zero, every admission goes through. Otherwise one in SAMPLE does,
which keeps trials running, so the gate opens again when routing turns skewed. Admissions into
free slots evict nothing and always go through. Where an expert is read never changes a token,
so the gate changes speed only.
"""

from __future__ import annotations

from collections import deque

from .policy import Key

HORIZON = 32  # decode steps a trial lasts
WINDOW = 64  # finished trials the decision looks at
SAMPLE = 8  # while closed, one admission in SAMPLE goes through (and starts a trial)


class AdmissionGate:
    def __init__(self, horizon: int = HORIZON, window: int = WINDOW, sample: int = SAMPLE):
        self.horizon, self.sample = horizon, sample
        self._results: deque[int] = deque(maxlen=window)  # scores of finished trials
        self._trials: dict[Key, list] = {}  # admitted key -> [start step, victim, score]
        self._victims: dict[Key, Key] = {}  # victim -> the admitted key whose trial it is in
        self._step = 0
        self._held = 0  # admissions held back since the last one sampled

    @property
    def open(self) -> bool:
        """Whether admissions pay, as far as finished trials show: open until a quarter of
        WINDOW trials have finished, then while their scores sum above zero."""
        if len(self._results) < max(1, self._results.maxlen // 4):
            return True
        return sum(self._results) > 0

    def allow(self) -> bool:
        """May an admission that evicts go ahead? While closed, one in SAMPLE may."""
        if self.open:
            return True
        self._held += 1
        if self._held < self.sample:
            return False
        self._held = 0
        return True

    def trial(self, admitted: Key, victim: Key) -> None:
        """`admitted` has just evicted `victim`: score the swap over the next HORIZON steps (a key
        is in one trial at a time)."""
        if admitted in self._trials or admitted in self._victims or victim in self._victims:
            return
        self._trials[admitted] = [self._step, victim, -1]  # the copy costs about one miss
        self._victims[victim] = admitted

    def seen(self, key: Key, hit: bool) -> None:
        """A decode step routed to `key`, which it found in a slot (`hit`) or not."""
        trial = self._trials.get(key)
        if trial is not None and hit:
            trial[2] += 1
        owner = self._victims.get(key)
        if owner is not None:  # kept, the victim would have been hit (back in a slot, it cost a copy)
            self._trials[owner][2] -= 1

    def tick(self) -> None:
        """A decode step has been observed: finish the trials that have run HORIZON steps."""
        self._step += 1
        while self._trials:  # in start order, as they were added: the finished ones come first
            key, (start, victim, score) = next(iter(self._trials.items()))
            if self._step - start < self.horizon:
                break
            del self._trials[key]
            self._victims.pop(victim, None)
            self._results.append(score)

    def clear(self) -> None:
        self._results.clear()
        self._trials.clear()
        self._victims.clear()
        self._held = 0
