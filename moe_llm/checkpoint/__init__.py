"""Where weights come from: a checkpoint directory (`source`: HF safetensors, or our quantized
directory through `qformat`), the architecture maps that say where a family keeps its layers,
experts, router and norms (`arch`), and loading (`model`: the meta skeleton and trunk;
`loader`: plan first, then trunk, store and engine)."""
