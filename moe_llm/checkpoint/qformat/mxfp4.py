"""MXFP4 expert tensors (GPT-OSS checkpoints), dequantized one expert at a time.

A checkpoint stores ``<proj>_blocks`` (E, R, G, 16) uint8, two FP4 (e2m1) codes per byte,
low nibble first, and ``<proj>_scales`` (E, R, G) uint8, one power-of-two exponent
(bias 127) per block of 32 values. Row r of expert e, dequantized, is the r-th output row
of that expert's matrix: R outputs, G * 32 inputs. transformers dequantizes every expert
of a layer at once (`integrations.mxfp4.convert_moe_packed_tensors`); reading one
expert's slice keeps host memory at one bf16 expert, which the loader then re-quantizes
to HQQ (or keeps, with quantization off). `encode` is the inverse, for tiny test checkpoints
in the layout GPT-OSS ships.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, B] uint8 and scales [..., G] uint8 -> values [..., G * B * 2] of `dtype`."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    b = blocks.to(torch.uint8)
    out = torch.empty(*b.shape[:-1], b.shape[-1] * 2, dtype=dtype, device=b.device)
    out[..., 0::2] = lut[(b & 0x0F).long()]
    out[..., 1::2] = lut[(b >> 4).long()]
    exp = scales.to(torch.int32) - SCALE_BIAS  # [..., G]
    out = torch.ldexp(out, exp.unsqueeze(-1).to(dtype))  # the whole block times 2**exp
    return out.reshape(*b.shape[:-2], -1)


def encode(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., C] (C a multiple of 32) -> (blocks [..., C / 32, 16], scales [..., C / 32]) uint8:
    per block of 32 the smallest power-of-two scale that brings its largest magnitude within
    6.0, each value rounded to the nearest FP4 code. `dequantize` of the result reproduces
    values that lie on that grid exactly."""
    if values.shape[-1] % 32:
        raise ValueError(f"MXFP4 encodes rows of a multiple of 32 values, got {values.shape[-1]}")
    v = values.float().reshape(*values.shape[:-1], -1, 32)
    amax = v.abs().amax(dim=-1)  # [..., G]
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-SCALE_BIAS, 128)
    scaled = v / torch.ldexp(torch.ones_like(exp), exp).unsqueeze(-1)
    mags = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1) + 8 * (scaled < 0)  # [..., G, 32]
    code = torch.where(code == 8, 0, code)  # -0.0 is stored as +0.0
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)  # low nibble first
    return blocks, (exp.to(torch.int32) + SCALE_BIAS).to(torch.uint8)
