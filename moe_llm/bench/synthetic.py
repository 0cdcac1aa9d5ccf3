"""Synthetic Mixtral geometry with random quantized weights, built on the device.

Nothing is downloaded and no bf16 model is ever made: the transformers trunk is
built on the meta device, its small tensors (embeddings, norms, routers, LM
head) are drawn on the device, the attention projections become `QuantLinear`s
holding random 4-bit codes, and every expert's byte buffer in the pinned
`ExpertStore` is random bytes with crafted 8-bit meta. The (min, step) meta is
chosen so that dequantized weights have mean ~0 and std ~0.02 (what
transformers' initializer gives), keeping activations finite and sane. With
random weights, routing is close to uniform: the worst case for a cache.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..checkpoint.arch import ArchMap
from ..checkpoint.loader import assemble
from ..checkpoint.model import (
    _rebuild_meta_buffers,
    _set_tensor,
    build_skeleton,
    decoder_layers,
    moe_info,
    quantize_head,
)
from ..config import EngineConfig
from ..experts.format import ExpertFormat
from ..experts.store import ExpertStore
from ..planning import plan_for
from ..quant import QuantSpec, pick_group_size
from ..runtime.engine import Engine
from ..runtime.quant_linear import QuantLinear, share_inputs

log = logging.getLogger(__name__)

INIT_STD = 0.02


@dataclass(frozen=True)
class Geometry:
    """Mixtral shapes; the defaults are Mixtral-8x7B's."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    experts: int = 8
    top_k: int = 2
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    max_positions: int = 32768

    def hf_config(self):
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            num_local_experts=self.experts, num_experts_per_tok=self.top_k,
            max_position_embeddings=self.max_positions, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,  # never stop early
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


MIXTRAL_8X7B = Geometry()


class IdTokenizer:
    """The synthetic model has no vocabulary: prompts are token ids, text is ids."""

    eos_token_id = None
    bos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens: bool = True):
        return {"input_ids": [int(t) for t in str(text).split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def _craft_meta(meta: torch.Tensor, bits: int, std: float) -> None:
    """Fill (scale_min, scale_step, zero_min, zero_step) rows so that uniform random
    codes and 8-bit scale/zero dequantize to mean ~0, std ~`std`."""
    code_std = math.sqrt((4**bits - 1) / 12.0)  # std of a uniform code in [0, 2^bits)
    centre = (2**bits - 1) / 2.0
    scale = std / code_std
    row = torch.tensor([0.9 * scale, 0.2 * scale / 255.0, centre - 0.25, 0.5 / 255.0], dtype=torch.float32)
    meta.copy_(row.to(meta.device).expand_as(meta))


def random_compact(spec: QuantSpec, device, gen: torch.Generator, std: float = INIT_STD) -> dict[str, torch.Tensor]:
    """Random codes and 8-bit scale/zero for one [out, in] matrix in the compact format."""
    out = {}
    for name, (dtype, shape) in spec.tensors("m").items():
        key = name.split(".", 1)[1]
        if dtype == torch.uint8:
            out[key] = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)
        else:
            out[key] = torch.empty(shape, dtype=dtype, device=device)
    _craft_meta(out["meta"], spec.bits, std)
    return out


def random_expert(fmt: ExpertFormat, device, gen: torch.Generator, std: float = INIT_STD) -> torch.Tensor:
    """One expert's whole byte buffer: random bytes, then crafted float32 meta."""
    buf = torch.randint(0, 256, (fmt.nbytes,), dtype=torch.uint8, device=device, generator=gen)
    views = fmt.layout.views(buf)
    if fmt.specs is None:  # unquantized: small random weights in the compute dtype
        for name in ("gate_up_proj", "down_proj"):
            views[name].copy_(torch.randn(views[name].shape, device=device, generator=gen) * std)
        return buf
    for name, spec in fmt.specs.items():
        _craft_meta(views[f"{name}.meta"], spec.bits, std)
    return buf


def _random_trunk(
    model: nn.Module, config, arch: ArchMap, device, dtype, attn_bits: int | None, gen: torch.Generator
) -> None:
    """Materialise every non-expert tensor on `device` with random values."""
    if attn_bits is not None:
        for layer in decoder_layers(model, arch):
            for name, mod in list(layer.named_modules()):
                if isinstance(mod, nn.Linear) and not arch.keep_dense(name):
                    out_f, in_f = mod.weight.shape
                    spec = QuantSpec(attn_bits, pick_group_size(attn_bits, in_f), out_f, in_f)
                    q = QuantLinear(spec, random_compact(spec, device, gen), None, dtype)
                    parent, _, attr = name.rpartition(".")
                    setattr(layer.get_submodule(parent) if parent else layer, attr, q)
    for name, p in list(model.named_parameters()):
        if arch.is_expert_param(name) or not p.is_meta:
            continue
        if "norm" in name:
            value = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            value = (torch.randn(p.shape, device=device, generator=gen) * INIT_STD).to(dtype)
        _set_tensor(model, name, value)
    _rebuild_meta_buffers(model, config, torch.device(device))


class SyntheticModel:
    """Trunk + store of one synthetic geometry; `engine(...)` wires a fresh cache each time."""

    def __init__(
        self,
        geometry: Geometry = MIXTRAL_8X7B,
        device: str = "cuda",
        experts_bits: int | None = 2,
        attn_bits: int | None = 4,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        head_bits: int | None = None,
    ):
        self.geometry = geometry
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.attn_bits = attn_bits
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.hf_config = geometry.hf_config()
        self.model = build_skeleton(self.hf_config, self.dtype)
        self.info = moe_info(self.model, self.hf_config)
        arch = self.info.arch
        layers = decoder_layers(self.model, arch)
        self._skeleton_experts = {i: arch.experts_of(layers[i]) for i in self.info.layers}
        _random_trunk(self.model, self.hf_config, arch, self.device, self.dtype, attn_bits, self.gen)
        self.head_bits = head_bits if quantize_head(self.model, head_bits, self.dtype, self.device) else None
        share_inputs(self.model)
        self.store: ExpertStore | None = None
        self.fmt: ExpertFormat | None = None
        self.set_experts(experts_bits)

    def set_experts(self, bits: int | None) -> None:
        """(Re)build the pinned store with random experts of `bits` bits."""
        t0 = time.perf_counter()
        self.detach()
        self.store = None  # free the old host buffers before pinning new ones
        info = self.info
        self.fmt = ExpertFormat.build(info.hidden, info.intermediate, bits, self.dtype)
        store = ExpertStore(self.fmt, info.layers, info.num_experts, pin=self.device.type == "cuda")
        for layer in info.layers:
            for e in range(info.num_experts):
                store.put_raw(layer, e, random_expert(self.fmt, self.device, self.gen))
        self.store = store
        self.store_build_s = time.perf_counter() - t0
        log.info("synthetic store: %d experts, %.1f GB in %.1f s", len(store), store.nbytes / 1e9, self.store_build_s)

    def engine(self, gpu_budget: int | str | None, prefetch: bool = True, retain: bool = True, **options) -> Engine:
        """A fresh engine (cache, prefetcher, runtime) over the shared trunk and store."""
        self.detach()
        cfg = EngineConfig.build(
            device=str(self.device), experts_bits=self.fmt.bits, attn_bits=self.attn_bits,
            gpu_budget=gpu_budget, prefetch=prefetch, **options,
        )  # fmt: skip
        plan = plan_for(self.model, self.hf_config, cfg, self.info, self.fmt, self.dtype)
        return assemble(
            self.model, IdTokenizer(), self.hf_config, cfg, self.info, self.fmt, self.store, plan, self.device,
            "synthetic-mixtral", retain=retain,
        )  # fmt: skip

    def detach(self) -> None:
        """Put the skeleton's expert modules back, dropping any engine's slot pool."""
        layers = decoder_layers(self.model, self.info.arch)
        for i, mod in self._skeleton_experts.items():
            self.info.arch.set_experts(layers[i], mod)

    def random_prompt(self, n: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.geometry.vocab, (n,), generator=g).tolist()

    @property
    def expert_bytes_total(self) -> int:
        return len(self.info.layers) * self.info.num_experts * self.fmt.nbytes
