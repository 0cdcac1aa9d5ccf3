"""Device-side expert dispatch for one decoded token: a layer's routed experts in one launch.

Every (layer, expert) has an entry in a device table of int64 addresses
(`experts.cache.ExpertCache.table`): the expert's GPU slot when it is resident,
or its pinned host buffer when it is not. The kernels read ``top_k_index`` and
the table on the device, add the compact tensors' byte offsets (fixed by the
`ExpertFormat`) and stream the expert from wherever it lies: HBM for a hit, the
PCIe link (zero-copy) for a miss. Nothing waits for the host, so a whole decode
step can be one CUDA graph, and one graph serves any mix of hits and misses.

A layer is three launches: gate_up with the GLU fused (grid: row blocks x k),
down split along K into fp32 partials (row blocks x k x splits), and `combine`,
which applies the routing weights and sums in k order, so the result does not
depend on where each expert was read from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..experts.format import ExpertFormat
from ..quant.compact import QuantSpec
from .triton_gemv import _gemv_rows, _geometry, _unroll, block_p, combine, supported_spec

_TARGET_PROGRAMS = 8 * 132


@dataclass(frozen=True)
class Tuning:
    """Tile shapes of the two expert GEMVs (swept on an H200 with scripts/tune_moe.py)."""

    gate_up_rows: int = 16
    down_rows: int = 32
    gate_up_warps: int = 4
    down_warps: int = 4
    unroll: int = 1
    max_block_p: int = 256
    magic: bool = True  # see triton_gemv._tile_dot

    @classmethod
    def from_file(cls, path: str, bits: int) -> Tuning:
        """The tuning for `bits` from a JSON file written by scripts/tune_moe.py (``{"2": {...}}``);
        the defaults for widths it does not list."""
        import json
        from dataclasses import fields
        from pathlib import Path

        entry = json.loads(Path(path).read_text()).get("best", {}).get(str(bits))
        if not entry:
            return cls()
        return cls(**{f.name: entry[f.name] for f in fields(cls) if f.name in entry})


DEFAULT_TUNING = Tuning()


@triton.jit
def _moe_gemv_kernel(
    x_ptr, x_stride, idx_ptr, table_ptr, base_ptr, out_ptr, out_stride, N, P, P1, G, stride_q, p_split, stride_split,
    OFF_Q: tl.constexpr, OFF_SQ: tl.constexpr, OFF_ZQ: tl.constexpr, OFF_META: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, GLU: tl.constexpr,
    UNROLL: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """Routed position j = program_id(1): out[j, split, n] for the expert top_k_index[j], read
    through its table entry; the input row is x[j] (x_stride 0: the same x for every j)."""
    pid_e = tl.program_id(1)
    e = tl.load(idx_ptr + pid_e)
    # int64 byte offset from `base_ptr` (the slot pool) to a GPU slot or to pinned host memory
    # (UVA: any address is base + offset). Offsets from a pointer argument, rather than raw
    # addresses cast to pointers, keep the compiler's alignment facts: every expert buffer and
    # every tensor in it starts on a 64-byte boundary, so the loads vectorise.
    off = tl.multiple_of(tl.load(table_ptr + e), 64)
    q_ptr = base_ptr + off + OFF_Q
    sq_ptr = base_ptr + off + OFF_SQ
    zq_ptr = base_ptr + off + OFF_ZQ
    meta_ptr = (base_ptr + off + OFF_META).to(tl.pointer_type(tl.float32), bitcast=True)
    _gemv_rows(
        x_ptr + pid_e * x_stride, q_ptr, sq_ptr, zq_ptr, meta_ptr, out_ptr + pid_e * out_stride,
        tl.program_id(0), tl.program_id(2), N, P, P1, G, stride_q, p_split, stride_split,
        BITS, GROUP, BLOCK_N, BLOCK_P, GLU, UNROLL, MAGIC,
    )  # fmt: skip


def supported(fmt: ExpertFormat) -> bool:
    return fmt.specs is not None and all(supported_spec(s) for s in fmt.specs.values())


def _offsets(fmt: ExpertFormat, name: str) -> dict[str, int]:
    by_name = {s.name: s.offset for s in fmt.layout.specs}
    return {
        "OFF_Q": by_name[f"{name}.q"], "OFF_SQ": by_name[f"{name}.scale_q"],
        "OFF_ZQ": by_name[f"{name}.zero_q"], "OFF_META": by_name[f"{name}.meta"],
    }  # fmt: skip


def _down_split(spec: QuantSpec, rows: int, k: int, bp: int) -> int:
    n_blocks = triton.cdiv(spec.out_features, rows) * k
    iters = _geometry(spec)[0] // bp
    split = 1
    while n_blocks * split * 2 <= _TARGET_PROGRAMS and iters // (split * 2) >= 4:
        split *= 2
    return split


def _launch(fmt: ExpertFormat, name: str, k: int, tuning: Tuning):
    """(grid, int args, constexprs, split) of one routed-experts GEMV; computed once per shape."""
    spec = fmt.specs[name]
    glu = name == "gate_up_proj"
    P, P1, G, stride_q = _geometry(spec)
    n = spec.out_features // 2 if glu else spec.out_features
    bp = block_p(spec, tuning.max_block_p)
    rows = tuning.gate_up_rows if glu else tuning.down_rows
    split = 1 if glu else _down_split(spec, rows, k, bp)
    iters = triton.cdiv(P // bp, split)
    consts = dict(
        BITS=spec.bits, GROUP=spec.group_size, BLOCK_N=rows, BLOCK_P=bp, GLU=glu, UNROLL=_unroll(iters, tuning.unroll),
        MAGIC=tuning.magic, num_warps=tuning.gate_up_warps if glu else tuning.down_warps, **_offsets(fmt, name),
    )  # fmt: skip
    return (triton.cdiv(n, rows), k, split), (n, P, P1, G, stride_q, iters * bp, n), consts, split


class MoeDecode:
    """Buffers and launches for one token's routed experts, allocated once per runtime."""

    def __init__(self, fmt: ExpertFormat, top_k: int, device: torch.device, tuning: Tuning = DEFAULT_TUNING):
        self.fmt, self.k, self.tuning = fmt, top_k, tuning
        inter, hidden = fmt.intermediate, fmt.hidden
        self._gate_up = _launch(fmt, "gate_up_proj", top_k, tuning)
        self._down = _launch(fmt, "down_proj", top_k, tuning)
        self.split = self._down[3]
        self.h = torch.empty(top_k, inter, dtype=torch.float32, device=device)  # [k, I]
        self.part = torch.empty(top_k, self.split, hidden, dtype=torch.float32, device=device)  # [k, split, H]

    def __call__(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 table_row: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """x [H] -> out [H] = sum_j w[j] * expert_{idx[j]}(x); table_row: int64 [E] byte offsets of
        each expert's buffer from `base` (a uint8 tensor, e.g. the slot pool)."""
        idx = top_k_index.reshape(-1)
        grid, args, consts, _ = self._gate_up
        _moe_gemv_kernel[grid](x, 0, idx, table_row, base, self.h, self.h.stride(0), *args, **consts)
        grid, args, consts, _ = self._down
        _moe_gemv_kernel[grid](
            self.h, self.h.stride(0), idx, table_row, base, self.part, self.part.stride(0), *args, **consts
        )
        combine(self.part, top_k_weights.reshape(-1), out.view(-1))
        return out
