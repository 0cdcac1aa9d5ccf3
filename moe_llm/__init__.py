"""moe-llm: run Mixture-of-Experts LLMs on one small GPU.

Experts live in pinned host RAM (optionally HQQ-quantized), an LRU cache of
expert slots sits on the device, and the next layer's router prefetches the
experts it will likely need while the current layer computes.
"""

from .config import EngineConfig, GenerationConfig
from .engine import Engine, GenerationResult, StreamChunk
from .errors import (
    BudgetError,
    CheckpointIntegrityError,
    ConfigError,
    InputError,
    ModelLoadError,
    MoeLLMError,
    UnsupportedModelError,
)
from .loader import load

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointIntegrityError",
    "ConfigError",
    "Engine",
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
