"""PrefixCache: the KV of recent prompt prefixes, block by block, for follow-up requests.

A prompt is cut into blocks of `block` tokens from position 0 (the engine prefills in
chunks of exactly that size, aligned the same way). Block j is keyed by a hash chain over
the tokens of blocks 0..j, so a key names the whole prefix up to the block's end, as in
vLLM and llama.cpp. Only blocks that a prefill chunk computed are stored, never decoded
positions: a restored block then holds bit for bit the keys and values that a fresh
prefill of the same chunk would compute, so greedy output with reuse equals output
without it. A request needs at least one token of its own to prefill (it needs the last
position's logits), so at most ``(n - 1) // block`` blocks are reused.

Blocks live in host RAM (the device's memory belongs to the expert cache) as one
[heads, block, dim] key and value tensor per layer, evicted least recently used past
`max_bytes`. Restoring is one concatenation per layer and one copy to the device.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Block:
    keys: list[torch.Tensor]  # per layer [1, heads, block, dim], host
    values: list[torch.Tensor]
    nbytes: int


def block_hashes(token_ids: list[int], block: int) -> list[bytes]:
    """Chained hash of each whole block of `token_ids` (a key names the prefix up to its end)."""
    out, h = [], b""
    for start in range(0, len(token_ids) - block + 1, block):
        d = hashlib.blake2b(h, digest_size=16)
        d.update(",".join(map(str, token_ids[start : start + block])).encode())
        h = d.digest()
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, block: int, max_bytes: int):
        self.block = block
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens served from the cache instead of prefilled
        self.lookup_tokens = 0  # prompt tokens looked up (hit rate denominator)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, token_ids: list[int]) -> tuple[int, list[_Block]]:
        """(tokens covered, the blocks) of the longest cached prefix that leaves one token to prefill."""
        usable = (len(token_ids) - 1) // self.block
        hashes = block_hashes(token_ids[: usable * self.block], self.block)
        found: list[_Block] = []
        with self._lock:
            for h in hashes:
                blk = self._blocks.get(h)
                if blk is None:
                    break
                self._blocks.move_to_end(h)
                found.append(blk)
            self.lookup_tokens += len(token_ids)
            self.hit_tokens += len(found) * self.block
        return len(found) * self.block, found

    def restore(self, kv, blocks: list[_Block], device: torch.device) -> None:
        """Fill an empty transformers DynamicCache with the blocks' keys and values."""
        for i in range(len(blocks[0].keys)):
            k = torch.cat([b.keys[i] for b in blocks], dim=-2).to(device)
            v = torch.cat([b.values[i] for b in blocks], dim=-2).to(device)
            kv.update(k, v, i)

    def store(self, token_ids: list[int], kv, start: int) -> None:
        """Keep the block of positions [start, start + block) of a prefill that just ran
        (`token_ids` holds at least that many tokens; `kv` holds those positions)."""
        if self.max_bytes <= 0 or start % self.block:
            return
        h = block_hashes(token_ids[: start + self.block], self.block)[-1]
        with self._lock:
            if h in self._blocks:
                self._blocks.move_to_end(h)
                return
        end = start + self.block
        keys = [layer.keys[:, :, start:end].to("cpu", copy=True) for layer in kv.layers]
        values = [layer.values[:, :, start:end].to("cpu", copy=True) for layer in kv.layers]
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if nbytes > self.max_bytes:
            return
        with self._lock:
            self._blocks[h] = _Block(keys, values, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes and self._blocks:
                _, old = self._blocks.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.nbytes = 0

    def stats(self) -> dict[str, float]:
        return {
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_lookup_tokens": self.lookup_tokens,
            "prefix_cache_hit_rate": self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0,
            "prefix_cache_blocks": len(self._blocks),
            "prefix_cache_bytes": self.nbytes,
            "prefix_cache_evictions": self.evictions,
        }


def reusable(kv) -> bool:
    """Whether a fresh transformers cache stores every position (plain dynamic layers, no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(kv, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
