"""Row-chunked dequantize + GEMM, so prefill scratch stays bounded.

Prefill expands an expert matrix to the compute dtype and hands it to a GEMM. A
whole Mixtral gate_up [2I, H] is 224 MiB of bf16, so the expansion goes through a
workspace of at most `DEQUANT_WORKSPACE_BYTES`, a block of output rows at a time.
Each output element is still one dot product over the full input width, so the
result does not depend on the chunking (up to the GEMM's own algorithm choice).

A row range [r0, r1) of a compact matrix (see `quant.compact`) is contiguous in
every tensor: ``q[r0:r1]``, ``scale_q``/``zero_q`` ``[r0*G : r1*G]``, and the meta
runs that cover those groups. A run of META_GROUP groups may straddle r0, so a
block also carries ``g0``, the position of its first group inside its first run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..quant import packing
from ..quant.compact import META_GROUP, QuantSpec

DEQUANT_WORKSPACE_BYTES = 64 << 20  # bound on the prefill dequant workspace (compute dtype)
ROW_ALIGN = 64  # chunks are whole multiples of this many rows (the dequant kernel's block), but the last

# dequant_rows(tensors, spec, dtype, r0, r1, out): rows [r0, r1) of W into `out` [r1 - r0, in]
DequantRows = Callable[[dict, QuantSpec, torch.dtype, int, int, torch.Tensor], None]
ActFn = Callable[[torch.Tensor], torch.Tensor]


def chunk_rows(n_rows: int, row_numel: int, workspace_numel: int) -> int:
    """Rows per chunk of a matrix of `n_rows` rows of `row_numel` elements, for a workspace
    of `workspace_numel`: all of them when they fit, else a multiple of ROW_ALIGN if it can."""
    rows = workspace_numel // row_numel
    if rows < 1:
        raise ValueError(f"a workspace of {workspace_numel} elements cannot hold one row of {row_numel}")
    if rows >= n_rows:
        return n_rows
    return rows if rows < ROW_ALIGN else rows - rows % ROW_ALIGN


def row_chunks(n_rows: int, row_numel: int, workspace_numel: int) -> list[tuple[int, int]]:
    """[r0, r1) ranges covering n_rows rows, each fitting the workspace."""
    step = chunk_rows(n_rows, row_numel, workspace_numel)
    return [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def dequant_workspace_numel(
    hidden: int, intermediate: int, dtype_bytes: int, limit: int = DEQUANT_WORKSPACE_BYTES
) -> int:
    """Elements of the prefill dequant workspace of one expert: `limit` bytes, but at least
    one aligned chunk of each matrix (gate/up row pairs of 2H, down rows of I) and at most
    the whole gate_up [2I, H], which then goes through in one piece."""
    whole = 2 * intermediate * hidden
    least = max(2 * hidden, intermediate) * ROW_ALIGN
    return min(whole, max(limit // dtype_bytes, least))


def row_range(
    tensors: dict[str, torch.Tensor], spec: QuantSpec, r0: int, r1: int
) -> tuple[dict[str, torch.Tensor], QuantSpec, int]:
    """Rows [r0, r1) of a compact [out, in] matrix: views of its tensors, the spec of the
    [r1 - r0, in] block, and g0 (the block's first group's index in its first meta run).
    The block spec's `meta_rows` does not apply: its meta view starts mid-run when g0 > 0."""
    if not 0 <= r0 < r1 <= spec.out_features:
        raise ValueError(f"row range [{r0}, {r1}) is outside [0, {spec.out_features})")
    G = spec.in_features // spec.group_size
    a, b = r0 * G, r1 * G
    views = {
        "q": tensors["q"][r0:r1],
        "scale_q": tensors["scale_q"][a:b],
        "zero_q": tensors["zero_q"][a:b],
        "meta": tensors["meta"][a // META_GROUP : -(-b // META_GROUP)],
    }
    return views, replace(spec, out_features=r1 - r0), a % META_GROUP


def dequantize_rows(
    tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype, r0: int, r1: int
) -> torch.Tensor:
    """Reference (torch) dequantization of rows [r0, r1) -> [r1 - r0, in] in `dtype`; equals
    ``compact.dequantize(tensors, spec, dtype)[r0:r1]``."""
    views, block, g0 = row_range(tensors, spec, r0, r1)
    codes = packing.unpack(views["q"], spec.bits, spec.in_features)  # [n, in]
    idx = (torch.arange(block.groups, device=views["meta"].device) + g0) // META_GROUP
    m = views["meta"][idx]  # [n*G, 4]
    scale = views["scale_q"].float() * m[:, 1] + m[:, 0]
    zero = views["zero_q"].float() * m[:, 3] + m[:, 2]
    n, g = block.out_features, spec.group_size
    w = (codes.float().view(n, -1, g) - zero.view(n, -1, 1)) * scale.view(n, -1, 1)
    return w.view(n, spec.in_features).to(dtype)


def reference_rows(tensors: dict, spec: QuantSpec, dtype: torch.dtype, r0: int, r1: int, out: torch.Tensor) -> None:
    """`DequantRows` through the torch reference (CPU tests of the chunk loops)."""
    out.copy_(dequantize_rows(tensors, spec, dtype, r0, r1))


def chunked_linear(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    spec: QuantSpec,
    dtype: torch.dtype,
    dequant_rows: DequantRows,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T, W dequantized a row chunk at a time into `workspace` (flat, `dtype`;
    default a fresh one of at most DEQUANT_WORKSPACE_BYTES). x: [..., in] -> [..., out]."""
    n, k = spec.out_features, spec.in_features
    if workspace is None:
        numel = min(n * k, max(DEQUANT_WORKSPACE_BYTES // x.new_empty((), dtype=dtype).element_size(), k))
        workspace = torch.empty(numel, dtype=dtype, device=x.device)
    chunks = row_chunks(n, k, workspace.numel())
    x = x.to(dtype)
    if len(chunks) == 1:
        w = workspace[: n * k].view(n, k)
        dequant_rows(tensors, spec, dtype, 0, n, w)
        return F.linear(x, w)
    y = torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)
    for r0, r1 in chunks:
        w = workspace[: (r1 - r0) * k].view(r1 - r0, k)
        dequant_rows(tensors, spec, dtype, r0, r1, w)
        y[..., r0:r1] = F.linear(x, w)
    return y


def chunked_expert_mlp(
    x: torch.Tensor,
    gate_up: dict[str, torch.Tensor],
    down: dict[str, torch.Tensor],
    specs: dict[str, QuantSpec],
    dtype: torch.dtype,
    act_fn: ActFn,
    workspace: torch.Tensor,
    dequant_rows: DequantRows,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with both matrices dequantized into `workspace` in row
    chunks: gate rows [a, b) next to up rows [I + a, I + b), then blocks of down rows.
    When the workspace holds a whole matrix this is one dequantize and one GEMM each, laid
    out as the whole matrix. x: [n, H] -> [n, H]."""
    gu_spec, d_spec = specs["gate_up_proj"], specs["down_proj"]
    inter, hidden = gu_spec.out_features // 2, gu_spec.in_features
    pairs = row_chunks(inter, 2 * hidden, workspace.numel())
    if len(pairs) == 1:
        w = workspace[: 2 * inter * hidden].view(2 * inter, hidden)
        dequant_rows(gate_up, gu_spec, dtype, 0, 2 * inter, w)
        gate, up = F.linear(x, w).chunk(2, dim=-1)  # [n, I] each
        h = act_fn(gate) * up
    else:
        h = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)  # [n, I]
        for a, b in pairs:
            c = b - a
            w = workspace[: 2 * c * hidden].view(2 * c, hidden)
            dequant_rows(gate_up, gu_spec, dtype, a, b, w[:c])
            dequant_rows(gate_up, gu_spec, dtype, inter + a, inter + b, w[c:])
            gate, up = F.linear(x, w).chunk(2, dim=-1)  # [n, c] each
            h[:, a:b] = act_fn(gate) * up
    blocks = row_chunks(hidden, inter, workspace.numel())
    if len(blocks) == 1:
        w = workspace[: hidden * inter].view(hidden, inter)
        dequant_rows(down, d_spec, dtype, 0, hidden, w)
        return F.linear(h, w)
    y = torch.empty(x.shape[0], hidden, dtype=h.dtype, device=x.device)  # [n, H]
    for a, b in blocks:
        w = workspace[: (b - a) * inter].view(b - a, inter)
        dequant_rows(down, d_spec, dtype, a, b, w)
        y[:, a:b] = F.linear(h, w)
    return y


__all__ = [
    "DEQUANT_WORKSPACE_BYTES",
    "ROW_ALIGN",
    "chunk_rows",
    "chunked_expert_mlp",
    "chunked_linear",
    "dequant_workspace_numel",
    "dequantize_rows",
    "reference_rows",
    "row_chunks",
    "row_range",
]
