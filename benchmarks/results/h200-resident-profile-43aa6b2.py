"""Resident decode: where a token's time goes (graph replay timing, eager op attribution)."""
import json, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from moe_llm.bench.synthetic import SyntheticModel

out = sys.argv[1]
m = SyntheticModel(device="cuda", experts_bits=2, attn_bits=4, head_bits=4)
eng = m.engine(None, max_context=1152, kernel_tuning="benchmarks/results/h200-kernel-tuning-exact.json")
p = m.random_prompt(512, 3)
eng.generate(p, max_new_tokens=8)
t0 = time.perf_counter(); r = eng.generate(p, max_new_tokens=128); print("decode tok/s", r.stats.get("decode_tok_s"), flush=True)
g = eng.graphs

# graph replay timing: replay one window's graph N times
win = next(iter(g._windows.values()))
torch.cuda.synchronize()
for n in (50,):
    t = time.perf_counter()
    for _ in range(n):
        win.graph.replay()
    torch.cuda.synchronize()
    print("graph replay ms", (time.perf_counter() - t) / n * 1e3, flush=True)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        win.graph.replay()
    torch.cuda.synchronize()
ka = prof.key_averages()
rows = sorted(((e.self_device_time_total, e.key, e.count) for e in ka), reverse=True)
tot = sum(r[0] for r in rows)
print("graph kernels us/token", tot / 10, "count/token", sum(r[2] for r in rows) / 10)
for us, k, c in rows[:18]:
    print(f"  {us/10:8.1f} us {c/10:6.1f}x  {k[:110]}")
# eager step: CPU ops with their device time
pos = 600
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof2:
    for _ in range(3):
        g.step_eager(5, pos)
    torch.cuda.synchronize()
ka2 = prof2.key_averages(group_by_input_shape=True)
rows2 = sorted(((e.self_device_time_total, e.key, e.count, str(e.input_shapes)[:90]) for e in ka2 if e.self_device_time_total > 0), reverse=True)
print("eager ops by device time (per step)")
for us, k, c, sh in rows2[:25]:
    print(f"  {us/3:8.1f} us {c/3:6.1f}x  {k[:40]:40s} {sh}")
prof2.export_chrome_trace(out + "/eager_trace.json")
