"""Dequantization of the affine q-formats on CUDA in one Triton kernel.

The torch path (unpack, float32 codes, addcmul, cast) makes several passes over float32
temporaries; at batch 1 that costs 17x bitsandbytes' fused nf4 GEMV for the linears of a
Llama-3-8B step (eval/results/gpu-round2). This kernel reads each packed byte, its group's
scale and minimum once and writes the weight in the compute dtype: one memory-bound pass,
after which the matmul reads the dense weight. Layout as in bitpack.py: a code of ``bits``
bits is split into at most two fields (widths WA and WB), each packed low bits first into
its own section of bytes.
"""
from __future__ import annotations

import torch

from .bitpack import fields

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None

BLOCK = 1024  # elements per program: large enough to hide load latency, small enough for any grid


if triton is not None:
    @triton.jit
    def _dequant(packed, scale, low, out, numel, off_b, PADDED: tl.constexpr, COLS: tl.constexpr,
                 GROUP: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
        # int32 offsets and compile-time divisors: 64-bit division is emulated on GPUs and made the
        # kernel compute-bound; WIDE (int64) only for tensors of 2**31 elements or more
        pid = tl.program_id(0).to(tl.int64) if WIDE else tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        live = offs < numel
        per_a = 8 // WA
        byte_a = tl.load(packed + offs // per_a, mask=live, other=0).to(tl.int32)
        code = (byte_a >> ((offs % per_a) * WA).to(tl.int32)) & ((1 << WA) - 1)
        if WB > 0:
            per_b = 8 // WB
            byte_b = tl.load(packed + off_b + offs // per_b, mask=live, other=0).to(tl.int32)
            code = code | (((byte_b >> ((offs % per_b) * WB).to(tl.int32)) & ((1 << WB) - 1)) << WA)
        grp = offs // GROUP
        s = tl.load(scale + grp, mask=live, other=0.0).to(tl.float32)
        m = tl.load(low + grp, mask=live, other=0.0).to(tl.float32)
        w = m + code.to(tl.float32) * s
        row = offs // PADDED
        col = offs % PADDED
        tl.store(out + row * COLS + col, w.to(out.dtype.element_ty), mask=live & (col < COLS))


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def dequantize(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, *, bits: int, group: int,
               shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Dense weight of ``shape`` from codes packed as bitpack.pack does, on packed's (CUDA) device."""
    rows, groups = scale.shape
    padded_cols = groups * group
    numel = rows * padded_cols
    (wa, _), *rest = fields(bits)
    wb = rest[0][0] if rest else 0
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(numel, BLOCK),)
    _dequant[grid](packed, scale, low, out, numel, numel * wa // 8, PADDED=padded_cols, COLS=shape[-1],
                   GROUP=group, WA=wa, WB=wb, BLOCK=BLOCK, WIDE=numel + BLOCK >= 2**31)
    return out
