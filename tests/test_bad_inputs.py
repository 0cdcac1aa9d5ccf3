"""A table of bad inputs, through the API (typed exception) and the CLI (exit 2, one stderr
line, no traceback). After every bad request the same engine still answers correctly."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import moe_llm
from moe_llm.errors import (
    BudgetError,
    CheckpointIntegrityError,
    ConfigError,
    InputError,
    ModelLoadError,
    UnsupportedModelError,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = [0, 84, 104, 101, 32, 113, 117, 105, 99, 107]
LONG_PROMPT = "experts " * 6000  # > 4096 tokens


@pytest.fixture(scope="module")
def bad_dirs(tiny_mixtral, tmp_path_factory):
    """name -> a broken model directory (or path) derived from the tiny Mixtral."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, MistralConfig

    from moe_llm.tiny import train_tokenizer

    root = tmp_path_factory.mktemp("bad")
    out = {"missing": root / "does-not-exist", "empty": root / "empty"}
    out["empty"].mkdir()
    out["file"] = root / "a-file.txt"
    out["file"].write_text("not a model")

    dense = root / "dense"  # a real dense (non-MoE) checkpoint
    tok = train_tokenizer()
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    tok.save_pretrained(dense)
    out["dense"] = dense

    unknown = root / "unknown"
    shutil.copytree(tiny_mixtral, unknown)
    c = json.loads((unknown / "config.json").read_text())
    c["model_type"] = "frobnicate_moe"
    (unknown / "config.json").write_text(json.dumps(c))
    out["unknown"] = unknown

    truncated = root / "truncated"
    shutil.copytree(tiny_mixtral, truncated)
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out["truncated"] = truncated

    shape = root / "shape"
    shutil.copytree(tiny_mixtral, shape)
    state = load_file(str(shape / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(state, str(shape / "model.safetensors"), metadata={"format": "pt"})
    out["shape"] = shape
    return out


# name, load() kwargs beyond the model dir (dir key or None = tiny), exception, message fragment
LOAD_CASES = [
    ("missing dir", "missing", {}, ModelLoadError, "model directory not found"),
    ("not a dir", "file", {}, ModelLoadError, "not a directory"),
    ("no config.json", "empty", {}, ModelLoadError, "no config.json"),
    ("dense model", "dense", {}, UnsupportedModelError, "not a Mixture-of-Experts model"),
    ("unknown architecture", "unknown", {}, UnsupportedModelError, "frobnicate_moe"),
    ("truncated safetensors", "truncated", {}, CheckpointIntegrityError, "model.safetensors"),
    ("wrong tensor shape", "shape", {}, CheckpointIntegrityError, "q_proj.weight has shape"),
    ("zero cache", None, {"cache_per_layer": 0}, ConfigError, "cache_per_layer must be between 1"),
    ("negative cache", None, {"cache_per_layer": -3}, ConfigError, "cache_per_layer must be between 1"),
    ("cache above experts", None, {"cache_per_layer": 9}, ConfigError, r"between 1 and num_experts \(8\)"),
    ("budget below trunk", None, {"gpu_budget": "1MiB"}, BudgetError, "too small"),
    ("bad bits", None, {"experts_bits": 5}, ConfigError, "experts_bits"),
    ("bad device", None, {"device": "tpu"}, ConfigError, "device must be"),
]

# name, generate() kwargs, exception, message fragment
REQUEST_CASES = [
    ("empty prompt", {"prompt": ""}, InputError, "prompt is empty"),
    ("prompt longer than context", {"prompt": LONG_PROMPT}, InputError, "the context holds 4096"),
    ("max_new_tokens zero", {"max_new_tokens": 0}, InputError, "max_new_tokens must be at least 1"),
    ("max_new_tokens negative", {"max_new_tokens": -5}, InputError, "max_new_tokens must be at least 1"),
    ("negative temperature", {"temperature": -1.0}, InputError, "temperature must be between"),
    ("nan temperature", {"temperature": math.nan}, InputError, "temperature must be between"),
    ("stop of non-strings", {"stop": [1, 2]}, InputError, "stop must be a list of strings"),
    ("empty stop string", {"stop": [""]}, InputError, "stop strings must not be empty"),
    ("top_p zero", {"top_p": 0.0}, InputError, "top_p"),
    ("token id out of vocab", {"prompt": [10**6]}, InputError, "token ids must be in"),
    ("bad message list", {"prompt": [{"content": "hi"}]}, InputError, "'role' and 'content'"),
]


@pytest.fixture(scope="module")
def reference(tiny_engine):
    return tiny_engine.generate(GOOD, max_new_tokens=8).token_ids


@pytest.mark.parametrize("name,dirkey,kwargs,exc,fragment", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_api_load_errors_are_typed(bad_dirs, tiny_mixtral, tiny_engine, reference, name, dirkey, kwargs, exc, fragment):
    path = bad_dirs[dirkey] if dirkey else tiny_mixtral
    with pytest.raises(exc, match=fragment):
        moe_llm.load(path, **kwargs)
    assert tiny_engine.generate(GOOD, max_new_tokens=8).token_ids == reference


@pytest.mark.parametrize("name,kwargs,exc,fragment", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_api_request_errors_leave_the_engine_serving(tiny_engine, reference, name, kwargs, exc, fragment):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", GOOD)
    with pytest.raises(exc, match=fragment):
        tiny_engine.generate(prompt, **kwargs)
    with pytest.raises(exc, match=fragment):
        tiny_engine.stream(prompt, **kwargs)  # stream validates eagerly, before the first next()
    assert tiny_engine.generate(GOOD, max_new_tokens=8).token_ids == reference


def _cli_cases(bad_dirs, tiny):
    gen = ["generate", str(tiny), "--max-new-tokens", "2", "--cache-per-layer", "2"]
    return [
        ("missing dir", ["generate", str(bad_dirs["missing"]), "-p", "hi"], "model directory not found"),
        ("not a dir", ["generate", str(bad_dirs["file"]), "-p", "hi"], "not a directory"),
        ("no config.json", ["generate", str(bad_dirs["empty"]), "-p", "hi"], "no config.json"),
        ("dense model", ["generate", str(bad_dirs["dense"]), "-p", "hi"], "not a Mixture-of-Experts"),
        ("unknown architecture", ["generate", str(bad_dirs["unknown"]), "-p", "hi"], "frobnicate_moe"),
        ("truncated safetensors", ["generate", str(bad_dirs["truncated"]), "-p", "hi"], "model.safetensors"),
        ("wrong tensor shape", ["generate", str(bad_dirs["shape"]), "-p", "hi"], "has shape"),
        ("zero cache", ["generate", str(tiny), "-p", "hi", "--cache-per-layer", "0"], "between 1 and num_experts"),
        ("negative cache", ["generate", str(tiny), "-p", "hi", "--cache-per-layer", "-1"], "between 1 and"),
        ("budget below trunk", ["generate", str(tiny), "-p", "hi", "--gpu-budget", "1MiB"], "too small"),
        ("bad bits", ["generate", str(tiny), "-p", "hi", "--experts-bits", "5"], "--experts-bits must be"),
        ("empty prompt", [*gen, "-p", ""], "prompt is empty"),
        ("prompt longer than context", [*gen, "-p", LONG_PROMPT], "the context holds"),
        ("max_new_tokens zero", [*gen, "-p", "hi", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        ("negative temperature", [*gen, "-p", "hi", "-t", "-1"], "temperature must be between"),
        ("empty stop string", [*gen, "-p", "hi", "--stop", ""], "stop strings must not be empty"),
        ("plan budget below trunk", ["plan", str(tiny), "--gpu-budget", "1MiB"], "too small"),
        ("quantize into the source", ["quantize", str(tiny), str(tiny)], "must differ"),
    ]


def _check_one_line(err: str, fragment: str) -> None:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def test_cli_bad_inputs_exit_2_with_one_line(bad_dirs, tiny_mixtral, capsys):
    """In-process through `main`, exactly as the console script runs it (fast)."""
    from moe_llm.cli import main

    for name, argv, fragment in _cli_cases(bad_dirs, tiny_mixtral):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        captured = capsys.readouterr()
        assert exc.value.code == 2, name
        _check_one_line(captured.err, fragment)


@pytest.mark.parametrize("case", ["missing dir", "empty prompt"])  # real processes: a few, they are slow
def test_cli_subprocess_exit_2_and_no_traceback(bad_dirs, tiny_mixtral, case):
    argv = {name: a for name, a, _ in _cli_cases(bad_dirs, tiny_mixtral)}[case]
    fragment = {name: f for name, _, f in _cli_cases(bad_dirs, tiny_mixtral)}[case]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "moe_llm", *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 2
    _check_one_line(proc.stderr, fragment)
    assert proc.stdout == ""
