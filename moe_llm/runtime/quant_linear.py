"""QuantLinear: a dense nn.Linear replacement holding compact-quantized weights.

Used for attention (and any other dense projection) when ``attn_bits`` is set.
Same HQQ math and byte format as the experts, so one set of kernels serves both.

Projections that read one input (q, k and v; gate and up of a dense MLP) are linked into a
`SharedInput` (`share_inputs`): for one token on CUDA the first of them called computes
them all in one launch (`triton_group.GemvGroup`, int8 activations), and the others return
their rows of that result when they are called with the same tensor. A linked member called
with another input runs the group again, so every one-token output of a member comes from
the same kernel and arithmetic, whatever order or inputs the calls come in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import quant_linear, rows, triton_kernels
from ..quant import QuantSpec, compact, pick_group_size

# sibling projections that transformers' modules call with one input tensor
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))


class QuantLinear(nn.Module):
    def __init__(self, spec: QuantSpec, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.compute_dtype = dtype
        for k, v in tensors.items():
            self.register_buffer(k, v, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.shared: tuple[SharedInput, int] | None = None  # (its group, its place in it)

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

    handles_rows = True  # decoded rows (`kernels.rows`): each as alone, in one launch on CUDA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None and x.is_cuda and (x.numel() == self.in_features or rows.batched(x)):
            group, i = self.shared
            return group.output(i, x)
        y = quant_linear(x, self.tensors(), self.spec, self.compute_dtype)
        return y if self.bias is None else y + self.bias

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, group={self.spec.group_size}"


class SharedInput:
    """One-token outputs of projections that read one input, computed in one launch (see the
    module docstring). Holds the input and the outputs of the last launch until every member
    has taken its rows."""

    def __init__(self, members: list[QuantLinear], kernels):
        self.members = members
        self.gemv = kernels.GemvGroup([m.tensors() for m in members], [m.spec for m in members])
        self.dtype = members[0].compute_dtype
        self._x: torch.Tensor | None = None
        self._outs: list[torch.Tensor | None] = []

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x or self._outs[i] is None:
            self._x, self._outs = x, list(self.gemv(x, self.dtype))
        y, self._outs[i] = self._outs[i], None
        if all(o is None for o in self._outs):
            self._x = None  # every member has its rows: hold nothing between tokens
        m = self.members[i]
        y = y.view(*x.shape[:-1], m.out_features)
        return y if m.bias is None else y + m.bias


def share_inputs(model: nn.Module) -> int:
    """Link the CUDA QuantLinear siblings of `SHARED_INPUTS` that have one spec but their rows
    (one launch for all of them per token). Returns how many groups it linked."""
    kernels = triton_kernels()
    count = 0
    for parent in model.modules():
        for names in SHARED_INPUTS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, QuantLinear) and m.q.is_cuda for m in members):
                continue
            if kernels is None or not all(kernels.supported_spec(m.spec) for m in members):
                continue
            if len({(m.spec.bits, m.spec.group_size, m.in_features, m.compute_dtype) for m in members}) != 1:
                continue
            try:
                group = SharedInput(members, kernels)
            except ValueError:  # tensors off a 16-byte boundary
                continue
            for i, m in enumerate(members):
                m.shared = (group, i)
            count += 1
    return count
