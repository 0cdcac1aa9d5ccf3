"""Perplexity windows, LRU and prefetch-recall math, routing traces, and the two CLI commands (tiny model)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_llm.cli import main
from moe_llm.eval.evaluate import (
    evenly_spaced,
    lru_hit_rate,
    perplexity,
    prefetch_recall,
    routing_report,
    tokenize_text,
    trace_routing,
    window_spans,
)

TEXT = (
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n"
    "        self.x = x\n        self.y = y\n"
) * 6


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (10, 4, 4), (3, 8, 4), (100, 16, 5), (2, 2, 1), (37, 9, 9)])
def test_window_spans_score_every_position_once_with_context(n, window, stride):
    scored = []
    for begin, end, first in window_spans(n, window, stride):
        assert begin < first <= end <= n and end - begin <= window  # the first target has context
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_window_spans_reject_bad_arguments():
    with pytest.raises(ValueError):
        window_spans(10, 1, 1)
    with pytest.raises(ValueError):
        window_spans(10, 4, 5)


def test_evenly_spaced_picks_a_spread_sample():
    assert evenly_spaced(list(range(10)), None) == list(range(10))
    assert evenly_spaced(list(range(10)), 20) == list(range(10))
    assert evenly_spaced(list(range(10)), 5) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError):
        evenly_spaced([1, 2], 0)


def test_lru_hit_rate_on_known_sequences():
    same = torch.tensor([[0, 1]] * 5)
    assert lru_hit_rate(same, 2) == pytest.approx(8 / 10)  # only the first token misses
    assert lru_hit_rate(same, 1) == pytest.approx(4 / 10)  # one slot holds the last expert loaded
    cycle = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert lru_hit_rate(cycle, 2) == 0.0  # LRU thrashes on a cycle longer than the cache
    assert lru_hit_rate(cycle, 4) == pytest.approx(4 / 8)
    # hits are moved to the front: [0,1] then [1,2] keeps 1 and evicts 0 with capacity 2
    assert lru_hit_rate(torch.tensor([[0, 1], [1, 2], [1, 0]]), 2) == pytest.approx(2 / 6)


def test_prefetch_recall_counts_routed_experts_found_in_the_guess():
    routed = torch.tensor([[0, 1], [2, 3]])
    guesses = torch.tensor([[1, 5, 0, 7], [4, 5, 6, 2]])
    assert prefetch_recall(guesses, routed, 1) == pytest.approx(1 / 4)
    assert prefetch_recall(guesses, routed, 3) == pytest.approx(2 / 4)
    assert prefetch_recall(guesses, routed, 4) == pytest.approx(3 / 4)


def test_perplexity_matches_transformers_on_one_window(tiny_engine, tiny_mixtral):
    from transformers import AutoModelForCausalLM

    ids = tokenize_text(tiny_engine, TEXT)[:200]
    got = perplexity(tiny_engine, ids, window=256, stride=128)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    with torch.no_grad():
        loss = ref_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert got.tokens == len(ids) - 1
    assert got.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_sliding_windows_see_less_context_than_one_pass(tiny_engine):
    ids = tokenize_text(tiny_engine, TEXT)
    full = perplexity(tiny_engine, ids, window=len(ids), stride=len(ids))
    slid = perplexity(tiny_engine, ids, window=32, stride=16)
    assert full.tokens == slid.tokens == len(ids) - 1
    assert slid.perplexity != pytest.approx(full.perplexity, rel=1e-6)
    sample = perplexity(tiny_engine, ids, window=32, stride=16, max_windows=3)
    assert 0 < sample.tokens < slid.tokens


def test_trace_records_every_token_and_full_guesses_have_full_recall(tiny_dirs):
    import moe_llm

    engine = moe_llm.load(tiny_dirs["mixtral"], device="cpu")  # 2 MoE layers
    ids = tokenize_text(engine, TEXT)
    trace = trace_routing(engine, ids, window=64, ahead=(1,), max_guesses=8)
    assert trace.tokens == len(ids)
    assert trace.routed_ids(0).shape == (len(ids), 2)
    assert trace.guess_ids(0, 1).shape == (len(ids), 8)
    routed = trace.routed_ids(1)
    recalls = [prefetch_recall(trace.guess_ids(0, 1), routed, n) for n in range(1, 9)]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # guessing every expert finds every one
    report = routing_report(trace, counts=(1, 2, 3, 4))
    assert report["cache_sizes"] == [1, 2, 3, 4, 5, 6, 7]
    assert report["lru_hit_rate"] == sorted(report["lru_hit_rate"])  # LRU is a stack algorithm
    assert set(report["prefetch_recall"]) == {"1"} and len(report["prefetch_recall"]["1"]) == 4


def test_trace_matches_the_router_outputs(tiny_engine):
    """The recorded experts are the trunk's own top-k (checked against transformers' router on a hook-free pass)."""
    ids = tokenize_text(tiny_engine, TEXT)[:40]
    trace = trace_routing(tiny_engine, ids, window=40)
    layers = tiny_engine.model.model.layers
    seen = {}
    hooks = [
        layers[i].mlp.gate.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[-1].clone()))
        for i in trace.layers
    ]
    try:
        tiny_engine.logits(ids)
    finally:
        for h in hooks:
            h.remove()
    for i in trace.layers:
        assert torch.equal(trace.routed_ids(i).long(), seen[i].long())


def _run_cli(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_perplexity_and_trace_print_json(tiny_mixtral, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code, out, _ = _run_cli(
        ["perplexity", str(tiny_mixtral), str(text), "--window", "64", "--stride", "32", "--json"], capsys
    )
    assert code == 0
    res = json.loads(out)
    assert res["perplexity"] > 1 and res["tokens"] > 50
    code, out, _ = _run_cli(["trace", str(tiny_mixtral), str(text), "--window", "64", "--json"], capsys)
    assert code == 0
    rep = json.loads(out)
    assert len(rep["lru_hit_rate"]) == 7 and all(0 <= h <= 1 for h in rep["lru_hit_rate"])
    assert set(rep["prefetch_recall"]) == {"1"}  # two MoE layers: only one layer ahead exists


@pytest.mark.parametrize(
    "extra,message",
    [(["--stride", "0"], "--stride"), (["--window", "1"], "--window"), (["--max-windows", "0"], "--max-windows")],
)
def test_cli_rejects_bad_options_with_one_line(tiny_mixtral, tmp_path, capsys, extra, message):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code, _, err = _run_cli(["perplexity", str(tiny_mixtral), str(text), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_or_empty_text_file(tiny_mixtral, tmp_path, capsys):
    code, _, err = _run_cli(["trace", str(tiny_mixtral), str(tmp_path / "nope.txt")], capsys)
    assert code == 2 and "not found" in err
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = _run_cli(["perplexity", str(tiny_mixtral), str(tmp_path / "empty.txt")], capsys)
    assert code == 2 and "empty" in err
