"""Lazy reader of a Hugging Face checkpoint directory.

Reads config.json, finds the safetensors shards (single file or sharded with an
index), and maps every tensor name onto the transformers 5.x module names. The
expert tensors of both naming schemes are served one expert at a time:

* per-expert (old): ``layers.L.block_sparse_moe.experts.E.w1/w2/w3`` (Mixtral) or
  ``layers.L.mlp.experts.E.gate_proj/up_proj/down_proj`` (Qwen-MoE, OLMoE);
* fused (5.x): ``layers.L.mlp.experts.gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I).

Nothing is read until asked for; safetensors memory-maps the files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointIntegrityError, ModelLoadError

_PER_EXPERT = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
    r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_RENAMES = [(re.compile(r"\.block_sparse_moe\.gate\."), ".mlp.gate.")]


def canonical_name(key: str) -> str:
    """Map a checkpoint key to the transformers 5.x parameter name."""
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


@dataclass
class _ExpertKeys:
    gate: dict[int, str] = field(default_factory=dict)  # expert -> key
    up: dict[int, str] = field(default_factory=dict)
    down: dict[int, str] = field(default_factory=dict)
    gate_up_fused: str | None = None
    down_fused: str | None = None


def read_config_dict(path: Path) -> dict:
    """config.json of model directory `path`, with one-line errors for the usual mistakes."""
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"not a directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"no config.json in {path}")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"config.json in {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"config.json in {path} is not a JSON object")
    return config


@dataclass
class ConfigOnly:
    """A model directory read for its config.json alone (planning needs no weights)."""

    path: Path
    config_dict: dict

    @classmethod
    def open(cls, path: str | Path) -> ConfigOnly:
        p = Path(path).expanduser()
        return cls(p, read_config_dict(p))


class Checkpoint:
    """A local HF checkpoint directory, opened lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.config_dict = read_config_dict(self.path)
        self._files = self._find_shards()
        self._handles: dict[Path, object] = {}
        self._key_file: dict[str, Path] = {}
        for f in self._files:
            for k in self._open(f).keys():
                self._key_file[k] = f
        self.trunk_keys: dict[str, str] = {}  # canonical -> raw
        self.experts: dict[int, _ExpertKeys] = {}
        for key in self._key_file:
            if m := _PER_EXPERT.match(key):
                layer, expert, role = int(m.group(1)), int(m.group(2)), _ROLE[m.group(3)]
                getattr(self.experts.setdefault(layer, _ExpertKeys()), role)[expert] = key
            elif m := _FUSED.match(key):
                ek = self.experts.setdefault(int(m.group(1)), _ExpertKeys())
                setattr(ek, "gate_up_fused" if m.group(2) == "gate_up_proj" else "down_fused", key)
            else:
                self.trunk_keys[canonical_name(key)] = key

    # -- files -------------------------------------------------------------
    def _find_shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointIntegrityError(f"{index.name}: malformed index ({exc})") from None
            files = sorted({self.path / name for name in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointIntegrityError(f"shard listed in {index.name} is missing: {f.name}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                raise ModelLoadError(
                    f"{self.path} holds only pickle weights (.bin/.pt); moe-llm loads safetensors only"
                )
            raise ModelLoadError(f"no .safetensors files in {self.path}")
        return files

    def _open(self, f: Path):
        if f not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointIntegrityError(f"{f.name}: cannot read safetensors ({exc})") from None
        return self._handles[f]

    def _read(self, key: str, index: int | None = None) -> torch.Tensor:
        f = self._key_file[key]
        try:
            if index is None:
                return self._open(f).get_tensor(key)
            return self._open(f).get_slice(key)[index]
        except Exception as exc:
            raise CheckpointIntegrityError(f"{f.name}: cannot read tensor {key} ({exc})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self._key_file[key]).get_slice(key).get_shape())

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def file_of(self, key: str) -> Path:
        """The shard that holds tensor `key`."""
        return self._key_file[key]

    def is_fused(self, layer: int) -> bool:
        """Whether `layer`'s experts are stored as one fused (E, ...) tensor pair."""
        ek = self.experts.get(layer)
        return bool(ek and ek.gate_up_fused and ek.down_fused)

    def expert_part_keys(self, layer: int, expert: int) -> list[str]:
        """Raw keys read by `expert(layer, expert)`."""
        ek = self.experts.get(layer)
        if ek is None:
            return []
        if ek.gate_up_fused and ek.down_fused:
            return [ek.gate_up_fused, ek.down_fused]
        return [d[expert] for d in (ek.gate, ek.up, ek.down) if expert in d]

    # -- tensors -----------------------------------------------------------
    def trunk_tensor(self, name: str) -> torch.Tensor:
        return self._read(self.trunk_keys[name])

    def moe_layers(self) -> list[int]:
        return sorted(self.experts)

    def num_experts(self, layer: int) -> int:
        ek = self.experts[layer]
        if ek.gate_up_fused:
            return self.shape(ek.gate_up_fused)[0]
        return len(ek.down)

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert, read from disk."""
        ek = self.experts.get(layer)
        if ek is None:
            raise CheckpointIntegrityError(f"no expert tensors for layer {layer}")
        if ek.gate_up_fused and ek.down_fused:
            return self._read(ek.gate_up_fused, expert), self._read(ek.down_fused, expert)
        try:
            gate, up, down = ek.gate[expert], ek.up[expert], ek.down[expert]
        except KeyError:
            raise CheckpointIntegrityError(f"layer {layer} expert {expert}: missing gate/up/down tensors") from None
        return torch.cat([self._read(gate), self._read(up)], dim=0), self._read(down)

    def close(self) -> None:
        self._handles.clear()
