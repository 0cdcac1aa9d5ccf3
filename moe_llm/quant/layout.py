"""Byte layout of one expert (or one dense matrix) inside a single flat buffer.

An `ExpertLayout` names each tensor of an expert with its dtype, shape and byte
offset. The host store and the device slots are plain uint8 buffers; views of
the right dtype and shape are cut out of them without copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ALIGN = 64  # bytes; keeps every view aligned for vectorised loads


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = _dtype_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ExpertLayout:
    specs: tuple[TensorSpec, ...]
    nbytes: int

    @classmethod
    def build(cls, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> ExpertLayout:
        specs, offset = [], 0
        for name, (dtype, shape) in tensors.items():
            spec = TensorSpec(name, dtype, tuple(int(s) for s in shape), offset)
            specs.append(spec)
            offset += -(-spec.nbytes // _ALIGN) * _ALIGN
        return cls(tuple(specs), offset)

    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into a flat uint8 buffer of `nbytes` bytes."""
        out = {}
        for s in self.specs:
            out[s.name] = buffer[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)
        return out

    def write(self, buffer: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Copy each named tensor into its place in `buffer`."""
        views = self.views(buffer)
        for name, view in views.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(view.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != layout {tuple(view.shape)}")
            view.copy_(t.to(view.dtype))
