"""Engine options shared by the LangChain and LlamaIndex adapters.

`EngineOptions` is a pydantic mixin holding what `moe_llm.load` needs; an
adapter class inherits it ahead of its framework base class and calls
`resolve_engine` once at construction: a shared `engine=` wins, else the
checkpoint at `model_path` is loaded (so a bad path fails at construction).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..runtime.engine import Engine


class EngineOptions(BaseModel):
    model_path: str | None = Field(default=None, description="Local Hugging Face checkpoint directory to load.")
    device: str | None = Field(default=None, description="'cpu', 'cuda' or 'cuda:N'; default cuda when available.")
    experts_bits: int | None = Field(default=None, description="Expert quantization bits (2, 3, 4) or None.")
    attn_bits: int | None = Field(default=None, description="Attention quantization bits (4) or None.")
    cache_per_layer: int | None = Field(default=None, description="Expert slots per MoE layer on the device.")
    gpu_budget: str | int | None = Field(default=None, description="Device memory budget, e.g. '12GiB'.")
    prefetch: bool = Field(default=True, description="Speculatively copy the next layer's likely experts.")
    chat_template: str | None = Field(
        default=None,
        description="Chat template (Jinja text or a .jinja file); default the checkpoint's, else generic ChatML.",
    )

    def resolve_engine(self, engine: Engine | None) -> Engine:
        """The engine to use: `engine` if given, else one loaded from `model_path`."""
        if engine is not None:
            return engine
        if self.model_path is None:
            raise ValueError("give model_path= (a checkpoint directory) or engine= (a loaded moe_llm.Engine)")
        from ..checkpoint.loader import load

        device = self.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return load(
            self.model_path, device=device, experts_bits=self.experts_bits, attn_bits=self.attn_bits,
            cache_per_layer=self.cache_per_layer, gpu_budget=self.gpu_budget, prefetch=self.prefetch,
            chat_template=self.chat_template,
        )  # fmt: skip


def usage_counts(stats: dict[str, Any] | None, output_tokens: int) -> dict[str, int]:
    """OpenAI-style usage for one call, from the last stream chunk's stats."""
    prompt = int((stats or {}).get("prompt_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": output_tokens, "total_tokens": prompt + output_tokens}
