"""Decode rows: one forward of B one-position rows (the batcher's batched decode step, from
`runtime.fused_decode`), in which every row must come out bit for bit as it would alone.

Inside `decode_rows(widths, masked)` each trunk op takes one of two ways:
- a kernel whose programs compute each row as a lone row's launch does, with the row as one
  more grid dimension (the norm and router kernels of `triton_trunk`, the GEMVs of
  `triton_gemv`/`triton_group`, the routed-experts kernels of `triton_moe`, whose int8 sums
  are exact integers in any order): one launch for all rows, in which rows that read the same
  weights share them through L2;
- anything else (torch's norms, cuBLAS linears, other families' routers, attention itself) runs
  once per row on that row's slice (`per_row`), which is the lone row's own call.
Outside it nothing changes. `trunk_ops.install` and the modules that handle rows
(`QuantLinear`, `OffloadedExperts`) consult `batched`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

_local = threading.local()


@dataclass(frozen=True)
class Rows:
    """The rows of the forward in progress: per row, how many key positions attention reads
    and whether it reads them under a mask, as the row's lone decode would."""

    widths: tuple[int, ...]
    masked: tuple[bool, ...]

    @property
    def count(self) -> int:
        return len(self.widths)


@contextlib.contextmanager
def decode_rows(widths: list[int], masked: list[bool]) -> Iterator[Rows]:
    prev = getattr(_local, "rows", None)
    _local.rows = Rows(tuple(widths), tuple(masked))
    try:
        yield _local.rows
    finally:
        _local.rows = prev


def current() -> Rows | None:
    return getattr(_local, "rows", None)


def batched(x: torch.Tensor) -> bool:
    """Whether `x` holds the rows of a decode-rows forward along its first dimension (B > 1)."""
    rows = current()
    return rows is not None and rows.count > 1 and x.dim() >= 1 and x.shape[0] == rows.count


def per_row(fn: Callable, x: torch.Tensor, *args, **kwargs):
    """fn on each row of x (x[b:b+1]), concatenated: what each row gets alone. Tuples of
    tensors are concatenated element by element."""
    outs = [fn(x[b : b + 1], *args, **kwargs) for b in range(x.shape[0])]
    if isinstance(outs[0], tuple):
        return tuple(
            torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts[0] for parts in zip(*outs, strict=True)
        )
    return torch.cat(outs)
