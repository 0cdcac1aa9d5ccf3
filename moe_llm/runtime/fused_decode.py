"""One trunk forward for B one-token decode rows, each with its own position and KV cache
(the batcher's "fused" mode, `batching`), in which every row comes out bit for bit as it would
decoded alone (`kernels.rows`): norms, routers, the quantized GEMVs and the routed experts
run their per-row kernels once for all rows (each routed expert is read in one launch for
every row that routes to it); other weighted modules run once per row.

Keys are right-padded to the widest row and attention reads each row's own window of them,
under the mask its lone decode uses: the CUDA-graph decoder's window when a lone request would
decode on it (`GraphDecoder.window_for`), else the row's positions with no mask, as
transformers' eager decode reads them. With device-side expert dispatch and graph decode the
whole step is replayed as one CUDA graph while the rows and their windows stay the same
(`batch_graph`); elsewhere it runs eagerly."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..checkpoint.arch import resolve_arch
from ..kernels.rows import decode_rows

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence

log = logging.getLogger(__name__)


class _BatchKV:
    """What the attention modules of a fused step see as their cache: each row's new key and
    value go into that row's own cache, and attention reads every row's keys right-padded to
    `width` positions."""

    def __init__(self, rows: list[Sequence], width: int):
        self.rows, self.width = rows, width

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        B, heads, _, dim = key_states.shape  # [B, heads, 1, dim]
        keys = key_states.new_zeros(B, heads, self.width, dim)
        values = value_states.new_zeros(B, value_states.shape[1], self.width, value_states.shape[-1])
        for b, seq in enumerate(self.rows):
            k, v = seq.kv.update(key_states[b : b + 1], value_states[b : b + 1], layer_idx)
            n = k.shape[-2]
            keys[b, :, :n].copy_(k[0])
            values[b, :, :n].copy_(v[0])
        return keys, values


class FusedDecode:
    def __init__(self, engine: Engine):
        from .decode_graph import unsupported_reason

        self.engine = engine
        # why the trunk cannot be driven layer by layer like this (None: it can), as for graphs
        self.unsupported = unsupported_reason(engine.model, engine.hf_config)
        if self.unsupported is None and engine.model.config._attn_implementation != "sdpa":
            self.unsupported = f"attention implementation {engine.model.config._attn_implementation!r}"
        arch = resolve_arch(engine.model, engine.hf_config)
        self.layers = arch.decoder_layers(engine.model)
        self.kv_arg = arch.kv_arg_of(self.layers[0]) if self.layers else "past_key_values"
        self.graph = None  # batch_graph.BatchGraph: the fused step replayed as a CUDA graph
        if self.unsupported is None and engine.graphs is not None and engine.runtime.device_dispatch:
            from .batch_graph import BatchGraph

            self.graph = BatchGraph(self)

    def _lone_window(self, seq: Sequence) -> tuple[int, bool]:
        """(key positions, masked) that the lone decode of `seq`'s next position reads: the graph
        decoder's window when a lone `seq` would decode on it (it fits the static KV), else its
        positions."""
        graphs, pos = self.engine.graphs, seq.cached
        if graphs is not None and len(seq.prompt_ids) + seq.max_new - 1 <= graphs.max_len:
            return graphs.window_for(pos), True
        return pos + 1, False

    def holds(self, seq: Sequence) -> bool:
        """Whether the batch graph holds `seq`'s KV (then `seq.kv` is None)."""
        return self.graph is not None and self.graph.holds(seq)

    def release(self, seq: Sequence) -> None:
        """`seq` decodes on outside the fused step: its KV back in a cache of its own."""
        if self.graph is not None:
            self.graph.release(seq)

    def forget(self, seq: Sequence) -> None:
        """`seq` is done (its KV may go)."""
        if self.graph is not None:
            self.graph.forget(seq)

    def drop(self) -> None:
        """The rows of the last step failed: forget what the batch graph holds."""
        if self.graph is not None:
            self.graph.drop()

    def __call__(self, rows: list[Sequence]) -> torch.Tensor:
        """Logits [B, V] of the next token of every row; each row's KV grows by one. The
        runtime's `begin_step` precedes the call and its `end_step` follows it."""
        windows = [self._lone_window(s) for s in rows]
        if self.graph is not None and self.engine.graphs is not None and all(m for _, m in windows):
            from .decode_graph import GraphCaptureError

            try:
                return self.graph.step(rows, windows)
            except GraphCaptureError as exc:
                log.warning("batched decode graphs are off (%s); batched rows decode eagerly", exc)
                self.graph = None
        for seq in rows:
            self.release(seq)
        dev = self.engine.device
        toks = torch.tensor([[s.next_tok] for s in rows], device=dev)  # [B, 1]
        pos = torch.tensor([[s.cached] for s in rows], device=dev)  # [B, 1]
        width = max(w for w, _ in windows)
        return self.trunk(toks, pos, width, _BatchKV(rows, width), windows)

    def trunk(self, toks: torch.Tensor, pos: torch.Tensor, width: int, kv, windows) -> torch.Tensor:
        """The transformers trunk for rows of tokens `toks` [B, 1] at positions `pos` [B, 1] whose
        keys `kv` gives right-padded to `width` (eagerly, or under capture); `windows`: each
        row's (key positions, masked), which its attention reads."""
        model, inner = self.engine.model, self.engine.model.model
        mask = (torch.arange(width, device=toks.device)[None, :] <= pos)[:, None, None, :]  # [B, 1, 1, width]
        with decode_rows([w for w, _ in windows], [m for _, m in windows]):
            h = inner.embed_tokens(toks)  # [B, 1, H]
            pe = inner.rotary_emb(h, pos)
            for layer in self.layers:
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, use_cache=True,
                          **{self.kv_arg: kv})  # fmt: skip
            return model.lm_head(inner.norm(h))[:, -1]
