"""The GPU/CPU split of a decode step on CUDA (`experts.split`): missed experts shared with CPU
threads inside the captured step. Greedy tokens must not depend on where an expert ran."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


# hidden 256, intermediate 512: bit planes wide enough for the GPU kernels' 32-column activation
# blocks, which the CPU kernel uses (the default tiny shapes refuse the split)
WIDE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 32}


@pytest.mark.parametrize("bits", [2, 3])
def test_tokens_do_not_depend_on_the_cpu_road(tmp_path, bits):
    import moe_llm
    from moe_llm.tiny import make_tiny

    path = make_tiny(tmp_path / "m", "mixtral", seed=4, layers=4, overrides=WIDE)
    runs = {}
    for mode in ("off", "auto", "all"):
        for graphs in (True, False):
            engine = moe_llm.load(path, device="cuda", experts_bits=bits, attn_bits=4, cache_per_layer=2,
                                  cpu_experts=mode, cuda_graphs=graphs)  # fmt: skip
            assert engine.runtime.device_dispatch
            assert engine.runtime.cpu_road == ("off" if mode == "off" else "split")
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


def test_tokens_do_not_depend_on_where_the_auto_search_moves(tmp_path, monkeypatch):
    """'auto' starts from a CPU road far too slow (the CPU takes nothing) and its search times
    windows of one lone step: it tries other tables every few steps while the request decodes
    (rewritten in place under the captured steps, with a step run ahead), and the tokens stay
    those of 'off'."""
    import moe_llm
    from moe_llm.experts import roads as roads_mod
    from moe_llm.experts import split as split_mod
    from moe_llm.experts import take_search
    from moe_llm.tiny import make_tiny

    path = make_tiny(tmp_path / "m", "mixtral", seed=4, layers=4, overrides=WIDE)
    opts = dict(device="cuda", experts_bits=2, attn_bits=4, cache_per_layer=2)
    off = moe_llm.load(path, cpu_experts="off", **opts)
    want = off.generate(PROMPT, max_new_tokens=24).token_ids
    off.runtime.close()
    slow = roads_mod.Roads(gpu_hbm=1e12, zero_copy=1e6, cpu=1e2, handoff_s=0.0)
    monkeypatch.setattr(split_mod, "road_rates", lambda: slow)
    monkeypatch.setattr(take_search, "WINDOW", 1)
    monkeypatch.setattr(take_search, "REST", 1)
    engine = moe_llm.load(path, cpu_experts="auto", **opts)
    assert engine.runtime.split_take["take"] == [0, 0, 0]
    got = engine.generate(PROMPT, max_new_tokens=24).token_ids
    search = engine.runtime._split.search
    engine.runtime.close()
    assert len(search.tables) == 2  # no CPU share, or all of every miss
    assert search.windows >= 16 and {i for i, _ in search.log} == {0, 1}, search.log
    assert got == want


def test_narrow_shapes_refuse_the_split(tmp_path):
    """The default tiny shapes make the GPU quantize activations in blocks of 16 columns: 'all'
    would change the tokens, so it is refused in one line, and 'auto' keeps misses on the GPU."""
    import moe_llm
    from moe_llm.errors import ConfigError
    from moe_llm.tiny import make_tiny

    path = make_tiny(tmp_path / "m", "mixtral", seed=4, layers=2)
    with pytest.raises(ConfigError, match="cpu_experts='all'"):
        moe_llm.load(path, device="cuda", experts_bits=2, cache_per_layer=2, cpu_experts="all")
    engine = moe_llm.load(path, device="cuda", experts_bits=2, cache_per_layer=2, cpu_experts="auto")
    assert engine.runtime.cpu_road == "off"


def _missed_experts(bits: int, n: int):
    """n random Mixtral-shaped experts of layer 0 in pinned host RAM, every table entry pointing
    there (all misses): (format, generator, store, slot pool, table row)."""
    import torch

    from moe_llm.bench.synthetic import random_expert
    from moe_llm.experts.format import ExpertFormat
    from moe_llm.experts.store import ExpertStore

    fmt = ExpertFormat.build(4096, 14336, bits, torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(bits)
    store = ExpertStore(fmt, [0], n, pin=True)
    for e in range(n):
        store.put_raw(0, e, random_expert(fmt, "cuda", gen))
    pool = torch.empty(1, fmt.nbytes, dtype=torch.uint8, device="cuda")
    host = torch.tensor([store.address(0, e) - pool.data_ptr() for e in range(n)], dtype=torch.int64, device="cuda")
    return fmt, gen, store, pool, host


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gpu_expert_is_the_cpu_expert_to_the_bit(bits):
    """At Mixtral shapes: each routed expert's float64 down sums from the GPU kernels (K-partials
    added) equal the CPU kernel's for the same x, bit for bit; so do the layer outputs of the two
    roads (test_split_dispatch_equals_the_gpu_alone)."""
    import torch

    from moe_llm.experts.split import expert_share
    from moe_llm.kernels.triton_moe import MoeDecode

    fmt, gen, store, pool, host = _missed_experts(bits, 3)
    run = MoeDecode(fmt, 2, torch.device("cuda"))
    assert run.matches_cpu
    x = (torch.randn(4096, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    idx = torch.tensor([2, 0], device="cuda")
    out = torch.empty(4096, dtype=torch.bfloat16, device="cuda")
    run(x, idx, torch.tensor([0.6, 0.4], device="cuda"), host, pool, out)
    torch.cuda.synchronize()
    assert run.part.dtype == torch.float64
    for j, e in enumerate((2, 0)):
        gpu = run.part[j].sum(dim=0).cpu()  # exact: multiples of 2^-32 far below 2^53
        cpu = expert_share(store.buffer(0, e), fmt, x.float().cpu(), 0, run.plane_bytes)
        assert torch.equal(gpu, cpu), (j, float((gpu - cpu).abs().max()))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("take", ["half", "all"])
def test_split_dispatch_equals_the_gpu_alone(bits, take):
    """One layer's routed experts through the mailbox (both missed): the CPU's share plus the
    GPU's rest equals the GPU computing all of it, bit for bit."""
    from types import SimpleNamespace

    import torch

    from moe_llm.experts.split import CpuSplit
    from moe_llm.kernels.triton_moe import MoeDecode

    fmt, gen, store, pool, host = _missed_experts(bits, 4)
    run = MoeDecode(fmt, 2, torch.device("cuda"))
    pd = run.plane_bytes
    cut = pd if take == "all" else (pd // 2) // run.cut_align * run.cut_align
    cache = SimpleNamespace(layers=[0], device=torch.device("cuda"), num_experts=4, store=store)
    split = CpuSplit(cache, fmt, 2, pd, [[0, cut, cut]])
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
        assert torch.equal(shared, alone)
    finally:
        split.close()


@pytest.mark.parametrize("mode", ["off", "all"])
def test_one_slot_for_every_layer_gives_the_tokens_of_every_slot(tmp_path, mode):
    """A budget with room for one expert slot in all (floor 0, the --cpu-moe regime): the prompt
    recycles the slot, decode reads every other expert in place or on the CPU; the tokens are
    those of a slot for every expert."""
    import moe_llm
    from moe_llm.tiny import make_tiny

    path = make_tiny(tmp_path / "m", "mixtral", seed=4, layers=4, overrides=WIDE)
    full = moe_llm.load(path, device="cuda", experts_bits=2, attn_bits=4, cache_per_layer=8)
    want = full.generate(PROMPT, max_new_tokens=24).token_ids
    p = full.plan
    budget = p.trunk_bytes + p.kv_bytes + p.workspace_bytes + p.expert_bytes
    del full
    engine = moe_llm.load(path, device="cuda", experts_bits=2, attn_bits=4, gpu_budget=budget, cpu_experts=mode)
    assert engine.plan.slots == 1 and engine.plan.floor == 0 and engine.runtime.device_dispatch
    assert engine.generate(PROMPT, max_new_tokens=24).token_ids == want
    assert engine.stats.host_syncs_per_token == 0
    engine.runtime.close()


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("take", ["half", "all"])
def test_batched_rows_share_misses_with_the_cpu_to_the_bit(bits, take):
    """Three decoded rows, every expert missed, two rows on one expert: through the mailbox
    (the CPU computes its share of each missed position against its own row) the rows equal
    the GPU reading every miss, and each row equals its lone call, bit for bit."""
    from types import SimpleNamespace

    import torch

    from moe_llm.experts.split import CpuSplit
    from moe_llm.kernels.triton_moe import MoeDecode

    fmt, gen, store, pool, host = _missed_experts(bits, 4)
    run = MoeDecode(fmt, 2, torch.device("cuda"))
    pd = run.plane_bytes
    cut = pd if take == "all" else (pd // 2) // run.cut_align * run.cut_align
    cache = SimpleNamespace(layers=[0], device=torch.device("cuda"), num_experts=4, store=store)
    split = CpuSplit(cache, fmt, 2, pd, [[0] + [cut] * (2 * b) for b in range(1, 5)])  # the CPU takes `cut`
    try:
        x = (torch.randn(3, 4096, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
        idx = torch.tensor([[3, 1], [1, 0], [2, 3]], device="cuda")
        w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]], device="cuda")
        gpu = run.rows(x, idx, w, host, pool)
        shared = run.rows(x, idx, w, host, pool, split.row(0))
        torch.cuda.synchronize()
        assert split.stats()["cpu_expert_calls"] == 4  # each missed expert once, for all its rows
        assert torch.equal(shared, gpu)
        for b in range(3):
            alone = torch.empty(4096, dtype=torch.bfloat16, device="cuda")
            run(x[b], idx[b], w[b], host, pool, alone)
            torch.cuda.synchronize()
            assert torch.equal(shared[b], alone), b
    finally:
        split.close()


@pytest.mark.parametrize("mode", ["auto", "all"])
def test_batched_requests_with_the_cpu_road_give_their_lone_tokens(tmp_path, mode):
    """Three concurrent requests decoded in one fused step (a CUDA graph) with two slots per
    layer: the CPU road computes shares of the batch's misses, and every request's greedy tokens
    are those it gets alone with the CPU road off."""
    from serve_helpers import interleaved

    import moe_llm
    from moe_llm.tiny import make_tiny

    path = make_tiny(tmp_path / "m", "mixtral", seed=4, layers=4, overrides=WIDE)
    prompts = [PROMPT, "def parse_args(argv):" * 3, "Experts live in host memory"]
    opts = dict(device="cuda", experts_bits=2, attn_bits=4, cache_per_layer=2, prefill_chunk=16, batch_mode="fused")
    off = moe_llm.load(path, cpu_experts="off", **opts)
    alone = [off.generate(p, max_new_tokens=16).token_ids for p in prompts]
    off.runtime.close()
    engine = moe_llm.load(path, cpu_experts=mode, **opts)
    assert engine.runtime.cpu_road == "split"
    before = engine.stats.cpu_expert_calls
    assert interleaved(engine, prompts, 16) == alone
    assert engine.batcher.counters.batched_rows > 0
    graph = engine.batcher._fused.graph
    assert graph is not None and graph.replays > 0
    if mode == "all":
        assert engine.stats.cpu_expert_calls > before
    engine.runtime.close()
