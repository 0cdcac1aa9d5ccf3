"""Counters shared by the cache, the prefetcher and the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Stats:
    cache_hits: int = 0
    cache_misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    admissions_held: int = 0  # decode admissions the cache's gate held back (they did not pay: experts.admission)
    bytes_to_device: int = 0  # copied into slots (copy engine)
    bytes_from_host: int = 0  # missed experts read in place from host RAM (GPU zero-copy, or CPU threads)
    cpu_expert_calls: int = 0  # missed experts (or their CPU shares) computed by CPU threads
    cpu_expert_bytes: int = 0  # expert bytes those CPU threads read
    cpu_expert_ms: float = 0.0  # their time
    decode_steps: int = 0  # one-token forwards
    decode_host_syncs: int = 0  # waits for the device inside those forwards (0 with device-side dispatch)
    tokens_generated: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens run through prefill forwards (the rest came from the prefix cache)
    requests: int = 0
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0

    def copy(self) -> Stats:
        return Stats(**asdict(self))

    def __sub__(self, other: Stats) -> Stats:
        return Stats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def hit_rate(self) -> float:
        n = self.cache_hits + self.cache_misses
        return self.cache_hits / n if n else 0.0

    @property
    def host_syncs_per_token(self) -> float:
        return self.decode_host_syncs / self.decode_steps if self.decode_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        # decode rate: tokens after the first over the time spent decoding them
        n = self.tokens_generated - self.requests
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["host_syncs_per_token"] = self.host_syncs_per_token
        d["tokens_per_second"] = self.tokens_per_second
        return d
