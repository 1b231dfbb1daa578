"""Dense bit packing of b-bit codes (b = 1 ... 8) into uint8, built from per-byte pieces.

A b-bit code is split into power-of-two bit fields, low bits first (3 = 2+1, 5 = 4+1,
6 = 4+2, 7 = 4+2+1); each field is packed on its own, 8/p fields of p bits a byte, the
first code in the lowest bits, and the pieces are concatenated. So:

    2 bits: four codes a byte          4 bits: two codes a byte (low nibble first)
    3 bits: a 2-bit stream + a 1-bit plane    5 bits: 4-bit stream + 1-bit plane
    6 bits: 4-bit stream + 2-bit stream       8 bits: the codes themselves

Why this layout and not "8 codes in b bytes": unpacking a field is one broadcast
shift-and-mask on uint8 (``bytes[:, None] >> shifts & mask``), so every bit width
dequantizes with at most three cheap uint8 passes in plain torch, on CPU and GPU
alike, and with no int32/int64 temporaries (a 40- or 48-bit group word would need
int64, 8 bytes per code of intermediate traffic). It is also the split llama.cpp's
Q5_0/Q3_K use (low bits + separate high-bit mask), which fused kernels handle well.
The packed size is exactly ``numel * bits / 8`` bytes when numel is a multiple of 8.
"""
from __future__ import annotations

import functools

import torch

# Power-of-two fields, largest first, so the common widths need the fewest passes.
_FIELDS = (8, 4, 2, 1)


@functools.cache
def fields(bits: int) -> tuple[tuple[int, int], ...]:
    """(width, shift) of each field of a ``bits``-bit code, low bits first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    out, shift, left = [], 0, bits
    for p in _FIELDS:
        if p <= left:
            out.append((p, shift))
            shift += p
            left -= p
    return tuple(out)


def packed_bytes(numel: int, bits: int) -> int:
    return numel * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 with values < 2**bits and numel a multiple of 8 -> 1-D uint8 of numel*bits/8 bytes."""
    q = codes.reshape(-1)
    if q.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {q.dtype}")
    if q.numel() % 8:
        raise ValueError(f"pack needs a multiple of 8 codes, got {q.numel()}")
    pieces = []
    for width, shift in fields(bits):
        per_byte = 8 // width
        v = ((q >> shift) & ((1 << width) - 1)).view(-1, per_byte)
        shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=q.device)
        # the fields of one byte occupy disjoint bits, so a sum is an OR
        pieces.append((v << shifts).sum(dim=1, dtype=torch.uint8) if per_byte > 1 else v.reshape(-1))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: 1-D uint8 codes of length ``numel``, on packed's device."""
    out = None
    start = 0
    for width, shift in fields(bits):
        n = numel * width // 8
        part = packed[start:start + n]
        start += n
        if width == 8:
            v = part
        else:
            shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
            v = ((part.unsqueeze(1) >> shifts) & ((1 << width) - 1)).reshape(-1)
        v = v << shift if shift else v
        out = v if out is None else out | v
    if start != packed.numel():
        raise ValueError(f"packed tensor has {packed.numel()} bytes; {numel} codes of {bits} bits need {start}")
    return out
