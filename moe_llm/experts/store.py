"""ExpertStore: every expert of the model in host RAM, one contiguous buffer each.

Buffers are pinned when the engine runs on CUDA, so a cache miss is one
asynchronous host-to-device DMA of `fmt.nbytes` bytes. An expert is encoded
(quantized) straight into its buffer and never held twice.

The buffers of one MoE layer are rows of one host slab ``[num_experts, nbytes]``.
On CUDA the slab is page-locked in place with ``cudaHostRegister``: the caching
pinned allocator rounds sizes up to a power of two, which would cost up to
twice the RAM for ~56 MB experts. If registration fails, the allocator is used.
Either way the pages are mapped into the device's address space at their host
address (UVA), so a kernel can read a missed expert in place (`address`).
"""

from __future__ import annotations

import logging
import weakref

import torch

from .format import ExpertFormat

log = logging.getLogger(__name__)


def _register(t: torch.Tensor, chunk: int) -> bool:
    """Page-lock `t` in place, `chunk` bytes per registration, from several threads
    (touching and locking pages is the slow part). Each range is unregistered when
    `t` is freed."""
    from concurrent.futures import ThreadPoolExecutor

    cudart = torch.cuda.cudart()
    base, total = t.data_ptr(), t.numel() * t.element_size()
    ranges = [(base + off, min(chunk, total - off)) for off in range(0, total, chunk)]
    with ThreadPoolExecutor(max_workers=min(16, len(ranges))) as pool:
        # portable | mapped: any device may read the pages in place (zero-copy), at the host address
        errors = list(pool.map(lambda r: int(cudart.cudaHostRegister(r[0], r[1], 3)), ranges))
    ok = [r[0] for r, e in zip(ranges, errors, strict=True) if e == 0]
    for ptr in ok:
        weakref.finalize(t, cudart.cudaHostUnregister, ptr)
    return len(ok) == len(ranges)


def host_buffer(nbytes: int, pin: bool, chunk: int | None = None) -> torch.Tensor:
    """A uint8 host buffer of `nbytes`, page-locked if `pin`. With `chunk`, each
    `chunk`-byte range is its own registration (copies must not span two)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    if not pin:
        return t
    t.zero_()  # touch every page (in parallel) before locking it
    if _register(t, chunk or nbytes):
        return t
    log.info("cudaHostRegister failed; using the pinned caching allocator")
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class ExpertStore:
    def __init__(self, fmt: ExpertFormat, layers: list[int], num_experts: int, pin: bool = False):
        self.fmt = fmt
        self.layers = list(layers)
        self.num_experts = num_experts
        self.pinned = pin
        self._slabs: dict[int, torch.Tensor] = {}  # layer -> flat [num_experts * nbytes]
        self._filled: set[tuple[int, int]] = set()

    def _slot(self, layer: int, expert: int) -> torch.Tensor:
        if not 0 <= expert < self.num_experts:
            raise KeyError((layer, expert))
        n = self.fmt.nbytes
        slab = self._slabs.get(layer)
        if slab is None:
            if layer not in self.layers:
                raise KeyError((layer, expert))
            # the store holds this very tensor: its finalizer unregisters the pages
            slab = self._slabs[layer] = host_buffer(self.num_experts * n, self.pinned, chunk=n)
        return slab[expert * n : (expert + 1) * n]

    def put(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        buf = self._slot(layer, expert)
        if (layer, expert) not in self._filled:
            buf.zero_()  # padding bytes are deterministic
            self._filled.add((layer, expert))
        self.fmt.layout.write(buf, tensors)

    def put_raw(self, layer: int, expert: int, data: torch.Tensor) -> None:
        """Install an already-encoded buffer (e.g. from a quantized checkpoint, or
        random codes for a synthetic model); `data` may live on any device."""
        if data.dtype != torch.uint8 or data.numel() != self.fmt.nbytes:
            raise ValueError(f"expert buffer must be {self.fmt.nbytes} uint8 bytes")
        self._slot(layer, expert).copy_(data.reshape(-1))
        self._filled.add((layer, expert))

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        if (layer, expert) not in self._filled:
            raise KeyError((layer, expert))
        return self._slot(layer, expert)

    def address(self, layer: int, expert: int) -> int:
        """The expert buffer's address, which device kernels may read in place when pinned."""
        return self.buffer(layer, expert).data_ptr()

    def views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.fmt.layout.views(self.buffer(layer, expert))

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._filled

    def __len__(self) -> int:
        return len(self._filled)

    @property
    def nbytes(self) -> int:
        return len(self._filled) * self.fmt.nbytes

    def is_complete(self) -> bool:
        return len(self._filled) == len(self.layers) * self.num_experts
