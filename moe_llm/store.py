"""ExpertStore: every expert of the model in host RAM, one contiguous buffer each.

Buffers are pinned when the engine runs on CUDA, so a cache miss is one
asynchronous host-to-device DMA of `fmt.nbytes` bytes. An expert is encoded
(quantized) straight into its buffer and never held twice.
"""

from __future__ import annotations

import logging

import torch

from .expert_format import ExpertFormat

log = logging.getLogger(__name__)


class ExpertStore:
    def __init__(self, fmt: ExpertFormat, layers: list[int], num_experts: int, pin: bool = False):
        self.fmt = fmt
        self.layers = list(layers)
        self.num_experts = num_experts
        self.pinned = pin
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def _alloc(self) -> torch.Tensor:
        return torch.empty(self.fmt.nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def put(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        buf = self._buffers.get((layer, expert))
        if buf is None:
            buf = self._alloc()
            buf.zero_()  # padding bytes are deterministic
            self._buffers[(layer, expert)] = buf
        self.fmt.layout.write(buf, tensors)

    def put_raw(self, layer: int, expert: int, data: torch.Tensor) -> None:
        """Install an already-encoded buffer (e.g. from a quantized checkpoint)."""
        if data.dtype != torch.uint8 or data.numel() != self.fmt.nbytes:
            raise ValueError(f"expert buffer must be {self.fmt.nbytes} uint8 bytes")
        buf = self._alloc()
        buf.copy_(data)
        self._buffers[(layer, expert)] = buf

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        return self._buffers[(layer, expert)]

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.fmt.layout.views(self.buffer(layer, expert))

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    @property
    def nbytes(self) -> int:
        return len(self._buffers) * self.fmt.nbytes

    def is_complete(self) -> bool:
        return len(self._buffers) == len(self.layers) * self.num_experts
