"""Kernel timings for one expert of the benchmark's format (CUDA, Triton's do_bench).

Reported next to the end-to-end rows so a reader can see where resident time
goes: the fused dequant-GEMVs of one routed expert at decode, the dequantize of
prefill, and a bf16 GEMV over the same shapes for comparison. do_bench clears
the L2 between runs, so weights come from HBM as they do in the engine.
"""

from __future__ import annotations

import torch

from ..experts.format import ExpertFormat
from .synthetic import random_expert


def kernel_timings(fmt: ExpertFormat, device: torch.device, seed: int = 0) -> dict:
    from triton.testing import do_bench

    from ..kernels import matrix_views, triton_kernels

    tk = triton_kernels()
    if tk is None or fmt.specs is None:
        return {}
    gen = torch.Generator(device).manual_seed(seed)
    views = fmt.layout.views(random_expert(fmt, device, gen))
    gu, dn = matrix_views(views, "gate_up_proj"), matrix_views(views, "down_proj")
    sgu, sdn = fmt.specs["gate_up_proj"], fmt.specs["down_proj"]
    ws = tk.DecodeWorkspace(1, sgu, sdn, device)
    x = torch.randn(fmt.hidden, device=device, generator=gen).to(fmt.dtype)
    scratch = torch.empty(2 * fmt.hidden * fmt.intermediate, dtype=fmt.dtype, device=device)

    def nbytes(t: dict) -> int:
        return sum(v.numel() * v.element_size() for v in t.values())

    dense_gu = torch.randn(sgu.out_features, sgu.in_features, device=device, generator=gen).to(fmt.dtype)
    ms = {
        "gate_up_glu_gemv": do_bench(lambda: tk.gemv(x, gu, sgu, ws.h[0], glu=True)),
        "down_gemv": do_bench(lambda: tk.gemv(ws.h[0], dn, sdn, ws.part[0])),
        "expert_decode": do_bench(lambda: ws.expert(0, x, gu, dn, fmt)),
        "dequantize_gate_up": do_bench(lambda: tk.dequantize(gu, sgu, fmt.dtype, scratch)),
        "dequantize_down": do_bench(lambda: tk.dequantize(dn, sdn, fmt.dtype, scratch)),
        "bf16_gate_up_gemv": do_bench(lambda: torch.nn.functional.linear(x, dense_gu)),
    }
    moved = {
        "gate_up_glu_gemv": nbytes(gu),
        "down_gemv": nbytes(dn),
        "expert_decode": nbytes(gu) + nbytes(dn),
        "dequantize_gate_up": nbytes(gu) + sgu.out_features * sgu.in_features * 2,
        "dequantize_down": nbytes(dn) + sdn.out_features * sdn.in_features * 2,
        "bf16_gate_up_gemv": dense_gu.numel() * 2,
    }
    return {k: {"us": v * 1e3, "gb_s": moved[k] / (v * 1e-3) / 1e9} for k, v in ms.items()}
