"""Kernel timings for the benchmark's expert format (CUDA).

Reported next to the end-to-end rows so a reader can see where resident time goes:
one decode layer's routed experts (top-k through the device table, `triton_moe`) read
from GPU slots and, zero-copy, from pinned host RAM; the dequantize of prefill; and a
bf16 GEMV over the gate_up shape for comparison.

The decode layers are timed as the engine runs them: captured in one CUDA graph that walks
LAYERS layers, each with its own experts (LAYERS * top_k distinct buffers, far more than the
L2 holds), so the time is the kernels' and not the host's launches. The prefill kernels are
single launches timed with Triton's do_bench, which clears the L2 between runs.
"""

from __future__ import annotations

import torch

from ..experts.format import ExpertFormat
from ..experts.store import ExpertStore
from .synthetic import random_expert

LAYERS = 8  # layers (each with its own top_k experts) that one timed decode graph walks


def _graph_ms(layer_fn, layers: int, reps: int = 20) -> float:
    """Median device time (ms, as do_bench gives it) of one call of layer_fn(layer), from a CUDA graph of `layers`
    calls replayed `reps` times (after a warm-up that compiles and fills the caches)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in range(layers):
            layer_fn(layer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            layer_fn(layer)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / layers)
    return sorted(times)[len(times) // 2]


def decode_layers(fmt: ExpertFormat, device: torch.device, gen: torch.Generator, top_k: int = 2):
    """LAYERS layers of top_k random experts each, pinned in host RAM and copied to GPU slots:
    (store, slots, in_slots, in_host); the table rows hold each layer's byte offsets from the
    slot pool to its experts' GPU slots (in_slots) or to their pinned host buffers (in_host)."""
    store = ExpertStore(fmt, list(range(LAYERS)), top_k, pin=True)
    for layer in range(LAYERS):
        for e in range(top_k):
            store.put_raw(layer, e, random_expert(fmt, device, gen))
    slots = torch.stack([store.buffer(lay, e).to(device) for lay in range(LAYERS) for e in range(top_k)])
    base = slots.data_ptr()

    def row(addr) -> torch.Tensor:
        return torch.tensor([addr(e) - base for e in range(top_k)], dtype=torch.int64, device=device)

    in_slots = [row(lambda e, lay=lay: slots[lay * top_k + e].data_ptr()) for lay in range(LAYERS)]
    in_host = [row(lambda e, lay=lay: store.address(lay, e)) for lay in range(LAYERS)]
    return store, slots, in_slots, in_host


def kernel_timings(fmt: ExpertFormat, device: torch.device, seed: int = 0, top_k: int = 2, tuning=None) -> dict:
    from triton.testing import do_bench

    from ..kernels import matrix_views, triton_kernels
    from ..kernels.triton_moe import MoeDecode

    tk = triton_kernels()
    if tk is None or fmt.specs is None:
        return {}
    gen = torch.Generator(device).manual_seed(seed)
    store, slots, in_slots, in_host = decode_layers(fmt, device, gen, top_k)
    run = MoeDecode(fmt, top_k, device, tuning)
    x = torch.randn(fmt.hidden, device=device, generator=gen).to(fmt.dtype)
    idx = torch.arange(top_k, device=device)
    w = torch.full((top_k,), 1.0 / top_k, device=device)
    out = torch.empty(fmt.hidden, dtype=fmt.dtype, device=device)

    def gemv(launch, src, quant, shared, table_row, dst):  # one of the layer's two GEMVs alone
        run._gemv(launch, src, quant, shared, idx, table_row, slots, dst, None)

    views = fmt.layout.views(slots[0])
    gu, dn = matrix_views(views, "gate_up_proj"), matrix_views(views, "down_proj")
    sgu, sdn = fmt.specs["gate_up_proj"], fmt.specs["down_proj"]
    scratch = torch.empty(2 * fmt.hidden * fmt.intermediate, dtype=fmt.dtype, device=device)
    dense_gu = torch.randn(sgu.out_features, sgu.in_features, device=device, generator=gen).to(fmt.dtype)
    ms = {
        "decode_layer_hits": _graph_ms(lambda lay: run(x, idx, w, in_slots[lay], slots, out), LAYERS),
        "decode_gate_up": _graph_ms(lambda lay: gemv(run._gate_up, x, run._xq, True, in_slots[lay], run.h), LAYERS),
        "decode_down": _graph_ms(lambda lay: gemv(run._down, run.h, run._hq, False, in_slots[lay], run.part), LAYERS),
        "decode_layer_zero_copy": _graph_ms(lambda lay: run(x, idx, w, in_host[lay], slots, out), LAYERS, reps=5),
        "dequantize_gate_up": do_bench(lambda: tk.dequantize(gu, sgu, fmt.dtype, scratch)),
        "dequantize_down": do_bench(lambda: tk.dequantize(dn, sdn, fmt.dtype, scratch)),
        "bf16_gate_up_gemv": do_bench(lambda: torch.nn.functional.linear(x, dense_gu)),
    }

    def nbytes(t: dict) -> int:
        return sum(v.numel() * v.element_size() for v in t.values())

    moved = {
        "decode_layer_hits": top_k * fmt.nbytes,
        "decode_gate_up": top_k * nbytes(gu),
        "decode_down": top_k * nbytes(dn),
        "decode_layer_zero_copy": top_k * fmt.nbytes,
        "dequantize_gate_up": nbytes(gu) + sgu.out_features * sgu.in_features * 2,
        "dequantize_down": nbytes(dn) + sdn.out_features * sdn.in_features * 2,
        "bf16_gate_up_gemv": dense_gu.numel() * 2,
    }
    return {k: {"us": v * 1e3, "gb_s": moved[k] / (v * 1e-3) / 1e9} for k, v in ms.items()}
