"""Draw the plots of docs/fidelity.md and print its tables as markdown.

Inputs: the JSON written by ``moe-llm trace ... --json`` and ``moe-llm perplexity ... --json``
(see docs/fidelity.md for the exact commands) and the demo's ``train_log.json``.

Usage: ``python scripts/plot_fidelity.py --results build/fidelity --img docs/img``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLES = {"1": "-", "2": "--", "4": ":"}  # layers ahead, as in the paper's Figure 2


def _finish(fig, ax, title: str, path: Path, legend_loc: str = "lower right") -> None:
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_hit_rate(trace: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    sizes = trace["cache_sizes"]
    for layer, rates in trace["lru_hit_rate_per_layer"].items():
        ax.plot(sizes, rates, color="0.75", lw=0.8, label="single layer" if layer == "0" else None)
    ax.plot(sizes, trace["lru_hit_rate"], "o-", color="C0", lw=2, label="mean over layers")
    ax.fill_between([2, 4], 0.4, 0.6, color="C1", alpha=0.15, label="paper, Mixtral-8x7B (2-4 cached)")
    ax.set(xlabel="experts cached per layer (of 8)", ylabel="LRU hit rate", xlim=(0.5, 7.5), ylim=(0, 1))
    _finish(fig, ax, f"LRU expert cache, {trace['tokens']:,} held-out tokens", path)


def plot_recall(trace: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    counts = trace["prefetch_counts"]
    for ahead, row in trace["prefetch_recall"].items():
        label = f"{ahead} layer{'s' if ahead != '1' else ''} ahead"
        ax.plot(counts, row, STYLES.get(ahead, "-."), marker="o", color="C0", label=label)
    ax.axhline(0.8, color="C1", lw=0.8, ls="--", label="paper: > 0.8, 1 layer ahead")
    ax.set(xlabel="experts prefetched per layer", ylabel="recall of routed experts", xticks=counts, ylim=(0, 1))
    _finish(fig, ax, "Speculative expert prefetch", path)


def plot_loss(log: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    hist = log["history"]
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], color="C0", lw=1, label="train (batch)")
    ev = log["evals"]
    ax.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", color="C3", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", ylim=(0, 9))
    _finish(fig, ax, f"Training: {log['steps']} steps x {log['tokens_per_step']:,} tokens", path, "upper right")


def tables(results: Path, trace: dict) -> str:
    rows = ["| experts | attention | perplexity | tokens | ratio to unquantized |", "|---|---|---|---|---|"]
    base_file = results / "ppl_none.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() and base_file.stat().st_size else None
    for name, label, attn in (("none", "unquantized (fp32 on CPU)", "unquantized"), ("4", "4-bit", "4-bit"),
                              ("3", "3-bit", "4-bit"), ("2", "2-bit", "4-bit")):  # fmt: skip
        f = results / f"ppl_{name}.json"
        if base and f.is_file() and f.stat().st_size:
            r = json.loads(f.read_text())
            rows.append(f"| {label} | {attn} | {r['perplexity']:.3f} | {r['tokens']:,} | "
                        f"{r['perplexity'] / base['perplexity']:.3f} |")  # fmt: skip
    rows += ["", "| experts cached per layer | " + " | ".join(map(str, trace["cache_sizes"])) + " |",
             "|---" * (len(trace["cache_sizes"]) + 1) + "|",
             "| LRU hit rate | " + " | ".join(f"{h:.3f}" for h in trace["lru_hit_rate"]) + " |", "",
             "| layers ahead | " + " | ".join(f"{n} prefetched" for n in trace["prefetch_counts"]) + " |",
             "|---" * (len(trace["prefetch_counts"]) + 1) + "|"]  # fmt: skip
    for ahead, row in trace["prefetch_recall"].items():
        raw = trace["prefetch_recall_raw"][ahead]
        rows.append(f"| {ahead} | " + " | ".join(f"{r:.3f} ({q:.3f})" for r, q in zip(row, raw, strict=True)) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("build/fidelity"))
    ap.add_argument("--train-log", type=Path, default=Path("moe_llm/data/demo/train_log.json"))
    ap.add_argument("--img", type=Path, default=Path("docs/img"))
    args = ap.parse_args()
    args.img.mkdir(parents=True, exist_ok=True)
    trace = json.loads((args.results / "trace.json").read_text())
    plot_hit_rate(trace, args.img / "demo_lru_hit_rate.png")
    plot_recall(trace, args.img / "demo_prefetch_recall.png")
    plot_loss(json.loads(args.train_log.read_text()), args.img / "demo_training_loss.png")
    print(tables(args.results, trace))


if __name__ == "__main__":
    main()
