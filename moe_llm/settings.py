"""Where `EngineConfig` values come from, highest first.

1. arguments given to `moe_llm.load` or on the command line (``None`` means "not given");
2. ``MOE_LLM_<FIELD>`` environment variables, e.g. ``MOE_LLM_GPU_BUDGET=12GiB``;
3. the ``[engine]`` table of a TOML file: ``$MOE_LLM_CONFIG`` if set, else
   ``$XDG_CONFIG_HOME/moe-llm/config.toml`` (``~/.config/moe-llm/config.toml``) if it exists;
4. the built-in defaults of `EngineConfig`.

Every value is validated by `EngineConfig` once, and an error names where the bad
value came from. ``cache_per_layer`` and ``gpu_budget`` exclude each other, so a
higher layer that sets one clears both from the layers below it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import EngineConfig
from .errors import ConfigError

ENV_PREFIX = "MOE_LLM_"
CONFIG_ENV = "MOE_LLM_CONFIG"
FIELDS = tuple(EngineConfig.model_fields)
_EXCLUSIVE = ("cache_per_layer", "gpu_budget")


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"reading {path} needs Python 3.11+ or the 'tomli' package") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path} is not valid TOML: {exc}") from None


def config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The settings file in effect, or None."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV]).expanduser()
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV} points to {path}, which is not a file")
        return path
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "moe-llm" / "config.toml"
    return path if path.is_file() else None


def file_settings(path: Path | None) -> dict[str, Any]:
    """The ``[engine]`` table of a settings file (empty when there is no file)."""
    if path is None:
        return {}
    data = _toml_load(path)
    unknown = sorted(set(data) - {"engine"})
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {unknown[0]!r} (settings go under [engine])")
    table = data.get("engine", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'engine' must be a table")
    for key in table:
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown setting engine.{key} (known: {', '.join(FIELDS)})")
    return _checked(table, lambda k: f"{path} engine.{k}")


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``MOE_LLM_<FIELD>`` variables, by field name. Other MOE_LLM_* variables are ignored."""
    env = os.environ if environ is None else environ
    values = {f: env[ENV_PREFIX + f.upper()] for f in FIELDS if ENV_PREFIX + f.upper() in env}
    return _checked(values, lambda k: ENV_PREFIX + k.upper())


def _checked(values: dict[str, Any], source) -> dict[str, Any]:
    """Validate each value alone, so an error names its source."""
    for key, value in values.items():
        try:
            EngineConfig.build(**{key: value})
        except ConfigError as exc:
            raise ConfigError(f"{source(key)}: {exc}") from None
    return dict(values)


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    if any(k in top for k in _EXCLUSIVE):
        base = {k: v for k, v in base.items() if k not in _EXCLUSIVE}
    return {**base, **top}


def resolve_engine_config(
    explicit: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    path: Path | None | bool = True,
) -> EngineConfig:
    """`EngineConfig` from explicit values over the environment over the settings file.

    `path=True` finds the file as described above; a Path uses that file; None/False uses none.
    """
    file_path = config_path(environ) if path is True else (path or None)
    merged = file_settings(file_path)
    merged = _overlay(merged, env_settings(environ))
    merged = _overlay(merged, {k: v for k, v in (explicit or {}).items() if v is not None})
    return EngineConfig.build(**merged)
