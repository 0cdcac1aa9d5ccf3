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
  finish) and, where the caller knows them, their missed experts. The slowest eighth is left
  out (a first step after a prompt, a graph capture, a host hiccup). Two windows are compared
  at the long-run mean miss count: each window's mean time moved along its own least-squares
  slope of time on misses. Routing draws 14.5 +- 3.3 misses a step at 12 GiB on
  random weights, so a window's raw mean carries about 3% of noise from the draw alone; that is
  the size of the differences between neighbouring tables;
- a pattern search: try a neighbour (more CPU first). A trial must be faster than the best by
  over `TOLERANCE` twice: against the best's window before it, and then against a window of
  the best timed right after it. Only then does it become the best, and the next trial doubles
  the stride in that direction. Bracketing a trial between two windows of the best keeps a
  host that speeds up or slows down over time from passing as a faster table. On one H200
  host, timed against the best's earlier window only, the search climbed from the model's
  tables to more CPU share and stopped at 0.95 of `all` (55.4 against 58.6 tok/s). In the same
  lease the `no-prefetch` row came back to the model's tables and ran at 66.3
  (`benchmarks/results/h200-policy-81dfddf.json`);
  otherwise the stride falls back to one, then (if the search has not come from there) the
  other direction is tried; with neither better, the search rests at the best for `REST`
  windows (each refreshing its window) and
  then tries its neighbours again, so a host whose rates drift is followed.

Every entry of every table is a take both roads compute to the same bits, so moving along the
ladder never changes the tokens (`split.CpuSplit.step_time` writes the tables in place).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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


class Fit(NamedTuple):
    """One window: its mean step time, mean misses, and slope of time on misses."""

    time_s: float
    misses: float
    slope_s: float  # seconds a step per missed expert

    def at(self, misses: float | None) -> float:
        """The window's step time at `misses` missed experts (None: its own mean)."""
        return self.time_s if misses is None else self.time_s + self.slope_s * (misses - self.misses)


class TakeSearch:
    """Where on the `ladder` the split runs, moved by the lone decode steps' measured times."""

    def __init__(self, model: TakeModel, roads: Roads):
        self.tables, self.at = ladder(model, roads)
        self.best = self.at
        self.best_fit: Fit | None = None  # the best's last window
        self.stride, self.direction = 1, 1
        self.tried_other = False  # in this round: the other direction has been tried at stride 1
        self.rest = 0  # windows left to rest at the best
        self.pending: tuple[int, Fit] | None = None  # a trial that beat the best, until the best is timed again
        self._times: list[float] = []
        self._misses: list[int] = []
        self._seen_misses = (0, 0)  # (steps, misses) over every observed step: the long-run mean
        self.windows = 0  # windows measured
        self.log: list[tuple[int, float]] = []  # (ladder index, window figure) per window

    @property
    def current(self) -> list[list[int]]:
        """The tables the split runs now."""
        return self.tables[self.at]

    def restart_window(self) -> None:
        """Drop the steps measured so far in this window (a window is full, or its steps do not count)."""
        self._times.clear()
        self._misses.clear()

    def observe(self, seconds: float, misses: int | None = None) -> bool:
        """One lone decode step took `seconds` and missed `misses` experts (None: not known);
        True when the search moved to other tables."""
        self._times.append(seconds)
        if misses is not None:
            self._misses.append(misses)
            n, total = self._seen_misses
            self._seen_misses = (n + 1, total + misses)
        if len(self._times) < WINDOW:
            return False
        fit = self._fit()
        self.restart_window()
        self.windows += 1
        self.log.append((self.at, fit.at(self._mean_misses())))
        return self._decide(fit)

    def _mean_misses(self) -> float | None:
        n, total = self._seen_misses
        return total / n if n else None

    def _fit(self) -> Fit:
        """The window without its slowest eighth: mean time, mean misses and the least-squares
        slope of time on misses (0 where the misses are unknown or all equal)."""
        keep = sorted(range(len(self._times)), key=self._times.__getitem__)[: WINDOW - WINDOW // 8]
        times = [self._times[i] for i in keep]
        mean_t = sum(times) / len(times)
        if len(self._misses) != len(self._times):
            return Fit(mean_t, 0.0, 0.0)
        ms = [self._misses[i] for i in keep]
        mean_m = sum(ms) / len(ms)
        var = sum((m - mean_m) ** 2 for m in ms)
        slope = sum((t - mean_t) * (m - mean_m) for t, m in zip(times, ms, strict=True)) / var if var else 0.0
        return Fit(mean_t, mean_m, slope)

    def _decide(self, fit: Fit) -> bool:
        before = self.at
        mean_m = self._mean_misses()
        if self.at == self.best:
            pending, self.pending = self.pending, None
            self.best_fit = fit
            if pending is not None:  # the best again, right after a trial that beat its earlier window
                at, trial = pending
                if trial.at(mean_m) < fit.at(mean_m) * (1 - TOLERANCE):  # faster than before and after
                    self.best, self.best_fit = at, trial
                    self.stride *= 2  # faster: go on, further, the same way
                    self.tried_other = True  # the way back is known to be slower
                    self.at = self._trial()
                else:  # the best had drifted (or drawn) slow: the trial lost after all
                    self.at = self._after_loss()
                return self.at != before
            if self.rest > 0:
                self.rest -= 1
                return False
            self.at = self._trial()
        elif fit.at(mean_m) < self.best_fit.at(mean_m) * (1 - TOLERANCE):  # both at today's mean
            self.pending = (self.at, fit)  # measure the best again before believing it
            self.at = self.best
        else:
            self.at = self._after_loss()
        return self.at != before

    def _after_loss(self) -> int:
        """Where to go after a trial that was not faster than the best."""
        if self.stride > 1:
            self.stride = 1  # overshot: try the nearer neighbour
        elif not self.tried_other:
            self.direction, self.tried_other = -self.direction, True
        else:  # neither neighbour is faster: rest here, then look again
            return self._rest()
        return self._trial()

    def _rest(self) -> int:
        """Rest REST windows at the best; the next round starts over (stride 1, more CPU first)."""
        self.rest, self.stride, self.direction, self.tried_other = REST, 1, 1, False
        return self.best

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
        return self._rest()
