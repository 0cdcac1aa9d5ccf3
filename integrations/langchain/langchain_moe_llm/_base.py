"""Fields and engine handling shared by `MoeLLM` and `ChatMoeLLM`.

A model either loads its own engine from `model_path` (at construction, so a
bad path fails early) or shares one passed as `engine=`. Sampling fields use
LangChain's names and map onto `moe_llm.GenerationConfig`; per-call keyword
arguments override them.
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import LangSmithParams
from pydantic import Field, PrivateAttr, model_validator

from moe_llm.serve.adapters import EngineOptions
from moe_llm.serve.tools import ensure_utf8

# per-call kwargs that map onto the engine's generation options
_CALL_OPTIONS = {
    "temperature": "temperature", "max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens",
    "top_p": "top_p", "top_k": "top_k", "seed": "seed",
}  # fmt: skip


class MoeParams(EngineOptions):
    """Engine and sampling fields (a mixin placed before the LangChain base class)."""

    engine: Any = Field(default=None, exclude=True, description="An already loaded `moe_llm.Engine` to share.")
    temperature: float = Field(default=0.0, description="Sampling temperature; 0 is greedy.")
    max_tokens: int = Field(default=256, description="Maximum number of tokens to generate.")
    top_p: float = Field(default=1.0, description="Nucleus sampling probability mass.")
    top_k: int = Field(default=0, description="Sample from the k most likely tokens; 0 disables.")
    stop: list[str] | None = Field(default=None, description="Stop strings; generation ends before them.")
    seed: int | None = Field(default=None, description="Sampling seed for reproducible non-greedy output.")
    streaming: bool = Field(default=False, description="Stream tokens to callbacks during invoke().")

    _engine: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _load_engine(self):
        self._engine = self.resolve_engine(self.engine)
        return self

    @property
    def client(self):
        """The `moe_llm.Engine` doing the work."""
        return self._engine

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    def _gen_options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Fields + per-call overrides -> keyword arguments of `Engine.stream`."""
        opts: dict[str, Any] = {
            "temperature": self.temperature, "max_new_tokens": self.max_tokens, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed,
        }  # fmt: skip
        for key, name in _CALL_OPTIONS.items():
            if kwargs.get(key) is not None:
                opts[name] = kwargs[key]
        opts["stop"] = list(stop) if stop is not None else list(self.stop or [])
        return opts

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name, "temperature": self.temperature, "max_tokens": self.max_tokens,
            "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
        }  # fmt: skip

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="moe_llm",
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type=model_type,
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (the default would download GPT-2)."""
        text = ensure_utf8(text, "text to tokenize")
        return list(self._engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens(self, text: str) -> int:
        return self._engine.count_tokens(text)


def usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    """LangChain `usage_metadata` for one call."""
    return {
        "input_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
    }
