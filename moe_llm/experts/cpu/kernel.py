"""ctypes bindings of the CPU expert kernel, and their torch-facing wrappers.

Every wrapper takes CPU tensors, converts activations to contiguous float32, checks shapes
against the `ExpertFormat`, and calls into C with the GIL released (ctypes.CDLL), so a call
can run on a worker thread beside the main thread. Outputs are fresh float32 tensors.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from functools import lru_cache

import torch

from ...errors import ConfigError
from ...quant import QuantSpec
from ..format import MATRICES, ExpertFormat
from .build import library

_c_int, _c_void_p, _c_float_p = ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float)
_ENOMEM = -3


class ExpertLayoutC(ctypes.Structure):
    """`moe_cpu_expert_layout`: geometry of one expert and byte offsets of its tensors."""

    _fields_ = [
        ("bits", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("intermediate", ctypes.c_int32),
        ("gs_gate_up", ctypes.c_int32),
        ("gs_down", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("off", ctypes.c_int64 * 8),
    ]


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """The loaded library with its signatures declared (raises CpuKernelUnavailable)."""
    so = library()
    layout_p = ctypes.POINTER(ExpertLayoutC)
    sigs = {
        "moe_cpu_abi_version": ([], _c_int),
        "moe_cpu_isa": ([], ctypes.c_char_p),
        "moe_cpu_openmp": ([], _c_int),
        "moe_cpu_strerror": ([_c_int], ctypes.c_char_p),
        "moe_cpu_expert_mlp": ([_c_void_p, layout_p, _c_void_p, _c_int, _c_void_p, _c_int], _c_int),
        "moe_cpu_experts_mlp": (
            [ctypes.POINTER(_c_void_p), _c_void_p, _c_int, layout_p, _c_void_p, _c_void_p, _c_int],
            _c_int,
        ),
        "moe_cpu_qlinear": ([_c_void_p] * 4 + [_c_int] * 4 + [_c_void_p, _c_int, _c_void_p, _c_int], _c_int),
        "moe_cpu_read_bandwidth": ([ctypes.c_size_t, _c_int, _c_int], ctypes.c_double),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(so, name)
        fn.argtypes, fn.restype = args, res
    return so


def isa() -> str:
    """The instruction set the kernel was compiled for: avx512-vnni, avx-vnni, avx2 or scalar."""
    return lib().moe_cpu_isa().decode()


@lru_cache(maxsize=1)
def default_threads() -> int:
    """`MOE_LLM_CPU_THREADS` if set, else the physical cores among the CPUs this process may
    run on (SMT siblings share one core's load ports, so they add little to a memory-bound
    kernel)."""
    env = os.environ.get("MOE_LLM_CPU_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"MOE_LLM_CPU_THREADS must be a whole number >= 1, got {env!r}")
        return int(env)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topo + "physical_package_id") as a, open(topo + "core_id") as b:
                cores.add((a.read().strip(), b.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


def _check(rc: int, what: str) -> None:
    if rc == 0:
        return
    msg = lib().moe_cpu_strerror(rc).decode()
    if rc == _ENOMEM:
        raise MemoryError(f"{what}: {msg}")
    raise ValueError(f"{what}: {msg}")


def _activations(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.device.type != "cpu":
        raise ValueError(f"the CPU kernel needs activations in host memory, got a tensor on {x.device}")
    if x.shape[-1] != width:
        raise ValueError(f"activations have {x.shape[-1]} features, expected {width}")
    return x.detach().reshape(-1, width).to(torch.float32).contiguous()


def layout_struct(fmt: ExpertFormat) -> ExpertLayoutC:
    """The C description of `fmt` (a quantized 2/3/4-bit expert format)."""
    if fmt.specs is None or fmt.bits not in (2, 3, 4):
        raise ValueError(f"the CPU kernel runs 2, 3 and 4-bit compact experts, not bits={fmt.bits}")
    offsets = {s.name: s.offset for s in fmt.layout.specs}
    gu, dn = (fmt.specs[m] for m in MATRICES)
    names = [f"{m}.{k}" for m in MATRICES for k in ("q", "scale_q", "zero_q", "meta")]
    off = (ctypes.c_int64 * 8)(*(offsets[n] for n in names))
    return ExpertLayoutC(fmt.bits, fmt.hidden, fmt.intermediate, gu.group_size, dn.group_size, 0, off)


def _buffer_ptr(buf: torch.Tensor, fmt: ExpertFormat) -> int:
    if buf.dtype != torch.uint8 or buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError("an expert buffer must be a contiguous uint8 tensor in host memory")
    if buf.numel() != fmt.nbytes:
        raise ValueError(f"an expert buffer of this format holds {fmt.nbytes} bytes, got {buf.numel()}")
    if buf.data_ptr() % 4:
        raise ValueError("an expert buffer must be 4-byte aligned (its float32 meta is read in place)")
    return buf.data_ptr()


def expert_mlp(x: torch.Tensor, buffer: torch.Tensor, fmt: ExpertFormat, threads: int | None = None) -> torch.Tensor:
    """y = down(silu(gate x) * (up x)) for one expert read in place from its host buffer.

    x: [..., H] of any float dtype, a few tokens (each row's codes are decoded once per 4
    tokens, 2 without AVX-512; a token's result does not depend on the others in the call);
    buffer: the expert's uint8 bytes (`ExpertStore.buffer`). Returns float32 [..., H]."""
    lay = layout_struct(fmt)
    xf = _activations(x, fmt.hidden)
    y = torch.empty_like(xf)
    rc = lib().moe_cpu_expert_mlp(
        _buffer_ptr(buffer, fmt), ctypes.byref(lay), xf.data_ptr(), xf.shape[0], y.data_ptr(), _threads(threads)
    )
    _check(rc, "moe_cpu_expert_mlp")
    return y.view(x.shape)


def experts_mlp(
    x: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    fmt: ExpertFormat,
    threads: int | None = None,
) -> torch.Tensor:
    """Several experts of one layer for one token, in one parallel region.

    x: [H] or [1, H]; buffers[e]: expert e's host buffer; weights[e]: its routing weight.
    Returns float32 [n, H] with row e = weights[e] * expert_e(x), each exactly equal to
    `weights[e] * expert_mlp(x, buffers[e])`; the caller sums the rows in a fixed order."""
    lay = layout_struct(fmt)
    xf = _activations(x, fmt.hidden)
    if xf.shape[0] != 1:
        raise ValueError(f"experts_mlp runs one token, got {xf.shape[0]}")
    w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1).contiguous()
    if not buffers or w.numel() != len(buffers):
        raise ValueError(f"need one weight per expert buffer: {len(buffers)} buffers, {w.numel()} weights")
    ptrs = (_c_void_p * len(buffers))(*(_buffer_ptr(b, fmt) for b in buffers))
    out = torch.empty(len(buffers), fmt.hidden, dtype=torch.float32)
    rc = lib().moe_cpu_experts_mlp(
        ptrs, w.data_ptr(), len(buffers), ctypes.byref(lay), xf.data_ptr(), out.data_ptr(), _threads(threads)
    )
    _check(rc, "moe_cpu_experts_mlp")
    return out


def qlinear(
    x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: QuantSpec, threads: int | None = None
) -> torch.Tensor:
    """y = x @ W.T for one compact-quantized W [out, in] (keys q, scale_q, zero_q, meta, CPU
    tensors as `ExpertFormat` views or `compact.quantize` give them). Returns float32 [..., out]."""
    if spec.bits not in (2, 3, 4):
        raise ValueError(f"the CPU kernel runs 2, 3 and 4-bit matrices, not bits={spec.bits}")
    parts = []
    for key, (dtype, shape) in spec.tensors("w").items():
        t = tensors[key[2:]]
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != math.prod(shape):
            raise ValueError(f"{key[2:]} must be a contiguous {dtype} host tensor of shape {shape}")
        parts.append(t)
    xf = _activations(x, spec.in_features)
    y = torch.empty(xf.shape[0], spec.out_features, dtype=torch.float32)
    rc = lib().moe_cpu_qlinear(
        *(t.data_ptr() for t in parts), spec.bits, spec.out_features, spec.in_features, spec.group_size,
        xf.data_ptr(), xf.shape[0], y.data_ptr(), _threads(threads),
    )  # fmt: skip
    _check(rc, "moe_cpu_qlinear")
    return y.view(*x.shape[:-1], spec.out_features)
