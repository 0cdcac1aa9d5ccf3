"""Compact HQQ format: packing round trips, bounded error per bit-width, bits moved."""

from __future__ import annotations

import pytest
import torch

from moe_llm.experts.format import ExpertFormat
from moe_llm.quant import QuantSpec, compact, packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (12, 64), generator=g)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (12, packing.packed_cols(64, bits))
    assert torch.equal(packing.unpack(packed, bits, 64), codes.to(torch.uint8))


# measured relative Frobenius errors on N(0,1) weights: 2-bit 0.37, 3-bit 0.18, 4-bit 0.086
@pytest.mark.parametrize("bits,bound", [(2, 0.42), (3, 0.22), (4, 0.11)])
def test_relative_error_is_bounded(bits, bound):
    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.02
    spec = QuantSpec(bits, compact.pick_group_size(bits, 256), 128, 256)
    t = compact.quantize(w, bits, spec.group_size)
    err = ((compact.dequantize(t, spec, torch.float32) - w).norm() / w.norm()).item()
    assert err < bound


def test_error_decreases_with_bits():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    errs = []
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, compact.pick_group_size(bits, 128), 64, 128)
        t = compact.quantize(w, bits, spec.group_size)
        errs.append((compact.dequantize(t, spec, torch.float32) - w).norm().item())
    assert errs[0] > errs[1] > errs[2]


def test_8bit_meta_adds_little_error_over_hqq():
    """Our 8-bit scale/zero must cost little next to hqq's own 16/32-bit meta."""
    from hqq.core.quantize import Quantizer

    torch.manual_seed(2)
    w = torch.randn(64, 256)
    wq, meta = Quantizer.quantize(w, nbits=2, group_size=32, axis=1, bitpack=False, device="cpu")
    ref = ((wq - meta["zero"]) * meta["scale"]).reshape(w.shape)
    spec = QuantSpec(2, 32, 64, 256)
    ours = compact.dequantize(compact.quantize(w, 2, 32), spec, torch.float32)
    e_ref, e_ours = (ref - w).norm().item(), (ours - w).norm().item()
    assert e_ours < 1.05 * e_ref


@pytest.mark.parametrize("bits,max_bpp", [(2, 3.0), (3, 3.5), (4, 4.5)])
def test_expert_bits_per_param(bits, max_bpp):
    # Mixtral-8x7B expert geometry: only the layout is built, nothing is allocated
    fmt = ExpertFormat.build(hidden=4096, intermediate=14336, bits=bits, dtype=torch.bfloat16)
    assert fmt.bits_per_param <= max_bpp
    assert fmt.bits_per_param > bits


def test_expert_format_encode_then_dense_matches_dequantize():
    torch.manual_seed(3)
    fmt = ExpertFormat.build(hidden=64, intermediate=32, bits=3, dtype=torch.float32)
    gate_up, down = torch.randn(64, 64) * 0.05, torch.randn(64, 32) * 0.05
    buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    fmt.layout.write(buf, fmt.encode(gate_up, down))
    views = fmt.layout.views(buf)
    w = fmt.dense(views, "down_proj")
    assert w.shape == down.shape
    assert ((w - down).norm() / down.norm()).item() < 0.25
