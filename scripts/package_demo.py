"""Assemble the shipped demo model directory from a training run and the corpus build.

Copies the weights and config written by ``scripts/train_demo.py`` (``RUN/model``),
the tokenizer and source manifest written by ``scripts/build_corpus.py``, the
training log, and a small held-out slice used by the CI tests, then checks that
transformers and ``moe_llm.load`` both open the result.

Usage: ``python scripts/package_demo.py RUN_DIR [--corpus build/demo_corpus] [--out moe_llm/data/demo]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SLICE_CHARS = 3200  # about 800 tokens: a few seconds of CPU per perplexity in CI
MAX_BYTES = 50 * 10**6


def heldout_slice(corpus: Path) -> str:
    """The first held-out document, cut at the last line break before SLICE_CHARS."""
    from build_corpus import DOC_SEPARATOR  # same folder

    first = (corpus / "text" / "heldout.txt").read_text(encoding="utf-8").split(DOC_SEPARATOR)[0]
    return first[: first.rfind("\n", 0, SLICE_CHARS) + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training output (holds model/ and train_log.json)")
    ap.add_argument("--corpus", type=Path, default=Path("build/demo_corpus"))
    ap.add_argument("--out", type=Path, default=Path("moe_llm/data/demo"))
    args = ap.parse_args()

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in sorted((args.run / "model").iterdir()):
        shutil.copyfile(f, out / f.name)
    for f in sorted((args.corpus / "tokenizer").iterdir()):
        shutil.copyfile(f, out / f.name)
    shutil.copyfile(args.run / "train_log.json", out / "train_log.json")
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    (out / "corpus_manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "heldout.txt").write_text(heldout_slice(args.corpus), encoding="utf-8")

    size = sum(f.stat().st_size for f in out.iterdir())
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moe_llm

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def main():\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits[0]
    engine = moe_llm.load(out)
    diff = float((engine.logits(ids[0].tolist()) - ref).abs().max())
    print(f"{out}: {size / 1e6:.1f} MB, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"moe_llm vs transformers max |logit diff| {diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
