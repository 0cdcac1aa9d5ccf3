"""CUDA-graph decode: one token's transformers trunk replayed as one graph per MoE layer.

Eager decode of a 32-layer MoE is host-bound: each layer launches dozens of small
kernels (norms, rotary, q/k/v/o GEMVs, the router) from Python, which costs more
than the GPU work itself. None of those kernels depends on which experts are
routed, so they are captured once into CUDA graphs and replayed per token. The
expert calls cannot be captured (which slot holds an expert is decided on the
host, after reading the router), so they split the trunk into segments:

    graph 0:      embed, rotary, mask, layer 0 up to its router (+ next-layer guess)
    host:         one sync; read routed experts; cache, copies, expert kernels
    graph 1:      layer 0's residual add, layer 1 up to its router ...
    ...
    graph last:   last residual add, final norm, LM head

Capture runs the transformers modules themselves once on a side stream; when a
layer calls its experts, `OffloadRuntime` hands the call to `_split`, which copies
the routed ids (and the prefetch guess) into a pinned buffer, ends the current
graph, starts the next, and returns the layer's static output buffer. Replay
therefore runs exactly the kernels eager decode would, with the same per-layer
host sync, minus the Python.

The KV cache is static (`StaticKV`). The prompt runs through transformers' own
eager forward with a `DynamicCache` whose layers write each prompt key and value
straight into the static tensors and keep nothing themselves (`write_through`),
so the prompt's KV never exists twice; each decoded token then writes its
position in place.
Attention reads a window of the cache that is a power of two of at least 256
positions, with a mask over the unwritten tail; one set of graphs is captured
per window width, lazily. Graphs are used only on CUDA, for the model families
whose layers take the standard transformers arguments, without sliding windows,
with "sdpa" or "eager" attention; everything else decodes eagerly.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass
from functools import cache

import torch
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

MIN_WINDOW = 256


class GraphCaptureError(RuntimeError):
    """The trunk could not be captured; the caller decodes eagerly instead."""


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


@dataclass
class _Segment:
    graph: torch.cuda.CUDAGraph
    layer: int | None = None  # MoE layer whose experts run after this graph; None for the last
    hidden: torch.Tensor | None = None  # [1, H] the experts' input (static, in the graph pool)
    top_k_index: torch.Tensor | None = None  # [1, k]
    top_k_weights: torch.Tensor | None = None  # [1, k]
    host_ids: torch.Tensor | None = None  # pinned [n]: routed ids, then the guess
    n_ids: int = 0


class _Window:
    """The graphs of one attention window width."""

    def __init__(self, width: int):
        self.width = width
        self.segments: list[_Segment] = []
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
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r}"
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(hf_config, attr, None) not in (None, 1, 1.0):
            return f"{attr} in the LM head"
    return None


class GraphDecoder:
    def __init__(self, model, hf_config, runtime, device: torch.device, max_len: int):
        self.model = model
        self.runtime = runtime
        self.device = torch.device(device)
        self.max_len = max_len
        self.layers = model.model.layers
        self.eager_attn = model.config._attn_implementation == "eager"
        params = inspect.signature(self.layers[0].forward).parameters
        self.kv_arg = "cache" if "cache" in params else "past_key_values"
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.arange = torch.arange(max_len, device=self.device)
        self.kv = StaticKV(hf_config.num_hidden_layers, max_len, self.pos)
        self._windows: dict[int, _Window] = {}
        self._capture: _Window | None = None  # set while capturing
        self._graph: torch.cuda.CUDAGraph | None = None  # the graph being captured
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._host_ids: dict[int, torch.Tensor] = {}
        if self.device.type == "cuda":
            self._routed = torch.cuda.Event()
            n_ids = runtime.ids_per_token()
            for m in model.modules():
                if getattr(m, "runtime", None) is runtime:  # an OffloadedExperts
                    self._host_ids[m.layer_idx] = torch.zeros(n_ids, dtype=torch.long, pin_memory=True)

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
            for layer in getattr(kv, "layers", None) or []:
                if isinstance(layer, _WriteThroughLayer):
                    layer.take_back(n)
            raise

    def window_for(self, pos: int) -> int:
        w = MIN_WINDOW
        while w < pos + 1:
            w *= 2
        return min(w, self.max_len)

    def _set(self, tok: int, pos: int) -> None:
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is outside the static cache ({self.max_len})")
        self.tok.fill_(tok)
        self.pos.fill_(pos)

    @torch.inference_mode()
    def step_eager(self, tok: int, pos: int) -> torch.Tensor:
        """The same trunk, static KV and mask as `step`, run eagerly (any device; tests)."""
        self._set(tok, pos)
        return self._trunk(self.window_for(pos))[0, -1]

    @torch.inference_mode()
    def step(self, tok: int, pos: int) -> torch.Tensor:
        """Logits [V] for token `tok` at position `pos` (the KV holds positions < pos)."""
        self._set(tok, pos)
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
        rt = self.runtime
        for seg in win.segments[:-1]:
            seg.graph.replay()
            self._routed.record()
            self._routed.synchronize()  # the one host sync of this layer
            ids = seg.host_ids[: seg.n_ids].tolist()
            rt.after_route(
                seg.layer, seg.hidden, ids, seg.top_k_index, seg.top_k_weights, out=rt.decode_out(seg.layer, seg.hidden)
            )
        win.segments[-1].graph.replay()
        return win.logits[0, -1]

    # -- capture -------------------------------------------------------------------------
    def _trunk(self, width: int) -> torch.Tensor:
        """The transformers trunk for one token, eagerly (captured in segments)."""
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

    def _split(self, layer: int, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """Called in place of a layer's experts while warming up or capturing."""
        rt = self.runtime
        ids = rt.route_ids(layer, hidden, top_k_index)
        host = self._host_ids[layer]
        host[: ids.numel()].copy_(ids, non_blocking=True)
        out = rt.decode_out(layer, hidden)
        if self._capture is not None:
            self._graph.capture_end()
            self._capture.segments.append(_Segment(
                self._graph, layer, hidden, top_k_index, top_k_weights, host, ids.numel(),
            ))  # fmt: skip
            self._graph = torch.cuda.CUDAGraph()
            self._graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        return out

    def _capture_window(self, width: int) -> _Window:
        """Warm up once on a side stream, then capture the segments of one window width.
        The warm-up writes the current position's KV, which the replay then rewrites."""
        log.info("capturing decode graphs for a %d-position window", width)
        if self._stream is None:
            self._stream = _capture_stream(self.device)
            self._pool = torch.cuda.graph_pool_handle()
        win = _Window(width)
        with _CAPTURE_LOCK:
            self._capture_into(win, width)
        return win

    def _capture_into(self, win: _Window, width: int) -> None:
        torch.cuda.synchronize(self.device)
        self.runtime.hook = self._split
        try:
            with torch.cuda.stream(self._stream):
                self._trunk(width)  # warm-up: lazy inits, Triton compiles, cuBLAS handles
                self._stream.synchronize()
                self._capture = win
                self._graph = torch.cuda.CUDAGraph()
                self._graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    win.logits = self._trunk(width)
                finally:
                    self._graph.capture_end()
                win.segments.append(_Segment(self._graph))
        finally:
            self.runtime.hook = None
            self._capture, self._graph = None, None
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        torch.cuda.synchronize(self.device)
