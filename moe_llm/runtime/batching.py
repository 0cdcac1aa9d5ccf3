"""Continuous batching: every request that shares an engine advances in the same steps.

A request is a `Sequence` with its own transformers KV cache. `Batcher.step` admits
waiting sequences (up to `max_batch` active, and with a GPU budget as many as its planned KV
holds: `kv_room`), runs one prefill chunk of the oldest sequence still prefilling (`prefill`: chunks of `prefill_chunk` tokens aligned at position
0, so a long prompt never stalls the others for more than one chunk, and a prompt is always
cut the same way whatever else runs; the prefix cache's longest match restored first), then
decodes one token for every sequence that has its first token. There is no scheduler
thread: the consumer that needs the next token and finds no step running runs one for
everyone (leader/follower), so a lone request runs in its own thread exactly as before,
and an exception inside a forward surfaces in the threads whose requests were in that step.

Decoding B > 1 rows: "fused" runs one trunk forward for all rows (`fused_decode`), in which
each row is computed as it would be alone (`kernels.rows`), so the union of the rows' routed
experts is read once per step and every row's tokens are bit-identical to running alone.
"exact" runs each row's one-token forward separately. "auto" is "exact" on CPU (where a fused
step saves nothing) and "fused" on CUDA, where a single decoding row keeps the CUDA-graph
decoder and moves to the fused step when a second row joins ("exact" on CUDA decodes
everything eagerly). A model whose trunk cannot be driven row by row (see
`FusedDecode.unsupported`) decodes its rows one by one.

A greedy request on the graph decoder runs ahead by one step (`_decode_ahead`): each step
enqueues the request's next step, fed by this one's argmax on the device, before the host
reads this one's token, so the GPU computes while the host ends the step (the cache's
admissions, detokenizing, stop checks). A step run ahead belongs to a batch that stays as
it is; whatever ends its request, changes the batch or resets the cache first forgets it
(`drop_ahead`), and it is never observed, counted or emitted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..config import GenerationConfig
from ..errors import EngineClosedError
from . import kv_room
from .batch_counters import BatchCounters
from .decode_graph import GraphCaptureError, take_back
from .fused_decode import FusedDecode
from .prefill import Prefill
from .prefix_cache import PrefixCache
from .sampling import sample
from .sequence import DECODE, DONE, PREFILL, QueueFullError, Sequence
from .textstream import TextStream

if TYPE_CHECKING:
    from .engine import Engine, StreamChunk

log = logging.getLogger(__name__)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        max_queue: int,
        prefill_chunk: int,
        prefix: PrefixCache | None,
        exact: bool,
    ):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefix = prefix
        self.prefill = Prefill(engine, prefill_chunk, prefix)
        self.exact = exact
        self._cond = threading.Condition()
        self._stepping = False
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self._graph_owner: Sequence | None = None  # the sequence whose KV the graph decoder holds
        self._graph_dec = None  # that decoder
        self._fused = FusedDecode(engine)
        self.counters = BatchCounters()  # for /metrics (the engine's Stats hold the per-token ones)

    # -- the consumer side ----------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active_requests(self) -> int:
        return len(self.active)

    def submit(self, prompt_ids: list[int], gen: GenerationConfig) -> Sequence:
        eng = self.engine
        max_new = min(gen.max_new_tokens, eng.context_length - len(prompt_ids))
        generator = torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None
        seq = Sequence(prompt_ids, gen, max_new, TextStream(eng.tokenizer, gen.stop), generator, eng.stats.copy())
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                self.counters.rejected += 1
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(seq)
        return seq

    def drain(self, seq: Sequence) -> Iterator[StreamChunk]:
        """The chunks of `seq` as they come; runs steps whenever nobody else is."""
        try:
            while True:
                chunk, lead = None, False
                with self._cond:
                    while not seq.out and seq.state != DONE and self._stepping:
                        self._cond.wait()
                    if seq.out:
                        chunk = seq.out.popleft()
                    elif seq.state == DONE:
                        err, seq.error = seq.error, None
                        if err is not None:
                            try:
                                raise err
                            finally:
                                err = None  # no cycle through the traceback: the KV it holds goes now
                        return
                    else:
                        self._stepping = lead = True
                if lead:
                    try:
                        self.step()
                    except BaseException:  # re-raised here (Ctrl-C): the request failed with it
                        seq.error = None
                        raise
                    finally:
                        with self._cond:
                            self._stepping = False
                            self._cond.notify_all()
                    continue
                yield chunk
        finally:
            self.cancel(seq)

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence its consumer left (a no-op once it is done)."""
        with self._cond:
            if seq.state == DONE:
                return
            seq.cancelled = True
            if seq in self.waiting:
                self.waiting.remove(seq)
                seq.state = DONE
            elif not self._stepping and self._drop_cancelled():  # else the running step drops it
                self.engine.cache.synchronize()  # fence in-flight copies once a request has left

    def fail_all(self, exc: BaseException) -> None:
        """Fail every queued and running request with `exc` and free their KV (`Engine.close`)."""
        with self._cond:
            for seq in [*self.waiting, *self.active]:
                self._finish_failed(seq, exc)
            self.waiting.clear()
            self._release_done()
        self.drop_ahead()
        self._fused.drop()

    # -- steps ------------------------------------------------------------------------------
    def step(self) -> None:
        eng = self.engine
        with eng._lock, torch.inference_mode():
            if eng.closed:  # a consumer that was waiting when the engine closed: its request failed
                self.fail_all(EngineClosedError("the engine is closed"))
                return
            with self._cond:
                left = self._drop_cancelled()
                while self.waiting and len(self.active) < self.max_batch:
                    if not kv_room.fits(self.active, self.waiting[0], eng):
                        self.counters.kv_wait(self.waiting[0])
                        break
                    seq = self.waiting.popleft()
                    seq.state = PREFILL
                    self.active.append(seq)
            decoding = [s for s in self.active if s.state == DECODE]
            prefilling = [s for s in self.active if s.state == PREFILL]
            work = ([prefilling[0]] if prefilling else []) + decoding
            if len(work) != 1 or work[0] is not self._graph_owner:  # the batch changed under a step run ahead
                self.drop_ahead()
            try:
                if prefilling:
                    self._prefill_chunk(prefilling[0])
                if decoding:
                    self._decode(decoding)
            except BaseException as exc:
                # raised inside a forward (error, Ctrl-C): slot bookkeeping may be half updated, and
                # these rows' KV too: return every slot to the free list and fail the step's requests
                eng.runtime.reset()
                self._fused.drop()
                with self._cond:
                    for seq in work:
                        self._finish_failed(seq, exc)
                    self._release_done()
                eng.cache.synchronize()
                if not isinstance(exc, Exception):
                    raise
                return
            self.counters.step(len(decoding) + (1 if prefilling and prefilling[0].generated else 0))
            with self._cond:
                left += self._drop_cancelled() + self._release_done()
            if left:  # requests left the batch: fence in-flight copies (as at the end of every request)
                eng.cache.synchronize()

    def _prefill_chunk(self, seq: Sequence) -> None:
        if seq.kv is None:
            self.prefill.begin(seq, self._graph_bound(seq, whole=True))
        logits = self.prefill.run(seq)
        if logits is None:
            return
        tok = sample(logits, seq.gen.temperature, seq.gen.top_k, seq.gen.top_p, seq.generator)
        self.engine.runtime.end_step()
        seq.state = DECODE
        self._maybe_graph(seq)
        self.prefill.keep(seq, self._kv_layers)
        self._emit(seq, tok)

    def _graph_bound(self, seq: Sequence, whole: bool = False):
        """The CUDA-graph decoder if `seq` goes to it once prefilled (a lone decoding request on
        CUDA that fits its static KV; `whole`: and prefilled in one chunk from position 0), else None."""
        graphs = self.engine.graphs
        if graphs is None or self._graph_owner is not None or len(self.active) > 1 or self.waiting:
            return None
        if len(seq.prompt_ids) + seq.max_new - 1 > graphs.max_len:
            return None  # past the static KV: this request decodes eagerly
        if whole and (seq.cached or len(seq.prompt_ids) > self.prefill.chunk):
            return None
        return graphs

    def _maybe_graph(self, seq: Sequence) -> None:
        """A lone decoding request on CUDA hands its KV to the CUDA-graph decoder; one that wrote
        its prompt through to the static KV and does not go (another request came) takes it back."""
        graphs = self._graph_bound(seq)
        if graphs is None:
            take_back(seq.kv, seq.cached)
            return
        graphs, _ = self.engine._graph_begin(graphs, seq.kv, seq.cached)  # on failure seq.kv holds it all
        if graphs is not None:
            seq.kv, seq.on_graph, self._graph_owner, self._graph_dec = None, True, seq, graphs

    def _kv_layers(self, seq: Sequence) -> list:
        """Per layer (keys, values) of `seq`'s positions, wherever they are (the static KV on the
        graph, or the batch graph's)."""
        if self._fused.holds(seq):
            return self._fused.graph.layers_of(seq)
        if seq.on_graph:
            return list(zip(self._graph_dec.kv.keys, self._graph_dec.kv.values, strict=True))
        return [(layer.keys, layer.values) for layer in seq.kv.layers]

    def _leave_graph(self, seq: Sequence) -> None:
        eng = self.engine
        if seq.on_graph:
            self.drop_ahead()
            seq.kv = self._graph_dec.kv.dump(eng._new_kv(), seq.cached)
            seq.on_graph = False
        if self._graph_owner is seq:
            self._graph_owner = None

    def drop_ahead(self) -> None:
        """Forget the step run ahead, if any (`_decode_ahead`): its request, if it goes on,
        enqueues that step again from the host."""
        if self._graph_dec is not None:
            self._graph_dec.discard()

    def _decode(self, rows: list[Sequence]) -> None:
        self.counters.max_rows = max(self.counters.max_rows, len(rows))
        if len(rows) > 1:
            for seq in rows:
                self._leave_graph(seq)
        if len(rows) == 1 or self.exact or self._fused.unsupported is not None:
            for seq in rows:
                if self._fused.holds(seq):  # out of a batch graph: its KV in a cache of its own again
                    self._fused.release(seq)
                    if len(rows) == 1 and not self.exact:
                        self._maybe_graph(seq)  # the last row of a batch returns to the graph decoder
                self._decode_one(seq)
            return
        self._decode_fused(rows)

    def _decode_one(self, seq: Sequence) -> None:
        """One token of one request: on the graph decoder (run ahead when greedy), else the eager one-token forward."""
        eng = self.engine
        if seq.on_graph:
            try:
                return self._decode_ahead(seq) if seq.gen.temperature <= 0 else self._decode_graph(seq)
            except GraphCaptureError as exc:  # graphs are off now: continue eagerly from the same KV
                eng._graphs_failed(exc)
                self._leave_graph(seq)
        eng.runtime.begin_step()
        ids = torch.tensor([[seq.next_tok]], device=eng.device)
        logits = eng.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{eng._kv_arg: seq.kv}).logits[0, -1]
        self._sampled(seq, logits)

    def _decode_graph(self, seq: Sequence) -> None:
        """One sampled token on the graph decoder: a replay, then the host samples (and waits)."""
        self.engine.runtime.begin_step()
        self._sampled(seq, self._graph_dec.step(seq.next_tok, seq.cached))

    def _sampled(self, seq: Sequence, logits: torch.Tensor) -> None:
        new = sample(logits, seq.gen.temperature, seq.gen.top_k, seq.gen.top_p, seq.generator)
        self.engine.runtime.end_step()  # the step is done: the cache sees its routing, admits experts
        seq.cached += 1
        self._emit(seq, new)

    def _decode_ahead(self, seq: Sequence) -> None:
        """One greedy token on the graph decoder, run ahead: the step after this one (fed by
        this one's argmax on the device) is enqueued before the host waits for this one, then
        the host ends this one with the routing copied when it was enqueued. No step runs
        ahead past the request's last token, or when the next step may have other work."""
        dec, rt = self._graph_dec, self.engine.runtime
        if not dec.in_flight:  # this step was not run ahead: its input comes from the host
            rt.begin_step()
            dec.enqueue(seq.cached, seq.next_tok)
        if seq.generated + 1 < seq.max_new and self._alone_next():
            rt.begin_step()
            dec.enqueue(seq.cached + 1)
        tok, routed = dec.take()
        rt.end_step(routed)
        seq.cached += 1
        self._emit(seq, tok)

    def _alone_next(self) -> bool:
        """Whether the next step decodes the one active request and nothing else."""
        return len(self.active) == 1 and not (self.waiting and self.max_batch > 1)

    def _decode_fused(self, rows: list[Sequence]) -> None:
        """One trunk forward for B one-token rows (`fused_decode`)."""
        rt = self.engine.runtime
        rt.begin_step()
        logits = self._fused(rows)  # [B, V]
        greedy = torch.argmax(logits, dim=-1).tolist()  # one host read for every greedy row
        picks = [greedy[b] if seq.gen.temperature <= 0 else
                 sample(logits[b], seq.gen.temperature, seq.gen.top_k, seq.gen.top_p, seq.generator)
                 for b, seq in enumerate(rows)]  # fmt: skip
        rt.end_step(rows=len(rows))  # the step is done: the cache sees every row's routing, admits experts
        self.counters.batched_rows += len(rows)
        for seq, new in zip(rows, picks, strict=True):
            seq.cached += 1
            self._emit(seq, new)

    # -- output -----------------------------------------------------------------------------
    def _emit(self, seq: Sequence, tok: int) -> None:
        from .engine import StreamChunk

        stats = self.engine.stats
        if seq.generated == 0:
            seq.t_first = time.perf_counter()
            seq.ttft = seq.t_first - seq.t0
            stats.prefill_seconds += seq.ttft
            self.counters.first_token(seq.ttft)
        stats.tokens_generated += 1
        seq.generated += 1
        seq.out_ids.append(tok)
        if tok in self.engine.eos_ids:
            return self._finish(seq, "stop")
        seq.pending.append(tok)
        delta = seq.text.push(tok)
        if delta:
            with self._cond:
                seq.out.append(StreamChunk(delta, seq.pending))
                self._cond.notify_all()
            seq.pending = []
        if seq.text.stopped:
            return self._finish(seq, "stop")
        seq.next_tok = tok
        if seq.generated >= seq.max_new:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        from .engine import StreamChunk

        tail = seq.text.flush() if not seq.text.stopped else ""
        seq.account(self.engine.stats)
        chunk = StreamChunk(tail, seq.pending, reason, seq.call_stats(self.engine))
        seq.pending = []
        self.prefill.keep(seq, self._kv_layers)  # the prompt and the reply, for the next turn
        with self._cond:
            seq.out.append(chunk)
            seq.state = DONE
            self._cond.notify_all()
        self._free(seq)

    def _finish_failed(self, seq: Sequence, exc: BaseException) -> None:
        if seq.state == DONE:
            return
        if seq.ttft is not None:
            seq.account(self.engine.stats)
        seq.error, seq.state = exc, DONE
        self._free(seq)
        self._cond.notify_all()

    def _free(self, seq: Sequence) -> None:
        self._fused.forget(seq)
        if seq.on_graph:
            self.drop_ahead()
        if self._graph_owner is seq:
            self._graph_owner = None
        seq.on_graph = False
        seq.kv = None

    def _drop_cancelled(self) -> int:
        """(under the condition) Remove cancelled sequences from the batch, counting what they made.
        Returns how many left."""
        for seq in [s for s in self.active if s.cancelled and s.state != DONE]:
            if seq.ttft is not None:
                seq.account(self.engine.stats)
            seq.state = DONE
            self._free(seq)
        return self._release_done()

    def _release_done(self) -> int:
        n = len(self.active)
        self.active = [s for s in self.active if s.state != DONE]
        return n - len(self.active)

    def stats(self) -> dict[str, Any]:
        d = {
            "queue_depth": self.queue_depth,
            "active_requests": self.active_requests,
            "max_batch": self.max_batch,
            **self.counters.to_dict(),
            "batch_mode": "exact" if self.exact or self._fused.unsupported else "fused",
            "batch_graph_captures": self._fused.graph.captures if self._fused.graph is not None else 0,
            "batch_graph_replays": self._fused.graph.replays if self._fused.graph is not None else 0,
        }
        d.update(self.prefix.stats() if self.prefix is not None else PrefixCache(0).stats())
        return d
