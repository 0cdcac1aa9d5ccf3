"""One trunk forward for B one-token decode rows, each with its own position and KV cache
(the batcher's "fused" mode, `batching`). Keys are right-padded to the longest row under a
mask; the experts see T = B tokens and read each routed expert once for all rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..checkpoint.arch import resolve_arch

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence


class _BatchKV:
    """What the attention modules of a fused step see as their cache: each row's new key and
    value go into that row's own cache, and attention reads every row's keys right-padded to
    `width` positions (the step's mask hides the padding)."""

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
        arch = resolve_arch(engine.model, engine.hf_config)
        self.layers = arch.decoder_layers(engine.model)
        self.kv_arg = arch.kv_arg_of(self.layers[0]) if self.layers else "past_key_values"

    def __call__(self, rows: list[Sequence]) -> torch.Tensor:
        """Logits [B, V] of the next token of every row; each row's KV grows by one."""
        eng = self.engine
        model, inner, dev = eng.model, eng.model.model, eng.device
        toks = torch.tensor([[s.next_tok] for s in rows], device=dev)  # [B, 1]
        pos = torch.tensor([[s.cached] for s in rows], device=dev)  # [B, 1]
        width = max(s.cached for s in rows) + 1
        valid = torch.arange(width, device=dev)[None, :] <= pos  # [B, width]
        h = inner.embed_tokens(toks)  # [B, 1, H]
        if model.config._attn_implementation == "eager":
            zero = torch.zeros((), dtype=h.dtype, device=dev)
            mask = torch.where(valid, zero, torch.finfo(h.dtype).min)[:, None, None, :]
        else:
            mask = valid[:, None, None, :]  # [B, 1, 1, width]
        pe = inner.rotary_emb(h, pos)
        kv = _BatchKV(rows, width)
        with eng.runtime.decode_rows():
            for layer in self.layers:
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe, use_cache=True,
                          **{self.kv_arg: kv})  # fmt: skip
        return model.lm_head(inner.norm(h))[:, -1]
