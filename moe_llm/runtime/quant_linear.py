"""QuantLinear: a dense nn.Linear replacement holding compact-quantized weights.

Used for attention (and any other dense projection) when ``attn_bits`` is set.
Same HQQ math and byte format as the experts, so one set of kernels serves both.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import quant_linear
from ..quant import QuantSpec, compact, pick_group_size


class QuantLinear(nn.Module):
    def __init__(self, spec: QuantSpec, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.compute_dtype = dtype
        for k, v in tensors.items():
            self.register_buffer(k, v, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, dtype, device) -> QuantLinear:
        out_f, in_f = weight.shape
        spec = QuantSpec(bits, pick_group_size(bits, in_f), out_f, in_f)
        qdev = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
        tensors = compact.quantize(weight.to(qdev), bits, spec.group_size)
        tensors = {k: v.to(device) for k, v in tensors.items()}
        b = None if bias is None else bias.to(device=device, dtype=dtype)
        return cls(spec, tensors, b, dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale_q": self.scale_q, "zero_q": self.zero_q, "meta": self.meta}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_linear(x, self.tensors(), self.spec, self.compute_dtype)
        return y if self.bias is None else y + self.bias

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, group={self.spec.group_size}"
