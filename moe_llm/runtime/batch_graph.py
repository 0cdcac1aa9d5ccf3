"""CUDA-graph decode of batched rows: the fused step (`fused_decode`) of B rows replayed as one
graph, as `decode_graph` replays a lone request's step.

While rows decode together their keys and values live in one static cache (`RowsKV`:
[B, kv heads, W, head dim] per layer, row b at index b, W the widest row's window), so the
step has fixed addresses and is captured once per batch: per (rows, windows), at the first
step of a new set of rows or when a row crosses into a wider window of the graph decoder
(each row's attention reads its own window, as alone). Then the rows' KV is moved in (from
their own caches, or from the previous batch's), the step is warmed up eagerly and captured,
and every later step is one replay: the host only writes the rows' tokens and positions and
reads the logits. A row that leaves the batch and decodes on gets its KV back in a cache of
its own (`release`). One batch graph is held at a time: a new one frees the last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .decode_graph import _CAPTURE_LOCK, GraphCaptureError, _capture_stream
from .sequence import DONE

if TYPE_CHECKING:
    from .fused_decode import FusedDecode
    from .sequence import Sequence

log = logging.getLogger(__name__)


class RowsKV:
    """The static KV cache of a batch: each row writes its new key and value at its own position
    (`pos` [B, 1] on the device) and attention reads all `width` positions of every row (the
    step's mask hides what lies past each row's position)."""

    def __init__(self, pos: torch.Tensor, width: int):
        self.pos, self.width = pos, width
        self.index = torch.arange(pos.shape[0], device=pos.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def fill(self, rows: list[Callable[[int], tuple[torch.Tensor, torch.Tensor]]], lengths: list[int], layers: int,
             done: Callable[[int], None] | None = None) -> None:  # fmt: skip
        """Allocate every layer and copy row b's first lengths[b] positions from rows[b](layer)
        ((keys, values) [1, heads, >= n, dim]); `done(layer)` after each layer (the previous
        batch frees its copy of it, so a move never holds two whole caches)."""
        B = len(rows)
        for layer in range(layers):
            srcs = [src(layer) for src in rows]
            k0, v0 = srcs[0]
            keys = k0.new_zeros(B, k0.shape[1], self.width, k0.shape[3])
            values = v0.new_zeros(B, v0.shape[1], self.width, v0.shape[3])
            for b, ((k, v), n) in enumerate(zip(srcs, lengths, strict=True)):
                keys[b, :, :n].copy_(k[0, :, :n])
                values[b, :, :n].copy_(v[0, :, :n])
            self.keys.append(keys)
            self.values.append(values)
            del srcs, k0, v0, k, v
            if done is not None:
                done(layer)

    def free(self, layer: int) -> None:
        """Drop this cache's tensors of `layer` (the batch is being replaced)."""
        self.keys[layer] = self.values[layer] = None

    def layer_of(self, b: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][b : b + 1], self.values[layer][b : b + 1]

    def layers_of(self, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[b : b + 1], v[b : b + 1]) for k, v in zip(self.keys, self.values, strict=True)]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        p = self.pos.view(-1)
        self.keys[layer_idx][self.index, :, p] = key_states[:, :, 0]
        self.values[layer_idx][self.index, :, p] = value_states[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]


class _Batch:
    def __init__(self, rows: list[Sequence], windows: list[tuple[int, bool]], device: torch.device):
        self.rows = list(rows)
        self.windows = list(windows)
        self.width = max(w for w, _ in windows)
        width = self.width
        self.tok = torch.zeros(len(rows), 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(len(rows), 1, dtype=torch.long, device=device)
        self.kv = RowsKV(self.pos, width)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def slot(self, seq: Sequence) -> int | None:
        return next((b for b, s in enumerate(self.rows) if s is seq), None)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class BatchGraph:
    def __init__(self, fused: FusedDecode):
        self.fused = fused
        self.engine = fused.engine
        self.batch: _Batch | None = None
        self.captures = 0  # batch graphs captured
        self.replays = 0  # steps replayed

    def holds(self, seq: Sequence) -> bool:
        return self.batch is not None and self.batch.slot(seq) is not None

    def layers_of(self, seq: Sequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [1, heads, W, dim] of a row this batch holds."""
        return self.batch.kv.layers_of(self.batch.slot(seq))

    def release(self, seq: Sequence) -> None:
        """Give a row that decodes on outside this batch its KV back, in a cache of its own."""
        if not self.holds(seq):
            return
        seq.kv = self.engine._new_kv()
        for i, (k, v) in enumerate(self.layers_of(seq)):
            seq.kv.update(k[:, :, : seq.cached].clone(), v[:, :, : seq.cached].clone(), i)
        self._vacate(seq)

    def _vacate(self, seq: Sequence) -> None:
        """`seq`'s slot is stale now; a batch with no row left goes (graph and KV)."""
        self.batch.rows[self.batch.slot(seq)] = None
        if all(s is None for s in self.batch.rows):
            self.batch = None

    def forget(self, seq: Sequence) -> None:
        """`seq` is done: its slot is stale, and a batch with no row left goes (graph and KV)."""
        if self.holds(seq):
            self._vacate(seq)

    def drop(self) -> None:
        """Forget the batch (its rows failed) and free its graph and KV."""
        self.batch = None

    def step(self, rows: list[Sequence], windows: list[tuple[int, bool]]) -> torch.Tensor:
        """Logits [B, V] of the next token of every row: one replay (after a capture when the
        rows or the window changed). Raises GraphCaptureError if the step cannot be captured;
        the rows then hold their KV in their own caches again."""
        batch = self.batch
        if batch is None or batch.windows != windows or not _same(batch.rows, rows):
            batch = self._rebuild(rows, windows)
        batch.tok.copy_(torch.tensor([[s.next_tok] for s in rows]), non_blocking=False)
        batch.pos.copy_(torch.tensor([[s.cached] for s in rows]), non_blocking=False)
        if batch.graph is None:
            try:
                self._capture(batch)
            except Exception as exc:
                for seq in rows:
                    self.release(seq)
                self.batch = None
                raise GraphCaptureError(
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
        batch.graph.replay()
        self.replays += 1
        self.engine.runtime.cache.step_enqueued()
        return batch.logits

    def _rebuild(self, rows: list[Sequence], windows: list[tuple[int, bool]]) -> _Batch:
        old = self.batch
        if old is not None:
            for seq in old.rows:  # rows of the last batch that decode on elsewhere get their KV back
                if seq is not None and seq.state != DONE and not any(seq is s for s in rows):
                    self.release(seq)
        self.batch = None  # the last batch's graph goes now, its KV layer by layer as it is moved
        new = _Batch(rows, windows, self.engine.device)
        sources = []
        for seq in rows:
            b = old.slot(seq) if old is not None else None
            if b is not None:
                sources.append(lambda layer, b=b: old.kv.layer_of(b, layer))
            else:
                sources.append(lambda layer, kv=seq.kv: (kv.layers[layer].keys, kv.layers[layer].values))
        layers = self.engine.hf_config.num_hidden_layers
        new.kv.fill(sources, [s.cached for s in rows], layers, old.kv.free if old is not None else None)
        for seq in rows:
            seq.kv = None
        self.batch = new
        return new

    def _capture(self, batch: _Batch) -> None:
        """Warm up once on a side stream (the real step: it writes each row's KV at its position,
        which the replay then rewrites), then capture the step."""
        log.info("capturing the batched decode graph for %d rows, a %d-position window", len(batch.rows), batch.width)
        dev = self.engine.device
        stream = _capture_stream(dev)
        trunk = self.fused.trunk
        with _CAPTURE_LOCK:
            torch.cuda.synchronize(dev)
            with torch.cuda.stream(stream):
                trunk(batch.tok, batch.pos, batch.width, batch.kv, batch.windows)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")  # its own pool: it goes with the batch
                try:
                    batch.logits = trunk(batch.tok, batch.pos, batch.width, batch.kv, batch.windows)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream(dev).wait_stream(stream)
            torch.cuda.synchronize(dev)
        batch.graph = graph
        self.captures += 1
