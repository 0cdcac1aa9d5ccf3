"""One loading pipeline (issue 13): `moe_llm.load` plans from config.json and the meta skeleton
before it reads any weight, so a budget that cannot fit fails with one line before a tensor,
an expert or a checksum is read; the plan it allocates is the one `moe-llm plan` prints, for
every family; and the context length is one definition, `planning.planned_context`."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

import moe_llm
from moe_llm.checkpoint.source import Checkpoint
from moe_llm.errors import BudgetError, InputError
from moe_llm.experts.store import ExpertStore
from moe_llm.planning import plan_model, planned_context

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reads(monkeypatch):
    """Every tensor key a `Checkpoint` reads, how many checkpoints were opened and how many
    expert stores were built, during one test."""
    seen = {"keys": [], "checkpoints": 0, "stores": 0}
    real_read, real_init, real_store = Checkpoint._read, Checkpoint.__init__, ExpertStore.__init__

    def read(self, key, index=None):
        seen["keys"].append(key)
        return real_read(self, key, index)

    def init(self, *args, **kwargs):
        seen["checkpoints"] += 1
        real_init(self, *args, **kwargs)

    def store(self, *args, **kwargs):
        seen["stores"] += 1
        real_store(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "_read", read)
    monkeypatch.setattr(Checkpoint, "__init__", init)
    monkeypatch.setattr(ExpertStore, "__init__", store)
    return seen


def test_a_budget_that_cannot_fit_fails_before_any_weight_is_read(tiny_mixtral, reads):
    with pytest.raises(BudgetError) as exc:
        moe_llm.load(tiny_mixtral, gpu_budget="8MiB")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("GPU budget 8.0 MiB is too small") and "; try --gpu-budget" in msg
    assert reads == {"keys": [], "checkpoints": 0, "stores": 0}  # no checkpoint opened, no tensor read

    engine = moe_llm.load(tiny_mixtral, gpu_budget="1GiB")  # the same counters see a load that fits
    assert reads["checkpoints"] == 1 and reads["stores"] == 1
    expert_keys = [k for k in reads["keys"] if ".experts." in k]
    assert len(expert_keys) == 2 * 8 * 3  # 2 layers x 8 experts x w1, w2, w3, each read once
    assert engine.plan.slots == 16


def test_a_quantized_directory_is_refused_before_its_checksums_are_read(tiny_mixtral, tmp_path, monkeypatch):
    from moe_llm.checkpoint.qformat import quantize_checkpoint, reader

    out = tmp_path / "q4"
    quantize_checkpoint(tiny_mixtral, out, experts_bits=4, attn_bits=None, device="cpu")
    seen = {"verified": 0, "views": 0}
    real_verify, real_view = reader.verify_files, reader.MappedFile.bytes_view

    def verify(*args, **kwargs):
        seen["verified"] += 1
        return real_verify(*args, **kwargs)

    def view(self, key):
        seen["views"] += 1
        return real_view(self, key)

    monkeypatch.setattr(reader, "verify_files", verify)
    monkeypatch.setattr(reader.MappedFile, "bytes_view", view)
    with pytest.raises(BudgetError, match="^GPU budget 8.0 MiB is too small"):
        moe_llm.load(out, gpu_budget="8MiB")
    assert seen == {"verified": 0, "views": 0}
    engine = moe_llm.load(out, gpu_budget="1GiB")
    assert seen["verified"] == 1 and seen["views"] >= 2 * 8  # every stored expert copied into the store
    assert engine.fmt.bits == 4 and engine.plan == plan_model(out, dtype="float32", gpu_budget="1GiB").plan


@pytest.mark.parametrize(
    "family,options",
    [
        ("mixtral", {}),
        ("qwen3_moe", {}),
        ("olmoe", {}),
        ("mixtral", {"experts_bits": 2, "attn_bits": 4, "head_bits": 4, "max_context": 512}),
        ("olmoe", {"experts_bits": 3, "attn_bits": 4}),
    ],
)
def test_the_loader_allocates_the_plan_made_from_the_meta_skeleton(tiny_dirs, family, options, caplog):
    planned = plan_model(tiny_dirs[family], dtype="float32", gpu_budget="1GiB", **options)
    with caplog.at_level(logging.WARNING, logger="moe_llm.checkpoint.loader"):
        engine = moe_llm.load(tiny_dirs[family], gpu_budget="1GiB", **options)
    assert "re-planning" not in caplog.text  # the trunk on the device holds what the meta count said
    assert engine.plan == planned.plan and engine.plan.trunk_bytes > 0


@pytest.fixture(scope="module")
def long_model(tiny_mixtral, tmp_path_factory):
    """The tiny Mixtral, its config saying it was trained for 32768 positions."""
    out = tmp_path_factory.mktemp("long") / "mixtral"
    shutil.copytree(tiny_mixtral, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 32768
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("max_context,context", [(None, 4096), (600, 600), (100_000, 32768)])
def test_the_engine_holds_requests_to_the_context_the_kv_is_planned_for(long_model, max_context, context):
    engine = moe_llm.load(long_model, max_context=max_context)
    assert engine.context_length == planned_context(max_context, 32768) == context
    c = engine.hf_config
    kv_per_position = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert engine.plan.kv_bytes == 2 * kv_per_position * context  # graph decode's static KV and the dynamic one
    with pytest.raises(InputError, match=f"the context holds {context}$"):
        engine.generate([5] * context, max_new_tokens=1)
