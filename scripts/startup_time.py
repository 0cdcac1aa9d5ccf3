"""How long the command line takes to start: the median of a few runs of each command.

Runs `moe-llm --help`, `moe-llm --version` and `python -c "import moe_llm"` as
subprocesses (one untimed warm-up each, so the numbers are for a warm file cache)
and prints the median wall-clock seconds. The goal is `moe-llm --help` under 1 s.

    python scripts/startup_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def commands() -> dict[str, list[str]]:
    # the installed entry point when there is one, else the module (same code path)
    cli = [shutil.which("moe-llm")] if shutil.which("moe-llm") else [sys.executable, "-m", "moe_llm"]
    return {
        "moe-llm --help": [*cli, "--help"],
        "moe-llm --version": [*cli, "--version"],
        'python -c "import moe_llm"': [sys.executable, "-c", "import moe_llm"],
    }


def median_seconds(argv: list[str], repeats: int) -> float:
    subprocess.run(argv, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command")
    args = parser.parse_args()
    for name, argv in commands().items():
        print(f"{name:<30} {median_seconds(argv, args.repeats):6.3f} s  (median of {args.repeats})")


if __name__ == "__main__":
    main()
