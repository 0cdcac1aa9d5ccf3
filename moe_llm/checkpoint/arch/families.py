"""The architecture maps of the families tested against transformers (tests/test_families.py).

Each entry is data: module paths, expert layout, router kind and checkpoint keys
(see `spec`). A family that is not listed loads through the generic map
(`resolve.GENERIC`), whose paths are read off the transformers skeleton.
The results of each family are tracked in docs/families.md.
"""

from __future__ import annotations

from .spec import FUSED_BIAS_ROLES, FUSED_ROLES, ArchMap, CheckpointKeys, ExpertLayout, RouterSpec

FUSED_PROJ = {"gate_up_proj": "gate_up", "down_proj": "down"}
MXFP4_PARTS = ("blocks", "scales")

# old Mixtral-style checkpoints name the block `block_sparse_moe`; transformers 5.x calls it `mlp`
_MIXTRAL_KEYS = CheckpointKeys(block_names=("block_sparse_moe", "mlp"), renames=((r"\.block_sparse_moe\.", ".mlp."),))
_DEEPSEEK_ROUTER = RouterSpec(kind="softmax_topk", routed_scaling="routed_scaling_factor")
_SIGMOID_GROUP = RouterSpec(
    kind="sigmoid_group_topk", correction_bias="e_score_correction_bias", routed_scaling="routed_scaling_factor"
)
_GRANITE_KEYS = CheckpointKeys(
    block_names=("block_sparse_moe",),
    fused={"input_linear.weight": "gate_up", "output_linear.weight": "down", **FUSED_ROLES},
    renames=((r"\.block_sparse_moe\.router\.layer\.weight$", ".block_sparse_moe.router.weight"),),
)
_GPT_OSS_KEYS = CheckpointKeys(
    fused={
        **FUSED_ROLES, **FUSED_BIAS_ROLES,
        **{f"experts.{p}_{part}": f"{r}.{part}" for p, r in FUSED_PROJ.items() for part in MXFP4_PARTS},
    },  # MXFP4 checkpoints (as shipped): experts.gate_up_proj_blocks / _scales, down_proj_blocks / _scales
)  # fmt: skip
_GRANITE = dict(block="block_sparse_moe", router="router", keys=_GRANITE_KEYS)

FAMILIES: dict[str, ArchMap] = {
    m.model_type: m
    for m in (
        ArchMap("mixtral", "MixtralForCausalLM", keys=_MIXTRAL_KEYS, verified=True),
        ArchMap("qwen2_moe", "Qwen2MoeForCausalLM", shared=("shared_expert", "shared_expert_gate"), verified=True),
        ArchMap("qwen3_moe", "Qwen3MoeForCausalLM", verified=True),
        ArchMap("olmoe", "OlmoeForCausalLM", verified=True),
        ArchMap(
            "deepseek_v2",
            "DeepseekV2ForCausalLM",
            router_spec=_DEEPSEEK_ROUTER,
            shared=("shared_experts",),
            kv_layout="latent",
            verified=True,
        ),  # fmt: skip
        ArchMap(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            router_spec=_SIGMOID_GROUP,
            shared=("shared_experts",),
            kv_layout="latent",
            verified=True,
        ),  # fmt: skip
        ArchMap(
            "phimoe",
            "PhimoeForCausalLM",
            router="router",
            router_spec=RouterSpec(kind="sparsemixer"),
            keys=CheckpointKeys(
                block_names=("block_sparse_moe", "mlp"),
                renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.gate\.weight$", ".mlp.router.weight")),
            ),
            verified=True,
        ),  # fmt: skip
        ArchMap("granitemoe", "GraniteMoeForCausalLM", **_GRANITE, verified=True),
        ArchMap("granitemoeshared", "GraniteMoeSharedForCausalLM", **_GRANITE, verified=True),
        ArchMap("granitemoehybrid", "GraniteMoeHybridForCausalLM", **_GRANITE, verified=True),
        ArchMap(
            "hunyuan_v1_moe",
            "HunYuanMoEV1ForCausalLM",
            router_spec=RouterSpec(weight="wg.weight"),
            shared=("shared_mlp",),
            verified=True,
        ),  # fmt: skip
        ArchMap(
            "gpt_oss",
            "GptOssForCausalLM",
            router="router",
            keys=_GPT_OSS_KEYS,
            # gate/up interleaved and transposed, biases, a clamped SwiGLU: the torch expert path
            layout=ExpertLayout(concatenated=False, transposed=True, bias=True, activation="clamped_swiglu"),
            verified=True,
        ),  # fmt: skip
    )
}

# families without a map of their own whose greedy tokens equal transformers' through the generic
# map (tests/test_families.py); any other family loads with a warning that it is not verified
GENERIC_VERIFIED = frozenset(
    ("afmoe", "axk1", "axk2", "cohere2_moe", "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo",
     "flint", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "granitemoe_swa", "hy_v3", "jamba", "kolibri1", "laguna",
     "lfm2_moe", "mellum", "mimo_v2_flash", "minimax_m2", "qwen3_5_moe_text", "qwen3_next", "solar_open")
)  # fmt: skip
