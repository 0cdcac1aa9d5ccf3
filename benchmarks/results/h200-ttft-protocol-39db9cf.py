"""Bench-protocol TTFT with and without the split alive; per-thread CPU during a TTFT."""
import gc, json, os, sys, time
import torch
from moe_llm.bench.synthetic import SyntheticModel
from moe_llm.bench import protocol as P
from moe_llm.experts import runtime as rtmod

out = sys.argv[1]
res = {}
def log(k, v):
    res[k] = v; print(k, json.dumps(v), flush=True); json.dump(res, open(out, "w"), indent=1)

marks = []
orig = rtmod.ExpertsRuntime._grouped
def grouped(self, layer, hidden, top_k_index, top_k_weights):
    t = time.perf_counter(); r = orig(self, layer, hidden, top_k_index, top_k_weights)
    marks.append((t, time.perf_counter())); return r
rtmod.ExpertsRuntime._grouped = grouped

def threads_cpu():
    d = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            f = open(f"/proc/self/task/{tid}/stat").read()
            name = f[f.index("(") + 1:f.rindex(")")]
            parts = f[f.rindex(")") + 2:].split()
            d[tid] = (name, int(parts[11]) + int(parts[12]))
        except Exception: pass
    return d

def ttft(eng, prompt, tag):
    eng.reset_cache(); torch.cuda.synchronize()
    marks.clear()
    c0 = threads_cpu(); t = time.perf_counter()
    s = eng.generate(prompt, max_new_tokens=1).stats["time_to_first_token_s"]
    wall = time.perf_counter() - t; c1 = threads_cpu()
    busy = {}
    for tid, (name, ticks) in c1.items():
        dt = ticks - c0.get(tid, (name, 0))[1]
        if dt: busy[f"{name}:{tid}"] = dt
    gaps = [round((marks[j][0] - marks[j - 1][0]) * 1e3, 1) for j in range(1, len(marks))]
    inl = [round((b - a) * 1e3, 1) for a, b in marks]
    r = dict(tag=tag, ttft=round(s, 4), wall=round(wall, 4), busy_ticks=busy, gaps=gaps, in_layer=inl)
    print(tag, r["ttft"], "busy", busy, flush=True)
    return r

def h2d_gbs():
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory(); dst = torch.empty_like(src, device="cuda")
    dst.copy_(src); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(3): dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(); return round(3 * (1 << 30) / (time.perf_counter() - t) / 1e9, 1)

m = SyntheticModel(device="cuda", experts_bits=2, attn_bits=4, head_bits=4)
wl = P.Workload(repeats=2)
prompts = {n: m.random_prompt(n, wl.seed + n) for n in wl.ttft_prompts}
prompts["main"] = m.random_prompt(wl.prompt_tokens, wl.seed)
prompts["warmup"] = m.random_prompt(32, wl.seed + 1)
opts = (("max_context", 1152), ("kernel_tuning", "benchmarks/results/h200-kernel-tuning-exact.json"))
log("h2d_idle", h2d_gbs())
row = P.run_variant(m, P.Variant("resident", 2, None, options=opts), wl, prompts)
log("resident_ttft", row["ttft_s_runs"])
row = P.run_variant(m, P.Variant("full", 2, 12 << 30, options=opts), wl, prompts)
log("full_ttft", row["ttft_s_runs"])

def custom(name, budget, decode=True, extra=()):
    eng = m.engine(budget, **dict(opts + tuple(extra)))
    runs = []
    try:
        eng.generate(prompts["warmup"], max_new_tokens=4)
        eng.generate(prompts[1024], max_new_tokens=2)
        if decode:
            eng.generate(prompts["main"], max_new_tokens=128)
        for i in range(3):
            runs.append(ttft(eng, prompts[1024], f"{name}-alive"))
        res[f"{name}_h2d_alive"] = h2d_gbs()
        if eng.runtime._split is not None:
            eng.runtime.close()
            time.sleep(0.05)
            for i in range(3):
                runs.append(ttft(eng, prompts[1024], f"{name}-closed"))
            res[f"{name}_h2d_closed"] = h2d_gbs()
    finally:
        log(f"{name}_runs", runs)
        eng.cache.synchronize(); eng.runtime.close(); del eng; m.detach()

custom("c12", 12 << 30)
custom("c12nodecode", 12 << 30, decode=False)
custom("c12off", 12 << 30, extra=(("cpu_experts", "off"),))
custom("c2all", 2 << 30, extra=(("cpu_experts", "all"),))
