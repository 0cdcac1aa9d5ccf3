"""The GPU/CPU split of a decode step on CUDA (`experts.split`): missed experts shared with CPU
threads inside the captured step. Greedy tokens must not depend on where an expert ran."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


@pytest.mark.xfail(
    reason="on the H200 (2026-12-02) 'all' diverged from 'off' at the 5th token of a tiny 2-bit model; "
    "not yet known whether float summation order or a fault in the split (see "
    "test_split_dispatch_equals_the_gpu_alone): why 'auto' keeps misses on the GPU for now",
    strict=False,
)
@pytest.mark.parametrize("bits", [2, 3])
def test_tokens_do_not_depend_on_the_cpu_road(tmp_path, bits):
    import moe_llm
    from moe_llm.tiny import make_tiny

    path = make_tiny(tmp_path / "m", "mixtral", seed=4, layers=4)
    runs = {}
    for mode in ("off", "auto", "all"):
        for graphs in (True, False):
            engine = moe_llm.load(path, device="cuda", experts_bits=bits, attn_bits=4, cache_per_layer=2,
                                  cpu_experts=mode, cuda_graphs=graphs)  # fmt: skip
            assert engine.runtime.device_dispatch
            assert engine.runtime.cpu_road == ("split" if mode == "all" else "off")
            r = engine.generate(PROMPT, max_new_tokens=24)
            s = engine.stats
            runs[mode, graphs] = r.token_ids
            assert s.host_syncs_per_token == 0
            if mode == "all":
                assert s.cpu_expert_calls > 0 and s.cpu_expert_bytes > 0
            if mode == "off":
                assert s.cpu_expert_calls == 0
            engine.runtime.close()
    assert len({tuple(t) for t in runs.values()}) == 1, runs


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("take", ["half", "all"])
def test_split_dispatch_equals_the_gpu_alone(bits, take):
    """One layer's routed experts through the mailbox (both missed): the CPU's share plus the
    GPU's rest equals the GPU computing all of it, to float rounding (same int8 blocks)."""
    from types import SimpleNamespace

    import torch

    from moe_llm.bench.synthetic import random_expert
    from moe_llm.experts.format import ExpertFormat
    from moe_llm.experts.split import CpuSplit
    from moe_llm.experts.store import ExpertStore
    from moe_llm.kernels.triton_moe import MoeDecode

    fmt = ExpertFormat.build(4096, 14336, bits, torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(bits)
    store = ExpertStore(fmt, [0], 4, pin=True)
    for e in range(4):
        store.put_raw(0, e, random_expert(fmt, "cuda", gen))
    pool = torch.empty(1, fmt.nbytes, dtype=torch.uint8, device="cuda")
    host = torch.tensor([store.address(0, e) - pool.data_ptr() for e in range(4)], dtype=torch.int64, device="cuda")
    run = MoeDecode(fmt, 2, torch.device("cuda"))
    pd = run.plane_bytes
    cut = pd if take == "all" else (pd // 2) // run.cut_align * run.cut_align
    cache = SimpleNamespace(layers=[0], device=torch.device("cuda"), num_experts=4, store=store)
    split = CpuSplit(cache, fmt, 2, pd, [0, cut, cut])
    try:
        x = (torch.randn(4096, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
        idx = torch.tensor([3, 1], device="cuda")
        w = torch.tensor([0.7, 0.3], device="cuda")
        alone = torch.empty(4096, dtype=torch.bfloat16, device="cuda")
        run(x, idx, w, host, pool, alone)
        shared = torch.empty_like(alone)
        run(x, idx, w, host, pool, shared, split.row(0))
        torch.cuda.synchronize()
        assert split.stats()["cpu_expert_calls"] == 2
        assert float((shared.float() - alone.float()).norm() / alone.float().norm()) < 1e-2
    finally:
        split.close()
