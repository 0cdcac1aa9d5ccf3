"""What an architecture map says: where a family keeps its experts, in the trunk and on disk.

A map is data. It names module paths (decoder layers, the MoE block in each layer,
the experts, router, shared experts and the norm before the block), the expert
layout transformers uses, the router kind, and the checkpoint key patterns of both
naming schemes (old per-expert keys and 5.x fused tensors). The routing itself is
transformers' own router module; the engine only needs the router's (E, H) weight
(and a correction bias) to guess the next layer's experts. The few accessors here
turn a path into a module; nothing probes a family by name.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from functools import cached_property

from torch import nn

KV_ARGS = ("cache", "past_key_values", "past_key_value")  # the decoder layer's KV argument, newest first
# checkpoint key -> role of one expert's matrix (old per-expert naming)
PER_EXPERT_ROLES = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# fused tensor, relative to the MoE block -> role (transformers 5.x naming)
FUSED_ROLES = {"experts.gate_up_proj": "gate_up", "experts.down_proj": "down"}
# fused expert biases, relative to the MoE block -> role (families whose layout has `bias`)
FUSED_BIAS_ROLES = {"experts.gate_up_proj_bias": "gate_up_bias", "experts.down_proj_bias": "down_bias"}


@dataclass(frozen=True)
class ExpertLayout:
    """How transformers' experts module holds a layer's experts, and what one expert computes.

    The checkpoint reader turns every layout into ours (gate rows then up rows, outputs as
    rows); what stays is the math: `bias` and `activation`. `plain` says whether that math
    is what the compiled expert kernels compute (see the property)."""

    gate_up: str = "gate_up_proj"  # (E, 2I, H): gate rows [0:I], up rows [I:2I]
    down: str = "down_proj"  # (E, H, I)
    concatenated: bool = True  # False: gate/up rows interleaved (g0, u0, g1, u1, ...)
    transposed: bool = False  # True: (E, H, 2I) and (E, I, H)
    bias: bool = False  # gate_up_proj_bias [E, 2I] / down_proj_bias [E, H], added after each matmul
    activation: str = "act_fn"  # "act_fn": act_fn(gate) * up with the module's act_fn; else one of
    # `experts.compute.ACTIVATIONS`, by name (GPT-OSS: "clamped_swiglu")
    act_args: tuple[tuple[str, float], ...] = ()  # the named activation's arguments, read off the
    # experts module when the map is bound (GPT-OSS: alpha, limit)

    @property
    def plain(self) -> bool:
        """down(act_fn(gate) * up) with no biases: the only experts the compiled kernels (Triton on
        CUDA, the C kernel on CPU) may run, and then only with a SiLU act_fn. Any other expert goes
        through the torch path (dequantize, matmul, bias, activation) everywhere."""
        return not self.bias and self.activation == "act_fn"

    def geometry(self, gate_up_shape) -> tuple[int, int, int]:
        """(experts, 2I, H) of transformers' fused gate_up tensor in this layout."""
        e, a, b = (int(n) for n in gate_up_shape)
        return (e, b, a) if self.transposed else (e, a, b)


@dataclass(frozen=True)
class RouterSpec:
    """The router as far as the engine needs it; transformers' module computes the routing."""

    kind: str = "softmax_topk"  # or "sigmoid_group_topk" (DeepSeek-V3: correction bias, group-limited top-k)
    weight: str = "weight"  # the (E, H) parameter, relative to the router module
    correction_bias: str | None = None  # added to the scores for the choice only, relative to the router
    routed_scaling: str | None = None  # config field scaling the routed weights (applied by transformers)


@dataclass(frozen=True)
class CheckpointKeys:
    """Checkpoint key patterns of one family: expert tensors and trunk renames."""

    block_names: tuple[str, ...] = ("mlp",)  # the MoE block's name in checkpoint keys (old names too)
    per_expert: dict[str, str] = field(default_factory=lambda: dict(PER_EXPERT_ROLES))
    fused: dict[str, str] = field(default_factory=lambda: dict(FUSED_ROLES))
    renames: tuple[tuple[str, str], ...] = ()  # trunk key regex -> replacement (old name -> transformers 5.x)
    layers_prefix: str = "model.layers"
    hf_renames: str | None = None  # generic map: also apply transformers' own key renames of this model type

    @cached_property
    def _prefix(self) -> str:
        head, dot, rest = self.layers_prefix.partition(".")
        return rf"(?:{re.escape(head)}\.)?{re.escape(rest)}" if dot else re.escape(head)

    @cached_property
    def per_expert_re(self) -> re.Pattern:
        blocks = "|".join(map(re.escape, self.block_names))
        roles = "|".join(map(re.escape, self.per_expert))
        return re.compile(rf"^{self._prefix}\.(\d+)\.(?:{blocks})\.experts\.(\d+)\.({roles})\.weight$")

    @cached_property
    def fused_re(self) -> re.Pattern:
        blocks = "|".join(map(re.escape, self.block_names))
        names = "|".join(map(re.escape, self.fused))
        return re.compile(rf"^{self._prefix}\.(\d+)\.(?:{blocks})\.({names})$")

    @cached_property
    def _renames(self) -> list[tuple[re.Pattern, str]]:
        return [(re.compile(p), r) for p, r in self.renames]

    @cached_property
    def _hf_renames(self) -> list:
        return transformers_renames(self.hf_renames) if self.hf_renames else []

    def classify(self, key: str) -> tuple[str, int, int | None, str] | None:
        """("per_expert", layer, expert, role) or ("fused", layer, None, role), or None for a trunk key."""
        if m := self.per_expert_re.match(key):
            return "per_expert", int(m.group(1)), int(m.group(2)), self.per_expert[m.group(3)]
        if m := self.fused_re.match(key):
            return "fused", int(m.group(1)), None, self.fused[m.group(2)]
        return None

    def canonical(self, key: str) -> str:
        """A trunk key under its transformers 5.x parameter name."""
        for pattern, repl in self._renames:
            key = pattern.sub(repl, key)
        for renaming in self._hf_renames:
            key = renaming.rename_source_key(key)[0]
        return key


def transformers_renames(model_type: str) -> list:
    """The plain key renamings (old checkpoint name -> module name) transformers' loader applies to
    `model_type`, in order; expert merges are ours (`CheckpointKeys.per_expert`). Empty where this
    transformers has none or names its tables differently."""
    try:
        from transformers import conversion_mapping as cm
        from transformers.core_model_loading import WeightRenaming

        types = [model_type, getattr(cm, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)]
        out = []
        for mt in dict.fromkeys(t for t in types if t):
            out += [t for t in cm.get_checkpoint_conversion_mapping(mt) or [] if type(t) is WeightRenaming]
        return out
    except (ImportError, AttributeError, TypeError):
        return []


@dataclass(frozen=True)
class ArchMap:
    """One family's architecture map (see the module docstring)."""

    model_type: str  # "*" for the generic map
    hf_class: str = ""  # transformers' causal-LM class, for the docs
    layers: str = "model.layers"  # the decoder layers' ModuleList, from the causal LM
    block: str = "mlp"  # decoder layer -> MoE block
    experts: str = "experts"  # block -> experts module (transformers' experts contract)
    router: str = "gate"  # block -> router module
    router_spec: RouterSpec = RouterSpec()
    shared: tuple[str, ...] = ()  # block -> shared experts (dense, stay in the trunk)
    norm: str | None = "post_attention_layernorm"  # decoder layer -> the norm whose output enters the block
    layout: ExpertLayout = ExpertLayout()
    keys: CheckpointKeys = CheckpointKeys()
    kv_arg: str = "cache"  # the decoder layer's KV cache argument (transformers >= 5.2x; older: past_key_values)
    kv_layout: str = "heads"  # "latent" (MLA): the cache holds kv_lora_rank + qk_rope_head_dim per token and layer
    verified: bool = False  # greedy tokens equal transformers' (tests/test_families.py)
    generic: bool = False  # the generic map: paths read off the skeleton (`resolve`)

    # -- module access ------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def block_of(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, self.block, None)

    def experts_of(self, layer: nn.Module) -> nn.Module | None:
        return getattr(self.block_of(layer), self.experts, None)

    def set_experts(self, layer: nn.Module, module: nn.Module) -> None:
        setattr(self.block_of(layer), self.experts, module)

    def router_of(self, layer: nn.Module) -> nn.Module | None:
        return getattr(self.block_of(layer), self.router, None)

    def router_weight(self, layer: nn.Module):
        """The router's (E, H) weight."""
        return self.router_of(layer).get_parameter(self.router_spec.weight)

    def router_bias(self, layer: nn.Module):
        """The score correction bias [E] added for the choice (DeepSeek-V3), or None."""
        name = self.router_spec.correction_bias
        if name is None:
            return None
        router = self.router_of(layer)
        mod_name, _, attr = name.rpartition(".")
        mod = router.get_submodule(mod_name) if mod_name else router
        return getattr(mod, attr, None)

    def norm_of(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, self.norm, None) if self.norm else None

    def kv_arg_of(self, layer: nn.Module) -> str:
        """The map's KV argument if the layer takes it, else the older name it does take."""
        params = inspect.signature(layer.forward).parameters
        if self.kv_arg in params:
            return self.kv_arg
        return next((a for a in KV_ARGS if a in params), self.kv_arg)

    def expert_prefix(self, layer_idx: int) -> str:
        """Parameter-name prefix of layer `layer_idx`'s experts in the model."""
        return f"{self.layers}.{layer_idx}.{self.block}.{self.experts}."

    def is_expert_param(self, name: str) -> bool:
        """Whether model parameter `name` belongs to routed experts (never part of the trunk)."""
        return f".{self.block}.{self.experts}." in name and name.startswith(f"{self.layers}.")

    def keep_dense(self, name: str) -> bool:
        """Whether module `name` (relative to a decoder layer) stays 16-bit: experts and the router."""
        return (
            name.startswith(f"{self.block}.{self.experts}")
            or name == f"{self.block}.{self.router}"
            or name.startswith(f"{self.block}.{self.router}.")
        )
