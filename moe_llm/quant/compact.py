"""The compact quantized weight format (HQQ math, 8-bit meta).

A matrix W [out, in] is quantized by hqq (`Quantizer.quantize`, half-quadratic
optimisation) with groups of `group_size` consecutive input columns. hqq 0.2.8
keeps the per-group scale and zero in 16/32-bit, which would cost 1 bit/param
at group 16, so we quantize both to 8 bits ourselves: affine per run of
`META_GROUP` consecutive groups, with a float32 (min, step) pair per run.

Tensors of one quantized matrix, with G = in // group_size:
  q        uint8 [out, in*bits/8]    packed codes (see `packing`)
  scale_q  uint8 [out * G]           8-bit scale
  zero_q   uint8 [out * G]           8-bit zero point
  meta     float32 [ceil(out*G/META_GROUP), 4]   (scale_min, scale_step, zero_min, zero_step)
Dequantization: w = (code - zero) * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import packing

META_GROUP = 128
DEFAULT_GROUP_SIZE = {2: 32, 3: 64, 4: 64}


@dataclass(frozen=True)
class QuantSpec:
    """How one [out, in] matrix is quantized."""

    bits: int
    group_size: int
    out_features: int
    in_features: int

    @property
    def groups(self) -> int:
        return self.out_features * (self.in_features // self.group_size)

    @property
    def meta_rows(self) -> int:
        return -(-self.groups // META_GROUP)

    def tensors(self, prefix: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {
            f"{prefix}.q": (torch.uint8, (self.out_features, packing.packed_cols(self.in_features, self.bits))),
            f"{prefix}.scale_q": (torch.uint8, (self.groups,)),
            f"{prefix}.zero_q": (torch.uint8, (self.groups,)),
            f"{prefix}.meta": (torch.float32, (self.meta_rows, 4)),
        }

    def payload_bits(self) -> int:
        """Bits moved for this matrix, without alignment padding."""
        return (
            self.out_features * packing.packed_cols(self.in_features, self.bits) * 8
            + 2 * self.groups * 8
            + self.meta_rows * 4 * 32
        )


def pick_group_size(bits: int, in_features: int, requested: int | None = None) -> int:
    """Largest group size <= the default (or requested) that divides `in_features`."""
    g = requested or DEFAULT_GROUP_SIZE[bits]
    while g > 8 and in_features % g:
        g //= 2
    if in_features % g or in_features % 8:
        raise ValueError(f"in_features={in_features} cannot be grouped for {bits}-bit quantization")
    return g


def _quantize_meta(values: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit affine quantization of a flat vector in runs of META_GROUP. Returns (q, min, step)."""
    n = values.numel()
    padded = torch.zeros(rows * META_GROUP, dtype=torch.float32, device=values.device)
    padded[:n] = values.float()
    padded[n:] = values.float()[-1] if n else 0.0
    runs = padded.view(rows, META_GROUP)
    lo, hi = runs.min(dim=1).values, runs.max(dim=1).values
    step = (hi - lo) / 255.0
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((runs - lo[:, None]) / step[:, None]).clamp_(0, 255).to(torch.uint8)
    return q.reshape(-1)[:n], lo, step


def quantize(weight: torch.Tensor, bits: int, group_size: int, optimize: bool = True) -> dict[str, torch.Tensor]:
    """Quantize W [out, in] with hqq and compact its meta. Keys: q, scale_q, zero_q, meta."""
    from hqq.core.quantize import Quantizer  # lazy: hqq pulls in optional extras

    out_f, in_f = weight.shape
    spec = QuantSpec(bits, group_size, out_f, in_f)
    device = weight.device
    w_q, meta = Quantizer.quantize(
        weight.float(),
        nbits=bits,
        channel_wise=True,
        group_size=group_size,
        optimize=optimize,
        axis=1,
        bitpack=False,
        device=str(device.type),
    )
    codes = w_q.reshape(out_f, in_f).round().clamp(0, 2**bits - 1).to(torch.uint8)
    scale = meta["scale"].reshape(-1).float()
    zero = meta["zero"].reshape(-1).float()
    rows = spec.meta_rows
    scale_q, s_min, s_step = _quantize_meta(scale, rows)
    zero_q, z_min, z_step = _quantize_meta(zero, rows)
    return {
        "q": packing.pack(codes, bits),
        "scale_q": scale_q,
        "zero_q": zero_q,
        "meta": torch.stack([s_min, s_step, z_min, z_step], dim=1).contiguous(),
    }


def expand_meta(scale_q: torch.Tensor, zero_q: torch.Tensor, meta: torch.Tensor, spec: QuantSpec):
    """8-bit meta -> float32 (scale, zero), each [out, G]."""
    idx = torch.arange(spec.groups, device=scale_q.device) // META_GROUP
    m = meta[idx]
    scale = scale_q.float() * m[:, 1] + m[:, 0]
    zero = zero_q.float() * m[:, 3] + m[:, 2]
    shape = (spec.out_features, spec.in_features // spec.group_size)
    return scale.view(shape), zero.view(shape)


def dequantize(tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantization to W [out, in] in `dtype` (torch ops, any device)."""
    codes = packing.unpack(tensors["q"], spec.bits, spec.in_features)
    scale, zero = expand_meta(tensors["scale_q"], tensors["zero_q"], tensors["meta"], spec)
    g = spec.group_size
    w = (codes.float().view(spec.out_features, -1, g) - zero[..., None]) * scale[..., None]
    return w.view(spec.out_features, spec.in_features).to(dtype)
