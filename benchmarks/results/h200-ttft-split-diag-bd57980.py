"""Cold TTFT(1024) at 12 GiB: off vs auto, auto after a pause, auto with the split's thread stopped."""
import json, sys, time
import torch
from moe_llm.bench.synthetic import Geometry, SyntheticModel
from moe_llm.bench.protocol import _ttft

model = SyntheticModel(Geometry(), "cuda", experts_bits=2, attn_bits=4, head_bits=4)
p = model.random_prompt(1024, 1024)
main = model.random_prompt(512, 0)
warm = model.random_prompt(32, 1)
out = {}
for mode in ("off", "auto", "all"):
    eng = model.engine(12 << 30, cpu_experts=mode, max_context=1152,
                       kernel_tuning="benchmarks/results/h200-kernel-tuning-exact.json")
    eng.generate(warm, max_new_tokens=4); eng.generate(p, max_new_tokens=2); eng.generate(main, max_new_tokens=128)
    r = {"right_after": [round(_ttft(eng, p)[0], 4) for _ in range(3)]}
    vals = []
    for _ in range(3):
        time.sleep(0.5); vals.append(round(_ttft(eng, p)[0], 4))
    r["after_0.5s"] = vals
    eng.generate(main, max_new_tokens=64)
    r["after_decode"] = [round(_ttft(eng, p)[0], 4) for _ in range(2)]
    if eng.runtime.cpu_road == "split":
        eng.runtime.close()
        r["thread_stopped"] = [round(_ttft(eng, p)[0], 4) for _ in range(3)]
    out[mode] = r
    print(mode, r, flush=True)
    eng.cache.synchronize(); eng.runtime.close(); del eng; model.detach()
json.dump(out, open(sys.argv[1], "w"), indent=1)
