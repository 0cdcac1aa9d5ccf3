"""PrefixCache: the KV of recent token sequences in a radix tree, for follow-up requests.

Each node holds a run of tokens and their keys and values (one [1, heads, n, dim] host
tensor per layer and kind); a path from the root spells a sequence that ran, and
sequences that share a prefix (a conversation's turns, questions over one RAG context)
share its nodes, so a prefix is held once. `match` walks a new prompt down the tree
token by token and returns the longest prefix held, ending anywhere inside a node;
`restore` puts that many positions into a fresh transformers `DynamicCache`; `store`
adds what a sequence ran past the tree (splitting a node where it diverges) and copies
only those positions from the device. Which positions of a sequence are worth keeping
(a prompt's, and a reply's where decode computes keys and values as a prefill does) is
the caller's choice (`prefill.Prefill.keep`).

Host RAM, not the device (which belongs to the expert cache), within `max_bytes`: past
it the least recently used leaves go first (a node's ancestors are at least as recently
used as it is, so what is left is always a tree of prefixes). The structure follows
SGLang's RadixAttention; vLLM and llama.cpp match whole blocks instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class _Node:
    tokens: list[int]  # the run this node adds to its parent's prefix
    keys: list[torch.Tensor]  # per layer [1, heads, len(tokens), dim], host
    values: list[torch.Tensor]
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)  # by first token
    tick: int = 0  # last use
    nbytes: int = 0
    copied: torch.cuda.Event | None = None  # the device-to-host copies of keys and values, until waited

    def ready(self) -> _Node:
        """This node, once its keys and values have reached host memory."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        return self


@dataclass
class Match:
    tokens: int  # leading tokens of the prompt the tree holds
    path: list[tuple[_Node, int]]  # the nodes, and how many tokens of each


def common_prefix(a: list[int], b: list[int], start: int, stop: int) -> int:
    """Length of the common prefix of `a` and `b[start:stop]`."""
    n, i = min(len(a), stop - start), 0
    while i < n:
        j = min(n, i + 256)
        if a[i:j] != b[start + i : start + j]:  # compare runs in C, then find the token
            while a[i] == b[start + i]:
                i += 1
            return i
        i = j
    return n


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cut(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Positions [a, b) of a [1, heads, n, dim] tensor, as a compact host tensor of their own.
    From CUDA the copy goes to pinned memory and is only queued on the current stream (the
    caller records an event behind it): storing a prompt's KV does not hold up its first token."""
    view = t[:, :, a:b]
    if not view.is_cuda:
        return view.clone()
    return torch.empty(view.shape, dtype=view.dtype, pin_memory=True).copy_(view, non_blocking=True)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._root = _Node([], [], [], None)
        self._nodes: set[_Node] = set()
        self._lock = threading.Lock()
        self._tick = 0
        self.nbytes = 0
        self.tokens = 0  # tokens held (each shared prefix once)
        self.hit_tokens = 0  # prompt tokens restored instead of prefilled
        self.lookup_tokens = 0  # prompt tokens looked up (hit rate denominator)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._nodes)

    def match(self, token_ids: list[int], limit: int | None = None) -> Match:
        """The longest prefix of `token_ids[:limit]` the tree holds (default: all but the last
        token, which a request must run itself for its logits)."""
        limit = len(token_ids) - 1 if limit is None else min(limit, len(token_ids))
        with self._lock:
            self.lookup_tokens += len(token_ids)
            self._tick += 1
            node, pos, path = self._root, 0, []
            while pos < limit:
                child = node.children.get(token_ids[pos])
                if child is None:
                    break
                k = common_prefix(child.tokens, token_ids, pos, limit)
                child.tick = self._tick
                path.append((child, k))
                pos += k
                if k < len(child.tokens):
                    break
                node = child
            return Match(pos, path)

    def restore(self, kv, match: Match, n: int, device: torch.device) -> None:
        """Fill an empty transformers DynamicCache with the first `n` positions of `match`."""
        pieces, left = [], n
        for node, k in match.path:
            if left <= 0:
                break
            pieces.append((node, min(k, left)))
            left -= k
        with self._lock:
            for i in range(len(pieces[0][0].keys)):
                k = torch.cat([node.ready().keys[i][:, :, :m] for node, m in pieces], dim=-2).to(device)
                v = torch.cat([node.values[i][:, :, :m] for node, m in pieces], dim=-2).to(device)
                kv.update(k, v, i)
            self.hit_tokens += n

    def store(self, token_ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        """Keep positions [0, n) of a sequence that ran: `token_ids[:n]` and, per layer, its
        (keys, values) [1, heads, >= n, dim] on any device. Only the positions past what the
        tree holds are copied; at most what fits in `max_bytes`."""
        if self.max_bytes <= 0 or n <= 0:
            return
        with self._lock:
            self._tick += 1
            node, pos, path_bytes = self._root, 0, 0
            while pos < n:
                child = node.children.get(token_ids[pos])
                if child is None:
                    break
                k = common_prefix(child.tokens, token_ids, pos, n)
                if k < len(child.tokens):
                    if pos + k == n:
                        child.tick = self._tick
                        return  # the tree holds it all already
                    self._split(child, k)  # (the tail keeps its last use)
                child.tick = self._tick
                node, pos, path_bytes = child, pos + k, path_bytes + child.nbytes
            if pos >= n:
                return
            flat = [t for kv in layers for t in kv]
            per_token = sum(t.numel() // t.shape[-2] * t.element_size() for t in flat)
            end = min(n, pos + (self.max_bytes - path_bytes) // per_token)
            if end <= pos:
                return
            leaf = _Node(list(token_ids[pos:end]), [_cut(k, pos, end) for k, _ in layers],
                         [_cut(v, pos, end) for _, v in layers], node, tick=self._tick)  # fmt: skip
            leaf.nbytes = _nbytes(leaf.keys) + _nbytes(leaf.values)
            if leaf.keys and leaf.keys[0].is_pinned():
                leaf.copied = torch.cuda.Event()
                leaf.copied.record()
            node.children[leaf.tokens[0]] = leaf
            self._nodes.add(leaf)
            self.nbytes += leaf.nbytes
            self.tokens += len(leaf.tokens)
            while self.nbytes > self.max_bytes and self._evict_one(leaf):
                pass

    def _split(self, node: _Node, k: int) -> None:
        """Cut `node` after its first `k` tokens: it keeps them, a new child takes the rest."""
        node.ready()
        tail = _Node(node.tokens[k:], [t[:, :, k:].clone() for t in node.keys],
                     [t[:, :, k:].clone() for t in node.values], node, node.children, node.tick)  # fmt: skip
        for c in tail.children.values():
            c.parent = tail
        node.tokens = node.tokens[:k]
        node.keys = [t[:, :, :k].clone() for t in node.keys]
        node.values = [t[:, :, :k].clone() for t in node.values]
        node.children = {tail.tokens[0]: tail}
        before = node.nbytes
        node.nbytes = _nbytes(node.keys) + _nbytes(node.values)
        tail.nbytes = _nbytes(tail.keys) + _nbytes(tail.values)
        self.nbytes += node.nbytes + tail.nbytes - before
        self._nodes.add(tail)

    def _evict_one(self, keep: _Node) -> bool:
        """Drop the least recently used leaf other than `keep` (whose ancestors are no leaves)."""
        leaves = [x for x in self._nodes if not x.children and x is not keep]
        if not leaves:
            return False
        old = min(leaves, key=lambda x: x.tick)
        del old.parent.children[old.tokens[0]]
        self._nodes.discard(old)
        self.nbytes -= old.nbytes
        self.tokens -= len(old.tokens)
        self.evictions += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._root.children.clear()
            self._nodes.clear()
            self.nbytes = self.tokens = 0

    def stats(self) -> dict[str, float]:
        return {
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_lookup_tokens": self.lookup_tokens,
            "prefix_cache_hit_rate": self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0,
            "prefix_cache_tokens": self.tokens,
            "prefix_cache_nodes": len(self._nodes),
            "prefix_cache_bytes": self.nbytes,
            "prefix_cache_evictions": self.evictions,
        }


def reusable(kv) -> bool:
    """Whether a fresh transformers cache stores every position (plain dynamic layers, no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(kv, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
