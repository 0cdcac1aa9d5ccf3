"""Tiny random-init MoE checkpoints in the real HF format (no download).

`make_tiny(dir, family)` writes config.json, safetensors weights and a
byte-level BPE tokenizer (trained offline on a fixed text) with a chat
template. The weights are random: output is noise, routing is near uniform.
Used by the tests, the examples and the README's demo fallback.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError

SINGLE_FILE = "model.safetensors"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token
to a few expert networks. Experts live in host memory and are copied to the GPU when
the router asks for them. An LRU cache keeps recently used experts on the device, and
the next layer's router guesses which experts come next. Beautiful is better than ugly.
Explicit is better than implicit. Simple is better than complex. Complex is better than
complicated. Flat is better than nested. Sparse is better than dense. Readability counts.
def main(): return 0  # numbers 0123456789 and symbols ()[]{}<>.,;:!?'"-_=+*/\\|@#$%^&~`
"""


def train_tokenizer(vocab_size: int = 512):
    """A deterministic byte-level BPE wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# multi-head latent attention (DeepSeek-V2/V3 and kin) at tiny size, with a dense first layer
_MLA = dict(
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
    num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
)  # fmt: skip
_INDEXER = dict(_MLA, index_n_heads=4, index_head_dim=16, index_topk=16)  # DeepSeek sparse attention

_GRANITE_SCALES = dict(embedding_multiplier=2.0, logits_scaling=1.5, residual_multiplier=0.5, attention_multiplier=0.2)

# family -> config fields beyond the tiny common ones (hidden 64, 4 heads, experts of 128)
TINY_OVERRIDES: dict[str, dict] = {
    "mixtral": dict(intermediate_size=128),
    "qwen3_moe": dict(
        intermediate_size=256,
        moe_intermediate_size=128,
        head_dim=16,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),  # fmt: skip
    "olmoe": dict(intermediate_size=128),
    "qwen2_moe": dict(shared_expert_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek_v2": dict(_MLA, q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(_MLA, routed_scaling_factor=2.5, norm_topk_prob=True),
    "gpt_oss": dict(layer_types=None, sliding_window=4),  # a window shorter than the test prompts
    "phimoe": dict(),
    "granitemoe": dict(_GRANITE_SCALES),
    "granitemoeshared": dict(_GRANITE_SCALES, shared_intermediate_size=128),
    "granitemoehybrid": dict(
        _GRANITE_SCALES, layer_types=["mamba", "attention", "mamba", "attention"], shared_intermediate_size=128
    ),
    "hunyuan_v1_moe": dict(moe_topk=2, num_shared_expert=1),
    # through the generic map
    "axk1": dict(_MLA),
    "axk2": dict(_INDEXER),
    "deepseek_v32": dict(_INDEXER),
    "glm_moe_dsa": dict(_INDEXER),
    "glm4_moe_lite": dict(_MLA),
    "dots1": dict(n_shared_experts=1),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "zaya": dict(num_experts_per_tok=1),
    "granitemoe_swa": dict(_GRANITE_SCALES),
}
# decoder layers a family needs at least (dense first layers, hybrid attention patterns)
TINY_LAYERS = {f: 3 for f in ("deepseek_v2", "deepseek_v3", "axk1", "axk2", "deepseek_v32", "glm_moe_dsa",
                              "glm4_moe_lite", "lfm2_moe")}  # fmt: skip
TINY_LAYERS.update(jamba=4, qwen3_next=4, granitemoehybrid=4, lara_mini=4)
FAMILIES = tuple(TINY_OVERRIDES)
_TINY_COMMON = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts_per_tok=2,
)  # fmt: skip
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def tiny_config(
    family: str,
    vocab_size: int,
    layers: int = 2,
    experts: int = 8,
    bos: int = 0,
    eos: int = 1,
    pad: int = 2,
    overrides: dict | None = None,
):
    """A tiny config of transformers' `family` (any model type: the common tiny fields it has,
    `TINY_OVERRIDES[family]`, then `overrides`)."""
    from transformers import AutoConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size, num_hidden_layers=layers, max_position_embeddings=4096,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
    )  # fmt: skip
    legacy = {"mixtral": (MixtralConfig, "num_local_experts"), "qwen3_moe": (Qwen3MoeConfig, "num_experts"),
              "olmoe": (OlmoeConfig, "num_experts")}  # fmt: skip
    if family in legacy and not overrides:  # the shapes the other tests were written against
        cls, n = legacy[family]
        return cls(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **{n: experts},
                   **TINY_OVERRIDES[family], **common)  # fmt: skip
    try:
        cls = type(AutoConfig.for_model(family))
    except ValueError:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}") from None
    defaults = cls()
    kwargs = {k: v for k, v in _TINY_COMMON.items() if hasattr(defaults, k)}
    kwargs.update({k: experts for k in _EXPERT_COUNTS if hasattr(defaults, k)})
    kwargs.update(TINY_OVERRIDES.get(family, {}))
    kwargs.update(overrides or {})
    return cls(**{**kwargs, **common})


def make_tiny(
    out_dir: str | Path,
    family: str = "mixtral",
    seed: int = 0,
    layers: int = 2,
    experts: int = 8,
    fused: bool = False,
    shards: int = 1,
    init_std: float = 0.08,
    overrides: dict | None = None,
) -> Path:
    """Write a seeded random-init tiny MoE checkpoint in `shards` safetensors files. Returns the directory.

    `fused` keeps transformers 5.x's fused expert tensors; otherwise experts are saved per
    expert, in the family's original key names (transformers' save_pretrained conversion).
    `family` is any transformers model type (`tiny_config`); `overrides` are config fields."""
    from transformers import AutoModelForCausalLM

    if shards < 1:
        raise ConfigError(f"shards must be at least 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    cfg = tiny_config(
        family, len(tok), layers, experts, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, overrides
    )
    cfg.initializer_range = init_std  # a wider init gives routing with some structure
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, init_std)
        saved = set(model.state_dict())
        for name, b in model.named_buffers():  # saved buffers too: DeepSeek-V3's e_score_correction_bias
            if name in saved and b.is_floating_point():
                b.normal_(0.0, init_std)
    if fused:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        cfg.save_pretrained(out)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)
    else:
        with _no_progress_bars():
            model.save_pretrained(out, max_shard_size="10GB")  # one file: split below, to exactly `shards`
        from safetensors.torch import load_file

        state = load_file(str(out / SINGLE_FILE))
        (out / SINGLE_FILE).unlink()
    _write_shards(state, out, shards)
    tok.save_pretrained(out)
    (out / "MOE_LLM_TINY.json").write_text(
        json.dumps({"family": family, "seed": seed, "random_weights": True}, indent=2)
    )
    return out


# what GPT-OSS's config.json says of its MXFP4 experts (everything else stays 16-bit)
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def to_mxfp4(src: str | Path, dst: str | Path) -> Path:
    """A copy of tiny GPT-OSS checkpoint `src` in the layout GPT-OSS ships: each layer's experts as
    MXFP4 ``<proj>_blocks`` (E, out, in / 32, 16) and ``<proj>_scales`` (E, out, in / 32) in place of
    transformers' (E, in, out) tensor (`qformat.mxfp4.encode`), biases and the trunk unchanged, and
    config.json's `quantization_config` saying mxfp4. Returns `dst`."""
    import shutil

    from safetensors.torch import load_file

    from .checkpoint.qformat import mxfp4
    from .checkpoint.qformat.safetensors_io import save_safetensors

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    renamed = {}
    for f in sorted(dst.glob("*.safetensors")):
        state = load_file(str(f))
        for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            blocks, scales = mxfp4.encode(state.pop(key).transpose(1, 2))  # rows are outputs
            state[f"{key}_blocks"], state[f"{key}_scales"] = blocks.contiguous(), scales.contiguous()
            renamed[key] = f.name
        save_safetensors(state, f, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        for key, file in renamed.items():
            del data["weight_map"][key]
            data["weight_map"].update({f"{key}_blocks": file, f"{key}_scales": file})
        index.write_text(json.dumps(data, indent=2) + "\n")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


@contextmanager
def _no_progress_bars():
    """transformers' "Writing model shards" bar is not ours to show; restore the setting after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def shard_groups(sizes: list[int], shards: int) -> list[list[int]]:
    """Split tensors (in order) into `shards` non-empty runs of about equal bytes."""
    if shards > len(sizes):
        raise ConfigError(f"cannot split {len(sizes)} tensors into {shards} shards")
    total, done, groups = sum(sizes), 0, [[] for _ in range(shards)]
    k = 0
    for i, size in enumerate(sizes):
        later_shards, left = shards - 1 - k, len(sizes) - i
        if groups[k] and later_shards and (done >= total * (k + 1) / shards or left <= later_shards):
            k += 1
        groups[k].append(i)
        done += size
    return groups


def _write_shards(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """`model.safetensors`, or `model-0000i-of-0000N.safetensors` and the index transformers writes."""
    from .checkpoint.qformat.safetensors_io import save_safetensors

    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # an earlier run's shards
    names = list(state)
    if shards == 1:
        save_safetensors(state, out / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(shard_groups([state[n].nbytes for n in names], shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_safetensors({names[j]: state[names[j]] for j in group}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys((names[j] for j in group), file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
