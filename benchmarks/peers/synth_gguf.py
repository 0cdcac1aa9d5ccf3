"""Write the benchmark's synthetic Mixtral-8x7B geometry as a GGUF for llama.cpp, with random weights.

The geometry is the protocol's (docs/peer.md, shared/benchmark.md): 32 layers, hidden 4096, 8 experts
of intermediate 14336, top-2, 32 query and 8 KV heads, vocab 32000. Types follow the comparison:
experts Q2_K (2.625 bits per weight, the k-quant closest to our 2-bit experts), attention and
embeddings Q4_K, output Q6_K, norms and router F32.

Speed does not depend on the values, so the quantized blocks are random bytes, with every fp16
scale field set to a small finite value (no inf or NaN reaches the kernels). One random array per
tensor shape is written for every layer, which keeps memory and time low (about a minute and
15.7 GB for 32 layers). The file is read back with gguf-py's reader and checked before exiting.

    PYTHONPATH=<llama.cpp>/gguf-py python synth_gguf.py OUT.gguf [--layers N]
    python synth_gguf.py OUT.gguf --gguf-py <llama.cpp>/gguf-py --layers 2   # a smoke geometry
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Geometry:
    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    experts: int = 8
    top_k: int = 2
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    context: int = 32768
    rope_base: float = 1e6

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SCALE = np.float16(0.002)
MOSTLY_Q2_K = 10  # llama_ftype of the file: its experts, which are nearly all of its bytes


def _scale_offsets(gguf) -> dict:
    """Byte offsets of the fp16 scale fields inside one block of each k-quant (ggml-common.h)."""
    q = gguf.GGMLQuantizationType
    return {
        q.Q2_K: (80, 82),  # scales[16] qs[64] d dmin
        q.Q4_K: (0, 2),  # d dmin scales[12] qs[128]
        q.Q6_K: (208,),  # ql[128] qh[64] scales[16] d
    }


def random_blocks(gguf, rng: np.random.Generator, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random blocks of `qtype` for a tensor of numpy shape `shape` (ggml's ne reversed), as the
    byte array GGUFWriter.add_tensor takes with raw_dtype; every fp16 scale is set to SCALE."""
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    *lead, cols = shape
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got {cols}")
    blocks = int(np.prod(lead)) * (cols // block)
    data = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    scale = np.frombuffer(SCALE.tobytes(), dtype=np.uint8)
    for off in _scale_offsets(gguf)[qtype]:
        data[:, off : off + 2] = scale
    return data.reshape(*lead, cols // block * size)


def _vocab(g: Geometry) -> tuple[list[str], list[float], list[int]]:
    """A llama (SentencePiece) vocabulary: unk, bos, eos, 256 byte tokens, then plain pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    plain = g.vocab - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(plain)]
    scores = [0.0] * 259 + [-float(i) for i in range(plain)]
    types = [2, 3, 3] + [6] * 256 + [1] * plain  # UNKNOWN, CONTROL, BYTE, NORMAL
    return tokens, scores, types


def write(path: Path, g: Geometry, seed: int = 0) -> int:
    """Write the GGUF; returns the bytes of one layer's experts."""
    import gguf

    q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("synthetic-mixtral-8x7b")
    w.add_context_length(g.context)
    w.add_embedding_length(g.hidden)
    w.add_block_count(g.layers)
    w.add_feed_forward_length(g.intermediate)
    w.add_head_count(g.heads)
    w.add_head_count_kv(g.kv_heads)
    w.add_rope_dimension_count(g.head_dim)
    w.add_rope_freq_base(g.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(g.experts)
    w.add_expert_used_count(g.top_k)
    w.add_file_type(MOSTLY_Q2_K)

    tokens, scores, types = _vocab(g)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    H, F, E, kv = g.hidden, g.intermediate, g.experts, g.kv_heads * g.head_dim
    norm = np.ones(H, dtype=np.float32)
    w.add_tensor("token_embd.weight", random_blocks(gguf, rng, q.Q4_K, (g.vocab, H)), raw_dtype=q.Q4_K)
    w.add_tensor("output_norm.weight", norm)
    w.add_tensor("output.weight", random_blocks(gguf, rng, q.Q6_K, (g.vocab, H)), raw_dtype=q.Q6_K)
    attn_q = random_blocks(gguf, rng, q.Q4_K, (H, H))
    attn_kv = random_blocks(gguf, rng, q.Q4_K, (kv, H))
    attn_out = random_blocks(gguf, rng, q.Q4_K, (H, H))
    router = (rng.standard_normal((E, H)) * 0.02).astype(np.float32)
    gate = random_blocks(gguf, rng, q.Q2_K, (E, F, H))  # ggml ne = [H, F, E]
    down = random_blocks(gguf, rng, q.Q2_K, (E, H, F))  # ggml ne = [F, H, E]
    up = random_blocks(gguf, rng, q.Q2_K, (E, F, H))
    for i in range(g.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm)
        w.add_tensor(p + "attn_q.weight", attn_q, raw_dtype=q.Q4_K)
        w.add_tensor(p + "attn_k.weight", attn_kv, raw_dtype=q.Q4_K)
        w.add_tensor(p + "attn_v.weight", attn_kv, raw_dtype=q.Q4_K)
        w.add_tensor(p + "attn_output.weight", attn_out, raw_dtype=q.Q4_K)
        w.add_tensor(p + "ffn_norm.weight", norm)
        w.add_tensor(p + "ffn_gate_inp.weight", router)
        w.add_tensor(p + "ffn_gate_exps.weight", gate, raw_dtype=q.Q2_K)
        w.add_tensor(p + "ffn_down_exps.weight", down, raw_dtype=q.Q2_K)
        w.add_tensor(p + "ffn_up_exps.weight", up, raw_dtype=q.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gate.nbytes + down.nbytes + up.nbytes


def verify(path: Path, g: Geometry) -> None:
    """Read the file back with gguf-py and check the tensors' count, types and ggml shapes."""
    import gguf

    q = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    want = 3 + 10 * g.layers
    if len(tensors) != want:
        raise SystemExit(f"{path}: {len(tensors)} tensors, expected {want}")
    blocks = int(reader.fields["llama.block_count"].contents())
    if blocks != g.layers:
        raise SystemExit(f"{path}: llama.block_count is {blocks}, expected {g.layers}")
    last = f"blk.{g.layers - 1}."
    H, F, E = g.hidden, g.intermediate, g.experts
    expect = {
        "token_embd.weight": (q.Q4_K, [H, g.vocab]),
        "output.weight": (q.Q6_K, [H, g.vocab]),
        last + "attn_k.weight": (q.Q4_K, [H, g.kv_heads * g.head_dim]),
        last + "ffn_gate_inp.weight": (q.F32, [H, E]),
        last + "ffn_gate_exps.weight": (q.Q2_K, [H, F, E]),
        last + "ffn_down_exps.weight": (q.Q2_K, [F, H, E]),
    }
    for name, (qtype, ne) in expect.items():
        t = tensors[name]
        if t.tensor_type != qtype or [int(n) for n in t.shape] != ne:
            raise SystemExit(f"{path}: {name} is {t.tensor_type.name} {list(t.shape)}, expected {qtype.name} {ne}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="GGUF file to write")
    ap.add_argument("--layers", type=int, default=Geometry.layers, help="decoder layers (2 for a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf-py", type=Path, help="gguf-py folder of the llama.cpp tree (else from PYTHONPATH)")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be at least 1, got {args.layers}")
    if args.gguf_py:
        sys.path.insert(0, str(args.gguf_py))
    try:
        import gguf  # noqa: F401
    except ImportError:
        ap.error("gguf-py is not importable: pass --gguf-py <llama.cpp>/gguf-py or put it on PYTHONPATH")
    g = Geometry(layers=args.layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = args.out.with_name(args.out.name + ".partial")
    per_layer = write(tmp, g, args.seed)
    verify(tmp, g)
    tmp.replace(args.out)
    size = args.out.stat().st_size
    print(
        f"wrote {args.out}: {g.layers} layers, {size / 1e9:.2f} GB, experts {per_layer / 2**20:.1f} MiB/layer "
        f"({per_layer / g.experts / 2**20:.2f} MiB/expert), checked, {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
