"""Kernel timings for the benchmark's expert format (CUDA, Triton's do_bench).

Reported next to the end-to-end rows so a reader can see where resident time goes:
one decode layer's routed experts (top-k through the device table, `triton_moe`) read
from GPU slots and, zero-copy, from pinned host RAM; the dequantize of prefill; and a
bf16 GEMV over the gate_up shape for comparison. do_bench clears the L2 between runs,
so weights come from HBM as they do in the engine.
"""

from __future__ import annotations

import torch

from ..experts.format import ExpertFormat
from ..experts.store import ExpertStore
from .synthetic import random_expert


def kernel_timings(fmt: ExpertFormat, device: torch.device, seed: int = 0, top_k: int = 2, tuning=None) -> dict:
    from triton.testing import do_bench

    from ..kernels import matrix_views, triton_kernels
    from ..kernels.triton_moe import DEFAULT_TUNING, MoeDecode

    tk = triton_kernels()
    if tk is None or fmt.specs is None:
        return {}
    gen = torch.Generator(device).manual_seed(seed)
    store = ExpertStore(fmt, [0], top_k, pin=True)
    for e in range(top_k):
        store.put_raw(0, e, random_expert(fmt, device, gen))
    slots = torch.stack([store.buffer(0, e).to(device) for e in range(top_k)])  # [k, bytes]
    base = slots.data_ptr()
    in_slots = torch.tensor([slots[e].data_ptr() - base for e in range(top_k)], dtype=torch.int64, device=device)
    in_host = torch.tensor([store.address(0, e) - base for e in range(top_k)], dtype=torch.int64, device=device)
    run = MoeDecode(fmt, top_k, device, tuning or DEFAULT_TUNING)
    x = torch.randn(fmt.hidden, device=device, generator=gen).to(fmt.dtype)
    idx = torch.arange(top_k, device=device)
    w = torch.full((top_k,), 1.0 / top_k, device=device)
    out = torch.empty(fmt.hidden, dtype=fmt.dtype, device=device)
    views = fmt.layout.views(slots[0])
    gu, dn = matrix_views(views, "gate_up_proj"), matrix_views(views, "down_proj")
    sgu, sdn = fmt.specs["gate_up_proj"], fmt.specs["down_proj"]
    scratch = torch.empty(2 * fmt.hidden * fmt.intermediate, dtype=fmt.dtype, device=device)
    dense_gu = torch.randn(sgu.out_features, sgu.in_features, device=device, generator=gen).to(fmt.dtype)
    ms = {
        "decode_layer_hits": do_bench(lambda: run(x, idx, w, in_slots, slots, out)),
        "decode_layer_zero_copy": do_bench(lambda: run(x, idx, w, in_host, slots, out), rep=40),
        "dequantize_gate_up": do_bench(lambda: tk.dequantize(gu, sgu, fmt.dtype, scratch)),
        "dequantize_down": do_bench(lambda: tk.dequantize(dn, sdn, fmt.dtype, scratch)),
        "bf16_gate_up_gemv": do_bench(lambda: torch.nn.functional.linear(x, dense_gu)),
    }

    def nbytes(t: dict) -> int:
        return sum(v.numel() * v.element_size() for v in t.values())

    moved = {
        "decode_layer_hits": top_k * fmt.nbytes,
        "decode_layer_zero_copy": top_k * fmt.nbytes,
        "dequantize_gate_up": nbytes(gu) + sgu.out_features * sgu.in_features * 2,
        "dequantize_down": nbytes(dn) + sdn.out_features * sdn.in_features * 2,
        "bf16_gate_up_gemv": dense_gu.numel() * 2,
    }
    return {k: {"us": v * 1e3, "gb_s": moved[k] / (v * 1e-3) / 1e9} for k, v in ms.items()}
