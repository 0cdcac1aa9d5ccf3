"""Lazy reader of a Hugging Face checkpoint directory.

Reads config.json, finds the safetensors shards (single file or sharded with an
index), and maps every tensor name onto the transformers 5.x module names with the
family's architecture map (`arch.CheckpointKeys`). The expert tensors of both naming
schemes are served one expert at a time:

* per-expert (old): ``layers.L.block_sparse_moe.experts.E.w1/w2/w3`` (Mixtral) or
  ``layers.L.mlp.experts.E.gate_proj/up_proj/down_proj`` (Qwen-MoE, OLMoE, DeepSeek);
* fused (5.x): ``layers.L.mlp.experts.gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I),
  or the family's own fused names (Granite-MoE: ``input_linear``/``output_linear``), or
  GPT-OSS's transposed, interleaved tensors with biases, in bf16 or as shipped in MXFP4
  (``gate_up_proj_blocks`` / ``_scales``), dequantized one expert at a time.

Nothing is read until asked for; safetensors memory-maps the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointIntegrityError, ModelLoadError
from .arch import ArchMap, CheckpointKeys, arch_for_type


def canonical_name(key: str, keys: CheckpointKeys | None = None) -> str:
    """Map a checkpoint key to the transformers 5.x parameter name (Mixtral's renames by default)."""
    return (keys or arch_for_type("mixtral").keys).canonical(key)


@dataclass
class _ExpertKeys:
    gate: dict[int, str] = field(default_factory=dict)  # expert -> key
    up: dict[int, str] = field(default_factory=dict)
    down: dict[int, str] = field(default_factory=dict)
    gate_up_fused: str | None = None
    down_fused: str | None = None
    mxfp4: dict[str, str] = field(default_factory=dict)  # "gate_up.blocks" ... -> key (GPT-OSS)
    bias: dict[str, str] = field(default_factory=dict)  # "gate_up_bias" / "down_bias" -> fused key (GPT-OSS)

    @property
    def is_mxfp4(self) -> bool:
        return len(self.mxfp4) == 4


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

    def __init__(self, path: str | Path, arch: ArchMap | None = None):
        self.path = Path(path).expanduser()
        self.config_dict = read_config_dict(self.path)
        arch = arch or arch_for_type(self.config_dict.get("model_type"))
        self.keys: CheckpointKeys = arch.keys
        self.layout = arch.layout
        self._files = self._find_shards()
        self._handles: dict[Path, object] = {}
        self._key_file: dict[str, Path] = {}
        for f in self._files:
            for k in self._open(f).keys():
                self._key_file[k] = f
        self.trunk_keys: dict[str, str] = {}  # canonical -> raw
        self.experts: dict[int, _ExpertKeys] = {}
        for key in self._key_file:
            hit = self.keys.classify(key)
            if hit is None:
                self.trunk_keys[self.keys.canonical(key)] = key
            elif hit[0] == "per_expert":
                _, layer, expert, role = hit
                getattr(self.experts.setdefault(layer, _ExpertKeys()), role)[expert] = key
            else:
                ek = self.experts.setdefault(hit[1], _ExpertKeys())
                if "." in hit[3]:  # an MXFP4 part: gate_up.blocks, down.scales, ...
                    ek.mxfp4[hit[3]] = key
                elif hit[3].endswith("_bias"):
                    ek.bias[hit[3]] = key
                else:
                    setattr(ek, "gate_up_fused" if hit[3] == "gate_up" else "down_fused", key)

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
        return bool(ek and ((ek.gate_up_fused and ek.down_fused) or ek.is_mxfp4))

    def expert_part_keys(self, layer: int, expert: int) -> list[str]:
        """Raw keys read by `expert(layer, expert)`."""
        ek = self.experts.get(layer)
        if ek is None:
            return []
        if ek.gate_up_fused and ek.down_fused:
            return [ek.gate_up_fused, ek.down_fused, *ek.bias.values()]
        if ek.is_mxfp4:
            return [*ek.mxfp4.values(), *ek.bias.values()]
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
        if ek.is_mxfp4:
            return self.shape(ek.mxfp4["gate_up.blocks"])[0]
        return len(ek.down)

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert, read from disk."""
        ek = self.experts.get(layer)
        if ek is None:
            raise CheckpointIntegrityError(f"no expert tensors for layer {layer}")
        if ek.gate_up_fused and ek.down_fused:
            gate_up, down = self._read(ek.gate_up_fused, expert), self._read(ek.down_fused, expert)
            if self.layout.transposed:  # (H, 2I) and (I, H) as transformers holds them
                gate_up, down = gate_up.T, down.T
            return self._gate_then_up(gate_up), down.contiguous()
        if ek.is_mxfp4:  # one expert dequantized: rows are outputs, (2I, H) and (H, I)
            from .qformat import mxfp4

            parts = {role: self._read(key, expert) for role, key in ek.mxfp4.items()}
            gate_up = mxfp4.dequantize(parts["gate_up.blocks"], parts["gate_up.scales"])
            down = mxfp4.dequantize(parts["down.blocks"], parts["down.scales"])
            return self._gate_then_up(gate_up), down
        try:
            gate, up, down = ek.gate[expert], ek.up[expert], ek.down[expert]
        except KeyError:
            raise CheckpointIntegrityError(f"layer {layer} expert {expert}: missing gate/up/down tensors") from None
        return torch.cat([self._read(gate), self._read(up)], dim=0), self._read(down)

    def expert_biases(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up bias [2I] with the gate entries first, down bias [H]) of one expert where the
        family's layout has biases (GPT-OSS), else None."""
        if not self.layout.bias:
            return None
        if not self.has_biases(layer):
            raise CheckpointIntegrityError(f"layer {layer}: expert biases (gate_up_proj_bias, down_proj_bias) missing")
        keys = self.experts[layer].bias
        return self._gate_then_up(self._read(keys["gate_up_bias"], expert)), self._read(keys["down_bias"], expert)

    def has_biases(self, layer: int) -> bool:
        """Whether `layer` stores both fused expert biases."""
        ek = self.experts.get(layer)
        return ek is not None and set(ek.bias) == {"gate_up_bias", "down_bias"}

    def _gate_then_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[2I, H] (or a [2I] bias) with the gate rows first, whether the family interleaves them
        (GPT-OSS) or not."""
        if self.layout.concatenated:
            return gate_up.contiguous()
        return torch.cat([gate_up[0::2], gate_up[1::2]], dim=0)

    def close(self) -> None:
        self._handles.clear()
