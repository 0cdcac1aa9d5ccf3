"""Where a cold 1024-token TTFT goes at 12 GiB: repeated runs, GC pauses, per-layer host timeline."""
import gc, json, sys, time
import torch
from moe_llm.bench.synthetic import SyntheticModel
from moe_llm.experts import runtime as rtmod

out = sys.argv[1]
res = {}
def log(k, v):
    res[k] = v; print(k, json.dumps(v) if not isinstance(v, str) else v, flush=True)

gcs = []
def gccb(phase, info, _t=[0.0]):
    if phase == "start": _t[0] = time.perf_counter()
    else: gcs.append((info["generation"], time.perf_counter() - _t[0]))
gc.callbacks.append(gccb)

marks = []
orig = rtmod.ExpertsRuntime._grouped
def grouped(self, layer, hidden, top_k_index, top_k_weights):
    t = time.perf_counter()
    r = orig(self, layer, hidden, top_k_index, top_k_weights)
    marks.append((layer, t, time.perf_counter()))
    return r
rtmod.ExpertsRuntime._grouped = grouped

t0 = time.perf_counter()
m = SyntheticModel(device="cuda", experts_bits=2, attn_bits=4, head_bits=4)
log("build_s", round(time.perf_counter() - t0, 1))
p1024 = m.random_prompt(1024, 7)
main = m.random_prompt(32, 3)
tun = "benchmarks/results/h200-kernel-tuning-exact.json"

def ttft(eng):
    eng.reset_cache(); torch.cuda.synchronize()
    marks.clear(); gcs.clear()
    t = time.perf_counter()
    s = eng.generate(p1024, max_new_tokens=1).stats["time_to_first_token_s"]
    return s, list(marks), list(gcs), t

variants = [
    ("12GiB-auto", dict(gpu_budget=12 << 30, cpu=None, gcmode="on")),
    ("12GiB-auto-gcfreeze", dict(gpu_budget=12 << 30, cpu=None, gcmode="freeze")),
    ("12GiB-off", dict(gpu_budget=12 << 30, cpu="off", gcmode="on")),
    ("resident", dict(gpu_budget=None, cpu=None, gcmode="on")),
    ("2GiB-all", dict(gpu_budget=2 << 30, cpu="all", gcmode="on")),
]
for name, v in variants:
    opts = dict(max_context=1152, kernel_tuning=tun)
    if v["cpu"]: opts["cpu_experts"] = v["cpu"]
    eng = m.engine(v["gpu_budget"], **opts)
    try:
        eng.generate(main, max_new_tokens=4)
        eng.generate(p1024, max_new_tokens=2)
        if v["gcmode"] == "freeze":
            gc.collect(); gc.freeze()
        log(f"{name}_gc_tracked", len(gc.get_objects()))
        runs = []
        for i in range(8):
            if i % 2 == 1:  # like the bench: a decode right before
                eng.generate(main, max_new_tokens=64)
            s, mk, g, t = ttft(eng)
            gaps = [round((mk[j][1] - mk[j - 1][1]) * 1e3, 2) for j in range(1, len(mk))]
            host = [round((b - a) * 1e3, 2) for _, a, b in mk]
            runs.append(dict(ttft=round(s, 4), after_decode=i % 2 == 1, gc=[(gg, round(d * 1e3, 2)) for gg, d in g],
                             first_sync_ms=round((mk[0][1] - t) * 1e3, 2) if mk else None,
                             end_ms=round((time.perf_counter() - t) * 1e3, 2),
                             layer_gaps_ms=gaps, host_in_layer_ms=host))
            print(name, i, runs[-1]["ttft"], "gc", runs[-1]["gc"], "gaps", gaps, flush=True)
        log(f"{name}_ttft", [r["ttft"] for r in runs])
        res[f"{name}_runs"] = runs
    finally:
        if v["gcmode"] == "freeze":
            gc.unfreeze()
        eng.cache.synchronize(); eng.runtime.close(); del eng; m.detach()
    json.dump(res, open(out, "w"), indent=1)
