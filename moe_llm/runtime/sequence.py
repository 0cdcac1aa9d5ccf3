"""Sequence: the state of one request in the batch (`batching`), from its prompt to its last token,
and what it adds to the counters;
RequestStream: the iterator of its chunks that the caller holds."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..config import GenerationConfig
from ..errors import MoeLLMError
from .stats import Stats
from .textstream import TextStream

if TYPE_CHECKING:
    from .batching import Batcher
    from .engine import Engine, StreamChunk

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


@dataclass
class Sequence:
    prompt_ids: list[int]
    gen: GenerationConfig
    max_new: int
    text: TextStream
    generator: torch.Generator | None
    before: Stats
    t0: float = field(default_factory=time.perf_counter)
    state: str = WAITING
    kv: Any = None  # transformers DynamicCache; None while the graph decoder holds the KV
    cached: int = 0  # positions whose keys and values are in the KV and belong to it (not a step run ahead's)
    clean: int = 0  # leading positions computed as a fresh prefill computes them (`prefill`)
    kept: int = 0  # leading positions stored in the prefix cache
    prefilled: int = 0  # prompt tokens run through prefill forwards (not restored)
    out_ids: list[int] = field(default_factory=list)  # every sampled token (the KV holds all but the last)
    next_tok: int = -1  # the last sampled token, fed by the next decode step
    generated: int = 0
    pending: list[int] = field(default_factory=list)
    out: deque = field(default_factory=deque)  # StreamChunks not yet taken by the consumer
    on_graph: bool = False
    ttft: float | None = None
    t_first: float = 0.0
    prefix_hit: int = 0
    error: BaseException | None = None
    cancelled: bool = False
    kv_waited: bool = False  # it waited in the queue for KV room (`kv_room.fits`)

    def account(self, stats: Stats) -> None:
        """Add this request, once it ends after its first token, to the engine's counters."""
        stats.decode_seconds += time.perf_counter() - self.t_first
        stats.requests += 1
        stats.prompt_tokens += len(self.prompt_ids)

    def call_stats(self, eng: Engine) -> dict[str, Any]:
        """The stats of this request's last chunk."""
        d = (eng.stats - self.before).to_dict()  # expert traffic: every request that ran meanwhile
        decode_s = time.perf_counter() - self.t_first
        d.update(
            tokens_generated=self.generated,
            prompt_tokens=len(self.prompt_ids),
            requests=1,
            prefill_seconds=self.ttft or 0.0,
            decode_seconds=decode_s,
            tokens_per_second=(self.generated - 1) / decode_s if decode_s > 0 and self.generated > 1 else 0.0,
            time_to_first_token_s=self.ttft or 0.0,
            prefix_cache_hit_tokens=self.prefix_hit,
            prefill_tokens=self.prefilled,
            expert_bits_per_param=eng.expert_bits_per_param,
            expert_slots=eng.cache.num_slots,
        )
        return d


class QueueFullError(MoeLLMError):
    """The engine's request queue is full; retry later."""


class RequestStream:
    """The chunks of one queued request (an iterator). Closing it, or dropping it, even before the
    first chunk, takes the request out of the batch."""

    def __init__(self, batcher: Batcher, seq: Sequence):
        self._batcher, self.seq = batcher, seq
        self._chunks = batcher.drain(seq)

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._batcher.cancel(self.seq)

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
