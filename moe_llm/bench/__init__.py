"""`moe-llm bench`: the synthetic Mixtral-8x7B benchmark protocol (see shared/benchmark.md).

`synthetic` builds the geometry on the device with random quantized weights,
`protocol` measures variants, `baseline` runs transformers + accelerate,
`report` derives ratios, targets and projections, `runner` ties them together.
"""

from .protocol import Variant, Workload, pinned_bandwidth, run_protocol
from .runner import default_variants, run_bench
from .synthetic import MIXTRAL_8X7B, Geometry, SyntheticModel

__all__ = [
    "MIXTRAL_8X7B",
    "Geometry",
    "SyntheticModel",
    "Variant",
    "Workload",
    "default_variants",
    "pinned_bandwidth",
    "run_bench",
    "run_protocol",
]
