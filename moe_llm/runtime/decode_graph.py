"""CUDA-graph decode: one token's whole forward (every layer and the LM head) replayed as one graph.

Eager decode of a 32-layer MoE is host-bound: each layer launches dozens of small
kernels (norms, rotary, q/k/v/o GEMVs, the router, the experts) from Python, which
costs more than the GPU work itself. With device-side expert dispatch
(`experts.runtime`) nothing in a step depends on the host: the experts kernels read
``top_k_index`` and the cache's address table on the device, hits from slots and
misses from pinned host RAM. So the trunk is captured once into one CUDA graph and
replayed per token; the cache changes what the graph reads by rewriting table
entries, never by re-capturing.

The KV cache is static (`StaticKV`). The prompt runs through transformers' own
eager forward with a `DynamicCache` whose layers write each prompt key and value
straight into the static tensors and keep nothing themselves (`write_through`),
so the prompt's KV never exists twice; each decoded token then writes its
position in place.
Attention reads a window of the cache that is a power of two of at least 256
positions, with a mask over the unwritten tail; one graph is captured per window
width, lazily. Graphs are used only on CUDA, for the model families whose layers
take the standard transformers arguments, without sliding windows, with "sdpa" or
"eager" attention, and with device-side expert dispatch; everything else decodes
eagerly.

Every step leaves its greedy pick (the argmax of its logits, captured in the graph) in
the input token tensor, so a greedy request can run ahead (`enqueue`): the next step is
enqueued with that device token as its input before the host has read this one's, and
each enqueued step's token and routing come back through a small pinned ring behind an
event (`take`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from functools import cache
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer

from ..checkpoint.arch import resolve_arch

if TYPE_CHECKING:
    from ..experts.runtime import Routed

log = logging.getLogger(__name__)

MIN_WINDOW = 256
RING = 2  # steps enqueued and not yet read, at most: the one read next and the one run ahead


def window_for(pos: int, max_len: int) -> int:
    """The key positions a decode step at position `pos` reads: the smallest power-of-two
    window from MIN_WINDOW that holds positions 0..pos, at most `max_len` (one graph each)."""
    w = MIN_WINDOW
    while w < pos + 1:
        w *= 2
    return min(w, max_len)


class GraphCaptureError(RuntimeError):
    """The trunk could not be captured; the caller decodes eagerly instead."""


class _Done:
    """What stands for a CUDA event off CUDA, where a step has finished when it returns."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


@cache
def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture in the process: PyTorch keeps a
    cuBLAS workspace per stream that is never freed, so a stream per engine would leak
    one workspace per engine."""
    return torch.cuda.Stream(device)


_CAPTURE_LOCK = threading.Lock()  # engines in different threads share the capture stream


class StaticKV:
    """A transformers-compatible KV cache with fixed tensors, written at a device position.

    Only what the attention modules call is implemented: ``update(k, v, layer_idx, ...)``.
    """

    def __init__(self, num_layers: int, max_len: int, pos: torch.Tensor):
        self.num_layers = num_layers
        self.max_len = max_len
        self.pos = pos  # [1, 1] int64 on the device: the position being written
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.width = max_len  # positions attention reads; set per captured window

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Store a prompt's keys and values [1, heads, n, dim] as positions 0..n-1 of layer
        `i`, allocating the layer for the whole context on first use. False (nothing
        written) for a layout this cache does not take."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[0] != 1 or k.shape[-2] != v.shape[-2] or k.shape[-2] > self.max_len:
            return False
        if i == len(self.keys) and i < self.num_layers:  # first request: allocate, in layer order
            shape_k = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            shape_v = (v.shape[0], v.shape[1], self.max_len, v.shape[3])
            self.keys.append(torch.zeros(shape_k, dtype=k.dtype, device=k.device))
            self.values.append(torch.zeros(shape_v, dtype=v.dtype, device=v.device))
        if i >= len(self.keys):
            return False
        key, value = self.keys[i], self.values[i]
        if (key.shape[:2], key.shape[3], key.dtype) != (k.shape[:2], k.shape[3], k.dtype):
            return False
        if (value.shape[:2], value.shape[3], value.dtype) != (v.shape[:2], v.shape[3], v.dtype):
            return False
        n = k.shape[-2]
        self.keys[i][:, :, :n].copy_(k)
        self.values[i][:, :, :n].copy_(v)
        return True

    def load(self, kv, n: int) -> None:
        """Take the first `n` positions of each layer of a transformers DynamicCache: layers
        that wrote through (`write_through`) hold them already, others are copied."""
        layers = getattr(kv, "layers", None)
        if layers is None or len(layers) != self.num_layers:
            raise RuntimeError("unexpected transformers cache layout")
        for i, layer in enumerate(layers):
            if isinstance(layer, _WriteThroughLayer) and layer.written == n:
                continue
            k, v = layer.keys, layer.values  # [1, heads, n, dim]
            if k is None or k.shape[-2] != n:
                raise RuntimeError(f"layer {i} cached {0 if k is None else k.shape[-2]} positions, expected {n}")
            if not self.write(i, k, v):
                raise RuntimeError(f"layer {i} has a key/value layout the static cache does not take")

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        index = self.pos.view(-1)
        self.keys[layer_idx].index_copy_(2, index, key_states)
        self.values[layer_idx].index_copy_(2, index, value_states)
        w = self.width
        return self.keys[layer_idx][:, :, :w], self.values[layer_idx][:, :, :w]

    def dump(self, kv, n: int):
        """Copy the first `n` positions of each layer into a transformers cache (eager fallback)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            kv.update(k[:, :, :n].clone(), v[:, :, :n].clone(), i)
        return kv


class _WriteThroughLayer(DynamicLayer):
    """A DynamicLayer whose first update (the prompt) lands in the static cache instead."""

    def __init__(self, static: StaticKV | None, index: int):
        super().__init__()
        self.static, self.index, self.written = static, index, 0

    def update(self, key_states, value_states, *args, **kwargs):
        static = self.static
        if static is not None and not self.written and not self.is_initialized:
            if static.write(self.index, key_states, value_states):
                self.written = key_states.shape[-2]
                return key_states, value_states  # what an empty DynamicLayer returns: the prompt's own
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.written or super().get_seq_length(*args, **kwargs)

    def take_back(self, n: int) -> None:
        """Hold the prompt itself again (copied from the static cache): a plain dynamic layer."""
        if self.written:
            k, v = self.static.keys[self.index], self.static.values[self.index]
            self.static, self.written = None, 0
            super().update(k[:, :, :n].clone(), v[:, :, :n].clone())


def write_through(kv, static: StaticKV) -> bool:
    """Make the layers of a fresh transformers DynamicCache write a prompt's keys and values
    straight into `static` (a layer whose layout the static cache refuses keeps them
    itself). False, and `kv` untouched, where its layers are not plain dynamic ones."""
    layers = getattr(kv, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or layer.is_initialized for layer in layers):
        return False
    kv.layers = [_WriteThroughLayer(static, i) for i in range(len(layers))]
    return True


def take_back(kv, n: int) -> None:
    """Make the write-through layers of `kv` hold their first `n` positions themselves again
    (copied from the static cache), for a request that decodes eagerly after all."""
    for layer in getattr(kv, "layers", None) or []:
        if isinstance(layer, _WriteThroughLayer):
            layer.take_back(n)


class _Window:
    """The graph of one attention window width."""

    def __init__(self, width: int):
        self.width = width
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [1, 1, V] static


def unsupported_reason(model, hf_config) -> str | None:
    """Why graph decode cannot run this model, or None if it can."""
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "rotary_emb", "layers", "norm"):
        if inner is None or not hasattr(inner, name):
            return f"the trunk has no model.{name}"
    if not hasattr(model, "lm_head"):
        return "the model has no lm_head"
    if getattr(hf_config, "sliding_window", None) is not None:
        return "sliding-window attention"
    kinds = _cache_layer_kinds(hf_config)
    if kinds:  # hybrid (linear attention, Mamba) or indexed (DeepSeek sparse attention) layers
        return f"KV cache layers of type {kinds}"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r}"
    # scalings transformers' model forward applies outside the layers, which the captured trunk skips
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "embedding_multiplier"):
        if getattr(hf_config, attr, None) not in (None, 1, 1.0):
            return f"{attr} outside the decoder layers"
    return None


def _cache_layer_kinds(hf_config) -> str | None:
    """The cache layer types of this model other than plain `DynamicLayer`, or None."""
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=hf_config).layers
    except Exception:  # a config transformers' cache cannot read: the capture decides
        return None
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    return ", ".join(kinds) or None


class GraphDecoder:
    def __init__(self, model, hf_config, runtime, device: torch.device, max_len: int):
        self.model = model
        self.runtime = runtime
        self.device = torch.device(device)
        self.max_len = max_len
        arch = resolve_arch(model, hf_config)
        self.layers = arch.decoder_layers(model)
        self.eager_attn = model.config._attn_implementation == "eager"
        self.kv_arg = arch.kv_arg_of(self.layers[0])
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.arange = torch.arange(max_len, device=self.device)
        self.kv = StaticKV(hf_config.num_hidden_layers, max_len, self.pos)
        self._windows: dict[int, _Window] = {}
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        # run ahead: each enqueued step's token and routing land in a ring slot behind an event
        cuda = self.device.type == "cuda"
        self._ring_tok = torch.zeros(RING, dtype=torch.long, pin_memory=cuda)
        self._ring_routing = torch.zeros(RING, len(runtime.cache.layers), runtime.top_k, dtype=torch.long,
                                         pin_memory=cuda)  # fmt: skip
        self._ring_done = [torch.cuda.Event() if cuda else _Done() for _ in range(RING)]
        self._ahead: deque[tuple[int, Routed]] = deque()  # (ring slot, routing) of steps not yet taken
        self._enqueued = 0

    # -- per request ---------------------------------------------------------------
    def prefill_cache(self, kv) -> bool:
        """Make `kv` (a fresh DynamicCache) write the prompt into the static KV. False where
        it cannot (its layers are not plain dynamic ones): `begin` then copies the prompt."""
        return write_through(kv, self.kv)

    def begin(self, kv, n: int) -> None:
        """Take over the KV of an eager prefill of `n` positions. On RuntimeError, `kv`
        holds the whole prompt again, for eager decode."""
        try:
            self.kv.load(kv, n)
        except RuntimeError:
            take_back(kv, n)
            raise

    def window_for(self, pos: int) -> int:
        return window_for(pos, self.max_len)

    def _set(self, pos: int, tok: int | None = None) -> None:
        """Write the step's position (and its input token, unless the last step's pick is it)."""
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is outside the static cache ({self.max_len})")
        if tok is not None:
            self.tok.fill_(tok)
        self.pos.fill_(pos)

    @torch.inference_mode()
    def step_eager(self, tok: int, pos: int) -> torch.Tensor:
        """The same trunk, static KV and mask as `step`, run eagerly (any device; tests)."""
        self._set(pos, tok)
        return self._eager(self.window_for(pos))[0, -1]

    @torch.inference_mode()
    def step(self, tok: int, pos: int) -> torch.Tensor:
        """Logits [V] for token `tok` at position `pos` (the KV holds positions < pos): one
        graph replay, no host sync (the host samples from them: `enqueue` is the greedy way)."""
        self._set(pos, tok)
        return self._forward(pos)

    # -- run ahead (greedy) ------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Steps enqueued and not yet taken."""
        return len(self._ahead)

    @torch.inference_mode()
    def enqueue(self, pos: int, tok: int | None = None) -> None:
        """Enqueue the greedy step at `pos` without waiting for it: its input is `tok`, or (None)
        the token the step before it picked on the device. Its own pick stays in `tok` for
        the step after it, and is copied with the step's routing into a ring slot behind an
        event, for `take`. The runtime's `begin_step` precedes each call."""
        if len(self._ahead) == RING:
            raise RuntimeError("the run-ahead ring is full: take a step first")
        self._set(pos, tok)
        self._forward(pos)
        slot = self._enqueued % RING
        self._enqueued += 1
        self._ring_tok[slot : slot + 1].copy_(self.tok.view(-1), non_blocking=True)
        routed = self.runtime.snapshot(self._ring_routing[slot])
        self._ring_done[slot].record()
        self._ahead.append((slot, routed))

    def take(self) -> tuple[int, Routed]:
        """The token and routing of the oldest step not yet taken, waiting for it to finish."""
        slot, routed = self._ahead.popleft()
        self._ring_done[slot].synchronize()
        return int(self._ring_tok[slot]), routed

    def discard(self) -> None:
        """Forget the steps not yet taken (their request ended, or left the graph). Nothing waits:
        a forgotten step only wrote KV past its request's positions, the next request's
        writes queue behind it on the stream, and evictions wait for it (`ExpertCache`)."""
        self._ahead.clear()

    def _forward(self, pos: int) -> torch.Tensor:
        """Logits [V] of the token in `tok` at position `pos` (both written already), whose
        argmax lands in `tok`: one graph replay, after which the cache knows the step is
        enqueued (evictions wait for it)."""
        width = self.window_for(pos)
        win = self._windows.get(width)
        if win is None:
            try:
                win = self._capture_window(width)
            except Exception as exc:
                raise GraphCaptureError(
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
            self._windows[width] = win
        win.graph.replay()
        self.runtime.cache.step_enqueued()
        return win.logits[0, -1]

    # -- capture -------------------------------------------------------------------------
    def _trunk(self, width: int) -> torch.Tensor:
        """The transformers trunk for one token, eagerly (or under capture)."""
        inner = self.model.model
        self.kv.width = width
        valid = self.arange[:width] <= self.pos.view(-1)  # [width]
        if self.eager_attn:
            dtype = inner.embed_tokens.weight.dtype
            zero = torch.zeros((), dtype=dtype, device=self.device)
            mask = torch.where(valid, zero, torch.finfo(dtype).min).view(1, 1, 1, width)
        else:
            mask = valid.view(1, 1, 1, width)
        h = inner.embed_tokens(self.tok)
        pe = inner.rotary_emb(h, self.pos)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=self.pos, position_embeddings=pe, use_cache=True,
                      **{self.kv_arg: self.kv})  # fmt: skip
        return self.model.lm_head(inner.norm(h))

    def _pick(self, logits: torch.Tensor) -> None:
        """The greedy pick of the step (logits [1, 1, V]) into `tok`: the next step's input."""
        torch.argmax(logits[:, -1], dim=-1, keepdim=True, out=self.tok)

    def _eager(self, width: int) -> torch.Tensor:
        logits = self._trunk(width)
        self._pick(logits)
        return logits

    def _capture_window(self, width: int) -> _Window:
        """Warm up once on a side stream, then capture the step for one window width.
        The warm-up writes the current position's KV, which the replay then rewrites; it
        leaves `tok` alone (no pick), so the replay reads the step's own input."""
        log.info("capturing the decode graph for a %d-position window", width)
        if self._stream is None:
            self._stream = _capture_stream(self.device)
            self._pool = torch.cuda.graph_pool_handle()
        win = _Window(width)
        with _CAPTURE_LOCK:
            torch.cuda.synchronize(self.device)
            with torch.cuda.stream(self._stream):
                self._trunk(width)  # warm-up: lazy inits, Triton compiles, cuBLAS handles
                self._stream.synchronize()
                win.graph = torch.cuda.CUDAGraph()
                win.graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    win.logits = self._trunk(width)
                    self._pick(win.logits)
                finally:
                    win.graph.capture_end()
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            torch.cuda.synchronize(self.device)
        return win
