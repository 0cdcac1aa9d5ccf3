"""The batcher's counters for /metrics and `engine.stats_dict()` (the engine's `Stats` hold the
per-token ones): steps, rows decoded together, refused requests, requests that waited for KV
room, time to first token, and the tokens of every request over the last 10 seconds of steps."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

RECENT_S = 10.0  # the window of `tokens_per_second`


class BatchCounters:
    def __init__(self):
        self.steps = 0
        self.batched_rows = 0  # rows decoded by fused forwards
        self.max_rows = 0  # most rows decoded in one step
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.rejected = 0
        self.kv_waited = 0  # requests that waited for KV room within a budget's plan
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    def step(self, tokens: int) -> None:
        """A step ended that produced `tokens` tokens (of every request)."""
        self.steps += 1
        now = time.perf_counter()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > RECENT_S:
            self._recent.popleft()

    def kv_wait(self, seq) -> None:
        """`seq`, at the head of the queue, waits for KV room: counted once per request."""
        if not seq.kv_waited:
            seq.kv_waited = True
            self.kv_waited += 1

    def first_token(self, ttft: float) -> None:
        self.ttft_sum += ttft
        self.ttft_count += 1

    def tokens_per_second(self) -> float:
        """Tokens of every request over the last 10 seconds of steps."""
        recent = list(self._recent)
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_steps": self.steps,
            "batched_rows": self.batched_rows,
            "max_batch_rows": self.max_rows,
            "requests_rejected": self.rejected,
            "requests_kv_waited": self.kv_waited,
            "recent_tokens_per_second": self.tokens_per_second(),
            "time_to_first_token_sum_s": self.ttft_sum,
            "time_to_first_token_count": self.ttft_count,
            "time_to_first_token_avg_s": self.ttft_sum / self.ttft_count if self.ttft_count else 0.0,
        }
