"""Minimal safetensors I/O: parse the header, then view tensors straight out of an mmap;
write files with the usual permissions.

A safetensors file is ``u64 header_len | JSON header | data``; the header maps each
tensor name to ``{dtype, shape, data_offsets: [begin, end]}`` relative to the data
section. Reading the header ourselves lets the loader copy an expert's bytes from
the page cache into its pinned buffer in one step, with no intermediate tensor.
The format holds raw bytes only, so nothing here can execute code (unlike pickle).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import CheckpointIntegrityError

DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # the reference implementation refuses headers over 100 MB


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it process-wide, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_usual_mode(path: Path) -> None:
    """Give `path` the mode of a newly created file (0666 less the umask). safetensors writes
    through a private temporary file, so its files come out 0600."""
    os.chmod(path, 0o666 & ~_umask())


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    set_usual_mode(path)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; raises naming the file if it is malformed."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointIntegrityError(f"{name}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointIntegrityError(f"{name}: truncated or corrupt safetensors header")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise CheckpointIntegrityError(f"{name}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointIntegrityError(f"{name}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointIntegrityError(f"{name}: corrupt safetensors header")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    try:
        for key, info in header.items():
            begin, end = (int(x) for x in info["data_offsets"])
            tensors[key] = TensorInfo(
                str(info["dtype"]), tuple(int(s) for s in info["shape"]), base + begin, base + end
            )
    except (KeyError, TypeError, ValueError):
        raise CheckpointIntegrityError(f"{name}: corrupt safetensors header entry {key!r}") from None
    data_end = max((t.end for t in tensors.values()), default=base)
    if data_end > size:
        raise CheckpointIntegrityError(
            f"{name}: truncated safetensors file ({size} bytes, the header needs {data_end})"
        )
    return tensors, {str(k): str(v) for k, v in meta.items()}


class MappedFile:
    """A safetensors file opened as a private (copy-on-write) memory map."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors, self.metadata = read_header(path)
        self._fh = open(path, "rb")
        size = path.stat().st_size
        self._mm = mmap.mmap(self._fh.fileno(), size, access=mmap.ACCESS_READ) if size else None

    def bytes_view(self, key: str) -> torch.Tensor:
        """The raw bytes of tensor `key` as a uint8 tensor backed by the mmap (no copy).
        The map is read-only: only ever copy out of the view, never write into it."""
        info = self.tensors[key]
        with warnings.catch_warnings():  # torch warns that the buffer is not writable
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.begin)

    def close(self) -> None:
        self.tensors = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
            self._mm = None
        self._fh.close()
