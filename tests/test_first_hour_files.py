"""What a new user's first commands write and print (issue 15): `make-tiny --shards N` writes N
weight files in both layouts with a generation_config.json, transformers' own progress bars and
warnings stay out of our output, and written files get the usual mode (0666 less the umask)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from moe_llm.checkpoint.source import Checkpoint
from moe_llm.tiny import make_tiny

CLI = [sys.executable, "-m", "moe_llm"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _weights(d) -> list[str]:
    return sorted(p.name for p in d.glob("*.safetensors"))


# -- 6. make-tiny --shards N writes N files, in both layouts ---------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_make_tiny_writes_as_many_shards_as_asked(tmp_path, fused, shards, one_thread):
    d = make_tiny(tmp_path / "m", "mixtral", layers=2, experts=4, fused=fused, shards=shards)
    assert len(_weights(d)) == shards, _weights(d)
    assert (d / "generation_config.json").is_file()
    index = d / "model.safetensors.index.json"
    assert index.is_file() == (shards > 1)
    ckpt = Checkpoint(d)
    if shards > 1:
        assert sorted(set(json.loads(index.read_text())["weight_map"].values())) == _weights(d)
    assert ckpt.moe_layers() == [0, 1] and all(ckpt.num_experts(layer) == 4 for layer in (0, 1))
    assert ckpt.is_fused(0) == fused
    ckpt.close()


def test_make_tiny_cli_writes_n_shards_and_no_transformers_progress_bar(tmp_path):
    proc = subprocess.run(
        [*CLI, "make-tiny", str(tmp_path / "m"), "--shards", "3", "--layers", "1"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(_weights(tmp_path / "m")) == 3
    out = proc.stdout + proc.stderr
    assert "Writing model shards" not in out and "it/s" not in out, out


# -- 7. transformers' warnings stay out of the CLI's output -----------------------------------


def test_long_prompt_prints_no_transformers_token_length_warning(tiny_mixtral, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_mixtral, d)
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_max_length"] = 8  # the prompt below is longer; the model's context is not
    cfg_file.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [*CLI, "generate", str(d), "-p", "the quick brown fox jumps over the lazy dog " * 3, "-n", "1", "--json"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_tokens"] > 8
    assert "Token indices" not in proc.stderr, proc.stderr


# -- 9. written files get the usual mode ------------------------------------------------------


def _modes(d) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir() if p.is_file()}


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_quantize_writes_files_with_the_usual_mode(tiny_mixtral, tmp_path, umask, mask, one_thread):
    from moe_llm.checkpoint.qformat import quantize_checkpoint

    umask(mask)
    out = tmp_path / "q"
    quantize_checkpoint(tiny_mixtral, out, experts_bits=4, attn_bits=None, device="cpu")
    modes = _modes(out)
    assert any(n.endswith(".safetensors") for n in modes) and "manifest.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), {n: oct(m) for n, m in modes.items()}


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_make_tiny_writes_files_with_the_usual_mode(tmp_path, umask, fused, one_thread):
    umask(0o022)
    d = make_tiny(tmp_path / "m", "mixtral", layers=1, experts=2, fused=fused, shards=2)
    modes = _modes(d)
    assert modes == dict.fromkeys(modes, 0o644), {n: oct(m) for n, m in modes.items()}
