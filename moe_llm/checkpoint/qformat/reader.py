"""Load a directory written by `quantize_checkpoint` without quantizing anything.

`QuantizedCheckpoint` quacks like `Checkpoint` where the loader needs it
(`path`, `config_dict`, `trunk_keys`, `trunk_tensor`) and adds the two steps that
replace quantization: `install_dense` builds `QuantLinear` modules from the stored
compact tensors, and `fill_store` copies each expert's bytes from the memory map
straight into its (pinned) `ExpertStore` buffer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ...config import EngineConfig
from ...errors import CheckpointIntegrityError, ConfigError, ModelLoadError
from ...experts.format import ExpertFormat
from ...experts.store import ExpertStore
from ...quant import QuantSpec
from ...runtime.quant_linear import QuantLinear
from .manifest import MANIFEST, METADATA_TAG, Manifest, read_manifest, verify_files
from .safetensors_io import DTYPES, MappedFile, read_header
from .writer import layout_entries

log = logging.getLogger(__name__)

_DENSE_PARTS = ("q", "scale_q", "zero_q", "meta")


def is_quantized_dir(path: str | Path) -> bool:
    """True for a moe-llm quantized directory, including one whose manifest went missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    if (p / MANIFEST).is_file():
        return True
    first = next(iter(sorted(p.glob("*.safetensors"))), None)
    if first is None:
        return False
    try:
        return METADATA_TAG in read_header(first)[1]
    except CheckpointIntegrityError:
        return False


def resolve_stored_bits(manifest: Manifest, cfg: EngineConfig, name: str) -> EngineConfig:
    """Adopt the stored bits; refuse a request for different ones (that needs the source)."""
    q = manifest.quantization
    stored = {"experts_bits": q.experts_bits, "attn_bits": q.attn_bits, "group_size": q.experts_group_size}
    for field, value in stored.items():
        asked = getattr(cfg, field)
        if asked is not None and asked != value:
            raise ConfigError(
                f"{name} is quantized with {field}={value}; {field}={asked} needs "
                "`moe-llm quantize` from the original checkpoint"
            )
    return cfg.model_copy(update=stored)


class QuantizedCheckpoint:
    def __init__(self, path: str | Path, verify_checksums: bool = True):
        self.path = Path(path).expanduser()
        self.manifest: Manifest = read_manifest(self.path)
        verify_files(self.path, self.manifest, checksums=verify_checksums)
        try:
            self.config_dict = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"config.json in {self.path} is unreadable: {exc}") from None
        self._files: dict[str, MappedFile] = {}
        self._key_file: dict[str, str] = {}
        for name in self.manifest.files:
            if name.endswith(".safetensors"):
                self._files[name] = MappedFile(self.path / name)
                for key in self._files[name].tensors:
                    self._key_file[key] = name
        dense_parts = {f"{m}.{p}" for m in self.manifest.dense for p in _DENSE_PARTS}
        self.trunk_keys = {
            k: k for k in self._key_file if not k.startswith("experts.") and k not in dense_parts
        }  # canonical -> raw: stored under transformers names already

    # -- settings ---------------------------------------------------------------------------------
    def resolve(self, cfg: EngineConfig) -> EngineConfig:
        return resolve_stored_bits(self.manifest, cfg, self.path.name)

    def check_format(self, fmt: ExpertFormat) -> None:
        if layout_entries(fmt) != [tuple(x) for x in self.manifest.experts.layout]:
            raise CheckpointIntegrityError(
                f"{MANIFEST} in {self.path}: the stored expert layout differs from this moe-llm's; re-quantize"
            )

    # -- tensors ----------------------------------------------------------------------------------
    def _tensor(self, key: str) -> torch.Tensor:
        name = self._key_file.get(key)
        if name is None:
            raise CheckpointIntegrityError(f"tensor {key} is missing from {self.path}")
        mf = self._files[name]
        info = mf.tensors[key]
        dtype = DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointIntegrityError(f"{name}: tensor {key} has unsupported dtype {info.dtype}")
        raw = mf.bytes_view(key)
        try:
            return raw.view(dtype).view(info.shape).clone()
        except RuntimeError:  # an offset not aligned to the dtype: copy the bytes first
            return raw.clone().view(dtype).view(info.shape)

    def trunk_tensor(self, name: str) -> torch.Tensor:
        return self._tensor(name)

    def install_dense(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
        """Replace each stored dense projection with a `QuantLinear` built from its compact tensors."""
        for module, entry in self.manifest.dense.items():
            spec = QuantSpec(entry.bits, entry.group_size, entry.out_features, entry.in_features)
            want = spec.tensors(module)
            tensors = {}
            for part in _DENSE_PARTS:
                t = self._tensor(f"{module}.{part}")
                want_dtype, want_shape = want[f"{module}.{part}"]
                if t.dtype != want_dtype or tuple(t.shape) != tuple(want_shape):
                    raise CheckpointIntegrityError(
                        f"tensor {module}.{part} in {self._key_file[f'{module}.{part}']} has "
                        f"{t.dtype}{tuple(t.shape)}, expected {want_dtype}{tuple(want_shape)}"
                    )
                tensors[part] = t.to(device)
            try:
                old = model.get_submodule(module)
            except AttributeError:
                raise CheckpointIntegrityError(f"{MANIFEST} names {module}, which this model does not have") from None
            bias = getattr(old, "bias", None)
            q = QuantLinear(spec, tensors, None, dtype)
            if bias is not None:  # still on meta: load_trunk fills it from the checkpoint
                q.bias = bias
            parent, _, attr = module.rpartition(".")
            setattr(model.get_submodule(parent), attr, q)
        return len(self.manifest.dense)

    def fill_store(
        self, layers: list[int], num_experts: int, fmt: ExpertFormat, pin: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> ExpertStore:  # fmt: skip
        """Copy every expert's stored bytes into its own (pinned) host buffer."""
        self.check_format(fmt)
        ex = self.manifest.experts
        if ex.layers != list(layers) or ex.num_experts != num_experts:
            raise CheckpointIntegrityError(
                f"{MANIFEST} in {self.path} lists experts for layers {ex.layers} x {ex.num_experts}, "
                f"the model has {layers} x {num_experts}"
            )
        store = ExpertStore(fmt, layers, num_experts, pin=pin)
        total, done = len(layers) * num_experts, 0
        for layer in layers:
            for e in range(num_experts):
                key = ex.key.format(layer=layer, expert=e)
                name = self._key_file.get(key)
                if name is None:
                    raise CheckpointIntegrityError(f"expert tensor {key} is missing from {self.path}")
                info = self._files[name].tensors[key]
                if info.dtype != "U8" or info.shape != (fmt.nbytes,):
                    raise CheckpointIntegrityError(
                        f"{name}: tensor {key} is {info.dtype}{list(info.shape)}, expected U8[{fmt.nbytes}]"
                    )
                store.put_raw(layer, e, self._files[name].bytes_view(key))
                done += 1
                if progress:
                    progress(done, total)
        return store

    def close(self) -> None:
        for mf in self._files.values():
            mf.close()
        self._files.clear()
