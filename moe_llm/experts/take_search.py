"""`cpu_experts="auto"`: the split's take tables chosen by measured decode step time.

The cost model (`roads.take_table`) treats the GPU's and the CPU's roads to host RAM as
independent. On the H200 hosts they are not: while the GPU reads its share of a miss over the
link (beside the cache's admission copies), the CPU kernel computes its own share slower than
it computes a whole miss alone, and which split is fastest differed from host to host
(docs/benchmarks.md). So the model only orders the candidates: `ladder` lists every distinct
set of tables it gives as the CPU road's rate is scaled from 1/16 to 16 times the load-time
estimate (less CPU share to more), with `all`'s at the top. `TakeSearch` starts at the
estimate's own tables and moves along the ladder by what lone decode steps measure:

- a *window* is `WINDOW` lone decode steps' wall times (end to end, as the host sees them
  finish); its figure is their mean with the slowest eighth left out (a first step after a
  prompt, a graph capture, a host hiccup);
- a pattern search: try a neighbour (more CPU first); a trial faster than the best by over
  `TOLERANCE` becomes the best, and the next trial doubles the stride in that direction;
  otherwise the stride falls back to one, then (if the search has not come from there) the
  other direction is tried; with neither better, the search rests at the best for `REST` windows (each refreshing its figure) and
  then tries its neighbours again, so a host whose rates drift is followed.

Every entry of every table is a take both roads compute to the same bits, so moving along the
ladder never changes the tokens (`split.CpuSplit.step_time` writes the tables in place).
"""

from __future__ import annotations

import dataclasses

from .roads import Roads, TakeModel

WINDOW = 32  # lone decode steps per measurement
TOLERANCE = 0.01  # a trial must be this much faster than the best to replace it
REST = 24  # windows at the best between two rounds of trials
SCALES = [2 ** (j / 4) for j in range(-16, 17)]  # the CPU road's rate, in units of the estimate


def ladder(model: TakeModel, roads: Roads) -> tuple[list[list[list[int]]], int]:
    """The tables the model gives over SCALES of the CPU road's rate, one per distinct lone-token
    table (the steps the search times; monotone: a faster CPU road takes at least as much),
    `all`'s at the top; and the index of the estimate's own."""
    tables: list[list[list[int]]] = []
    start = 0
    for scale in SCALES:
        t = model.tables(dataclasses.replace(roads, cpu=roads.cpu * scale))
        if not tables or t[0] != tables[-1][0]:
            tables.append(t)
        elif scale == 1:
            tables[-1] = t  # the estimate's own tables, for every row count
        if scale == 1:
            start = len(tables) - 1
    top = dataclasses.replace(model, mode="all").tables(roads)
    if top[0] == tables[-1][0]:
        tables[-1] = top
    else:
        tables.append(top)
    return tables, start


class TakeSearch:
    """Where on the `ladder` the split runs, moved by the lone decode steps' measured times."""

    def __init__(self, model: TakeModel, roads: Roads):
        self.tables, self.at = ladder(model, roads)
        self.best = self.at
        self.best_s: float | None = None  # the best's last window figure
        self.stride, self.direction = 1, 1
        self.tried_other = False  # in this round: the other direction has been tried at stride 1
        self.rest = 0  # windows left to rest at the best
        self._times: list[float] = []
        self.windows = 0  # windows measured
        self.log: list[tuple[int, float]] = []  # (ladder index, window figure) per window

    @property
    def current(self) -> list[list[int]]:
        """The tables the split runs now."""
        return self.tables[self.at]

    def restart_window(self) -> None:
        """Drop the steps measured so far in this window (the tables just changed)."""
        self._times.clear()

    def observe(self, seconds: float) -> bool:
        """One lone decode step took `seconds`; True when the search moved to other tables."""
        self._times.append(seconds)
        if len(self._times) < WINDOW:
            return False
        times = sorted(self._times)[: WINDOW - WINDOW // 8]
        self._times.clear()
        figure = sum(times) / len(times)
        self.windows += 1
        self.log.append((self.at, figure))
        return self._decide(figure)

    def _decide(self, figure: float) -> bool:
        before = self.at
        if self.at == self.best:
            self.best_s = figure
            if self.rest > 0:
                self.rest -= 1
                return False
        elif figure < self.best_s * (1 - TOLERANCE):
            self.best, self.best_s = self.at, figure
            self.stride *= 2  # faster: go on, further, the same way
            self.tried_other = True  # the way back is known to be slower
        elif self.stride > 1:
            self.stride = 1  # overshot: try the nearer neighbour
        elif not self.tried_other:
            self.direction, self.tried_other = -self.direction, True
        else:  # neither neighbour is faster: rest here, then look again
            self.at, self.rest, self.stride, self.direction, self.tried_other = self.best, REST, 1, 1, False
            return self.at != before
        self.at = self._trial()
        return self.at != before

    def _trial(self) -> int:
        """The next ladder index to measure from the best, or the best itself once the ladder
        ends on both sides (then the search rests)."""
        for _ in range(2):
            nxt = min(len(self.tables) - 1, max(0, self.best + self.direction * self.stride))
            if nxt != self.best:
                return nxt
            if self.tried_other:
                break
            self.direction, self.stride, self.tried_other = -self.direction, 1, True
        self.rest, self.stride, self.direction, self.tried_other = REST, 1, 1, False
        return self.best
