"""`manifest.json` of a quantized model directory: what was written, how, and its checksums.

The manifest is written last, so a directory without one is an unfinished
quantization. Loading checks the format version first, then that every listed
file exists with the recorded size and (unless disabled) sha256, naming the first
file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import CheckpointIntegrityError

FORMAT_NAME = "moe-llm-quantized"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXPERT_KEY = "experts.{layer}.{expert}"  # one uint8 tensor per expert: its ExpertFormat bytes
METADATA_TAG = "moe_llm_format"  # written into every safetensors header of the directory
_CHUNK = 16 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    bytes: int


class DenseEntry(BaseModel):
    """A dense projection stored as compact tensors ``<module>.q/scale_q/zero_q/meta``."""

    model_config = ConfigDict(extra="forbid")

    bits: int
    group_size: int
    out_features: int
    in_features: int


class QuantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "hqq+compact8"
    experts_bits: int
    experts_group_size: int | None = None
    attn_bits: int | None = None
    meta_group: int


class ExpertsEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[int]
    num_experts: int
    nbytes: int
    bits_per_param: float
    key: str = EXPERT_KEY
    layout: list[tuple[str, str, list[int], int]]  # (name, dtype, shape, byte offset)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str
    source: dict[str, Any] = Field(description="Source directory name and its config.json.")
    quantization: QuantSettings
    experts: ExpertsEntry
    dense: dict[str, DenseEntry] = Field(default_factory=dict)
    files: dict[str, FileEntry]

    def write(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=1))
        os.replace(tmp, directory / MANIFEST)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def read_manifest(directory: Path) -> Manifest:
    """Parse and version-check `directory/manifest.json`."""
    path = directory / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointIntegrityError(f"{MANIFEST} is missing from {directory}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointIntegrityError(f"{MANIFEST} in {directory} is unreadable: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointIntegrityError(f"{MANIFEST} in {directory} is not a moe-llm quantized manifest")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointIntegrityError(
            f"{MANIFEST} in {directory} has format version {version!r}; this moe-llm reads version "
            f"{FORMAT_VERSION}: re-run `moe-llm quantize` on the source checkpoint"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise CheckpointIntegrityError(f"{MANIFEST} in {directory} is malformed at {loc}: {err['msg']}") from None


def verify_files(directory: Path, manifest: Manifest, checksums: bool = True) -> None:
    """Every listed file exists with its recorded size (and sha256 when `checksums`)."""
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointIntegrityError(f"{name} is listed in {MANIFEST} but missing from {directory}")
        size = path.stat().st_size
        if size != entry.bytes:
            raise CheckpointIntegrityError(
                f"{name} in {directory} has {size} bytes, {MANIFEST} records {entry.bytes} (modified or truncated)"
            )
    if checksums:  # hashlib releases the GIL: hash the files in parallel, report in manifest order
        names = list(manifest.files)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = pool.map(lambda n: sha256_file(directory / n), names)
            for name, digest in zip(names, digests, strict=True):
                if digest != manifest.files[name].sha256:
                    raise CheckpointIntegrityError(
                        f"{name} in {directory} does not match its sha256 in {MANIFEST} (modified or corrupted)"
                    )
