"""Build the demo model's corpus and tokenizer, offline and deterministically.

Source: every ``.py`` file of the CPython standard library on this machine
(``sysconfig.get_paths()["stdlib"]``), minus machine-specific or table-like
modules (``site-packages``, ``encodings``, ``_sysconfigdata*``, ``config-*``).
Files are taken in sorted path order; a file goes to the held-out split when the
sha256 of its relative path falls in the lowest ``--heldout-permille`` of the
hash space, so the split never depends on file sizes or on the order of the
walk. The script then trains a byte-level BPE on the training split only,
tokenizes both splits into uint16 arrays and writes a manifest that records the
Python version, every file with its sha256, and the sha256 of each output.

Layout of ``--out`` (default ``build/demo_corpus``)::

    text/train.txt, text/heldout.txt   documents joined by a form feed line
    tokenizer/                         PreTrainedTokenizerFast (save_pretrained)
    tokens/train.bin, tokens/heldout.bin, tokens/meta.json   what training needs
    manifest.json                      sources, split, hashes

Usage: ``python scripts/build_corpus.py [--out DIR] [--vocab-size 8192]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sysconfig
from pathlib import Path

import numpy as np

log = logging.getLogger("build_corpus")

EXCLUDE_PARTS = ("site-packages", "__pycache__", "encodings", "lib-dynload")
EXCLUDE_PREFIXES = ("_sysconfigdata", "config-")
DOC_SEPARATOR = "\n\f\n"  # between documents in the text files; never inside a stdlib file we keep
SPECIALS = ("<s>", "</s>", "<pad>")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def in_heldout(rel: str, permille: int) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 1000 < permille


def collect_sources(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) for every usable stdlib .py file, in sorted order."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(p in EXCLUDE_PARTS for p in parts) or parts[0].startswith(EXCLUDE_PREFIXES):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few test files are deliberately not UTF-8
        text = text.replace("\r\n", "\n")
        if not text.strip() or "\f" in text:
            continue
        out.append((rel, text))
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts`, wrapped as a transformers fast tokenizer with the [INST] chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from moe_llm.tiny import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """Every document as <s> tokens </s>, concatenated into one uint16 stream."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    pieces = []
    for enc in encoded:
        pieces.append(np.asarray([bos, *enc.ids, eos], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def build(out: Path, vocab_size: int, heldout_permille: int, root: Path | None = None) -> dict:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    sources = collect_sources(root)
    if not sources:
        raise SystemExit(f"no .py sources under {root}")
    train = [(r, t) for r, t in sources if not in_heldout(r, heldout_permille)]
    heldout = [(r, t) for r, t in sources if in_heldout(r, heldout_permille)]
    log.info("%d files: %d train, %d held out", len(sources), len(train), len(heldout))

    (out / "text").mkdir(parents=True, exist_ok=True)
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    outputs = {}
    for name, docs in (("train", train), ("heldout", heldout)):
        path = out / "text" / f"{name}.txt"
        path.write_text(DOC_SEPARATOR.join(t for _, t in docs), encoding="utf-8")
        outputs[f"text/{name}.txt"] = path

    tokenizer = train_tokenizer([t for _, t in train], vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    outputs["tokenizer/tokenizer.json"] = out / "tokenizer" / "tokenizer.json"
    counts = {}
    for name, docs in (("train", train), ("heldout", heldout)):
        ids = encode_documents(tokenizer, [t for _, t in docs])
        path = out / "tokens" / f"{name}.bin"
        ids.tofile(path)
        outputs[f"tokens/{name}.bin"] = path
        counts[name] = int(ids.size)
    meta = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "uint16",
        "tokens": counts,
    }
    (out / "tokens" / "meta.json").write_text(json.dumps(meta, indent=2))

    manifest = {
        "source": "CPython standard library .py files",
        "python": platform.python_version(),
        "stdlib_root": str(root),
        "exclude_parts": list(EXCLUDE_PARTS),
        "exclude_prefixes": list(EXCLUDE_PREFIXES),
        "heldout_rule": f"int(sha256(relpath)[:8], 16) % 1000 < {heldout_permille}",
        "vocab_size": len(tokenizer),
        "tokens": counts,
        "bytes": {
            name: sum(len(t.encode()) for _, t in docs) for name, docs in (("train", train), ("heldout", heldout))
        },
        "outputs_sha256": {k: sha256_file(p) for k, p in sorted(outputs.items())},
        "files": {
            split: [{"path": r, "sha256": sha256_bytes(t.encode())} for r, t in docs]
            for split, docs in (("train", train), ("heldout", heldout))
        },
    }
    manifest["corpus_sha256"] = sha256_bytes(
        json.dumps(manifest["files"], sort_keys=True).encode()
    )  # identifies the exact source set
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/demo_corpus"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--heldout-permille", type=int, default=25, help="held-out share of files, in 1/1000")
    ap.add_argument("--stdlib", type=Path, default=None, help="source root (default: this Python's stdlib)")
    args = ap.parse_args()
    m = build(args.out, args.vocab_size, args.heldout_permille, args.stdlib)
    log.info("corpus %s", m["corpus_sha256"])
    log.info("tokens: %s", m["tokens"])
    for k, v in m["outputs_sha256"].items():
        log.info("%s  %s", v, k)


if __name__ == "__main__":
    main()
