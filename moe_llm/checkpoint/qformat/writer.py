"""Quantize a Hugging Face MoE checkpoint once into a self-contained moe-llm directory.

The source is streamed shard by shard. Each source shard yields one output shard
holding the tensors that became complete in it: trunk tensors unchanged (their
transformers 5.x names), dense projections as compact tensors
``<module>.q/scale_q/zero_q/meta``, and every expert as one uint8 tensor
``experts.L.E`` holding exactly its `ExpertFormat` bytes. At most one source shard
(memory-mapped), one output shard and one dense expert are alive at a time.
config.json, the tokenizer and other small files are copied; `manifest.json`
(format version, source config, settings, per-file sha256) is written last.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointIntegrityError, ConfigError
from ...experts.format import ExpertFormat
from ...quant import QuantSpec, compact, pick_group_size
from ...quant.compact import META_GROUP
from ..arch import ArchMap
from ..model import MoeInfo, build_skeleton, decoder_layers, moe_info, persistent_buffers, read_config
from ..source import Checkpoint
from .manifest import (
    EXPERT_KEY,
    MANIFEST,
    METADATA_TAG,
    DenseEntry,
    ExpertsEntry,
    FileEntry,
    Manifest,
    QuantSettings,
    file_entry,
)
from .safetensors_io import read_header, save_safetensors

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", MANIFEST}


@dataclass
class QuantizeProgress:
    tensors_done: int
    tensors_total: int
    bytes_done: int  # source bytes consumed
    bytes_total: int
    elapsed_s: float


def dense_modules(model: nn.Module, bits: int, arch: ArchMap) -> dict[str, QuantSpec]:
    """Module name -> spec of every projection `model.quantize_dense` would quantize."""
    layers = decoder_layers(model, arch)
    out = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and not arch.keep_dense(name):
                out_f, in_f = mod.weight.shape
                out[f"{arch.layers}.{i}.{name}"] = QuantSpec(bits, pick_group_size(bits, in_f), out_f, in_f)
    return out


def trunk_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and persistent buffer a checkpoint holds (`model.load_trunk` reads the same)."""
    return [*model.named_parameters(), *persistent_buffers(model)]


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ConfigError("the output directory must differ from the source directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path exists and is not a directory: {out}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out} is not empty (pass --overwrite to replace it)")


def _prepare_out(out: Path) -> None:
    if out.exists():
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _quant_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return dev


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    experts_bits: int = 2,
    attn_bits: int | None = 4,
    group_size: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: Callable[[QuantizeProgress], None] | None = None,
) -> Manifest:
    """Write the quantized form of checkpoint `src` to `out`; returns its manifest."""
    from ... import __version__

    if experts_bits not in (2, 3, 4):
        raise ConfigError(f"experts_bits must be 2, 3 or 4, got {experts_bits!r}")
    if attn_bits not in (4, None):
        raise ConfigError(f"attn_bits must be 4 or None, got {attn_bits!r}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if (src / MANIFEST).is_file():
        raise ConfigError(f"{src} is already a quantized moe-llm directory")
    qdev = _quant_device(device)
    ckpt = Checkpoint(src)
    _check_out(src, out, overwrite)
    hf_config = read_config(ckpt)
    model = build_skeleton(hf_config, torch.float32)  # meta: names and shapes only
    info = moe_info(model, hf_config)
    try:
        fmt = ExpertFormat.build(
            info.hidden, info.intermediate, experts_bits, torch.float32, group_size, info.arch.layout
        )
        dense = dense_modules(model, attn_bits, info.arch) if attn_bits else {}
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    params = {n: tuple(p.shape) for n, p in trunk_tensors(model) if not info.arch.is_expert_param(n)}
    _check_source(ckpt, info, params, tied=bool(getattr(hf_config, "tie_word_embeddings", False)))
    dense_weights = {f"{m}.weight": m for m in dense}
    work = _schedule(ckpt, info, params)

    _prepare_out(out)
    t0 = time.perf_counter()
    state = QuantizeProgress(0, work.tensors, 0, work.bytes, 0.0)
    if progress:
        progress(state)

    def advance(nbytes: int) -> None:
        state.tensors_done += 1
        state.bytes_done += nbytes
        state.elapsed_s = time.perf_counter() - t0
        if progress:
            progress(state)

    files: dict[str, FileEntry] = {}
    want_gu, want_d = (2 * info.intermediate, info.hidden), (info.hidden, info.intermediate)
    for f in ckpt.files:
        tensors: dict[str, torch.Tensor] = {}
        for canon, nbytes in work.trunk[f]:
            t = ckpt.trunk_tensor(canon)
            if tuple(t.shape) != params[canon]:
                raise CheckpointIntegrityError(f"tensor {canon} has shape {tuple(t.shape)}, expected {params[canon]}")
            module = dense_weights.get(canon)
            if module is None:
                tensors[canon] = t.contiguous()
            else:
                spec = dense[module]
                for k, v in compact.quantize(t.to(qdev), spec.bits, spec.group_size).items():
                    tensors[f"{module}.{k}"] = v.cpu()
            advance(nbytes)
        for layer, e, nbytes in work.experts[f]:
            gate_up, down = ckpt.expert(layer, e)
            if tuple(gate_up.shape) != want_gu or tuple(down.shape) != want_d:
                raise CheckpointIntegrityError(
                    f"layer {layer} expert {e}: shapes {tuple(gate_up.shape)}/{tuple(down.shape)}, "
                    f"expected {want_gu}/{want_d}"
                )
            encoded = fmt.encode(gate_up.to(qdev), down.to(qdev), ckpt.expert_biases(layer, e))
            buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)  # zeroed padding: reproducible bytes
            fmt.layout.write(buf, {k: v.cpu() for k, v in encoded.items()})
            tensors[EXPERT_KEY.format(layer=layer, expert=e)] = buf
            advance(nbytes)
        if tensors:
            _save(out / f"model-{len(files) + 1:05d}.safetensors", tensors, files)
    ckpt.close()

    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _SKIP_FILES:
            shutil.copyfile(p, out / p.name)  # a new file: the usual mode, not the source's
            files[p.name] = file_entry(out / p.name)
    manifest = Manifest(
        created_by=f"moe-llm {__version__}",
        source={"name": src.name, "config": ckpt.config_dict},
        quantization=QuantSettings(
            experts_bits=experts_bits, experts_group_size=group_size, attn_bits=attn_bits, meta_group=META_GROUP
        ),
        experts=ExpertsEntry(
            layers=info.layers,
            num_experts=info.num_experts,
            nbytes=fmt.nbytes,
            bits_per_param=fmt.bits_per_param,
            layout=layout_entries(fmt),
        ),
        dense={
            m: DenseEntry(bits=s.bits, group_size=s.group_size, out_features=s.out_features, in_features=s.in_features)
            for m, s in dense.items()
        },
        files=files,
    )
    manifest.write(out)
    log.info("quantized %s -> %s in %.1f s", src, out, time.perf_counter() - t0)
    return manifest


def _check_source(ckpt: Checkpoint, info: MoeInfo, params: dict[str, tuple[int, ...]], tied: bool) -> None:
    """Everything the model needs is in the checkpoint, before a byte is written."""
    if ckpt.moe_layers() != info.layers:
        raise CheckpointIntegrityError(
            f"checkpoint has experts for layers {ckpt.moe_layers()}, config expects {info.layers}"
        )
    for layer in info.layers:
        if ckpt.num_experts(layer) != info.num_experts:
            raise CheckpointIntegrityError(
                f"layer {layer} has {ckpt.num_experts(layer)} experts, config says {info.num_experts}"
            )
        if info.arch.layout.bias and not ckpt.has_biases(layer):
            raise CheckpointIntegrityError(f"layer {layer}: expert biases (gate_up_proj_bias, down_proj_bias) missing")
        for e in range(info.num_experts):
            if not ckpt.expert_part_keys(layer, e):
                raise CheckpointIntegrityError(f"layer {layer} expert {e}: missing gate/up/down tensors")
    for name in params:
        if name not in ckpt.trunk_keys and not (tied and name == "lm_head.weight"):
            raise CheckpointIntegrityError(f"tensor {name} is missing from the checkpoint")


@dataclass
class _Schedule:
    """Per source shard: the trunk tensors and experts that become complete in it."""

    trunk: dict[Path, list[tuple[str, int]]]  # (canonical name, source bytes)
    experts: dict[Path, list[tuple[int, int, int]]]  # (layer, expert, source bytes)

    @property
    def tensors(self) -> int:
        return sum(map(len, self.trunk.values())) + sum(map(len, self.experts.values()))

    @property
    def bytes(self) -> int:
        return sum(x[-1] for v in [*self.trunk.values(), *self.experts.values()] for x in v)


def _schedule(ckpt: Checkpoint, info: MoeInfo, params: dict[str, tuple[int, ...]]) -> _Schedule:
    order = {f: i for i, f in enumerate(ckpt.files)}
    size = {k: t.nbytes for f in ckpt.files for k, t in read_header(f)[0].items()}
    work = _Schedule({f: [] for f in ckpt.files}, {f: [] for f in ckpt.files})
    for canon, raw in ckpt.trunk_keys.items():
        if canon in params:
            work.trunk[ckpt.file_of(raw)].append((canon, size[raw]))
    for layer in info.layers:
        share = info.num_experts if ckpt.is_fused(layer) else 1  # a fused tensor holds every expert
        for e in range(info.num_experts):
            keys = ckpt.expert_part_keys(layer, e)
            last = max((ckpt.file_of(k) for k in keys), key=order.__getitem__)
            work.experts[last].append((layer, e, sum(size[k] // share for k in keys)))
    return work


def layout_entries(fmt: ExpertFormat) -> list[tuple[str, str, list[int], int]]:
    return [(s.name, str(s.dtype).removeprefix("torch."), list(s.shape), s.offset) for s in fmt.layout.specs]


def _save(path: Path, tensors: dict[str, torch.Tensor], files: dict[str, FileEntry]) -> None:
    from .manifest import FORMAT_VERSION

    save_safetensors(tensors, path, metadata={"format": "pt", METADATA_TAG: str(FORMAT_VERSION)})
    files[path.name] = file_entry(path)
