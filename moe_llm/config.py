"""Runtime configuration: one pydantic model per concern, validated once.

`EngineConfig` holds what `moe_llm.load` accepts; `GenerationConfig` holds one
request's sampling options. Validation errors become :class:`ConfigError` /
:class:`InputError` with a one-line message naming the field.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError, InputError

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip


def parse_size(value: str | int | float) -> int:
    """Parse '12GiB', '512MB', '1.5G' or a plain byte count into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"invalid size {value!r}; use e.g. '12GiB' or '512MiB'")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {value!r}")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "value"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return msg if msg.startswith(loc) else f"{loc}: {msg}"


class EngineConfig(BaseModel):
    """Options of `moe_llm.load`; `None` bits keep the checkpoint's precision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Compute dtype; default float32 on CPU, bfloat16 on CUDA."
    )
    experts_bits: Literal[2, 3, 4] | None = Field(None, description="Expert quantization bits, or None.")
    attn_bits: Literal[4] | None = Field(None, description="Attention/dense quantization bits, or None.")
    head_bits: Literal[4] | None = Field(
        None,
        description="LM head quantization bits, or None to keep it 16-bit (the design's default). On "
        "Mixtral-8x7B 4 bits free ~190 MB, about 3 more 2-bit expert slots; a head tied to the "
        "embeddings stays 16-bit.",
    )
    cache_per_layer: int | None = Field(
        None, description="Expert slots on the device, as a count per MoE layer (the cache itself is global)."
    )
    gpu_budget: int | None = Field(None, description="Device memory budget in bytes (accepts '12GiB').")
    prefetch: bool = Field(
        True,
        description="Copy experts ahead of use: a prompt's next layer while the current one computes, and "
        "after each decode step missed experts the policy prefers to a resident one (without it, decode "
        "admissions only fill free slots).",
    )
    prefetch_experts: int | None = Field(
        None, description="Router top-k counted per prompt token for the next layer's guess; default the model's top-k."
    )
    cache_policy: Literal["lru", "lfu"] = Field(
        "lru",
        description="Which expert leaves the global cache: 'lru', or 'lfu' (frequency-aware, admits a "
        "missed expert only if it is used more often than its victim).",
    )
    cpu_experts: Literal["auto", "off", "all"] = Field(
        "auto",
        description="Missed experts in decode: 'all' computes every miss on CPU threads, inside the captured "
        "step (llama.cpp's --cpu-moe); 'auto' is the CPU kernel on a CPU-only machine and, on CUDA, shares each "
        "miss between the GPU (zero-copy) and the CPU by a cost model of this machine's measured bandwidths; "
        "'off' the GPU (or torch on CPU) only. The two roads compute an expert to the same bits.",
    )
    admissions_in_flight: int = Field(
        4, description="Decode admission copies in flight at once; they share the link with zero-copy misses."
    )
    kernel_tuning: str | None = Field(
        None, description="JSON of decode-kernel tile shapes measured on this machine (scripts/tune_moe.py)."
    )
    cuda_graphs: bool = Field(
        True, description="On CUDA, replay each decode step (every layer and the LM head) as one CUDA graph."
    )
    max_context: int | None = Field(
        None, description="Context length to plan the KV cache for; default min(model max, 4096)."
    )
    group_size: int | None = Field(None, description="Expert quantization group size; default per bits.")
    verify_checksums: bool = Field(
        True, description="Check every file of a quantized directory against its manifest sha256 on load."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template for chat messages: Jinja text, or a path to a .jinja file (read here). "
        "Default: the checkpoint's own, else a generic ChatML template (docs/chat.md).",
    )
    max_batch: int = Field(8, description="Requests decoded together in one step (continuous batching).")
    max_queue: int = Field(64, description="Requests waiting for a batch slot before new ones are refused.")
    prefill_chunk: int = Field(
        1024,
        description="Prompt tokens per prefill forward (chunks end at its multiples). With offloaded "
        "experts each chunk streams the experts once, so a longer chunk prefills faster; a shorter one lets "
        "other requests decode sooner.",
    )
    prefix_cache: int = Field(
        512 * 2**20, description="Host RAM for the KV of recent prompt prefixes (accepts '512MiB'; 0 turns it off)."
    )
    batch_mode: Literal["auto", "exact", "fused"] = Field(
        "auto",
        description="How several requests decode together: 'fused' (one forward for all rows, each computed as "
        "alone), 'exact' (each row's own one-token forward); both give each request its lone tokens. 'auto': "
        "exact on CPU, fused on CUDA. docs/serve.md",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {v!r}")
        return v

    @field_validator("experts_bits", "attn_bits", "head_bits", mode="before")
    @classmethod
    def _bits(cls, v):
        if isinstance(v, str):
            if v.strip().lower() in ("none", "", "16", "bf16", "fp16"):
                return None
            return int(v)
        return v

    @field_validator("cache_per_layer")
    @classmethod
    def _cache(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"cache_per_layer must be between 1 and num_experts, got {v}")
        return v

    @field_validator("gpu_budget", mode="before")
    @classmethod
    def _budget(cls, v):
        return None if v is None else parse_size(v)

    @field_validator("prefix_cache", mode="before")
    @classmethod
    def _prefix_cache(cls, v):
        return 0 if v in (None, 0, "0", "off", "none") else parse_size(v)

    @field_validator("prefetch_experts", "max_context", "group_size", "admissions_in_flight", "max_batch",
                     "max_queue", "prefill_chunk")  # fmt: skip
    @classmethod
    def _positive(cls, v: int | None, info) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be positive, got {v}")
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        from .serve.tools import read_chat_template

        return None if v is None else read_chat_template(v)

    @classmethod
    def build(cls, **kwargs) -> EngineConfig:
        try:
            cfg = cls(**kwargs)
        except ValidationError as exc:
            raise ConfigError(_first_error(exc)) from None
        if cfg.cache_per_layer is not None and cfg.gpu_budget is not None:
            raise ConfigError("give either cache_per_layer or gpu_budget, not both")
        return cfg


class GenerationConfig(BaseModel):
    """One request's decoding options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, description="Maximum number of tokens to generate.")
    temperature: float = Field(0.0, description="0 means greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, description="Keep the k most likely tokens; 0 disables.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included).")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Sampling seed (what torch.Generator takes).")

    @field_validator("max_new_tokens")
    @classmethod
    def _mnt(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v: float) -> float:
        if not (0.0 <= v <= 100.0) or v != v:
            raise ValueError(f"temperature must be between 0 and 100, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"top_k must be >= 0, got {v}")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a list of strings")
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return list(v)

    @classmethod
    def build(cls, **kwargs) -> GenerationConfig:
        try:
            return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "seed"})
        except ValidationError as exc:
            raise InputError(_first_error(exc)) from None
