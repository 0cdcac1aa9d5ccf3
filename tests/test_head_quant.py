"""`head_bits=4`: the LM head becomes a QuantLinear whose logits follow the dequantized weight,
one token ([1, 1, H], the decode shape) and many (prefill) alike; the model still generates; a
head tied to the embeddings is left alone; `moe-llm plan` counts the bytes the head really takes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_llm
from moe_llm.checkpoint.model import build_skeleton, head_spec, quantize_head
from moe_llm.quant import compact
from moe_llm.runtime.quant_linear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_model(tiny_mixtral):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()


def test_a_quantized_head_computes_the_dequantized_weights_logits(hf_model):
    model = copy.deepcopy(hf_model)
    weight = model.lm_head.weight.detach().clone()
    assert quantize_head(model, 4, torch.float32, torch.device("cpu")) is True
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.spec.bits == 4
    assert (head.out_features, head.in_features) == tuple(weight.shape)
    dense = compact.dequantize(head.tensors(), head.spec, torch.float32)
    assert (dense - weight).abs().max() < 0.5 * weight.abs().max()  # a 4-bit copy of the head
    for shape in [(1, 1, 64), (1, 9, 64), (3, 5, 64)]:  # decode token, prefill, batch
        x = torch.randn(*shape)
        torch.testing.assert_close(head(x), F.linear(x, dense))
    assert head.weight_nbytes < weight.numel() * 2 / 3  # under 5.4 of 16 bits a weight


def test_a_model_with_a_quantized_head_still_generates(hf_model, tiny_mixtral):
    from transformers import AutoTokenizer

    model = copy.deepcopy(hf_model)
    ids = AutoTokenizer.from_pretrained(tiny_mixtral)("The quick brown fox", return_tensors="pt").input_ids
    before = hf_model(ids).logits[0, -1]
    quantize_head(model, 4, torch.float32, torch.device("cpu"))
    after = model(ids).logits[0, -1]
    assert torch.corrcoef(torch.stack([before, after]))[0, 1] > 0.95  # same logits up to 4-bit noise
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)


def test_the_engine_generates_through_a_quantized_head(tiny_mixtral):
    engine = moe_llm.load(tiny_mixtral, cache_per_layer=2)
    if not isinstance(engine.model.lm_head, QuantLinear):  # until the loader honours head_bits itself
        assert quantize_head(engine.model, 4, torch.float32, torch.device("cpu"))
    result = engine.generate("The quick brown fox", max_new_tokens=5, temperature=0.0)
    assert len(result.token_ids) == 5 or result.finish_reason == "stop"
    assert engine.logits([1, 2, 3]).shape == (3, 512)  # a full-sequence (prefill-shaped) pass


def test_nothing_happens_without_bits(hf_model):
    head = hf_model.lm_head
    assert quantize_head(hf_model, None, torch.float32, torch.device("cpu")) is False
    assert hf_model.lm_head is head


def test_a_tied_head_is_refused_with_a_log_line(caplog):
    from transformers import AutoModelForCausalLM

    from moe_llm.tiny import tiny_config

    cfg = tiny_config("mixtral", 512)
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with caplog.at_level(logging.INFO, logger="moe_llm.checkpoint.model"):
        assert quantize_head(model, 4, torch.float32, torch.device("cpu")) is False
    assert "tied" in caplog.text
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.get_input_embeddings().weight


def test_the_planned_head_spec_is_the_quantized_heads(hf_model, tiny_mixtral):
    skeleton = build_skeleton(hf_model.config, torch.float32)  # meta: what `moe-llm plan` sees
    spec = head_spec(skeleton, 4)
    model = copy.deepcopy(hf_model)
    quantize_head(model, 4, torch.float32, torch.device("cpu"))
    assert spec == model.lm_head.spec
    planned = sum(
        torch.empty((), dtype=dt).element_size() * torch.Size(shape).numel() for dt, shape in spec.tensors("w").values()
    )
    assert planned == model.lm_head.weight_nbytes
    assert head_spec(skeleton, None) is None
