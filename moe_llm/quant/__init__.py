"""Compact HQQ-based quantization: packing, meta compaction, reference dequantization."""

from .compact import DEFAULT_GROUP_SIZE, QuantSpec, dequantize, pick_group_size, quantize
from .layout import ExpertLayout, TensorSpec

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "ExpertLayout",
    "QuantSpec",
    "TensorSpec",
    "dequantize",
    "pick_group_size",
    "quantize",
]
