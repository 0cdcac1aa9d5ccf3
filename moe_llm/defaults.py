"""Where the embedded default model comes from when no model directory is given."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DATA = Path(__file__).parent / "data"


def shipped_demo_dir() -> Path | None:
    """The trained demo MoE shipped inside the package, if present."""
    d = PACKAGE_DATA / "demo"
    return d if (d / "config.json").is_file() else None


def cache_dir() -> Path:
    root = os.environ.get("MOE_LLM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "moe-llm")
    return Path(root)


def default_model_dir() -> tuple[Path, bool]:
    """(directory, is_random). Prefers the shipped demo; else builds a tiny random Mixtral once."""
    demo = shipped_demo_dir()
    if demo is not None:
        return demo, False
    tiny = cache_dir() / "tiny-mixtral"
    if not (tiny / "config.json").is_file():
        from .tiny import make_tiny

        make_tiny(tiny, "mixtral", seed=0, layers=4)
    return tiny, True
