"""One GEMV launch over the matrices that read one input (q, k and v of a layer), for one token.

`share_inputs` (runtime/quant_linear.py) links such projections; the first one called for a
token runs `GemvGroup`, which computes every member's rows with int8 activations and the row
loop of `gemv_i8` (`_rows_i8`): each row as that matrix's lone int8 GEMV with the same tiling
computes it. A table of int64 byte offsets from the first member's codes points at
each member's four tensors, so the members stay where they were loaded.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental.gluon import language as gl

from ..quant.compact import QuantSpec
from .gemv_i8 import _group_gemv_i8_kernel
from .triton_gemv import INT8_BLOCK_N, _launch, _quantized


class GemvGroup:
    """Matrices of one spec but their row counts, that read one input (q, k and v): one launch
    computes them all for decoded positions, with int8 activations. Built once; `__call__` per step."""

    MAX = 4

    def __init__(self, tensors: list[dict[str, torch.Tensor]], specs: list[QuantSpec]):
        s0 = specs[0]
        if not 1 <= len(specs) <= self.MAX or any(
            (s.bits, s.group_size, s.in_features) != (s0.bits, s0.group_size, s0.in_features) for s in specs
        ):  # fmt: skip
            raise ValueError("a GEMV group needs 1-4 matrices of one bit width, group size and input width")
        base = tensors[0]["q"]
        names = ("q", "scale_q", "zero_q", "meta")
        offs = [t[k].data_ptr() - base.data_ptr() for t in tensors for k in names]
        if any(o % 16 for o in offs):
            raise ValueError("every tensor of a GEMV group must start on a 16-byte boundary")
        dev = base.device
        self.tensors, self.specs, self.base = tensors, specs, base
        self.rows = [s.out_features for s in specs]
        self.bn = INT8_BLOCK_N
        blocks = [triton.cdiv(n, self.bn) for n in self.rows]
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        pad = self.MAX - len(specs)
        self.table = torch.tensor(offs + [0] * 4 * pad, dtype=torch.int64, device=dev)
        self.starts = torch.tensor(starts + [2**30] * pad, dtype=torch.int32, device=dev)
        out_rows = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.meta = torch.tensor(self.rows + [0] * pad + out_rows + [0] * pad, dtype=torch.int32, device=dev)
        self.grid = (sum(blocks), 1)
        spec = QuantSpec(s0.bits, s0.group_size, self.bn, s0.in_features)  # the shape of one row block
        _, args, consts = _launch(spec, False, 1, self.bn)
        self.args = args[1:6]  # P, P1, G, stride_q, p_split
        self.consts = {k: v for k, v in consts.items() if k != "GLU"}
        self.consts["L1"] = gl.BlockedLayout([1], [32], [consts["num_warps"]], [0])  # of the member table

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """x [R, K] (or [K]) -> each matrix's rows [R, N_i] (views of one output), each input row
        computed as alone."""
        k = self.specs[0].in_features
        rows = x.numel() // k
        xq, dx, xs = _quantized(x.to(dtype).reshape(rows, k), self.specs[0])
        total = sum(self.rows)
        out = torch.empty(rows, total, dtype=dtype, device=x.device)
        _group_gemv_i8_kernel[(self.grid[0], rows)](
            xq, dx, xs, self.base, self.table, self.starts, self.meta, out, *self.args, xq.stride(0), dx.stride(0),
            total, MP=self.MAX, **self.consts,
        )  # fmt: skip
        return list(out.split(self.rows, dim=-1))
