"""Sweep the tile shapes of the routed-experts decode kernels on the GPU (Mixtral-8x7B shapes).

For each bit width and tuning, times one layer's dispatch (k=2 experts: gate_up+GLU, down,
combine) with every table entry pointing at GPU slots (hits) and at pinned host RAM
(zero-copy misses), and reports GB/s of expert bytes read. Writes JSON.

    python scripts/tune_moe.py --out tune.json [--quick]
    python scripts/tune_moe.py --tiles --out tiles.json   # each GEMV's byte tiles, HBM and host
"""

# ruff: noqa: B023  (every closure below is timed within the iteration that made it)
from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from moe_llm.bench.synthetic import random_expert
from moe_llm.experts.format import ExpertFormat
from moe_llm.experts.store import ExpertStore
from moe_llm.kernels.triton_moe import MoeDecode, Tuning, combine


def _reference(fmt: ExpertFormat, bufs: list[torch.Tensor], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_j w[j] * expert_j(x) from dequantized weights in float32."""
    out = torch.zeros(fmt.hidden, device=x.device)
    for buf, wj in zip(bufs, w.tolist(), strict=True):
        views = fmt.layout.views(buf)
        gate, up = (fmt.dense(views, "gate_up_proj").float() @ x.float()).chunk(2)
        out += wj * (fmt.dense(views, "down_proj").float() @ (torch.nn.functional.silu(gate) * up))
    return out


def _layer(hidden: int, inter: int, bits: int, E: int):
    """One layer of E random experts pinned in host RAM and copied to GPU slots: (fmt, store,
    slots, {"slots": table, "host": table}, generator); table entries are byte offsets from the
    slot pool (as in ExpertCache) to a slot or to the pinned host copy."""
    fmt = ExpertFormat.build(hidden, inter, bits, torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(0)
    store = ExpertStore(fmt, [0], E, pin=True)
    for e in range(E):
        store.put_raw(0, e, random_expert(fmt, "cuda", gen))
    slots = torch.stack([store.buffer(0, e).cuda() for e in range(E)])
    base = slots.data_ptr()
    tables = {
        "slots": torch.tensor([slots[e].data_ptr() - base for e in range(E)], dtype=torch.int64, device="cuda"),
        "host": torch.tensor([store.address(0, e) - base for e in range(E)], dtype=torch.int64, device="cuda"),
    }
    return fmt, store, slots, tables, gen


def _step_inputs(hidden: int, gen: torch.Generator):
    """(x, top-k ids, weights, out) of one decoded token routed to experts 2 and 5."""
    x = torch.randn(hidden, device="cuda", generator=gen).to(torch.bfloat16)
    idx = torch.tensor([2, 5], device="cuda")
    w = torch.tensor([0.6, 0.4], device="cuda")
    return x, idx, w, torch.empty(hidden, dtype=torch.bfloat16, device="cuda")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", action="store_true", help="sweep gate_up and down apart (slots only), then combine")
    ap.add_argument("--tiles", action="store_true", help="each GEMV's byte tile, rows and warps, from HBM and host")
    args = ap.parse_args()
    if args.parts:
        return sweep_parts(args.out)
    if args.tiles:
        return sweep_tiles(args.out)
    hidden, inter, E, k = 4096, 14336, 8, 2
    results = []
    for bits in (2, 3):
        fmt, store, slots, tables, gen = _layer(hidden, inter, bits, E)
        x, idx, w, out = _step_inputs(hidden, gen)
        ref = _reference(fmt, [slots[e] for e in idx.tolist()], x, w)
        tunings = [Tuning(int8=False)]  # the float-activation kernel at its defaults, for comparison
        rows_grid = itertools.product((8, 16, 32), (16, 32, 64), (4, 8), (1, 2) if not args.quick else (1,))
        tunings += [
            Tuning(gate_up_rows=g, down_rows=d, gate_up_warps=wp, down_warps=wp, unroll=u, int8=True)
            for g, d, wp, u in rows_grid
        ]
        for t in tunings:
            run = MoeDecode(fmt, k, torch.device("cuda"), t)
            row = {"bits": bits, **t.__dict__, "expert_bytes": fmt.nbytes}
            for name, table in tables.items():

                def step(run=run, table=table, x=x, idx=idx, w=w, slots=slots, out=out):
                    run(x, idx, w, table, slots, out)

                ms = do_bench(step, warmup=10, rep=60 if name == "slots" else 30)
                row[f"{name}_us"] = ms * 1e3
                row[f"{name}_gb_s"] = k * fmt.nbytes / (ms * 1e-3) / 1e9
            got = out.float()
            row["rel_err_vs_dequantized"] = float((got - ref).norm() / ref.norm())
            results.append(row)
            print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
    best = {}
    for bits in (2, 3):
        rows = [r for r in results if r["bits"] == bits]
        best[bits] = max(rows, key=lambda r: r["slots_gb_s"])
        print("best", bits, best[bits])
    if args.out:  # `best` is what EngineConfig.kernel_tuning reads
        with open(args.out, "w") as f:
            json.dump({"results": results, "best": {str(b): r for b, r in best.items()}}, f, indent=1)


def sweep_parts(out_path: str | None) -> None:
    """Each GEMV alone (gate_up with its activation quantization; down with its own and the
    combine) over a wider grid than the joint sweep, every table entry at a GPU slot; then the
    best pair per width, timed whole on slots and on pinned host RAM."""
    hidden, inter, E, k = 4096, 14336, 8, 2
    results, best = [], {}
    for bits in (2, 3):
        fmt, store, slots, tables, gen = _layer(hidden, inter, bits, E)
        table, host = tables["slots"], tables["host"]
        x, idx, w, out = _step_inputs(hidden, gen)
        parts = {"gate_up": [], "down": []}
        for g, wp in itertools.product((4, 8, 16, 32), (2, 4, 8)):
            run = MoeDecode(fmt, k, torch.device("cuda"), Tuning(gate_up_rows=g, gate_up_warps=wp))
            ms = do_bench(lambda run=run: run._gemv(run._gate_up, x, run._xq, True, idx, table, slots, run.h, None),
                          warmup=10, rep=60)  # fmt: skip
            parts["gate_up"].append(dict(bits=bits, gate_up_rows=g, gate_up_warps=wp, us=ms * 1e3))
            print(json.dumps(parts["gate_up"][-1]), flush=True)
        for d, wp, sp in itertools.product((8, 16, 32, 64), (2, 4, 8), (1, 2, 4, 8)):
            run = MoeDecode(fmt, k, torch.device("cuda"), Tuning(down_rows=d, down_warps=wp, down_split=sp))
            run._gemv(run._gate_up, x, run._xq, True, idx, table, slots, run.h, None)

            def down(run=run):
                run._gemv(run._down, run.h, run._hq, False, idx, table, slots, run.part, None)
                combine(run.part, w, out)

            ms = do_bench(down, warmup=10, rep=60)
            parts["down"].append(dict(bits=bits, down_rows=d, down_warps=wp, down_split=sp, us=ms * 1e3))
            print(json.dumps(parts["down"][-1]), flush=True)
        g = min(parts["gate_up"], key=lambda r: r["us"])
        d = min(parts["down"], key=lambda r: r["us"])
        t = Tuning(gate_up_rows=g["gate_up_rows"], gate_up_warps=g["gate_up_warps"], down_rows=d["down_rows"],
                   down_warps=d["down_warps"], down_split=d["down_split"])  # fmt: skip
        run = MoeDecode(fmt, k, torch.device("cuda"), t)
        row = {"bits": bits, **t.__dict__, "expert_bytes": fmt.nbytes, "gate_up_us": g["us"], "down_us": d["us"]}
        for name, tab in (("slots", table), ("host", host)):
            ms = do_bench(lambda run=run, tab=tab: run(x, idx, w, tab, slots, out), warmup=10, rep=60)
            row[f"{name}_us"], row[f"{name}_gb_s"] = ms * 1e3, k * fmt.nbytes / (ms * 1e-3) / 1e9
        ref = _reference(fmt, [slots[e] for e in idx.tolist()], x, w)
        run(x, idx, w, table, slots, out)
        row["rel_err_vs_dequantized"] = float((out.float() - ref).norm() / ref.norm())
        print("best", json.dumps(row), flush=True)
        best[bits] = row
        results += parts["gate_up"] + parts["down"]
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"results": results, "best": {str(b): r for b, r in best.items()}}, f, indent=1)


# (widest byte tile, rows, warps) of gate_up; (widest byte tile, rows, warps, K-splits; 0: automatic) of down
GATE_UP_TILES = [(256, 8, 4), (512, 8, 4), (512, 4, 4), (512, 8, 8), (1024, 4, 4), (1024, 8, 4), (1024, 8, 8),
                 (1024, 16, 8), (1024, 4, 2), (1024, 2, 2)]  # fmt: skip
DOWN_TILES = [(256, 16, 2, 2), (256, 16, 2, 0), (512, 16, 2, 2), (512, 16, 2, 1), (512, 8, 2, 2), (512, 16, 4, 2),
              (512, 32, 4, 2), (512, 8, 4, 1), (1024, 16, 4, 1), (1024, 8, 2, 2)]  # fmt: skip


def sweep_tiles(out_path: str | None) -> None:
    """Each GEMV alone over its byte tiles (`Tuning.gate_up_block_p` / `down_block_p`, capped by
    what the packed planes allow), rows and warps: two routed experts of one layer, every table
    entry at a GPU slot (HBM) and at pinned host RAM (zero-copy); GB/s of that GEMV's bytes, and
    whether every setting gives the same bits (gate_up's h; down's combined output)."""
    hidden, inter, E = 4096, 14336, 8
    results = []
    for bits in (2, 3):
        fmt, store, slots, tables, gen = _layer(hidden, inter, bits, E)
        x, idx, w, out = _step_inputs(hidden, gen)
        gu_bytes = sum(s.nbytes for s in fmt.layout.specs if s.name.startswith("gate_up"))
        dn_bytes = fmt.nbytes - gu_bytes
        h_ref = out_ref = None
        for bp, rows, warps in GATE_UP_TILES:
            run = MoeDecode(
                fmt, 2, torch.device("cuda"), Tuning(gate_up_block_p=bp, gate_up_rows=rows, gate_up_warps=warps)
            )
            row = {"bits": bits, "gemv": "gate_up", "bp": run._gate_up[2]["BLOCK_P"], "rows": rows, "warps": warps}
            for name, table in tables.items():
                ms = do_bench(lambda run=run, table=table: run._gemv(run._gate_up, x, run._xq, True, idx, table, slots,
                                                                     run.h, None), warmup=5, rep=40)  # fmt: skip
                row[f"{name}_us"], row[f"{name}_GBs"] = round(ms * 1e3, 1), round(2 * gu_bytes / ms / 1e6, 1)
            h_ref = run.h.clone() if h_ref is None else h_ref
            row["same_h"] = bool(torch.equal(run.h, h_ref))
            results.append(row)
            print(json.dumps(row), flush=True)
        for bp, rows, warps, split in DOWN_TILES:
            tuning = Tuning(down_block_p=bp, down_rows=rows, down_warps=warps, down_split=split)
            run = MoeDecode(fmt, 2, torch.device("cuda"), tuning)
            run.h.copy_(h_ref)
            row = {"bits": bits, "gemv": "down", "bp": run._down[2]["BLOCK_P"], "rows": rows, "warps": warps,
                   "split": run.split}  # fmt: skip
            for name, table in tables.items():

                def down(run=run, table=table):
                    run._gemv(run._down, run.h, run._hq, False, idx, table, slots, run.part, None)
                    combine(run.part, w, out)

                ms = do_bench(down, warmup=5, rep=40)
                row[f"{name}_us"], row[f"{name}_GBs"] = round(ms * 1e3, 1), round(2 * dn_bytes / ms / 1e6, 1)
            out_ref = out.clone() if out_ref is None else out_ref
            row["same_out"] = bool(torch.equal(out, out_ref))
            results.append(row)
            print(json.dumps(row), flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
