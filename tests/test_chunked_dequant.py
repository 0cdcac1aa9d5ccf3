"""Prefill dequantizes in row chunks: a row range of a compact matrix maps to contiguous slices
of its tensors (meta runs may straddle the range start), and chunked dequantize + GEMM gives
the whole-matrix result for any workspace size. CPU tests use the torch reference; the Triton
kernel's row variant runs in Triton's interpreter when Triton is installed, and on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from moe_llm.kernels import chunking
from moe_llm.kernels.chunking import (
    DEQUANT_WORKSPACE_BYTES,
    ROW_ALIGN,
    chunked_expert_mlp,
    chunked_linear,
    dequant_workspace_numel,
    dequantize_rows,
    reference_rows,
    row_chunks,
    row_range,
)
from moe_llm.quant import compact
from moe_llm.quant.compact import META_GROUP, QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")

# (bits, group, out, in): G = in / group groups per row; 3, 5 and 6 do not divide 128, so
# meta runs straddle row boundaries, and 300 rows span several runs
SHAPES = [(2, 32, 300, 96), (3, 32, 130, 160), (4, 32, 97, 192), (4, 64, 64, 256), (2, 16, 40, 128)]


def quantized(bits, group, out_f, in_f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    return compact.quantize(w, bits, group, optimize=False), QuantSpec(bits, group, out_f, in_f)


@pytest.mark.parametrize("bits,group,out_f,in_f", SHAPES)
def test_row_ranges_dequantize_exactly_like_the_whole_matrix(bits, group, out_f, in_f):
    t, spec = quantized(bits, group, out_f, in_f)
    whole = compact.dequantize(t, spec, torch.float32)
    ranges = [(0, out_f), (0, 1), (out_f - 1, out_f), (1, out_f), (7, 50), (33, 34), (13, out_f - 3)]
    ranges += [(r, r + 1) for r in range(out_f)]  # every row alone: every straddle offset
    for r0, r1 in [(a, min(b, out_f)) for a, b in ranges if a < out_f]:
        assert torch.equal(dequantize_rows(t, spec, torch.float32, r0, r1), whole[r0:r1]), (r0, r1)


def test_row_range_views_are_slices_of_the_tensors():
    t, spec = quantized(2, 32, 300, 96)  # G = 3
    views, block, g0 = row_range(t, spec, 50, 120)
    assert block == QuantSpec(2, 32, 70, 96)
    assert g0 == (50 * 3) % META_GROUP == 22
    assert views["q"].data_ptr() == t["q"][50].data_ptr() and views["q"].shape == (70, t["q"].shape[1])
    assert views["scale_q"].data_ptr() == t["scale_q"][150].data_ptr() and views["scale_q"].numel() == 210
    assert views["meta"].data_ptr() == t["meta"][1].data_ptr()  # groups 150..359 lie in runs 1 and 2
    assert views["meta"].shape[0] == 2
    with pytest.raises(ValueError, match="outside"):
        row_range(t, spec, 10, 301)


@pytest.mark.parametrize("n_rows,row_numel,ws", [(300, 96, 96 * 70), (300, 96, 96 * 64 * 2), (5, 10, 1000), (7, 3, 3)])
def test_row_chunks_cover_the_rows_within_the_workspace(n_rows, row_numel, ws):
    chunks = row_chunks(n_rows, row_numel, ws)
    assert chunks[0][0] == 0 and chunks[-1][1] == n_rows
    assert all(a < b and (b - a) * row_numel <= ws for a, b in chunks)
    assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))
    step = chunks[0][1] - chunks[0][0]
    assert step == n_rows or step < ROW_ALIGN or step % ROW_ALIGN == 0
    assert (len(chunks) == 1) == (n_rows * row_numel <= ws)  # whole when it fits
    with pytest.raises(ValueError, match="cannot hold one row"):
        row_chunks(n_rows, row_numel, row_numel - 1)


def test_the_workspace_is_bounded_for_mixtral_and_whole_for_small_experts():
    assert dequant_workspace_numel(4096, 14336, 2) * 2 == DEQUANT_WORKSPACE_BYTES  # not 2*I*H*2 = 224 MiB
    assert dequant_workspace_numel(64, 128, 4) == 2 * 64 * 128
    n = dequant_workspace_numel(4096, 14336, 2)
    assert len(row_chunks(14336, 2 * 4096, n)) == 4 and len(row_chunks(4096, 14336, n)) == 2


@pytest.mark.parametrize("bits,group,out_f,in_f", SHAPES[:3])
@pytest.mark.parametrize("rows", [1, 3, 64, 10_000])
def test_chunked_linear_matches_the_whole_matrix(bits, group, out_f, in_f, rows):
    t, spec = quantized(bits, group, out_f, in_f)
    w = compact.dequantize(t, spec, torch.float32)
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(1))
    ws = torch.empty(min(rows, out_f) * in_f)
    y = chunked_linear(x, t, spec, torch.float32, reference_rows, ws)
    assert y.shape == (2, 5, out_f)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-4)  # BLAS blocks differ per shape
    if rows >= out_f:  # one chunk: the very same dequantize and GEMM as before
        assert torch.equal(y, F.linear(x, w))


def test_chunked_linear_default_workspace_is_bounded(monkeypatch):
    t, spec = quantized(4, 32, 97, 192)
    monkeypatch.setattr(chunking, "DEQUANT_WORKSPACE_BYTES", 10 * 192 * 4)  # 10 fp32 rows
    sizes = []

    def spy(tensors, spec_, dtype, r0, r1, out):
        sizes.append(out.numel())
        reference_rows(tensors, spec_, dtype, r0, r1, out)

    x = torch.randn(3, 192)
    y = chunked_linear(x, t, spec, torch.float32, spy)
    torch.testing.assert_close(y, F.linear(x, compact.dequantize(t, spec, torch.float32)), rtol=1e-4, atol=1e-4)
    assert max(sizes) <= 10 * 192 and len(sizes) == 10


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("pairs", [1, 5, 64, None])  # gate/up row pairs per chunk; None: the whole matrix
def test_chunked_expert_mlp_matches_the_reference_expert(bits, pairs):
    from moe_llm.experts.format import ExpertFormat, matrix_views
    from moe_llm.kernels import expert_mlp

    hidden, inter = 64, 160
    fmt = ExpertFormat.build(hidden, inter, bits, torch.float32)
    gen = torch.Generator().manual_seed(bits)
    enc = fmt.encode(torch.randn(2 * inter, hidden, generator=gen), torch.randn(hidden, inter, generator=gen))
    x = torch.randn(7, hidden, generator=gen)
    ref = expert_mlp(x, enc, fmt, F.silu)  # CPU: the torch reference path, whole matrices
    numel = 2 * inter * hidden if pairs is None else max(pairs * 2 * hidden, inter)
    calls = []

    def spy(tensors, spec, dtype, r0, r1, out):
        calls.append((spec.out_features, r0, r1))
        reference_rows(tensors, spec, dtype, r0, r1, out)

    y = chunked_expert_mlp(
        x, matrix_views(enc, "gate_up_proj"), matrix_views(enc, "down_proj"), fmt.specs, torch.float32, F.silu,
        torch.empty(numel), spy,
    )  # fmt: skip
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())  # BLAS blocks differ
    gu = sorted((r0, r1) for n, r0, r1 in calls if n == 2 * inter)
    assert gu[0][0] == 0 and gu[-1][1] == 2 * inter  # every gate and up row dequantized exactly once
    assert sum(r1 - r0 for r0, r1 in gu) == 2 * inter
    if pairs is None:
        assert len(calls) == 2 and torch.equal(y, ref)  # one dequantize per matrix, as before


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from moe_llm.kernels import triton_dequant as td
    from moe_llm.quant import compact
    from moe_llm.quant.compact import QuantSpec

    for bits, group, out_f, in_f in {shapes}:
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
        t = compact.quantize(w, bits, group, optimize=False)
        spec = QuantSpec(bits, group, out_f, in_f)
        whole = compact.dequantize(t, spec, torch.float32)
        assert torch.equal(td.dequantize(t, spec, torch.float32), whole)
        for r0, r1 in [(0, out_f), (1, 7), (3, out_f), (out_f - 5, out_f), (17, 93)]:
            out = torch.empty(r1 - r0, in_f)
            td.dequantize_rows(t, spec, torch.float32, r0, r1, out)
            assert torch.equal(out, whole[r0:r1]), (bits, r0, r1)
    print("ok")
    """
)


def test_the_triton_row_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    code = _INTERPRETED.format(shapes=[(2, 32, 300, 192), (3, 64, 130, 256), (4, 64, 96, 320)])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cuda_expert_mlp_with_a_small_workspace_matches_a_whole_one(bits):
    from moe_llm.experts.format import ExpertFormat
    from moe_llm.kernels import expert_mlp

    hidden, inter = 1024, 3584
    fmt = ExpertFormat.build(hidden, inter, bits, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(2 * inter, hidden, generator=gen), torch.randn(hidden, inter, generator=gen)
    enc = fmt.encode(gate_up.cuda(), down.cuda())
    x = torch.randn(37, hidden, generator=gen).to("cuda", torch.bfloat16)
    ws = lambda n: torch.empty(n, dtype=torch.bfloat16, device="cuda")  # noqa: E731
    whole = expert_mlp(x, enc, fmt, F.silu, ws(2 * inter * hidden))
    small = expert_mlp(x, enc, fmt, F.silu, ws(130 * 2 * hidden))  # 130 gate/up pairs, 73 down rows a chunk
    torch.testing.assert_close(small, whole, rtol=1e-2, atol=1e-2)
    fmt32 = ExpertFormat.build(hidden, inter, bits, torch.float32)
    ref = expert_mlp(x.cpu().float(), {k: v.cpu() for k, v in enc.items()}, fmt32, F.silu)
    # bf16 against fp32: outputs near 4e4 (random N(0, 1) weights) carry a bf16 ulp of 256, so the
    # error is judged against the output's scale
    _close_in_scale(small.float().cpu(), ref, 0.02)


@pytest.mark.gpu
def test_cuda_quant_linear_chunks_a_head_sized_matrix():
    from moe_llm.kernels import quant_linear

    out_f, in_f = 40_000, 1024  # 78 MiB of bf16: above DEQUANT_WORKSPACE_BYTES, so two chunks
    w = torch.randn(out_f, in_f, device="cuda")
    t = compact.quantize(w, 4, 64)
    spec = QuantSpec(4, 64, out_f, in_f)
    dense = compact.dequantize(t, spec, torch.bfloat16)
    x = torch.randn(1, 9, in_f, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(quant_linear(x, t, spec, torch.bfloat16), F.linear(x, dense), rtol=1e-2, atol=5e-2)
    one = x[:, -1:]  # [1, 1, H]: the fused GEMV, as for a 4-bit LM head at decode
    # the decode GEMV quantizes the activation to int8 in blocks of 32 columns (as the CPU kernel
    # does, `triton_gemv`): an error of about 0.6% of the output's scale, not bf16 rounding
    _close_in_scale(quant_linear(one, t, spec, torch.bfloat16), F.linear(one, dense), 0.02)


def _close_in_scale(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """The error's RMS within `rel` of the output's RMS, and no element off by over 5 times that."""
    got, want = got.float(), want.float()
    scale = want.pow(2).mean().sqrt()
    err = got - want
    assert err.pow(2).mean().sqrt() <= rel * scale, (err.pow(2).mean().sqrt(), scale)
    assert err.abs().max() <= 5 * rel * scale, (err.abs().max(), scale)
