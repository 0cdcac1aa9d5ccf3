"""The CPU expert kernel (`moe_llm.experts.cpu`) against the torch reference.

Two oracles. (1) `exact_expert`, a numpy model of the exact arithmetic the CPU kernel shares
with the GPU decode kernels: int8 activations per block of 32 columns, one rounded float32
product per block term, rounded to an integer and summed exactly. The kernel must equal it
bit for bit, which pins every index, shift, scale and rounding. (2) The fp32
dequantize-then-matmul reference `moe_llm.kernels.expert_mlp`: int8 activations add an error
of about amax / (127 * sqrt(12)) per element, 0.4-0.6% of the norm of one projection for
Gaussian inputs (block amax ~ 2.1 sigma), and the MLP stacks two projections plus the int8 h,
measured at 1.0-1.6%; the bound is 3e-2.

Shapes cover the SIMD path (bit planes 32-column aligned) and the portable one: H=256 with
I=352 (down's planes are 88, 44 columns) and H=264, I=200 (group size 8); larger ones cover
the transposed runs of 16 (AVX-512) or 8 blocks and the packed 3-bit rows, and the kernel is
also rebuilt as for machines without AVX-512 and without VNNI.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import exact_expert
import pytest
import torch
import torch.nn.functional as F

from moe_llm.experts import ExpertStore, cpu
from moe_llm.experts.cpu import build
from moe_llm.experts.format import ExpertFormat, matrix_views
from moe_llm.kernels import expert_mlp as reference_mlp
from moe_llm.quant import QuantSpec, compact, packing

SHAPES = [(256, 352), (256, 512), (264, 200)]
MLP_TOL = 3e-2
EXACT_TOL = 1e-5


def random_expert(fmt: ExpertFormat, seed: int) -> torch.Tensor:
    """A host buffer of `fmt`: random codes and 8-bit meta, float meta giving scales in
    [0.01, 0.03] and zeros over the whole code range."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in fmt.specs.items():
        for key, (dtype, shape) in spec.tensors(name).items():
            if dtype == torch.uint8:
                tensors[key] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        meta = torch.empty(spec.meta_rows, 4)
        meta[:, 0] = 0.01 + 0.01 * torch.rand(spec.meta_rows, generator=gen)
        meta[:, 1], meta[:, 2], meta[:, 3] = 0.02 / 255, 0.0, (2**spec.bits - 1) / 255
        tensors[f"{name}.meta"] = meta
    buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    fmt.layout.write(buf, tensors)
    return buf


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [b, n] as the kernel sees it: int8 per block of 32 columns, dequantized."""
    out = torch.empty_like(x)
    for j in range(0, x.shape[1], 32):
        blk = x[:, j : j + 32]
        amax = blk.abs().amax(dim=1, keepdim=True)
        inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
        out[:, j : j + 32] = torch.round(blk * inv) * (amax / 127.0)
    return out


def simulated_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    codes = packing.unpack(tensors["q"], spec.bits, spec.in_features).double()
    scale, zero = compact.expand_meta(tensors["scale_q"], tensors["zero_q"], tensors["meta"], spec)
    g = spec.group_size
    w = (codes - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)
    return int8_blocks(x).double() @ w.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def experts():
    """(H, I, bits) -> (format, buffer)."""
    out = {}
    for i, (h, inter) in enumerate(SHAPES):
        for bits in (2, 3, 4):
            fmt = ExpertFormat.build(h, inter, bits, torch.float32)
            out[h, inter, bits] = fmt, random_expert(fmt, seed=10 * i + bits)
    return out


def test_shapes_cover_both_paths(experts):
    fmt, _ = experts[256, 352, 3]
    assert fmt.specs["down_proj"].group_size == 32  # 352 is not a multiple of 64
    assert {s.group_size for s in experts[264, 200, 2][0].specs.values()} == {8}
    assert cpu.isa() in ("avx512-vnni", "avx-vnni", "avx2", "scalar")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b", [1, 5])
def test_qlinear_is_the_exact_model(experts, bits, shape, b):
    fmt, buf = experts[(*shape, bits)]
    views = fmt.layout.views(buf)
    gen = torch.Generator().manual_seed(b)
    for name in ("gate_up_proj", "down_proj"):
        spec = fmt.specs[name]
        x = torch.randn(b, spec.in_features, generator=gen)
        t = matrix_views(views, name)
        y = cpu.qlinear(x, t, spec, threads=2)
        for i in range(b):
            want = exact_expert.linear(t, spec, x[i].numpy()).astype("float32")
            assert torch.equal(y[i], torch.from_numpy(want)), (name, i)
        assert rel(y, simulated_linear(x, t, spec)) < EXACT_TOL  # and the model is the int8 product


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b", [1, 5])
def test_expert_mlp_is_the_exact_model(experts, bits, shape, b):
    """Bit for bit, each token alone: what the GPU kernels must give too (tests/test_gpu_split.py)."""
    fmt, buf = experts[(*shape, bits)]
    x = torch.randn(b, shape[0], generator=torch.Generator().manual_seed(10 + b))
    y = cpu.expert_mlp(x, buf, fmt, threads=3)
    for i in range(b):
        assert torch.equal(y[i], torch.from_numpy(exact_expert.expert(buf, fmt, x[i]).astype("float32"))), i


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("b", [1, 5])
def test_rows_of_sixteen_block_runs_are_the_exact_model(bits, b):
    """Planes of whole runs of 16 blocks (2048 columns at 2 bits, 1024 at 4; 3 bits: 4096, its
    2-bit and 1-bit planes read packed) take the AVX-512 path that transposes a run's codes once
    for every plane: the same bits, for one token and a tile."""
    n = 4096 if bits == 3 else 2048
    fmt = ExpertFormat.build(n, n, bits, torch.float32)
    buf = random_expert(fmt, seed=40 + bits)
    x = torch.randn(b, n, generator=torch.Generator().manual_seed(b))
    y = cpu.expert_mlp(x, buf, fmt, threads=2)
    for i in range(b):
        assert torch.equal(y[i], torch.from_numpy(exact_expert.expert(buf, fmt, x[i]).astype("float32"))), i
    t, spec = matrix_views(fmt.layout.views(buf), "down_proj"), fmt.specs["down_proj"]
    if bits == 3:  # and down_proj's 14,336 columns: 1-bit planes that do not start on whole runs
        fmt = ExpertFormat.build(512, 14336, 3, torch.float32)
        buf = random_expert(fmt, seed=50)
        t, spec = matrix_views(fmt.layout.views(buf), "down_proj"), fmt.specs["down_proj"]
        x = torch.randn(b, spec.in_features, generator=torch.Generator().manual_seed(b))
    lin = cpu.qlinear(x, t, spec, threads=2)
    for i in range(b):
        assert torch.equal(lin[i], torch.from_numpy(exact_expert.linear(t, spec, x[i].numpy()).astype("float32")))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b", [1, 5])
def test_expert_mlp_matches_reference(experts, bits, shape, b):
    fmt, buf = experts[(*shape, bits)]
    x = torch.randn(b, shape[0], generator=torch.Generator().manual_seed(b))
    ref = reference_mlp(x, fmt.layout.views(buf), fmt, F.silu)
    y = cpu.expert_mlp(x, buf, fmt, threads=2)
    assert y.dtype == torch.float32 and y.shape == (b, shape[0])
    assert rel(y, ref) < MLP_TOL


def test_hqq_encoded_expert_from_the_store():
    """A real quantized expert (hqq + 8-bit meta) installed in an ExpertStore."""
    h, inter = 256, 352
    gen = torch.Generator().manual_seed(3)
    gate_up, down = torch.randn(2 * inter, h, generator=gen) * 0.05, torch.randn(h, inter, generator=gen) * 0.05
    x = torch.randn(3, h, generator=gen, dtype=torch.bfloat16)
    for bits in (2, 3, 4):
        fmt = ExpertFormat.build(h, inter, bits, torch.float32)
        store = ExpertStore(fmt, layers=[0], num_experts=2)
        store.put(0, 1, fmt.encode(gate_up, down))
        ref = reference_mlp(x.float(), store.views(0, 1), fmt, F.silu)
        y = cpu.expert_mlp(x, store.buffer(0, 1), fmt)
        assert rel(y, ref) < MLP_TOL


@pytest.mark.parametrize("shape", [(256, 512), (256, 352), (264, 200)])
def test_experts_mlp_equals_single_expert_calls(shape):
    fmt = ExpertFormat.build(*shape, 2, torch.float32)
    bufs = [random_expert(fmt, seed=s) for s in range(3)]
    weights = [0.5, 0.3, 0.2]
    x = torch.randn(shape[0], generator=torch.Generator().manual_seed(0))
    out = cpu.experts_mlp(x, bufs, weights, fmt, threads=2)
    assert out.shape == (3, shape[0])
    for e, (buf, w) in enumerate(zip(bufs, weights, strict=True)):
        single = cpu.expert_mlp(x[None], buf, fmt, threads=1)[0]
        assert torch.equal(out[e], torch.tensor(w, dtype=torch.float32) * single)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b", [1, 5])
def test_outputs_do_not_depend_on_thread_count(experts, shape, b):
    for bits in (2, 3, 4):
        fmt, buf = experts[(*shape, bits)]
        x = torch.randn(b, shape[0], generator=torch.Generator().manual_seed(7))
        ys = [cpu.expert_mlp(x, buf, fmt, threads=t) for t in (1, 2, 3)]
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_tokens_are_independent_and_bf16_is_converted(experts):
    fmt, buf = experts[256, 512, 4]
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = cpu.expert_mlp(x, buf, fmt)
    assert torch.equal(y, cpu.expert_mlp(x.float(), buf, fmt))
    assert torch.equal(y[4], cpu.expert_mlp(x[4], buf, fmt))  # 1-D in, 1-D out, same row
    assert torch.equal(y[5:], cpu.expert_mlp(x[5:], buf, fmt))  # tile of 4 + remainder


def test_concurrent_calls_release_the_gil_and_agree(experts):
    lib = cpu.kernel.lib()
    assert isinstance(lib, ctypes.CDLL) and not isinstance(lib, ctypes.PyDLL)
    fmt, buf = experts[256, 512, 2]
    xs = [torch.randn(2, 256, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    serial = [cpu.expert_mlp(x, buf, fmt, threads=1) for x in xs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        parallel = list(pool.map(lambda x: cpu.expert_mlp(x, buf, fmt, threads=1), xs))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_bad_inputs_raise_clear_errors(experts):
    fmt, buf = experts[256, 512, 2]
    with pytest.raises(ValueError, match="holds"):
        cpu.expert_mlp(torch.randn(1, 256), buf[:-64], fmt)
    with pytest.raises(ValueError, match="features"):
        cpu.expert_mlp(torch.randn(1, 128), buf, fmt)
    with pytest.raises(ValueError, match="2, 3 and 4-bit"):
        cpu.expert_mlp(torch.randn(1, 256), buf, ExpertFormat.build(256, 512, None, torch.float32))
    with pytest.raises(ValueError, match="threads"):
        cpu.expert_mlp(torch.randn(1, 256), buf, fmt, threads=0)
    with pytest.raises(ValueError, match="one weight per expert"):
        cpu.experts_mlp(torch.randn(256), [buf, buf], [1.0], fmt)
    spec = QuantSpec(2, 48, 64, 256)  # 48 does not divide 256: the C side refuses it
    t = {k[2:]: torch.zeros(shape, dtype=dt) for k, (dt, shape) in spec.tensors("w").items()}
    with pytest.raises(ValueError, match="multiple of 8 and of the group size"):
        cpu.qlinear(torch.randn(1, 256), t, spec)


def test_broken_compiler_raises_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_LLM_CACHE_DIR", str(tmp_path / "fresh"))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(cpu.CpuKernelUnavailable) as err:
        build.load()
    msg = str(err.value)
    assert "\n" not in msg and "/bin/false" in msg and "failed" in msg
    assert not list((tmp_path / "fresh").glob("*.so"))  # no half-written library left behind
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cpu.CpuKernelUnavailable, match="no C compiler"):
        build.load()


def test_compiler_without_openmp_builds_a_serial_kernel(tmp_path, caplog):
    cc = tmp_path / "cc-no-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec gcc "$@"\n')
    cc.chmod(0o755)
    lib = build.load(build.BuildSettings([str(cc)], tmp_path / "cache"))
    lib.moe_cpu_openmp.restype = ctypes.c_int
    assert lib.moe_cpu_openmp() == 0
    assert "without OpenMP" in caplog.text


def test_library_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    first = cpu.library_path()
    assert first.is_file() and first.name.startswith("moe_cpu-")
    mtime = first.stat().st_mtime_ns
    assert cpu.library_path() == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setenv("MOE_LLM_CACHE_DIR", str(tmp_path))
    assert build.BuildSettings.from_env().cache_dir == tmp_path


def test_measure_read_bandwidth():
    gbs = cpu.measure_read_bandwidth(threads=1, nbytes=32 << 20, repeats=2)
    assert 0.1 < gbs < 10_000


def test_non_finite_activations_propagate(experts):
    fmt, buf = experts[256, 512, 3]
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    x[0, 17] = float("nan")
    y = cpu.expert_mlp(x, buf, fmt)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


@pytest.mark.skipif(
    __import__("platform").machine() not in ("x86_64", "AMD64") or not build.BuildSettings.from_env().cc,
    reason="x86 instruction-set flags",
)
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avxvnni"])
def test_narrower_instruction_sets_give_the_same_bits(tmp_path, flags):
    """The kernel built as for a machine without AVX-512 (256-bit vectors, AVX-VNNI) and without
    VNNI too (AVX2's saturating maddubs): every path, transposed runs and packed 3-bit rows
    included, still equals the exact model. Built and run in a subprocess (one kernel per process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import exact_expert
from test_cpu_kernel import random_expert
from moe_llm.experts import cpu
from moe_llm.experts.format import ExpertFormat
print(cpu.isa())
for bits, h, i in ((2, 2048, 2048), (3, 4096, 4096), (4, 2048, 2048), (3, 512, 14336), (2, 256, 352)):
    fmt = ExpertFormat.build(h, i, bits, torch.float32)
    buf = random_expert(fmt, seed=bits)
    x = torch.randn(3, h, generator=torch.Generator().manual_seed(1))
    y = cpu.expert_mlp(x, buf, fmt, threads=2)
    for t in range(3):
        want = torch.from_numpy(exact_expert.expert(buf, fmt, x[t]).astype("float32"))
        assert torch.equal(y[t], want), (bits, h, i, t)
print("ok")
"""
    cc = " ".join(build.BuildSettings.from_env().cc)
    env = {**os.environ, "CC": f"{cc} {flags}", "MOE_LLM_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    isa, ok = out.stdout.split()[-2:]
    assert ok == "ok" and isa in ({"avx-vnni", "avx2"} if "avxvnni" not in flags else {"avx2"})


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_one_token_rows_with_scales_expanded_in_the_sum_are_the_exact_model(bits, group_size):
    """Rows whose groups come sixteen blocks at a time in whole meta runs (16 groups of 32 or 8 of
    64 columns per run of 16 blocks) have their scales expanded inside the exact sum for one token
    (AVX-512, 2 and 4 bits): the same bits as the exact model, and as the tile path of several
    tokens (3 bits keeps the scales pass: the same check)."""
    fmt = ExpertFormat.build(1024, 1536, bits, torch.float32, group_size=group_size)
    assert {s.group_size for s in fmt.specs.values()} == {group_size}
    buf = random_expert(fmt, seed=60 + bits + group_size)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(group_size))
    one = torch.cat([cpu.expert_mlp(x[i : i + 1], buf, fmt, threads=2) for i in range(3)])
    for i in range(3):
        assert torch.equal(one[i], torch.from_numpy(exact_expert.expert(buf, fmt, x[i]).astype("float32"))), i
    assert torch.equal(cpu.expert_mlp(x, buf, fmt, threads=2), one)
