"""One request's prefill, chunk by chunk, and what of its KV the prefix cache keeps.

`Prefill.begin` gives a request its transformers `DynamicCache`: holding the longest
prefix of the prompt the prefix cache has, restored to the token; or, for a lone request
the CUDA-graph decoder will take, with layers that write the prompt straight into the
decoder's static KV (`decode_graph.write_through`), so the prompt's KV never exists twice
on the device. `Prefill.run` runs the next chunk: chunks end at multiples of
`prefill_chunk` counted from position 0, so past a restored prefix a prompt is cut as a
fresh prefill cuts it. `Prefill.keep` stores a request's sequence in the prefix cache:
after its prefill the prompt, at its end the prompt and the reply, so the next chat turn
(the old prompt, the old reply, a new message) prefills only its new tokens.

What is kept must give the tokens a fresh prefill gives. Restored keys and values differ
from a fresh prefill's only in float rounding (chunks of other lengths; one-token steps)
where decode computes them with a prefill's math. Where it does not (`like_prefill`: the
int8-activation decode kernels, the CPU expert kernel, device-side dispatch, fused
dequant-GEMVs of quantized dense layers; about 1% relative error in layer 1's keys of a
tiny 2-bit model against 1e-6 for rounding), the keys and values of decoded positions,
and of prompt positions a one-token chunk ran, are not kept, and a restore never leaves
a one-token chunk that a fresh prefill would run with other tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .prefix_cache import PrefixCache, reusable

if TYPE_CHECKING:
    from .batching import Sequence
    from .engine import Engine


def like_prefill(engine: Engine) -> bool:
    """Whether one-token forwards compute keys and values with a prefill's math (up to float rounding)."""
    from .quant_linear import QuantLinear

    rt = engine.runtime
    if rt.device_dispatch or rt.cpu_road != "off":
        return False  # int8 activations in the expert decode kernels
    if engine.device.type == "cuda":  # one-token quantized dense layers: a fused dequant-GEMV (int8 activations)
        return not any(isinstance(m, QuantLinear) for m in engine.model.modules())
    return True


class Prefill:
    def __init__(self, engine: Engine, chunk: int, prefix: PrefixCache | None):
        self.engine = engine
        self.chunk = chunk
        self.prefix = prefix
        self.reusable = prefix is not None and reusable(engine._new_kv())
        self.like_prefill = like_prefill(engine)
        self.write_through = True  # a lone request bound for the graph decoder prefills into its static KV

    def begin(self, seq: Sequence, graphs) -> None:
        """A fresh KV for `seq`: the cached prefix of its prompt restored, else, with `graphs`
        (the graph decoder the request will go to), written through to the static KV."""
        eng = self.engine
        seq.kv = eng._new_kv()
        if self.reusable:
            match = self.prefix.match(seq.prompt_ids)
            n = self._usable(match.tokens, len(seq.prompt_ids))
            if n:
                self.prefix.restore(seq.kv, match, n, eng.device)
                seq.cached = seq.clean = seq.kept = seq.prefix_hit = n
                return
        if graphs is not None and self.write_through:
            graphs.prefill_cache(seq.kv)

    def _usable(self, n: int, total: int) -> int:
        """Restored tokens, `n` at most, so that no position runs in a one-token chunk (the decode
        path) where a fresh prefill runs it with others (only where that path is not a prefill's)."""
        first_end = min(total, (n // self.chunk + 1) * self.chunk)
        if not self.like_prefill and n % self.chunk and first_end - n == 1:
            return n - 1
        return n

    def run(self, seq: Sequence) -> torch.Tensor | None:
        """Run the next chunk of `seq`'s prompt: the last position's logits once the prompt is
        done (the caller samples, then ends the runtime's step), else None."""
        eng = self.engine
        start, total = seq.cached, len(seq.prompt_ids)
        end = min(total, (start // self.chunk + 1) * self.chunk)
        ids = seq.prompt_ids[start:end]
        eng.runtime.prompt_start(len(ids))
        one = len(ids) == 1
        if one:
            eng.runtime.begin_step()  # a one-token forward: the runtime's decode path
        ids_t = torch.tensor([ids], device=eng.device)
        out = eng.model(input_ids=ids_t, use_cache=True, logits_to_keep=1, **{eng._kv_arg: seq.kv})
        seq.cached = end
        seq.prefilled += len(ids)
        eng.stats.prefill_tokens += len(ids)
        if seq.clean == start and (not one or self.like_prefill):
            seq.clean = end
        if end < total:
            if one:
                eng.runtime.end_step()
            return None
        return out.logits[0, -1]

    def keep(self, seq: Sequence, layers: Callable[[Sequence], list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Store the positions of `seq` that a later prompt may reuse: all of them where decode
        computes them as a prefill does, else those its prefill chunks computed. `layers(seq)`:
        per layer (keys, values) holding at least `seq.cached` positions."""
        n = seq.cached if self.like_prefill else seq.clean
        if not self.reusable or n <= seq.kept:
            return
        self.prefix.store(seq.prompt_ids + seq.out_ids, layers(seq), n)
        seq.kept = n
