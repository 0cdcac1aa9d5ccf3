"""How one expert is laid out in bytes: unquantized tensors or the compact format.

An expert is the pair ``gate_up_proj`` [2I, H] and ``down_proj`` [H, I], named as
in transformers. Unquantized experts keep both in the compute dtype; quantized
ones hold the compact tensors of `quant.compact` under the same prefixes. Experts
whose map declares biases (GPT-OSS) also hold ``gate_up_proj_bias`` [2I] and
``down_proj_bias`` [H]: float32 when quantized, else the compute dtype. `compute`
is the map's expert layout (`arch.ExpertLayout`): what the expert computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checkpoint.arch.spec import ExpertLayout as ExpertMath
from ..quant import ExpertLayout, QuantSpec, compact, pick_group_size

MATRICES = ("gate_up_proj", "down_proj")
BIASES = {"gate_up_proj": "gate_up_proj_bias", "down_proj": "down_proj_bias"}
COMPACT_KEYS = ("q", "scale_q", "zero_q", "meta")


def matrix_views(views: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The compact tensors of matrix `name` (keys q, scale_q, zero_q, meta) from slot views."""
    return {key: views[f"{name}.{key}"] for key in COMPACT_KEYS}


@dataclass(frozen=True)
class ExpertFormat:
    hidden: int
    intermediate: int
    bits: int | None
    dtype: torch.dtype
    specs: dict[str, QuantSpec] | None
    layout: ExpertLayout
    compute: ExpertMath = field(default_factory=ExpertMath)

    @classmethod
    def build(
        cls, hidden: int, intermediate: int, bits: int | None, dtype: torch.dtype, group_size: int | None = None,
        compute: ExpertMath | None = None,
    ) -> ExpertFormat:  # fmt: skip
        compute = compute or ExpertMath()
        shapes = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}
        bias_dtype = dtype if bits is None else torch.float32  # one stored layout for every compute dtype
        biases = {BIASES[name]: (bias_dtype, shape[:1]) for name, shape in shapes.items()} if compute.bias else {}
        if bits is None:
            layout = ExpertLayout.build({**{name: (dtype, shape) for name, shape in shapes.items()}, **biases})
            return cls(hidden, intermediate, None, dtype, None, layout, compute)
        specs = {
            name: QuantSpec(bits, pick_group_size(bits, shape[1], group_size), shape[0], shape[1])
            for name, shape in shapes.items()
        }
        tensors: dict = {}
        for name, spec in specs.items():
            tensors.update(spec.tensors(name))
        return cls(hidden, intermediate, bits, dtype, specs, ExpertLayout.build({**tensors, **biases}), compute)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def bits_per_param(self) -> float:
        """Bits moved to the device per expert parameter (the whole slot buffer)."""
        return self.nbytes * 8 / self.params

    def encode(
        self, gate_up: torch.Tensor, down: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> named tensors of this format (quantizing if needed). `biases`:
        (gate_up [2I], down [H]), given exactly when the format has them."""
        if (biases is not None) != self.compute.bias:
            raise ValueError(
                "expert biases given to a format without them" if biases is not None else "expert biases missing"
            )
        mats = {"gate_up_proj": gate_up, "down_proj": down}
        out = {}
        if self.specs is None:
            out = {k: v.to(self.dtype) for k, v in mats.items()}
        else:
            for name, spec in self.specs.items():
                for key, t in compact.quantize(mats[name], spec.bits, spec.group_size).items():
                    out[f"{name}.{key}"] = t
        if biases is not None:
            bias_dtype = self.dtype if self.specs is None else torch.float32
            out.update({BIASES[m]: b.to(bias_dtype) for m, b in zip(MATRICES, biases, strict=True)})
        return out

    def dense(self, views: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """Full-precision matrix `name` from slot views (reference path)."""
        if self.specs is None:
            return views[name]
        return compact.dequantize(matrix_views(views, name), self.specs[name], self.dtype)
