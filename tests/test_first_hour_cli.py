"""A new user's first hour with the command line (issue 15): start-up imports nothing heavy,
help shows plain flags as flags, `--version` works, bad arguments and bad prompts fail before
the model loads with one stderr line and exit 2, a malformed config.json names its field,
`bench` never overwrites the committed results, and the README's main command shows the mission."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import moe_llm
from moe_llm.cli import main
from moe_llm.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "moe_llm"]
# what start-up must not pay for: the ML stack, and the rich renderers behind typer's help panels
HEAVY = ("torch", "transformers", "hqq", "safetensors", "typer.rich_utils", "rich.markdown", "rich.traceback")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")


def _run(argv: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=kw.pop("timeout", 300), env=_env(), **kw)


def _one_error_line(err: str, fragment: str) -> None:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], err


def _imported_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = _run([sys.executable, "-c", probe], text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")]
    assert line, proc.stdout + proc.stderr
    return [m for m in line[-1].removeprefix("HEAVY=").split(",") if m]


# -- 1. start-up ----------------------------------------------------------------------------


def test_import_moe_llm_imports_neither_torch_nor_transformers():
    assert _imported_after("import moe_llm; moe_llm.InputError; moe_llm.__version__") == []


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["bench", "--help"], ["--version"]])
def test_help_and_version_import_neither_torch_nor_transformers(argv):
    code = f"from moe_llm.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _imported_after(code) == []


def test_public_names_still_resolve_lazily():
    for name in moe_llm.__all__:
        assert getattr(moe_llm, name) is not None
    assert moe_llm.load.__module__ == "moe_llm.checkpoint.loader" and moe_llm.Engine.__name__ == "Engine"
    assert set(moe_llm.__all__) <= set(dir(moe_llm))


def test_version_prints_the_package_version():
    proc = _run([*CLI, "--version"], text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"moe-llm {moe_llm.__version__}\n"
    assert moe_llm.__version__ == version("moe-llm")  # one version: pyproject's


# -- 2. help shows flags as flags -------------------------------------------------------------


def _commands() -> list[str]:
    import typer.main

    from moe_llm.cli import _register, app

    _register()
    return sorted(typer.main.get_command(app).commands)


def test_help_shows_no_type_next_to_flags(capsys):
    for argv in [["--help"], *([c, "--help"] for c in _commands())]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        out = capsys.readouterr().out
        assert exc.value.code == 0, argv
        assert "<bool>" not in out and "--help" in out, (argv, out)
    main_help = subprocess.run([*CLI, "generate", "--help"], capture_output=True, text=True, env=_env()).stdout
    assert re.search(r"--json\s+Print one JSON object", main_help), main_help
    assert re.search(r"--max-new-tokens <int>", main_help), main_help  # options that take values keep their type


# -- 3. generation arguments are checked before the model loads ------------------------------

BAD_GENERATION = [
    (["-n", "-1"], "max_new_tokens must be at least 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (["-t", "-1"], "temperature must be between"),
    (["--top-p", "0"], "top_p must be in"),
    (["--top-k", "-2"], "top_k must be >= 0"),
    (["--stop", ""], "stop strings must not be empty"),
    (["--cache-per-layer", "0"], "cache_per_layer must be between 1"),
    (["--experts-bits", "5"], "--experts-bits must be"),
    (["--gpu-budget", "lots"], "invalid size"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_GENERATION)
def test_generate_checks_arguments_before_loading(args, fragment, tmp_path, capsys):
    # the model directory does not exist: an error about it would mean the load came first
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tmp_path / "no-such-model"), "-p", "hi", *args])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, fragment)


@pytest.mark.parametrize(("args", "fragment"), [BAD_GENERATION[0], BAD_GENERATION[-3]])
def test_generate_checks_arguments_before_resolving_the_demo(args, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "-p", "hi", *args])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, fragment)  # no "using the embedded demo" note first


# -- 4. a prompt that is not UTF-8 ----------------------------------------------------------


def _random_prompt_bytes() -> bytes:
    import random

    return random.Random(0).randbytes(2000).replace(b"\0", b"")  # argv cannot hold NUL


@pytest.mark.parametrize("prompt", [b"\xff\xfe\x80abc", _random_prompt_bytes()], ids=["short", "random-2000"])
def test_prompt_that_is_not_utf8_exits_2_with_one_line(tiny_mixtral, prompt):
    proc = _run([*CLI, "generate", str(tiny_mixtral), "-p", prompt, "-n", "4"])
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    _one_error_line(err, "not valid UTF-8")
    assert proc.stdout == b""


# -- 5. a config.json field of the wrong type --------------------------------------------------


@pytest.fixture(scope="module")
def bad_type_dir(tiny_mixtral, tmp_path_factory):
    d = tmp_path_factory.mktemp("badtype") / "m"
    shutil.copytree(tiny_mixtral, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = "big"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_config_field_of_wrong_type_is_a_one_line_load_error(bad_type_dir, capsys):
    with pytest.raises(ModelLoadError) as exc:
        moe_llm.load(bad_type_dir, device="cpu")
    message = str(exc.value)
    assert "\n" not in message and "hidden_size" in message and "config.json" in message, message
    with pytest.raises(SystemExit) as sysexit:
        main(["generate", str(bad_type_dir), "-p", "hi", "-n", "1"])
    assert sysexit.value.code == 2
    _one_error_line(capsys.readouterr().err, "hidden_size")


# -- 8. bench writes a new file, never the committed results ----------------------------------


def test_bench_default_out_is_a_new_file_in_the_current_directory(tmp_path, monkeypatch, capsys):
    import moe_llm.bench
    from moe_llm.errors import MoeLLMError

    seen = []

    def fake_run_bench(*args, out, **kwargs):
        seen.append(out)
        raise MoeLLMError("stopped by the test")

    monkeypatch.setattr(moe_llm.bench, "run_bench", fake_run_bench)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for _ in range(2):
        with pytest.raises(SystemExit):
            main(["bench", "--tiny", "--device", "cpu"])
        Path(seen[-1]).write_text("{}")  # the next run must not reuse it
    capsys.readouterr()
    first, second = (Path(p) for p in seen)
    assert first.parent.resolve() == second.parent.resolve() == tmp_path.resolve()
    assert re.fullmatch(r"moe-llm-bench-\d{8}-\d{6}(-\d+)?\.json", first.name), first
    assert first != second
    assert not any((tmp_path / "benchmarks" / "results").iterdir())


def test_bench_docs_pass_out_explicitly():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    runs = re.findall(r"^moe-llm bench\b(?:[^\n]*\\\n)*[^\n]*", text, re.MULTILINE)
    assert runs and all("--out" in r for r in runs), runs


# -- 10. the README's main command ----------------------------------------------------------


def readme_main_command() -> list[str]:
    """The `moe-llm generate ...` part of the README's first bash block (the pip installs dropped)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    parts = [p.strip() for p in block.replace("\\\n", " ").split("&&")]
    run = [p for p in parts if p.startswith("moe-llm ")]
    assert len(run) == 1 and all(p.startswith("pip install") for p in parts if p not in run), parts
    return shlex.split(run[0])


def test_readme_main_command_shows_quantized_offloaded_generation():
    argv = readme_main_command()
    assert argv[:2] == ["moe-llm", "generate"]
    proc = _run([*CLI, *argv[1:]], text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 20, proc.stdout  # streamed text on stdout
    err = proc.stderr
    bits = float(re.search(r"expert bits/param\D*([0-9.]+)", err).group(1))
    assert bits < 8, err  # quantized experts (16/32 unquantized)
    slots, total = map(int, re.search(r"expert slots\D*(\d+) of (\d+)", err).groups())
    assert 0 < slots < total, err  # a cache smaller than the model
    hits, misses = map(int, re.search(r"cache hits / misses\D*(\d+) / (\d+)", err).groups())
    assert hits > 0 and misses > 0, err
    assert "Traceback" not in err and "Writing model shards" not in err
