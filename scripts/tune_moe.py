"""Sweep the tile shapes of the routed-experts decode kernels on the GPU (Mixtral-8x7B shapes).

Each GEMV is timed as the engine runs it: captured in a CUDA graph that walks
`bench.kernels.LAYERS` layers, each with its own two routed experts in HBM (far more bytes than
the L2 holds), so neither the host's launches nor a warm L2 enter the time. For gate_up (GLU
fused) and down (split-K, with the combine) the sweep covers byte tiles, rows per program,
warps and K-splits, checks that every setting gives the same bits, then times the whole layer
with the best pair, from HBM and zero-copy from pinned host RAM. Writes the JSON that `--kernel-tuning` reads (``best``).

    python scripts/tune_moe.py --out tune.json [--bits 2,3] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, replace

import torch

from moe_llm.bench.kernels import LAYERS, _graph_ms, decode_layers
from moe_llm.experts.format import ExpertFormat
from moe_llm.kernels.triton_moe import MoeDecode, Tuning, combine, default_tuning


def _reference(fmt: ExpertFormat, bufs: list[torch.Tensor], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_j w[j] * expert_j(x) from dequantized weights in float32."""
    out = torch.zeros(fmt.hidden, device=x.device)
    for buf, wj in zip(bufs, w.tolist(), strict=True):
        views = fmt.layout.views(buf)
        gate, up = (fmt.dense(views, "gate_up_proj").float() @ x.float()).chunk(2)
        out += wj * (fmt.dense(views, "down_proj").float() @ (torch.nn.functional.silu(gate) * up))
    return out


def _grids(quick: bool) -> tuple[list[dict], list[dict]]:
    """The gate_up and down settings swept (Tuning fields): byte tiles, rows and warps per program
    (two lanes hold a 32-column block, `gemv_i8.tile_layout`; settings with fewer
    blocks than threads are left out) and down's K-splits."""

    def fits(bp: int, rows: int, warps: int) -> bool:  # two lanes a 32-column block
        return rows * (bp // 32) * 2 >= 32 * warps

    gate_up = [
        dict(gate_up_block_p=bp, gate_up_rows=r, gate_up_warps=wp)
        for bp, r, wp in itertools.product((1024, 512, 256), (1, 2, 4, 8, 16), (1, 2, 4))
        if fits(bp, r, wp) and not (quick and r == 16)
    ]
    down = [
        dict(down_block_p=bp, down_rows=r, down_warps=wp, down_split=sp)
        for bp, r, wp, sp in itertools.product((512, 256), (2, 4, 8, 16), (1, 2, 4), (1, 2, 4))
        if fits(bp, r, wp) and not (quick and sp == 4)
    ]
    return gate_up, down


def sweep(bits: int, quick: bool) -> tuple[list[dict], dict]:
    dev = torch.device("cuda")
    fmt = ExpertFormat.build(4096, 14336, bits, torch.bfloat16)
    gen = torch.Generator(dev).manual_seed(0)
    store, slots, in_slots, in_host = decode_layers(fmt, dev, gen)
    x = torch.randn(fmt.hidden, device=dev, generator=gen).to(fmt.dtype)
    idx = torch.arange(2, device=dev)
    w = torch.tensor([0.6, 0.4], device=dev)
    out = torch.empty(fmt.hidden, dtype=fmt.dtype, device=dev)
    gu_bytes = sum(s.nbytes for s in fmt.layout.specs if s.name.startswith("gate_up"))
    dn_bytes = fmt.nbytes - gu_bytes
    ref_run = MoeDecode(fmt, 2, dev)
    ref_run._gemv(ref_run._gate_up, x, ref_run._xq, True, idx, in_slots[0], slots, ref_run.h, None)
    h_ref = ref_run.h.clone()
    ref_run(x, idx, w, in_slots[0], slots, out)
    out_ref = out.clone()
    results, best = [], {}
    gate_up, down = _grids(quick)
    for name, grid in (("gate_up", gate_up), ("down", down)):
        rows = []
        for fields in grid:
            run = MoeDecode(fmt, 2, dev, replace(default_tuning(bits), **fields))
            if name == "gate_up":

                def one(lay, run=run):
                    run._gemv(run._gate_up, x, run._xq, True, idx, in_slots[lay], slots, run.h, None)

                nbytes = gu_bytes
            else:
                run.h.copy_(h_ref)

                def one(lay, run=run):
                    run._gemv(run._down, run.h, run._hq, False, idx, in_slots[lay], slots, run.part, None)
                    combine(run.part, w, out)

                nbytes = dn_bytes
            ms = _graph_ms(one, LAYERS)
            one(0)
            same = torch.equal(run.h, h_ref) if name == "gate_up" else torch.equal(out, out_ref)
            row = {"bits": bits, "gemv": name, **fields, "split": run.split, "us": round(ms * 1e3, 2),
                   "gb_s": round(2 * nbytes / (ms * 1e-3) / 1e9, 1), "same_bits": same}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        results += rows
        best[name] = min((r for r in rows if r["same_bits"]), key=lambda r: r["us"])
    fields = {k: v for part in ("gate_up", "down") for k, v in best[part].items() if k in Tuning.__dataclass_fields__}
    tuning = replace(default_tuning(bits), **fields)
    layer = {}
    for label, t in (("default", default_tuning(bits)), ("best", tuning)):
        run = MoeDecode(fmt, 2, dev, t)
        hbm = _graph_ms(lambda lay, run=run: run(x, idx, w, in_slots[lay], slots, out), LAYERS)
        host = _graph_ms(lambda lay, run=run: run(x, idx, w, in_host[lay], slots, out), LAYERS, reps=5)
        layer[label] = {"hits_us": round(hbm * 1e3, 2), "hits_gb_s": round(2 * fmt.nbytes / (hbm * 1e-3) / 1e9, 1),
                        "zero_copy_gb_s": round(2 * fmt.nbytes / (host * 1e-3) / 1e9, 1)}  # fmt: skip
    run(x, idx, w, in_slots[0], slots, out)
    ref = _reference(fmt, [slots[e] for e in idx.tolist()], x, w)
    entry = {**asdict(tuning), "layer": layer, "same_bits_as_default": bool(torch.equal(out, out_ref)),
             "rel_err_vs_dequantized": float((out.float() - ref).norm() / ref.norm())}  # fmt: skip
    print("best", bits, json.dumps(entry), flush=True)
    del store
    return results, entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    args = ap.parse_args()
    results, best = [], {}
    for bits in (int(b) for b in args.bits.split(",")):
        rows, best[str(bits)] = sweep(bits, args.quick)
        results += rows
    if args.out:  # `best` is what EngineConfig.kernel_tuning reads
        with open(args.out, "w") as f:
            json.dump({"command": "python scripts/tune_moe.py", "results": results, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
