"""The CPU side of the GPU/CPU decode split (`experts.split`, `experts/cpu/split_loop.c`):
the CPU share of an expert (intermediate neurons i % PD >= cut) computed from the host buffer,
checked against an exact model of its int8 arithmetic; the whole share equals the CPU expert
kernel bit for bit; the cost model's take table."""

from __future__ import annotations

import threading

import exact_expert
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_llm.experts import cpu
from moe_llm.experts.format import ExpertFormat, matrix_views
from moe_llm.experts.roads import Roads, predicted_layer_s, take_table
from moe_llm.experts.split import expert_share
from moe_llm.quant import compact, packing


def _expert(fmt: ExpertFormat, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(2 * fmt.intermediate, fmt.hidden, generator=gen) * 0.05
    down = torch.randn(fmt.hidden, fmt.intermediate, generator=gen) * 0.05
    buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    fmt.layout.write(buf, fmt.encode(gate_up, down))
    return buf


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for j in range(0, x.shape[-1], 32):
        blk = x[..., j : j + 32]
        amax = blk.abs().amax(dim=-1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        out[..., j : j + 32] = torch.round(blk * inv) * (amax / 127.0)
    return out


def _dense(views, fmt, name) -> torch.Tensor:
    spec = fmt.specs[name]
    t = matrix_views(views, name)
    codes = packing.unpack(t["q"], spec.bits, spec.in_features).double()
    scale, zero = compact.expand_meta(t["scale_q"], t["zero_q"], t["meta"], spec)
    g = spec.group_size
    return (codes - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)


def _model_share(buf, fmt, x, cut, pd) -> torch.Tensor:
    """float64 model of the kernel's int8 arithmetic, h zero outside the share."""
    views = fmt.layout.views(buf)
    gate, up = (_dense(views, fmt, "gate_up_proj") @ _int8_blocks(x.double())).chunk(2)
    h = F.silu(gate) * up
    keep = (torch.arange(fmt.intermediate) % pd) >= cut
    h = torch.where(keep, h, torch.zeros_like(h))
    return _dense(views, fmt, "down_proj") @ _int8_blocks(h.float()).double()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_share_is_the_exact_model_and_shares_add_up_to_the_bit(bits):
    """The CPU's share of an expert is the exact model's sum over its neurons, in float64; with
    the GPU's complement (the same model over the other neurons) it adds up to the whole expert
    exactly, and rounds to the bits the CPU kernel gives for the whole."""
    fmt = ExpertFormat.build(256, 512, bits, torch.float32)
    buf = _expert(fmt, bits)
    x = torch.randn(256, generator=torch.Generator().manual_seed(7))
    pd = {2: 128, 3: 128, 4: 256}[bits]  # bytes of the main plane of down_proj (I/4, I/4, I/2)
    whole = exact_expert.expert(buf, fmt, x)
    assert (torch.from_numpy(whole) - _model_share(buf, fmt, x, 0, pd)).norm() / _model_share(
        buf, fmt, x, 0, pd
    ).norm() < 1e-4
    neuron = np.arange(fmt.intermediate) % pd
    for cut in (0, 32, 64, pd - 32):
        got = expert_share(buf, fmt, x, cut, pd)
        assert got.dtype == torch.float64
        assert np.array_equal(got.numpy(), exact_expert.expert(buf, fmt, x, keep=neuron >= cut))
        rest = exact_expert.expert(buf, fmt, x, keep=neuron < cut)  # what the GPU computes
        assert np.array_equal(got.numpy() + rest, whole)
    assert torch.equal(expert_share(buf, fmt, x, pd, pd), torch.zeros(256, dtype=torch.float64))  # cut = PD


@pytest.mark.parametrize(("bits", "inter"), [(2, 4096), (4, 2048), (3, 4096), (3, 2048)])
def test_shares_over_runs_of_blocks_are_the_exact_model(bits, inter):
    """down_proj planes of whole runs of blocks take the transposing path, 3-bit rows read packed
    (their 1-bit planes halves of the 2-bit ones: a cut skips each differently); a cut inside a
    run leaves its head to the per-plane path or to zero activations: every share is still the
    exact model's, and reads only from the run it starts in."""
    fmt = ExpertFormat.build(512, inter, bits, torch.float32)
    buf = _expert(fmt, 20 + bits)
    x = torch.randn(512, generator=torch.Generator().manual_seed(9))
    pd = inter // 2 if bits == 4 else inter // 4  # bytes of down_proj's main plane
    neuron = np.arange(fmt.intermediate) % pd
    for cut in (0, 96, pd // 2 + 96, pd - 32):
        got = expert_share(buf, fmt, x, cut, pd, threads=2)
        assert np.array_equal(got.numpy(), exact_expert.expert(buf, fmt, x, keep=neuron >= cut)), cut


@pytest.mark.parametrize(
    ("bits", "inter", "pd", "cuts"), [(2, 512, 128, (8, 40, 100)), (2, 64, 16, (4, 12)), (3, 64, 16, (4, 12))]
)
def test_shares_cut_inside_a_block_are_the_exact_model(bits, inter, pd, cuts):
    """Each gate_up item is one block of 32 neurons of h: a cut inside a block, or planes shorter
    than a block (one block then holds the share's neurons of two planes), leave the block's
    other neurons zero."""
    fmt = ExpertFormat.build(256, inter, bits, torch.float32)
    buf = _expert(fmt, 30 + inter)
    x = torch.randn(256, generator=torch.Generator().manual_seed(11))
    neuron = np.arange(fmt.intermediate) % pd
    for cut in cuts:
        got = expert_share(buf, fmt, x, cut, pd, threads=2)
        assert np.array_equal(got.numpy(), exact_expert.expert(buf, fmt, x, keep=neuron >= cut)), cut


@pytest.mark.parametrize("bits", [2, 3])
def test_whole_share_equals_the_cpu_expert_kernel(bits):
    fmt = ExpertFormat.build(256, 512, bits, torch.float32)
    buf = _expert(fmt, 10 + bits)
    x = torch.randn(256, generator=torch.Generator().manual_seed(3))
    a = expert_share(buf, fmt, x, 0, 128, threads=2)
    b = cpu.expert_mlp(x[None], buf, fmt, threads=1)[0]
    assert torch.equal(a.float(), b)


def test_take_table_balances_the_two_roads():
    roads = Roads(gpu_hbm=1.1e12, zero_copy=36e9, cpu=40e9)
    pd, align, nbytes = 3584, 256, 55_738_368
    auto = take_table("auto", 2, pd, align, roads, nbytes, 3)
    assert auto[0] == 0 and all(t % align == 0 and 0 < t < pd for t in auto[1:])
    assert take_table("all", 2, pd, align, roads, nbytes, 3) == [0, pd, pd]
    for m in (1, 2):  # the modelled layer time is no worse than either road alone
        t = predicted_layer_s(m, 2, auto[m], pd, roads, nbytes, 3)
        assert t <= predicted_layer_s(m, 2, 0, pd, roads, nbytes, 3)
        assert t <= predicted_layer_s(m, 2, pd, pd, roads, nbytes, 3)
    slow_cpu = take_table("auto", 2, pd, align, Roads(1.1e12, 36e9, 1e9), nbytes, 3)
    assert slow_cpu[1] < auto[1]


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
@pytest.mark.parametrize("bits", [2, 4])
def test_tokens_do_not_depend_on_cpu_experts(tiny_dirs, family, bits):
    """CPU machine: 'off' is the torch path, 'auto' and 'all' the CPU kernel; same tokens."""
    import moe_llm

    runs = {}
    for mode in ("off", "auto", "all"):
        engine = moe_llm.load(tiny_dirs[family], experts_bits=bits, cache_per_layer=2, cpu_experts=mode)
        res = engine.generate("Experts live in host memory", max_new_tokens=16)
        runs[mode] = (res.token_ids, engine.stats.cpu_expert_calls, engine.runtime.cpu_road)
    assert runs["off"][0] == runs["auto"][0] == runs["all"][0]
    assert runs["off"][1:] == (0, "off")
    assert runs["auto"][1] > 0 and runs["auto"][2] == runs["all"][2] == "cpu"


def test_cpu_experts_option_is_checked(tiny_dirs):
    import moe_llm
    from moe_llm.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu_experts"):
        moe_llm.load(tiny_dirs["mixtral"], experts_bits=2, cpu_experts="sometimes")


def _serve(split, r: int, ids: list[int], cuts: list[int], toks: list[int], xs: torch.Tensor) -> torch.Tensor:
    """Publish positions (ids, cuts, the hidden state each reads) and hidden states xs [T, H]
    into mailbox row r as the GPU would, raise its flag, wait for `done`: the y rows [n, H]."""
    import time

    box = split.box
    head, x, y = box.views(r)
    P = box.positions
    n = len(ids)
    head[0] = n
    head[1 : 1 + n] = torch.tensor(ids, dtype=torch.int32)
    head[1 + P : 1 + P + n] = torch.tensor(cuts, dtype=torch.int32)
    head[1 + 2 * P : 1 + 2 * P + n] = torch.tensor(toks, dtype=torch.int32)
    x[: xs.shape[0]] = xs
    done = box.buf[box.done(r) - box.base :][:4].view(torch.int32)
    flag = box.buf[box.flag(r) - box.base :][:4].view(torch.int32)
    flag[0] = 1
    deadline = time.monotonic() + 10
    while int(done[0]) != 1:
        assert time.monotonic() < deadline, "the serving thread did not answer"
        time.sleep(1e-4)
    done[0] = 0
    return y[:n]


def _split_over(fmt, layers: int, experts: int, takes, threads: int = 2, search=None):
    from types import SimpleNamespace

    from moe_llm.experts import ExpertStore
    from moe_llm.experts.split import CpuSplit

    store = ExpertStore(fmt, list(range(layers)), experts)
    for layer in range(layers):
        for e in range(experts):
            store.put_raw(layer, e, _expert(fmt, 100 + experts * layer + e))
    cache = SimpleNamespace(layers=list(range(layers)), device=torch.device("cpu"), num_experts=experts, store=store)
    return store, CpuSplit(cache, fmt, 2, 128, takes, threads=threads, ops=object(), search=search)


def test_serving_thread_answers_the_mailbox_in_any_row_order():
    """The C serving loop of the split, driven from Python as the GPU would drive it: routed
    ids, cuts and x into a row, its flag raised; the thread writes the CPU shares and `done`."""
    fmt = ExpertFormat.build(256, 512, 2, torch.float32)
    store, split = _split_over(fmt, 3, 4, [[0, 64, 128]])
    try:
        for r, (ids, cuts) in ((1, ([2, 3], [64, 128])), (0, ([1, 0], [0, 32])), (2, ([3, 3], [128, 128]))):
            x = torch.randn(256, generator=torch.Generator().manual_seed(r))
            y = _serve(split, r, ids, cuts, [0, 0], x[None])
            for j, (e, cut) in enumerate(zip(ids, cuts, strict=True)):
                if cut < 128:
                    assert torch.equal(y[j], expert_share(store.buffer(r, e), fmt, x, cut, 128, threads=1))
        stats = split.stats()
        assert stats["cpu_expert_calls"] == 3 and stats["cpu_expert_bytes"] > 0
    finally:
        split.close()
    assert not split._thread.is_alive()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_serving_thread_computes_each_batched_position_on_its_own_row(bits):
    """A step of three batched rows publishes six positions and three hidden states: each missed
    position's share is computed against its own row's x, as that row's lone step would, and
    the positions of one expert with one cut in one call (the expert read once); a position
    past the published count, or with a hit's cut, is left alone."""
    fmt = ExpertFormat.build(256, 512, bits, torch.float32)
    store, split = _split_over(fmt, 2, 4, [[0, 64, 128], [0] * 5, [0] * 7])
    try:
        assert split.box.positions == 6 and split.box.tokens == 3
        assert split.row(0).fits(3) and not split.row(0).fits(4)
        xs = torch.randn(3, 256, generator=torch.Generator().manual_seed(5))
        # expert 1: rows 0 and 1, one cut (one call); expert 2: row 0 a hit, row 2 a miss; expert 3:
        # rows 1 and 2 with two cuts (two calls)
        ids, cuts, toks = [1, 2, 1, 3, 3, 2], [0, 128, 0, 32, 64, 0], [0, 0, 1, 1, 2, 2]
        y = _serve(split, 1, ids, cuts, toks, xs).clone()
        for j, (e, cut, t) in enumerate(zip(ids, cuts, toks, strict=True)):
            if cut < 128:
                assert torch.equal(y[j], expert_share(store.buffer(1, e), fmt, xs[t], cut, 128, threads=1)), j
        assert split.stats()["cpu_expert_calls"] == 4
        before = y[1].clone()
        _serve(split, 1, ids[:3], cuts[:3], toks[:3], xs)  # n = 3: expert 1's two positions, in one call
        assert split.stats()["cpu_expert_calls"] == 5
        assert torch.equal(split.box.views(1)[2][1], before)  # the hit's row is not written
    finally:
        split.close()


def test_serving_thread_computes_more_missed_experts_than_one_job_holds():
    """Three rows routed to six distinct experts, each with its own cut: the loop computes them in
    jobs of a few experts (each expert's gate_up, then its down, on a shared team) and every
    position equals its expert's share computed alone."""
    fmt = ExpertFormat.build(256, 512, 2, torch.float32)
    store, split = _split_over(fmt, 1, 8, [[0, 64, 128], [0] * 5, [0] * 7], threads=3)
    try:
        xs = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
        ids, cuts, toks = [7, 1, 2, 5, 4, 6], [0, 32, 64, 96, 0, 32], [0, 0, 1, 1, 2, 2]
        y = _serve(split, 0, ids, cuts, toks, xs).clone()
        for j, (e, cut, t) in enumerate(zip(ids, cuts, toks, strict=True)):
            assert torch.equal(y[j], expert_share(store.buffer(0, e), fmt, xs[t], cut, 128, threads=1)), j
        assert split.stats()["cpu_expert_calls"] == 6
    finally:
        split.close()


def test_auto_tables_move_in_place_with_the_measured_step_times(monkeypatch):
    """'auto' starts at the cost model's tables; the lone steps' times say a larger CPU share
    is faster (a host whose roads share its RAM); the search's next tables are written over the
    device table in place (captured steps hold its address), and the serving thread still
    answers with them."""
    from moe_llm.experts import take_search
    from moe_llm.experts.roads import TakeModel

    monkeypatch.setattr(take_search, "WINDOW", 2)
    fmt = ExpertFormat.build(256, 512, 2, torch.float32)
    model = TakeModel("auto", 2, 128, 32, fmt.nbytes, 2, 1)
    roads = Roads(gpu_hbm=1e12, zero_copy=1e9, cpu=1e9, handoff_s=0.0)
    search = take_search.TakeSearch(model, roads)
    start = search.at
    store, split = _split_over(fmt, 2, 4, search.current, search=search)
    try:
        table, addr = split.takes, split.takes.data_ptr()
        assert split.take == model.tables(roads)[0]
        for seconds in (0.02, 0.02):  # the start's window: then a trial of more CPU share
            split.step_time(seconds)
        assert search.at == start + 1 and split.take == search.tables[start + 1][0]
        for seconds in (0.01, 0.01):  # faster: the start is timed again, to confirm it
            split.step_time(seconds)
        assert search.best == start and search.at == start and split.take == search.tables[start][0]
        for seconds in (0.02, 0.02):  # still slower: the trial wins, and the next one goes further
            split.step_time(seconds)
        assert search.best == start + 1 and search.at > start + 1
        assert split.takes is table and split.takes.data_ptr() == addr
        assert split.takes[1, :3].tolist() == search.current[0] == split.take
        assert split.search_report() == {"ladder_index": search.at, "ladder": len(search.tables),
                                         "best": start + 1, "windows": 3}  # fmt: skip
        xs = torch.randn(1, 256, generator=torch.Generator().manual_seed(9))
        y = _serve(split, 1, [0, 3], [32, 32], [0, 0], xs)
        assert torch.equal(y[0], expert_share(store.buffer(1, 0), fmt, xs[0], 32, 128, threads=1))
    finally:
        split.close()


def test_an_idle_serving_thread_parks_and_still_answers():
    """Between requests the serving thread and its team stop spinning: over half a second of
    idling, after 0.3 s without a flag, the process uses under a tenth of a core (the team sleeps,
    the thread naps a millisecond at a time); the next request is answered with the right rows."""
    import time

    fmt = ExpertFormat.build(256, 512, 2, torch.float32)
    store, split = _split_over(fmt, 2, 4, [[0, 64, 64]])
    try:
        x = torch.randn(256, generator=torch.Generator().manual_seed(3))
        _serve(split, 0, [1, 2], [64, 64], [0, 0], x[None])
        time.sleep(0.3)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(0.5)
        busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        assert busy < 0.1, f"idle split used {busy:.2f} cores"
        y = _serve(split, 1, [3, 0], [64, 128], [0, 0], x[None])
        assert torch.equal(y[0], expert_share(store.buffer(1, 3), fmt, x, 64, 128, threads=1))
    finally:
        split.close()
    assert not split._thread.is_alive()


def test_a_serving_thread_that_cannot_start_is_an_error_not_a_hang():
    """A serving loop that stops at start (here: more threads than the loop's team allows; an
    allocation that fails takes the same path) raises SplitUnavailable from the constructor, so
    the engine falls back or reports it before any GPU step could wait on the loop; no thread is
    left behind. The same constructor with a sane count serves."""
    from moe_llm.experts.split import SplitUnavailable

    fmt = ExpertFormat.build(256, 512, 2, torch.float32)
    before = threading.active_count()
    with pytest.raises(SplitUnavailable, match="count out of range"):
        _split_over(fmt, 1, 2, [[0, 64, 128]], threads=5000)
    assert threading.active_count() == before
    store, split = _split_over(fmt, 1, 2, [[0, 64, 128]])
    try:
        x = torch.randn(256, generator=torch.Generator().manual_seed(9))
        y = _serve(split, 0, [1, 0], [64, 128], [0, 0], x[None])
        assert torch.equal(y[0], expert_share(store.buffer(0, 1), fmt, x, 64, 128, threads=1))
    finally:
        split.close()
