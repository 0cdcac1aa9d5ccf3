"""Every decode GEMV launch the engine makes builds for an H200 (sm_90), on any machine.

Triton compiles to a cubin without a GPU, so CI (which has none) catches a kernel that no longer
builds, or that a new Triton release no longer accepts, before a GPU session spends device time
on it. Each case takes its constexprs from the engine's own launch builders (`triton_moe._launch`
with the built-in tiles, `triton_gemv._launch` for the dense int8 GEMVs, `GemvGroup`'s), for the
Mixtral-8x7B shapes and tiny ones. The Gluon GEMVs (`kernels/gemv_i8.py`) must also use no shared
memory: keeping each 32-column block on one pair of lanes, whose sums meet by one shuffle, with
no layout moves through shared memory, is what made them fast.
"""

from __future__ import annotations

import platform
import sys

import pytest
import torch

if sys.platform == "linux" and platform.machine() == "x86_64":  # the test extra installs Triton here
    import triton
else:  # pragma: no cover
    triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from moe_llm.experts.format import ExpertFormat  # noqa: E402
from moe_llm.kernels import gemv_i8  # noqa: E402
from moe_llm.kernels import triton_gemv as tg  # noqa: E402
from moe_llm.kernels import triton_moe as tm  # noqa: E402
from moe_llm.kernels import triton_moe_rows as tr  # noqa: E402
from moe_llm.quant.compact import QuantSpec  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)
POINTERS = {  # pointer arguments by name; every other argument is an int32
    "xq_ptr": "*i32", "dx_ptr": "*fp32", "xs_ptr": "*fp32", "idx_ptr": "*i64", "table_ptr": "*i64",
    "base_ptr": "*u8", "pcut_ptr": "*i32", "cnt_ptr": "*i32", "q_ptr": "*u8", "sq_ptr": "*u8", "zq_ptr": "*u8",
    "meta_ptr": "*fp32", "start_ptr": "*i32", "rows_ptr": "*i32",
}  # fmt: skip


SHAPES = ("N", "P", "P1", "G", "stride_q")  # the leading launch ints, compiled into the Gluon GEMVs


def _shapes(ints: tuple, names=SHAPES) -> dict:
    return {n: v for n, v in zip(SHAPES, ints, strict=False) if n in names}


def _compile(fn, consts: dict, out: str, gluon: bool):
    consts = dict(consts)
    warps = consts.pop("num_warps", 4)
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, out if n == "out_ptr" else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    source = (GluonASTSource if gluon else ASTSource)(fn, sig, consts, attrs)
    return triton.compile(source, target=H200, options={"num_warps": warps})


FORMATS = [
    pytest.param(f"{size}-{bits}bit", ExpertFormat.build(h, i, bits, torch.bfloat16), id=f"{size}-{bits}bit")
    for bits in (2, 3, 4)
    for size, h, i in (("mixtral", 4096, 14336), ("tiny", 64, 128))
]


@pytest.mark.parametrize("name,fmt", FORMATS)
def test_routed_expert_kernels_build(name, fmt):
    """The routed-experts GEMVs (lone token, with and without the CPU's share) and the batched
    rows kernel, with the tiles the engine takes for this width."""
    tuning = tm.default_tuning(fmt.bits)
    for proj, out in (("gate_up_proj", "*fp32"), ("down_proj", "*fp64")):
        _, ints, consts, _, _ = tm._launch(fmt, proj, 2, tuning)
        for cpu in (False, True):
            kernel = _compile(gemv_i8._moe_gemv_i8_kernel, dict(consts, CPU=cpu, **_shapes(ints)), out, gluon=True)
            assert kernel.metadata.shared == 0, (name, proj, cpu)
        rows = {k: v for k, v in consts.items() if k not in ("QB", "L3")}
        _compile(tr._moe_rows_kernel, dict(rows, CPU=True, RB=4), out, gluon=False)


@pytest.mark.parametrize(
    "spec", [QuantSpec(4, 64, 6144, 4096), QuantSpec(4, 64, 32000, 4096), QuantSpec(2, 32, 64, 128),
             QuantSpec(3, 64, 40, 128), QuantSpec(4, 8, 16, 64)], ids=str,
)  # fmt: skip
def test_dense_int8_kernels_build(spec):
    """One matrix (o_proj, the LM head) and the q/k/v group, as `linear` and `GemvGroup` launch them."""
    _, ints, consts = tg._launch(spec, False, 1)
    kernel = _compile(gemv_i8._qgemv_i8_kernel, dict(consts, **_shapes(ints)), "*bf16", gluon=True)
    assert kernel.metadata.shared == 0
    group = {k: v for k, v in consts.items() if k != "GLU"} | _shapes(ints, SHAPES[1:])
    group.update(MP=4, L1=gl.BlockedLayout([1], [32], [consts["num_warps"]], [0]))
    kernel = _compile(gemv_i8._group_gemv_i8_kernel, group, "*bf16", gluon=True)
    assert kernel.metadata.shared == 0


def _other_kernels():
    """(kernel, argument types, constexprs) of every other kernel of a decode or prefill step, as
    its launch site builds them for Mixtral-8x7B in bfloat16."""
    from moe_llm.kernels import triton_attention as ta
    from moe_llm.kernels import triton_dequant as td
    from moe_llm.kernels import triton_trunk as tt

    bf16, f32, f64, i32, i64 = "*bf16", "*fp32", "*fp64", "*i32", "*i64"
    spec = QuantSpec(2, 32, 14336, 4096)
    for x in (bf16, f32):  # x of gate_up, h of down
        yield tg._quant_kernel, {"x_ptr": x, "xq_ptr": i32, "dx_ptr": f32, "xs_ptr": f32}, {"QB": 32, "BLOCK": 1024}
    for cpu in (False, True):
        types = {"part_ptr": f64, "w_ptr": f32, "out_ptr": bf16, "cpu_ptr": f64, "pcut_ptr": i32}
        yield tm._combine_kernel, types, {"HAS_W": True, "CPU": cpu, "BLOCK": 1024}
    types = {"idx_ptr": i64, "table_ptr": i64, "take_ptr": i32, "pcut_ptr": i32, "x_ptr": bf16, "head_ptr": i32,
             "xbox_ptr": f32}  # fmt: skip
    yield tm._publish_kernel, types, {"KT": 2, "NP": 2, "BLOCK": 1024}
    yield tr._groups_kernel, {"idx_ptr": i64, "cnt_ptr": i32}, {"RB": 4, "NP": 8}
    types = {
        "q_ptr": bf16,
        "k_ptr": bf16,
        "v_ptr": bf16,
        "m_ptr": "*u8",
        "acc_ptr": f32,
        "ml_ptr": f32,
        "scale": "fp32",
    }
    yield (
        ta._attention_split_kernel,
        types,
        {"REP": 4, "BLOCK_M": 16, "D": 128, "SPLIT": ta.SPLIT, "BLOCK_K": ta.BLOCK_K},
    )
    yield ta._attention_merge_kernel, {"acc_ptr": f32, "ml_ptr": f32, "out_ptr": bf16}, {"D": 128}
    yield (
        tt._rmsnorm_kernel,
        {"x_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16, "eps": "fp32"},
        {"BLOCK": 4096, "num_warps": 8},
    )
    types = {"x_ptr": bf16, "w_ptr": bf16, "logits_ptr": bf16, "scores_ptr": f32, "idx_ptr": i64}
    yield tt._router_kernel, types, {"K": 2, "KP": 2, "EP": 8, "BLOCK_H": 1024, "num_warps": 8}
    names = ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr")
    yield tt._rotary_kernel, dict.fromkeys(names, bf16), {"D": 128, "BLOCK": 128, "num_warps": 1}
    consts = {"BITS": 2, "GROUP": 32, "BLOCK_N": 64, "BLOCK_P": tg.block_p(spec, widest=32), "num_warps": tg.NUM_WARPS}
    yield (
        td._dequant_kernel,
        {"q_ptr": "*u8", "sq_ptr": "*u8", "zq_ptr": "*u8", "meta_ptr": f32, "out_ptr": bf16},
        consts,
    )


@pytest.mark.parametrize("kernel,types,consts", [pytest.param(*case, id=case[0].__name__) for case in _other_kernels()])
def test_other_kernels_build(kernel, types, consts):
    """The float GEMV, the activation quantizer, the combine, the CPU road's publish, the rows'
    grouping, decode attention, RMSNorm, the router, the rotary embedding and prefill's dequantize."""
    consts = dict(consts)
    warps = consts.pop("num_warps", 4)
    types = {**POINTERS, **types}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in kernel.arg_names}
    triton.compile(ASTSource(kernel, sig, consts, {}), target=H200, options={"num_warps": warps})
