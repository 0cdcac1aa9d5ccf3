"""Device-side expert dispatch for one decoded token: a layer's routed experts in one launch.

Every (layer, expert) has an entry in a device table of int64 addresses
(`experts.cache.ExpertCache.table`): the expert's GPU slot when it is resident,
or its pinned host buffer when it is not. The kernels read ``top_k_index`` and
the table on the device, add the compact tensors' byte offsets (fixed by the
`ExpertFormat`) and stream the expert from wherever it lies: HBM for a hit, the
PCIe link (zero-copy) for a miss. Nothing waits for the host, so a whole decode
step can be one CUDA graph, and one graph serves any mix of hits and misses.

A layer is three launches: gate_up with the GLU fused (grid: row blocks x k),
down split along K into partials (row blocks x k x splits), and `combine`,
which applies the routing weights and sums in k order, so the result does not
depend on where each expert was read from. The GEMVs take int8 activations and their
partials are exact float64 sums, computed as the CPU kernel computes them (`gemv_i8`): an
expert whose share the CPU computes (`experts.split`) gives the same bits as one the GPU
computes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..experts.format import ExpertFormat
from ..quant.compact import QuantSpec
from .gemv_i8 import _moe_gemv_i8_kernel, tile_layout
from .triton_exact import _add_rn
from .triton_gemv import _geometry, activation_block, block_p, quantize_activations, row_meta, supported_spec
from .triton_moe_rows import group_counts, rows_gemv

_TARGET_PROGRAMS = 8 * 132


@dataclass(frozen=True)
class Tuning:
    """Tile shapes of the two expert GEMVs (`gemv_i8`; swept on an H200 with scripts/tune_moe.py,
    each GEMV timed in a CUDA graph over 8 layers' distinct experts): rows and warps per
    program, the widest packed-byte tile of a row, and down_proj's K-splits. The field defaults
    are the 2-bit tiles of benchmarks/results/h200-kernel-tuning-halfblock.json (a layer of two
    experts in HBM 49.9 us, 2.24 TB/s; its best, 4 gate_up rows on 2 warps, was 0.1% faster);
    `default_tuning` has the 3-bit best."""

    gate_up_rows: int = 2
    down_rows: int = 2
    gate_up_warps: int = 1
    down_warps: int = 1
    # widest packed-byte tile (see triton_gemv.block_p) of each GEMV: half rows of a 2-bit
    # gate_up, 512-byte tiles of down's 3.5 KB rows
    gate_up_block_p: int = 512
    down_block_p: int = 512
    down_split: int = 1  # K-splits of down_proj; 0: enough programs to fill the GPU (_down_split)

    @classmethod
    def from_file(cls, path: str, bits: int) -> Tuning:
        """The tuning for `bits` from a JSON file written by scripts/tune_moe.py (``{"best": {"2":
        {...}}}``); `default_tuning(bits)` for the widths and fields it does not list."""
        import json
        from dataclasses import fields, replace
        from pathlib import Path

        base = default_tuning(bits)
        entry = json.loads(Path(path).read_text()).get("best", {}).get(str(bits))
        if not entry:
            return base
        return replace(base, **{f.name: entry[f.name] for f in fields(cls) if f.name in entry})


# the 3-bit best of the same sweep (a layer 72.0 us, 2.00 TB/s)
_MEASURED = {3: Tuning(gate_up_rows=4, gate_up_warps=2, gate_up_block_p=512, down_rows=2, down_warps=1, down_split=1)}


def default_tuning(bits: int) -> Tuning:
    """The tiles to use for `bits`-bit experts when no tuning file is given."""
    return _MEASURED.get(bits, Tuning())


@triton.jit
def _combine_kernel(
    part_ptr, w_ptr, out_ptr, N, KSEL, SPLIT, cpu_ptr, pcut_ptr, PD, HAS_W: tl.constexpr, CPU: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[n] = sum_j w[j] * (sum_s part[j, s, n] + cpu[j, n]), in a fixed order, for token
    program_id(1) (its KSEL positions, as a lone token's). With CPU, position j of token t
    has a CPU share (row cpu[t * KSEL + j], float64 in host memory) when pcut[t * KSEL + j] < PD. The
    partials (float64 exact sums with int8 activations) are added in float64, so where a share
    was computed does not change the result; then rounded once to float32."""
    t = tl.program_id(1).to(tl.int64)
    part_ptr += t * KSEL * SPLIT * N
    w_ptr += t * KSEL
    out_ptr += t * N
    pcut_ptr += t * KSEL
    cpu_ptr += t * KSEL * N
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(KSEL):
        s_acc = tl.zeros([BLOCK], dtype=tl.float64)
        for s in range(SPLIT):
            s_acc += tl.load(part_ptr + (j * SPLIT + s) * N + offs, mask=mask, other=0.0).to(tl.float64)
        if CPU:
            shared = tl.load(pcut_ptr + j) < PD
            s_acc += tl.load(cpu_ptr + j * N + offs, mask=mask & shared, other=0.0, volatile=True).to(tl.float64)
        y = s_acc.to(tl.float32)
        if HAS_W:
            y = y * tl.load(w_ptr + j).to(tl.float32)
        acc = _add_rn(acc, y)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _publish_kernel(
    idx_ptr, table_ptr, pool_bytes, take_ptr, pcut_ptr, x_ptr, x_stride, head_ptr, xbox_ptr, H, PD, N, P,
    KT: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The GPU/CPU split of one layer (`experts.split`) for the N routed positions of a step (KT
    per token; position j belongs to token j // KT): a routed expert whose table entry points
    outside the slot pool is a miss; with m missed positions the CPU takes take[m] bytes of the
    down plane of each (cut = PD - take[m]; PD: all on the GPU). Program 0 writes the cuts to
    the device (for the kernels) and, with the routed ids and tokens, into the mailbox header
    (room for P positions); program t copies token t's hidden state x[t] into the mailbox."""
    t = tl.program_id(0)
    if t == 0:
        j = tl.arange(0, NP)
        jm = j < N
        e = tl.load(idx_ptr + j, mask=jm, other=0)
        off = tl.load(table_ptr + e, mask=jm, other=0)
        miss = jm & ((off < 0) | (off >= pool_bytes))
        take = tl.load(take_ptr + tl.sum(miss.to(tl.int32), axis=0))
        cut = tl.where(miss, PD - take, PD)
        tl.store(pcut_ptr + j, cut, mask=jm)
        tl.store(head_ptr, N)
        tl.store(head_ptr + 1 + j, e.to(tl.int32), mask=jm)
        tl.store(head_ptr + 1 + P + j, cut, mask=jm)
        tl.store(head_ptr + 1 + 2 * P + j, (j // KT).to(tl.int32), mask=jm)
    for h0 in range(0, H, BLOCK):
        offs = h0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + t * x_stride + offs, mask=offs < H)
        tl.store(xbox_ptr + t * H + offs, v.to(tl.float32), mask=offs < H)


def combine(
    part: torch.Tensor, weights: torch.Tensor | None, out: torch.Tensor, cpu: tuple | None = None, tokens: int = 1
) -> None:  # fmt: skip
    """part: [tokens * k, split, N] (float64 exact sums, or fp32) -> out [tokens, N]: per token
    t, sum_j weights[t, j] * sum_s part[t * k + j, s]. With `cpu` = (float64 rows pointer,
    pcut [tokens * k], PD), the CPU's share of position t * k + j is added before the weight."""
    positions, split, n = part.shape
    k = positions // tokens
    block = 1024
    w = weights if weights is not None else part
    cpu_ptr, pcut, pd = cpu if cpu is not None else (part, part, 0)
    _combine_kernel[(triton.cdiv(n, block), tokens)](
        part, w, out, n, k, split, cpu_ptr, pcut, pd, HAS_W=weights is not None, CPU=cpu is not None, BLOCK=block
    )


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
    """(grid, int args, constexprs, split, activation block) of one routed-experts GEMV;
    computed once per shape."""
    spec = fmt.specs[name]
    glu = name == "gate_up_proj"
    P, P1, G, stride_q = _geometry(spec)
    n = spec.out_features // 2 if glu else spec.out_features
    bp = block_p(spec, tuning.gate_up_block_p if glu else tuning.down_block_p)
    rows = tuning.gate_up_rows if glu else tuning.down_rows
    warps = tuning.gate_up_warps if glu else tuning.down_warps
    split = 1 if glu else tuning.down_split or _down_split(spec, rows, k, bp)
    iters = triton.cdiv(P // bp, split)
    qb = activation_block(spec, bp)
    consts = dict(
        BITS=spec.bits, GROUP=spec.group_size, QB=qb, BLOCK_N=rows, BLOCK_P=bp, GLU=glu, ROW_META=row_meta(spec, bp),
        L3=tile_layout(rows, bp // qb, qb // 4, warps), num_warps=warps, **_offsets(fmt, name),
    )  # fmt: skip
    grid = (triton.cdiv(n, rows), k, split)
    return grid, (n, P, P1, G, stride_q, iters * bp, n), consts, split, qb


class MoeDecode:
    """Buffers and launches for one token's routed experts, allocated once per runtime."""

    def __init__(self, fmt: ExpertFormat, top_k: int, device: torch.device, tuning: Tuning | None = None):
        tuning = tuning or default_tuning(fmt.bits)
        self.fmt, self.k, self.tuning = fmt, top_k, tuning
        inter, hidden = fmt.intermediate, fmt.hidden
        self._gate_up = _launch(fmt, "gate_up_proj", top_k, tuning)
        self._down = _launch(fmt, "down_proj", top_k, tuning)
        self.split = self._down[3]
        self.h = torch.empty(top_k, inter, dtype=torch.float32, device=device)  # [k, I]
        # the K-partials: exact float64 sums
        self.part = torch.empty(top_k, self.split, hidden, dtype=torch.float64, device=device)  # [k, split, H]
        # int8 activations of x (shared by the k experts) and of h (one row per expert)
        self._xq = self._quant_buffers(1, hidden, self._gate_up[4], device)
        self._hq = self._quant_buffers(top_k, inter, self._down[4], device)

    @staticmethod
    def _quant_buffers(rows: int, k: int, qb: int, device) -> tuple:
        return (
            torch.empty(rows, k // 4, dtype=torch.int32, device=device),
            torch.empty(rows, k // qb, dtype=torch.float32, device=device),
            torch.empty(rows, k // qb, dtype=torch.float32, device=device),
            qb,
        )

    @property
    def matches_cpu(self) -> bool:
        """Whether these kernels compute an expert bit for bit as the CPU kernel does (exact
        int8 arithmetic in blocks of 32 columns, as `experts/cpu/moe_cpu.c`): the condition for
        sharing missed experts with the CPU without changing any output."""
        return self._gate_up[4] == 32 and self._down[4] == 32

    @property
    def plane_bytes(self) -> int:
        """PD: bytes of the main plane of down_proj; a CPU cut is a byte position in it."""
        return _geometry(self.fmt.specs["down_proj"])[0]

    @property
    def cut_align(self) -> int:
        """Cuts are multiples of this: whole down tiles and whole gate_up row blocks."""
        return math.lcm(self._down[2]["BLOCK_P"], self._gate_up[2]["BLOCK_N"])

    def _gemv(self, launch, x: torch.Tensor, quant, shared: bool, idx, table_row, base, out, pcut) -> None:
        """One routed-experts GEMV over the positions of `idx`: x holds one row per position, or
        (`shared`) one row for all of them."""
        grid, args, consts, _, _ = launch
        grid = (grid[0], idx.numel(), grid[2])
        xq, dx, sums, qb = quant
        quantize_activations(x.view(-1, x.shape[-1]), qb, xq, dx, sums)
        xs = (xq, 0 if shared else xq.stride(0), dx, sums, 0 if shared else dx.stride(0))
        split = (idx, 0, False) if pcut is None else (pcut, self.plane_bytes, True)
        _moe_gemv_i8_kernel[grid](
            *xs, idx, table_row, base, out, out.stride(0), *args, split[0], split[1], CPU=split[2], **consts
        )

    def _publish(self, split, x: torch.Tensor, idx: torch.Tensor, table_row, base) -> torch.Tensor:
        """Publish the step's routed positions `idx` (k per row of x [B, H]) to the CPU road and
        raise the layer's flag; returns the cut of each position (on the device)."""
        b, n = x.shape[0], idx.numel()
        x = x.contiguous()
        pcut = split.pcut
        _publish_kernel[(b,)](
            idx, table_row, base.numel(), split.take(b), pcut, x, x.stride(0), split.head, split.xbox,
            self.fmt.hidden, self.plane_bytes, n, split.positions, KT=self.k, NP=triton.next_power_of_2(n), BLOCK=1024,
        )  # fmt: skip
        split.raise_flag()
        return pcut

    def __call__(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 table_row: torch.Tensor, base: torch.Tensor, out: torch.Tensor, split=None) -> torch.Tensor:  # fmt: skip
        """x [H] -> out [H] = sum_j w[j] * expert_{idx[j]}(x); table_row: int64 [E] byte offsets of
        each expert's buffer from `base` (a uint8 tensor, e.g. the slot pool). With `split`
        (an `experts.split.SplitRow`) the CPU computes its share of each missed expert."""
        idx = top_k_index.reshape(-1)
        pcut = None
        if split is not None:
            pcut = self._publish(split, x.view(1, -1), idx, table_row, base)
        self._gemv(self._gate_up, x, self._xq, True, idx, table_row, base, self.h, pcut)
        self._gemv(self._down, self.h, self._hq, False, idx, table_row, base, self.part, pcut)
        if split is not None:
            split.wait_done()
        cpu = None if split is None else (split.ybox, pcut, self.plane_bytes)
        combine(self.part, top_k_weights.reshape(-1), out.view(-1), cpu)
        return out

    def rows(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
             table_row: torch.Tensor, base: torch.Tensor, split=None) -> torch.Tensor:  # fmt: skip
        """Decoded rows x [B, H] with their routing [B, k] -> [B, H], each row as `__call__`
        computes it alone, all B * k routed positions in one launch per GEMV. The positions run
        sorted by expert; with int8 activations the rows of one expert share one program, which
        reads the expert once for all of them (`triton_moe_rows`: the exact int8 sums do not
        depend on the grouping). With `split` (int8 only) the CPU computes its share of each
        missed position, as for a lone token: the sums are exact, so the cut does not change
        any row's bits."""
        b, hidden = x.shape
        n = b * self.k
        dev = x.device
        idx = top_k_index.reshape(-1)
        pcut = None
        if split is not None:
            pcut = self._publish(split, x, idx, table_row, base)
        order = torch.argsort(idx, stable=True)  # [n] positions grouped by expert
        h = torch.empty(n, self.fmt.intermediate, dtype=torch.float32, device=dev)
        part = torch.empty(n, self.split, hidden, dtype=self.part.dtype, device=dev)
        sorted_idx = idx[order]
        xs = x[order // self.k]
        cnt, rb = group_counts(sorted_idx, b)
        cuts = None if pcut is None else (pcut[:n][order], self.plane_bytes)
        for launch, src, dst in ((self._gate_up, xs, h), (self._down, h, part)):
            quant = self._quant_buffers(n, src.shape[-1], launch[4], dev)
            quantize_activations(src, quant[3], *quant[:3])
            rows_gemv(launch, quant, sorted_idx, cnt, rb, table_row, base, dst, cuts)
        if split is not None:
            split.wait_done()
        out = torch.empty_like(x)
        cpu = None if split is None else (split.ybox, pcut, self.plane_bytes)
        combine(part[torch.argsort(order)], top_k_weights.reshape(-1), out, cpu, tokens=b)
        return out
