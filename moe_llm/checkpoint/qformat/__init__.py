"""The quantized checkpoint directory: quantize once with `moe-llm quantize`, load fast.

Layout of a directory written by `quantize_checkpoint`::

    config.json, tokenizer files, ...   copied from the source (a self-contained model dir)
    model-00001.safetensors, ...        trunk tensors, compact dense projections, experts.L.E bytes
    manifest.json                       format version, source config, settings, per-file sha256

`moe_llm.load` recognises such a directory (`is_quantized_dir`) and reads it with
`QuantizedCheckpoint`: no hqq call, experts copied from mmap into pinned buffers.
Only safetensors and JSON are read; no pickle is ever loaded.
"""

from .manifest import FORMAT_VERSION, MANIFEST, Manifest, read_manifest, verify_files
from .reader import QuantizedCheckpoint, is_quantized_dir, resolve_stored_bits
from .writer import QuantizeProgress, quantize_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "Manifest",
    "QuantizeProgress",
    "QuantizedCheckpoint",
    "is_quantized_dir",
    "quantize_checkpoint",
    "read_manifest",
    "resolve_stored_bits",
    "verify_files",
]
