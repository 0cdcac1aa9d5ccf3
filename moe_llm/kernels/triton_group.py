"""One GEMV launch over the matrices that read one input (q, k and v of a layer), for one token.

`share_inputs` (runtime/quant_linear.py) links such projections; the first one called for a
token runs `GemvGroup`, which computes every member's rows with int8 activations and the row
loop of `triton_gemv` (`_gemv_rows`): each row as that matrix's lone int8 GEMV with the same
tiling computes it. A table of int64 byte offsets from the first member's codes points at
each member's four tensors, so the members stay where they were loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.compact import QuantSpec
from .triton_gemv import INT8_BLOCK_N, _gemv_rows, _launch, _quantized


@triton.jit
def _group_gemv_kernel(
    x_ptr, dx_ptr, xs_ptr, base_ptr, table_ptr, start_ptr, rows_ptr, out_ptr, P, P1, G, stride_q, p_split,
    x_stride, s_stride, out_stride, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    UNROLL: tl.constexpr, MAGIC: tl.constexpr, I8: tl.constexpr, ROW_META: tl.constexpr, MP: tl.constexpr,
):  # fmt: skip
    """Several matrices of one shape of row (the projections of one input: q, k and v) in one
    launch: row block program_id(0) belongs to member m, the last whose first block start[m]
    it reaches; the member's four tensors lie at the int64 byte offsets table[4m:4m+4] from
    base_ptr (every tensor starts on a 16-byte boundary), its rows[m] output rows at row
    offset out_row[m] (the rows of the members before it). Input row program_id(1) (strides
    x_stride, s_stride; out_stride) runs the same code as a lone row."""
    b = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    starts = tl.load(start_ptr + tl.arange(0, MP))  # [MP] first row block of each member, padded high
    m = tl.sum((starts <= b).to(tl.int32), axis=0) - 1
    first = tl.load(start_ptr + m)
    n = tl.load(rows_ptr + m)
    out_row = tl.load(rows_ptr + MP + m)
    q_ptr = base_ptr + tl.multiple_of(tl.load(table_ptr + 4 * m), 16)
    sq_ptr = base_ptr + tl.multiple_of(tl.load(table_ptr + 4 * m + 1), 16)
    zq_ptr = base_ptr + tl.multiple_of(tl.load(table_ptr + 4 * m + 2), 16)
    meta_ptr = (base_ptr + tl.multiple_of(tl.load(table_ptr + 4 * m + 3), 16)).to(
        tl.pointer_type(tl.float32), bitcast=True
    )
    _gemv_rows(
        x_ptr + r * x_stride, dx_ptr + r * s_stride, xs_ptr + r * s_stride, q_ptr, sq_ptr, zq_ptr, meta_ptr,
        out_ptr + r * out_stride + out_row, b - first, 0, n, P, P1, G, stride_q, p_split, 0, P, BITS, GROUP, BLOCK_N,
        BLOCK_P, False, UNROLL, MAGIC, I8, ROW_META,
    )  # fmt: skip


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

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """x [R, K] (or [K]) -> each matrix's rows [R, N_i] (views of one output), each input row
        computed as alone."""
        k = self.specs[0].in_features
        rows = x.numel() // k
        xq, dx, xs = _quantized(x.to(dtype).reshape(rows, k), self.specs[0])
        total = sum(self.rows)
        out = torch.empty(rows, total, dtype=dtype, device=x.device)
        _group_gemv_kernel[(self.grid[0], rows)](
            xq, dx, xs, self.base, self.table, self.starts, self.meta, out, *self.args, xq.stride(0), dx.stride(0),
            total, I8=True, MP=self.MAX, **self.consts,
        )  # fmt: skip
        return list(out.split(self.rows, dim=-1))
