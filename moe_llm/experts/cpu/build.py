"""Compile `moe_cpu.c` (with `split_loop.c`, the CPU side of the decode split) once per machine and load it with ctypes.

The shared object is cached under a name keyed by a hash of the source, the compiler, its
flags, `platform.machine()` and the CPU's model and flags (``-march=native`` binaries must not
be shared between hosts of one home directory). A build writes a temporary file and renames it
into place, so concurrent processes never load a half-written library. Settings come from the
environment once per build: ``CC`` (default ``cc``, then ``gcc``, ``clang``) and
``MOE_LLM_CACHE_DIR`` (default ``$MOE_LLM_HOME`` or ``$XDG_CACHE_HOME/moe-llm`` or
``~/.cache/moe-llm``, plus ``/cpu-kernels``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ...errors import MoeLLMError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("split_loop.c")  # the unit compiled: it includes moe_cpu.c
SOURCES = (Path(__file__).with_name("moe_cpu.c"), SOURCE)
BASE_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11", "-pthread")
OPENMP_FLAGS = ("-fopenmp",)


class CpuKernelUnavailable(MoeLLMError, RuntimeError):
    """The CPU expert kernel cannot be built or loaded here (no compiler, or the build failed)."""


@dataclass(frozen=True)
class BuildSettings:
    cc: list[str]
    cache_dir: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BuildSettings:
        env = os.environ if environ is None else environ
        cc = shlex.split(env.get("CC", "")) or [next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "cc")]
        root = env.get("MOE_LLM_CACHE_DIR")
        if not root:
            base = env.get("MOE_LLM_HOME") or os.path.join(
                env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "moe-llm"
            )
            root = os.path.join(base, "cpu-kernels")
        return cls(cc, Path(root))


def _cpu_fingerprint() -> str:
    """Model name and feature flags of this CPU (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            keep = [line for line in fh if line.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "".join(sorted(set(keep)))
    except OSError:
        return platform.processor()


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    line = (errors or lines or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _compile(cc: list[str], flags: tuple[str, ...], out: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    cmd = [*cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CpuKernelUnavailable(f"cannot run the C compiler {shlex.join(cc)!r}: {_one_line(str(exc))}") from None
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            why = _one_line(proc.stderr) or f"exit status {proc.returncode}"
            raise CpuKernelUnavailable(f"building the CPU expert kernel with {shlex.join(cc)!r} failed: {why}")
        os.replace(tmp, out)  # atomic: a concurrent builder wins or loses whole
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path(settings: BuildSettings | None = None) -> Path:
    """Build (if not cached) and return the path of the shared object."""
    s = settings or BuildSettings.from_env()
    if not shutil.which(s.cc[0]):
        raise CpuKernelUnavailable(f"no C compiler: {s.cc[0]!r} not found (set CC or install gcc)")
    try:
        s.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CpuKernelUnavailable(f"cannot create the kernel cache {s.cache_dir}: {exc.strerror}") from None
    source, cpu = b"\0".join(p.read_bytes() for p in SOURCES), _cpu_fingerprint().encode()
    variants = []  # with OpenMP, else (a compiler without it) a serial kernel
    for flags in (BASE_FLAGS + OPENMP_FLAGS, BASE_FLAGS):
        parts = [source, shlex.join(s.cc).encode(), " ".join(flags).encode(), platform.machine().encode(), cpu]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
        variants.append((flags, s.cache_dir / f"moe_cpu-{key}.so"))
    for _, out in variants:
        if out.is_file():
            return out
    errors = []
    for flags, out in variants:
        try:
            _compile(s.cc, flags, out)
        except CpuKernelUnavailable as exc:
            errors.append(exc)
            continue
        if flags is BASE_FLAGS:
            log.warning("CPU expert kernel built without OpenMP (%s); it runs on one thread", errors[0])
        return out
    raise errors[0]


def load(settings: BuildSettings | None = None) -> ctypes.CDLL:
    """Build and load the library. CDLL (not PyDLL): calls release the GIL."""
    path = library_path(settings)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise CpuKernelUnavailable(f"cannot load the CPU expert kernel {path}: {_one_line(str(exc))}") from None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The process-wide library (built on first use)."""
    return load()
