"""Does the CPU road leave the store's DMA slower? Raw copies of every expert, before/after."""
import json, sys, time
import torch
from moe_llm.bench.synthetic import SyntheticModel

out = sys.argv[1]; res = {}
def log(k, v):
    res[k] = v; print(k, json.dumps(v), flush=True); json.dump(res, open(out, "w"), indent=1)

m = SyntheticModel(device="cuda", experts_bits=2, attn_bits=4, head_bits=4)
st = m.store
keys = [(l, e) for l in m.info.layers for e in range(m.info.num_experts)]
n = st.fmt.nbytes
dst = torch.empty(8, n, dtype=torch.uint8, device="cuda")
s = torch.cuda.Stream()
def copies(tag):
    torch.cuda.synchronize()
    t = time.perf_counter(); per = []
    with torch.cuda.stream(s):
        for i in range(0, len(keys), 8):
            a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True); a.record(s)
            for j, k in enumerate(keys[i:i + 8]):
                dst[j].copy_(st.buffer(*k), non_blocking=True)
            b.record(s); per.append((a, b))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    ms = [round(a.elapsed_time(b), 2) for a, b in per]
    log(tag, dict(gbs=round(len(keys) * n / wall / 1e9, 2), layer_ms_min=min(ms), layer_ms_max=max(ms), layer_ms=ms))

def ttft(eng, p, tag):
    v = []
    for _ in range(2):
        eng.reset_cache(); torch.cuda.synchronize()
        v.append(round(eng.generate(p, max_new_tokens=1).stats["time_to_first_token_s"], 4))
    log(tag, v)

p1024 = m.random_prompt(1024, 1024); main = m.random_prompt(512, 0); warm = m.random_prompt(32, 1)
opts = dict(max_context=1152, kernel_tuning="benchmarks/results/h200-kernel-tuning-exact.json")
copies("copies_fresh")
copies("copies_fresh2")
eng = m.engine(12 << 30, cpu_experts="off", **opts)
eng.generate(warm, max_new_tokens=4); eng.generate(p1024, max_new_tokens=2); eng.generate(main, max_new_tokens=128)
eng.reset_cache(); copies("copies_after_off_decode"); ttft(eng, p1024, "ttft_off")
eng.cache.synchronize(); eng.runtime.close(); del eng; m.detach()
# the CPU reads every expert once (as the CPU road does, but all of them)
t = time.perf_counter(); acc = 0
for k in keys:
    acc += int(st.buffer(*k).view(torch.int64).sum())
log("cpu_read_all_s", round(time.perf_counter() - t, 2))
copies("copies_after_cpu_read")
eng = m.engine(12 << 30, **opts)
eng.generate(warm, max_new_tokens=4); eng.generate(p1024, max_new_tokens=2)
eng.reset_cache(); copies("copies_split_before_decode"); ttft(eng, p1024, "ttft_split_before_decode")
for i in range(3):
    eng.generate(main, max_new_tokens=128)
    eng.reset_cache(); copies(f"copies_after_split_decode{i}"); ttft(eng, p1024, f"ttft_split_after_decode{i}")
eng.cache.synchronize(); eng.runtime.close(); del eng; m.detach()
time.sleep(1.0)
copies("copies_after_close_1s")
