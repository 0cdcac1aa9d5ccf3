"""Fused dequant-GEMV for the compact format on CUDA (Triton).

Placeholder until the Triton kernels land: `supports` returns False so the
reference dequantize+matmul path is used.
"""

from __future__ import annotations

import torch


def supports(x: torch.Tensor, fmt) -> bool:
    return False


def expert_mlp(x: torch.Tensor, views, fmt, act_fn):  # pragma: no cover - see supports()
    raise NotImplementedError


def supports_linear(x: torch.Tensor, spec) -> bool:
    return False


def linear(x: torch.Tensor, tensors, spec):  # pragma: no cover - see supports_linear()
    raise NotImplementedError
