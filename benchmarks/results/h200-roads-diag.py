"""As run for benchmarks/results/h200-roads-diag.json (tree 334612a plus nothing; Tuning.max_block_p was
then the one byte-tile width of both GEMVs): python3 h200-roads-diag.py OUT.json"""
import json, sys, threading, time
import torch, triton, triton.language as tl
from moe_llm.bench.synthetic import random_expert
from moe_llm.experts.format import ExpertFormat
from moe_llm.experts.store import ExpertStore
from moe_llm.experts.split import expert_share
from moe_llm.experts.cpu import measure_read_bandwidth
from moe_llm.kernels.triton_moe import MoeDecode, Tuning

res = {}
def log(k, v):
    res[k] = v; print(k, v, flush=True)

H, I, E = 4096, 14336, 16
fmt = ExpertFormat.build(H, I, 2, torch.bfloat16)
gen = torch.Generator("cuda").manual_seed(0)
store = ExpertStore(fmt, [0], E, pin=True)
for e in range(E):
    store.put_raw(0, e, random_expert(fmt, "cuda", gen).cpu())
slots = torch.empty(2, fmt.nbytes, dtype=torch.uint8, device="cuda")
base = slots.data_ptr()
x = torch.randn(H, device="cuda", generator=gen).to(torch.bfloat16)
w = torch.tensor([0.6, 0.4], device="cuda")
out = torch.empty(H, dtype=torch.bfloat16, device="cuda")
host_tab = torch.tensor([store.address(0, e) - base for e in range(E)], dtype=torch.int64, device="cuda")
pairs = [torch.tensor([2 * i, 2 * i + 1], device="cuda") for i in range(4)]  # experts 0..7 for the GPU

def gpu_rate(fn, nbytes, secs=1.5):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    n = 0; t0 = time.perf_counter(); s.record()
    while time.perf_counter() - t0 < secs:
        for _ in range(4):
            fn(n); n += 1
        torch.cuda.synchronize()
    e.record(); torch.cuda.synchronize()
    return n * nbytes / (s.elapsed_time(e) / 1e3) / 1e9

def zc_step(run):
    def f(n=0):
        run(x, pairs[n % 4], w, host_tab, slots, out)
    return f

# 1. zero-copy MoE kernel variants
tunings = {
    "default": Tuning(),
    "exact_file": Tuning.from_file("benchmarks/results/h200-kernel-tuning-exact.json", 2),
}
for bp in (128, 512, 1024):
    tunings[f"bp{bp}"] = Tuning(max_block_p=bp)
for g, d, wp in ((4, 8, 4), (16, 32, 4), (8, 16, 8), (32, 64, 8)):
    tunings[f"bp1024_g{g}_d{d}_w{wp}"] = Tuning(max_block_p=1024, gate_up_rows=g, down_rows=d, gate_up_warps=wp, down_warps=wp)
for name, t in tunings.items():
    try:
        run = MoeDecode(fmt, 2, torch.device("cuda"), t)
        r = gpu_rate(zc_step(run), 2 * fmt.nbytes, 0.8)
        log(f"zc_{name}_GBs", round(r, 1))
    except Exception as exc:
        log(f"zc_{name}_error", str(exc)[:200])

# parts: gate_up only, down only (default tuning)
run = MoeDecode(fmt, 2, torch.device("cuda"), Tuning.from_file("benchmarks/results/h200-kernel-tuning-exact.json", 2))
gu_bytes = sum(s.nbytes for s in fmt.layout.specs if s.name.startswith("gate_up"))
dn_bytes = fmt.nbytes - gu_bytes
log("gate_up_fraction", gu_bytes / fmt.nbytes)
def gu(n=0):
    run._gemv(run._gate_up, x, run._xq, True, pairs[n % 4], host_tab, slots, run.h, None)
def dn(n=0):
    run._gemv(run._down, run.h, run._hq, False, pairs[n % 4], host_tab, slots, run.part, None)
log("zc_gate_up_only_GBs", round(gpu_rate(gu, 2 * gu_bytes, 0.8), 1))
log("zc_down_only_GBs", round(gpu_rate(dn, 2 * dn_bytes, 0.8), 1))

# 2. probe kernel (contiguous reads) over the same host experts
@triton.jit
def _sum_host(base_ptr, out_ptr, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    start = pid * BLOCK * ITERS
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(base_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))

class P:
    def __init__(s, a): s.a = a
    def data_ptr(s): return s.a
    dtype = torch.int32
nw = fmt.nbytes // 4
po = torch.empty(triton.cdiv(nw, 2048 * 16), dtype=torch.int32, device="cuda")
def probe(n=0):
    for j in range(2):
        e = (2 * (n % 4) + j)
        _sum_host[(po.numel(),)](P(store.address(0, e)), po, nw, BLOCK=2048, ITERS=16)
log("probe_contig_GBs", round(gpu_rate(probe, 2 * fmt.nbytes, 0.8), 1))

# copy engine
dst = torch.empty(fmt.nbytes, dtype=torch.uint8, device="cuda")
def copy(n=0):
    dst.copy_(store.buffer(0, n % 8), non_blocking=True)
log("copy_engine_GBs", round(gpu_rate(copy, fmt.nbytes, 0.8), 1))

# 3. CPU alone
xc = torch.randn(H)
pd = run.plane_bytes
stop = threading.Event()
cpu_stat = {}
def cpu_loop(threads):
    n = 0; t0 = time.perf_counter()
    while not stop.is_set():
        expert_share(store.buffer(0, 8 + n % 8), fmt, xc, 0, pd, threads); n += 1
    cpu_stat["GBs"] = n * fmt.nbytes / (time.perf_counter() - t0) / 1e9

for th in (15, 16):
    try:
        log(f"ram_read_{th}t_GBs", round(measure_read_bandwidth(th), 1))
    except Exception as exc:
        log("ram_error", str(exc))
for th in (8, 15):
    stop.clear(); t = threading.Thread(target=cpu_loop, args=(th,)); t.start(); time.sleep(1.5); stop.set(); t.join()
    log(f"cpu_alone_{th}t_GBs", round(cpu_stat["GBs"], 1))

# 4. contention: CPU (15 threads) while GPU zero-copy / probe / copy engine
for gname, fn, nb in (("zc", zc_step(run), 2 * fmt.nbytes), ("probe", probe, 2 * fmt.nbytes), ("copy", copy, fmt.nbytes)):
    stop.clear(); t = threading.Thread(target=cpu_loop, args=(15,)); t.start(); time.sleep(0.2)
    g = gpu_rate(fn, nb, 1.5)
    stop.set(); t.join()
    log(f"both_{gname}_gpu_GBs", round(g, 1)); log(f"both_{gname}_cpu_GBs", round(cpu_stat["GBs"], 1))
# GPU zc while pure RAM read
rb = {}
def rr():
    rb["v"] = measure_read_bandwidth(15, repeats=20)
t = threading.Thread(target=rr); t.start(); time.sleep(0.1)
g = gpu_rate(zc_step(run), 2 * fmt.nbytes, 1.0); t.join()
log("both_zc_ramread_gpu_GBs", round(g, 1)); log("both_zc_ramread_cpu_GBs", round(rb["v"], 1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
