"""moe-llm: run Mixture-of-Experts LLMs on one small GPU.

Experts live in pinned host RAM (optionally HQQ-quantized), an LRU cache of
expert slots sits on the device, and the next layer's router prefetches the
experts it will likely need while the current layer computes.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    BudgetError,
    CheckpointIntegrityError,
    ConfigError,
    EngineClosedError,
    InputError,
    ModelLoadError,
    MoeLLMError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from .checkpoint.loader import load
    from .config import EngineConfig, GenerationConfig
    from .runtime.engine import Engine, GenerationResult, StreamChunk

__version__ = "0.1.0"

# torch, transformers and pydantic load on first use, so `import moe_llm` and `moe-llm --help` stay fast
_LAZY = {
    "EngineConfig": ".config",
    "GenerationConfig": ".config",
    "Engine": ".runtime.engine",
    "GenerationResult": ".runtime.engine",
    "StreamChunk": ".runtime.engine",
    "load": ".checkpoint.loader",
}

__all__ = [
    "BudgetError",
    "CheckpointIntegrityError",
    "ConfigError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "GenerationConfig",
    "GenerationResult",
    "InputError",
    "ModelLoadError",
    "MoeLLMError",
    "StreamChunk",
    "UnsupportedModelError",
    "load",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
