"""Sequence: the state of one request in the batch (`batching`), from its prompt to its last token;
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
    from .engine import StreamChunk

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
