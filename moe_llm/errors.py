"""One exception hierarchy for moe-llm.

Every error a user can cause derives from :class:`MoeLLMError`. The CLI maps the
whole family to one stderr line and exit code 2; anything else is a bug.
"""

from __future__ import annotations


class MoeLLMError(Exception):
    """Base class of every error moe-llm raises on purpose."""


class ConfigError(MoeLLMError, ValueError):
    """An engine or generation option is invalid."""


class ModelLoadError(MoeLLMError):
    """A model directory cannot be loaded (missing, malformed or unsupported)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but is not a supported Mixture-of-Experts model."""


class CheckpointIntegrityError(ModelLoadError):
    """A checkpoint file is truncated, corrupted, missing or has the wrong shape."""


class BudgetError(MoeLLMError):
    """The GPU memory budget cannot hold the model's trunk plus one expert slot per layer."""


class InputError(MoeLLMError, ValueError):
    """A request is invalid: empty prompt, too long for the context, bad sampling values."""


class EngineClosedError(MoeLLMError):
    """The engine was closed (`Engine.close`): it holds no model and runs no request."""


class GenerationCancelled(MoeLLMError):
    """A generation was cancelled by its consumer."""


__all__ = [
    "BudgetError",
    "CheckpointIntegrityError",
    "ConfigError",
    "EngineClosedError",
    "GenerationCancelled",
    "InputError",
    "ModelLoadError",
    "MoeLLMError",
    "UnsupportedModelError",
]
