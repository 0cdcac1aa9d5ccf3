"""Generation behaviour: sampling, seeds, stop strings, streaming, chat, finish reasons."""

from __future__ import annotations

import pytest
import torch

from moe_llm.runtime.sampling import sample
from moe_llm.runtime.textstream import TextStream


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, 0.0) == 1


def test_a_vanishing_temperature_samples_the_argmax():
    """A positive temperature so small that logits / t overflows (the fuzzer sent 5e-324) is
    greedy, not an error."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, t, generator=g) == 1 for t in (5e-324, 1e-40, 1e-12))
    assert sample(logits, 5e-324, top_p=0.5, generator=g) == 1
    assert all(sample(logits, 1.0, top_p=p, generator=g) == 1 for p in (3.2e-172, 1e-45, 0.0))  # top_p ~ 0: greedy


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(50)
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, 1.5, top_k=1, generator=g) == int(logits.argmax()) for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_p=0.8, generator=g) for _ in range(200)}
    assert draws <= {0, 1} and draws == {0, 1}


def test_seeded_sampling_is_reproducible(tiny_engine):
    a = tiny_engine.generate("Simple is better", max_new_tokens=12, temperature=1.0, seed=7)
    b = tiny_engine.generate("Simple is better", max_new_tokens=12, temperature=1.0, seed=7)
    c = tiny_engine.generate("Simple is better", max_new_tokens=12, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_temperature_zero_determinism(tiny_engine):
    runs = [tiny_engine.generate("Flat is better", max_new_tokens=10).token_ids for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_stream_concatenates_to_generate(tiny_engine):
    res = tiny_engine.generate("Readability counts", max_new_tokens=20)
    chunks = list(tiny_engine.stream("Readability counts", max_new_tokens=20))
    assert "".join(c.text for c in chunks) == res.text
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
    assert chunks[-1].finish_reason == res.finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert res.stats["tokens_generated"] == 20


def test_stop_string_truncates_and_finishes_with_stop(tiny_engine):
    full = tiny_engine.generate("The quick brown", max_new_tokens=24).text
    assert len(full) > 6
    stop = full[3:6]
    res = tiny_engine.generate("The quick brown", max_new_tokens=24, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == full[: full.find(stop)]
    streamed = "".join(c.text for c in tiny_engine.stream("The quick brown", max_new_tokens=24, stop=[stop]))
    assert streamed == res.text


def test_textstream_holds_back_partial_stop_matches():
    class ByteTok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    ts = TextStream(ByteTok(), stop=["END"])
    out = [ts.push(ord(ch)) for ch in "abEN"]
    assert "".join(out) == "ab"  # "EN" may be the start of END
    out2 = ts.push(ord("x"))
    assert out2 == "ENx"
    for ch in "yEND":
        ts.push(ord(ch))
    assert ts.stopped and ts.text == "abENxy"


def test_chat_messages_use_the_chat_template(tiny_engine):
    msgs = [{"role": "user", "content": "Hello"}]
    ids = tiny_engine.encode(msgs)
    text = tiny_engine.tokenizer.decode(ids)
    assert "[INST]" in text and "Hello" in text
    res = tiny_engine.generate(msgs, max_new_tokens=5)
    assert res.prompt_tokens == len(ids)


def test_max_new_tokens_is_respected(tiny_engine):
    res = tiny_engine.generate("Sparse is better", max_new_tokens=3)
    assert len(res.token_ids) <= 3


def test_invalid_requests_raise_typed_errors_and_engine_stays_usable(tiny_engine):
    from moe_llm import InputError

    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(stop=[1, 2]), dict(top_p=0.0)):
        with pytest.raises(InputError):
            tiny_engine.generate("ok", **bad)
    with pytest.raises(InputError):
        tiny_engine.generate("")
    with pytest.raises(InputError):
        tiny_engine.generate("word " * 5000)
    assert len(tiny_engine.generate("ok", max_new_tokens=3).token_ids) > 0
