"""Quantize once, load fast: `quantize_checkpoint` -> `moe_llm.load` is bit-identical to
quantizing in memory, much faster, never unpickles, and refuses damaged directories
with an error naming the file."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch

import moe_llm
from moe_llm.checkpoint.qformat import FORMAT_VERSION, MANIFEST, quantize_checkpoint, read_manifest
from moe_llm.checkpoint.qformat.manifest import sha256_file
from moe_llm.errors import CheckpointIntegrityError, ConfigError
from moe_llm.tiny import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

log = logging.getLogger(__name__)
PROMPT = [0, 84, 104, 101, 32, 113, 117, 105, 99, 107]  # token ids: no EOS surprises
NEW = 24


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """4 layers x 16 experts over 3 shards, so experts straddle shard boundaries."""
    return make_tiny(tmp_path_factory.mktemp("qsrc") / "m", "mixtral", seed=1, layers=4, experts=16, shards=3)


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory):
    """(directory, seconds to quantize), timed with hqq already imported and warm."""
    from moe_llm.quant import compact

    compact.quantize(torch.randn(64, 64), 2, 32)  # import + first-call cost is not quantization
    out = tmp_path_factory.mktemp("qout") / "q"
    t0 = time.perf_counter()
    quantize_checkpoint(src, out, experts_bits=2, attn_bits=4, device="cpu")
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def in_memory(src):
    return moe_llm.load(src, experts_bits=2, attn_bits=4, cache_per_layer=3)


def _copy(qdir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(qdir, dst)
    return dst


def test_round_trip_tokens_and_bytes_identical_to_in_memory_quantization(quantized, in_memory):
    qdir, _ = quantized
    engine = moe_llm.load(qdir, cache_per_layer=3)
    assert engine.config.experts_bits == 2 and engine.config.attn_bits == 4
    a, b = engine.cache.store, in_memory.cache.store
    for layer in a.layers:
        for e in range(a.num_experts):
            assert torch.equal(a.buffer(layer, e), b.buffer(layer, e)), (layer, e)
    got = engine.generate(PROMPT, max_new_tokens=NEW).token_ids
    want = in_memory.generate(PROMPT, max_new_tokens=NEW).token_ids
    assert got == want and len(got) > 0
    assert torch.equal(engine.logits(PROMPT), in_memory.logits(PROMPT))


def test_loading_is_at_least_5x_faster_than_quantizing(quantized):
    qdir, t_quantize = quantized
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        moe_llm.load(qdir)
        times.append(time.perf_counter() - t0)
    t_load = min(times)
    log.warning("quantize %.3f s, load quantized %.3f s, ratio %.1fx", t_quantize, t_load, t_quantize / t_load)
    assert t_quantize >= 5 * t_load, (t_quantize, t_load)


def test_directory_is_self_contained_with_a_complete_manifest(src, quantized):
    qdir, _ = quantized
    names = {p.name for p in qdir.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", MANIFEST} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    m = read_manifest(qdir)
    assert m.format_version == FORMAT_VERSION
    assert m.source["config"] == json.loads((src / "config.json").read_text())
    assert m.quantization.experts_bits == 2 and m.quantization.attn_bits == 4
    assert set(m.files) == names - {MANIFEST}
    for name, entry in m.files.items():
        assert entry.sha256 == sha256_file(qdir / name) and entry.bytes == (qdir / name).stat().st_size
    assert len(m.dense) == 4 * 4  # q, k, v, o per layer
    assert abs(m.experts.bits_per_param - 2.54) < 0.01


def test_loading_never_unpickles(quantized, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    engine = moe_llm.load(quantized[0])
    assert engine.generate(PROMPT, max_new_tokens=2).token_ids


def test_a_corrupted_byte_is_named(quantized, tmp_path):
    qdir = _copy(quantized[0], tmp_path)
    shard = sorted(qdir.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=rf"{shard.name}.*sha256"):
        moe_llm.load(qdir)


def test_a_missing_shard_is_named(quantized, tmp_path):
    qdir = _copy(quantized[0], tmp_path)
    shard = sorted(qdir.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointIntegrityError, match=rf"{shard.name} is listed in manifest.json but missing"):
        moe_llm.load(qdir)


def test_a_truncated_shard_is_named(quantized, tmp_path):
    qdir = _copy(quantized[0], tmp_path)
    shard = sorted(qdir.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointIntegrityError, match=rf"{shard.name}.*truncated"):
        moe_llm.load(qdir)


def test_a_modified_config_is_named(quantized, tmp_path):
    qdir = _copy(quantized[0], tmp_path)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointIntegrityError, match="config.json"):
        moe_llm.load(qdir)


def test_a_manifest_of_another_format_version_is_refused(quantized, tmp_path):
    qdir = _copy(quantized[0], tmp_path)
    raw = json.loads((qdir / MANIFEST).read_text())
    raw["format_version"] = FORMAT_VERSION + 1
    (qdir / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheckpointIntegrityError, match=rf"manifest.json .*format version {FORMAT_VERSION + 1}"):
        moe_llm.load(qdir)


def test_a_missing_manifest_is_named_not_mistaken_for_a_plain_checkpoint(quantized, tmp_path):
    qdir = _copy(quantized[0], tmp_path)
    (qdir / MANIFEST).unlink()
    with pytest.raises(CheckpointIntegrityError, match="manifest.json is missing"):
        moe_llm.load(qdir)


def test_checksums_can_be_skipped_but_sizes_are_still_checked(quantized, tmp_path):
    qdir = _copy(quantized[0], tmp_path)
    (qdir / "tokenizer_config.json").write_text((qdir / "tokenizer_config.json").read_text() + " ")
    with pytest.raises(CheckpointIntegrityError, match=r"tokenizer_config.json in .* has \d+ bytes"):
        moe_llm.load(qdir, verify_checksums=False)


def test_other_bits_than_stored_are_refused(quantized):
    with pytest.raises(ConfigError, match="experts_bits=2; experts_bits=4 needs `moe-llm quantize`"):
        moe_llm.load(quantized[0], experts_bits=4)


def test_cli_quantize_writes_a_loadable_dir_and_refuses_a_non_empty_one(src, quantized, tmp_path, capsys):
    from moe_llm.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(src), str(out), "--experts-bits", "3", "--attn-bits", "none", "--device", "cpu"])
    assert exc.value.code in (0, None)
    assert "wrote" in capsys.readouterr().err
    m = read_manifest(out)
    assert m.quantization.experts_bits == 3 and m.quantization.attn_bits is None and not m.dense
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(src), str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err


def test_fused_source_streams_with_byte_accurate_progress(tmp_path):
    src = make_tiny(tmp_path / "fused", "mixtral", seed=2, layers=2, fused=True)
    reports = []
    quantize_checkpoint(src, tmp_path / "q", experts_bits=3, attn_bits=None, device="cpu", progress=reports.append)
    last = reports[-1]
    assert last.tensors_done == last.tensors_total and last.bytes_done == last.bytes_total
    assert last.bytes_total <= (src / "model.safetensors").stat().st_size
    a = moe_llm.load(tmp_path / "q").cache.store
    b = moe_llm.load(src, experts_bits=3).cache.store
    assert all(torch.equal(a.buffer(layer, e), b.buffer(layer, e)) for layer in a.layers for e in range(8))
