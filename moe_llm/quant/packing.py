"""Bit packing for the compact weight format.

Codes of a matrix [rows, cols] are packed along the column axis in a *strided*
layout: for b-bit codes (b in 1, 2, 4) there are p = 8 // b codes per byte and
byte c of a row holds columns c, c + cols/p, c + 2*cols/p, ... at bit offsets
0, b, 2b, .... A kernel that loads a contiguous tile of packed bytes therefore
unpacks p contiguous column tiles, which keeps both weight and activation loads
coalesced. 3-bit codes are two planes: the low 2 bits packed as 2-bit, then
the high bit packed as 1-bit, concatenated along the column axis.
"""

from __future__ import annotations

import torch


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per row for `bits`-bit codes of `cols` columns."""
    if bits == 3:
        return packed_cols(cols, 2) + packed_cols(cols, 1)
    per_byte = 8 // bits
    if cols % per_byte:
        raise ValueError(f"{cols} columns are not divisible by {per_byte} ({bits}-bit packing)")
    return cols // per_byte


def _pack_pow2(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = codes.shape
    per_byte = 8 // bits
    step = cols // per_byte
    codes = codes.to(torch.uint8)
    out = torch.zeros(rows, step, dtype=torch.uint8, device=codes.device)
    for k in range(per_byte):
        out |= codes[:, k * step : (k + 1) * step] << (bits * k)
    return out


def _unpack_pow2(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * k)) & mask for k in range(per_byte)]
    out = torch.cat(parts, dim=1)
    assert out.shape[1] == cols
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [rows, cols] (values < 2**bits) into uint8 [rows, packed_cols]."""
    rows, cols = codes.shape
    packed_cols(cols, bits)  # validates divisibility
    if bits == 3:
        codes = codes.to(torch.uint8)
        return torch.cat([_pack_pow2(codes & 3, 2), _pack_pow2(codes >> 2, 1)], dim=1)
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"unsupported bits {bits}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    return _pack_pow2(codes, bits)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [rows, packed_cols] -> uint8 codes [rows, cols]."""
    if bits == 3:
        lo_cols = packed_cols(cols, 2)
        lo = _unpack_pow2(packed[:, :lo_cols], 2, cols)
        hi = _unpack_pow2(packed[:, lo_cols:], 1, cols)
        return lo | (hi << 2)
    if bits == 8:
        return packed
    return _unpack_pow2(packed, bits, cols)
