"""Fused dequantize + matrix product for 2-8 input rows of the affine q-formats, in Triton (issue 14).

A speculative draft step runs 8-16 rows (the tree's newest nodes, padded to 8, 16, 32 or 64) through every
linear layer. The GEMV kernel (:mod:`.gemv_triton`) runs one program per input row, each decoding every code again: 8 rows
cost 6.6x one. Dequantize + matmul writes and re-reads 2 bytes per weight, 14x the bytes of a 2.25-bit
draft's codes, whatever the rows (10.5 ms for the linears of an 8B step on the H200).

Here each program owns BM input rows x BN output rows and a share of K (SPLIT_K programs per output tile add
into a float32 output): it loads the int32 words of its BN weight rows once per K step, and for each code
position of a word decodes a [BN, BK / PER] tile in registers (shift, mask, scale, min) and multiplies it
with the matching columns of x on the tensor cores (``tl.dot``, fp32 accumulation). Every code is decoded
once per BM rows and no weight is written. Measured on the H200 (scripts/gemm_bench.py): 7.5-8.7 ms for
2-8 rows of that 8B step, so :mod:`.affine` sends 2..MAX_ROWS rows here; more rows dequantize.

Layout (as :mod:`.gemv_triton`): the affine q-formats as :mod:`.bitpack` stores them (at most two bit
fields, each its own section, code i of a W-bit field at bit W * (i % (32 // W)) of int32 word
i // (32 // W), rows padded to whole groups), float16 scale and min per group. No nf4 kernel: the same
design over bitsandbytes' layout cost 23-25 ms for 2-16 rows against 12.5 ms for dequantize + matmul.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .bitpack import fields
from .gemv_triton import _INTERPRET, _rows, _words, triton_cdiv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers fall back to dequantize + matmul
    triton = None

# Rows these kernels take (scripts/gemm_bench.py, H200, all linears of an 8B step in q2/128, CUDA graph):
# 2-8 rows 7.5-8.7 ms against 8.8-30.8 ms for the GEMV kernel (one program per row) and 10.5 ms for
# dequantize + matmul. At 16 rows the two are even (10.55 against 10.50 ms; a 16-row step of the whole 8B
# draft 16.2 ms through this kernel against 15.6 through dequantize + matmul), so 16 rows keep the older
# path; at 64 rows dequantize + matmul wins (10.5 against 17-28 ms).
MAX_ROWS = 8
MIN_ROWS = 2  # a single row is the GEMV kernel's case (4.6 ms)


@dataclass(frozen=True)
class Config:
    """BM input rows x BN output rows per program, BK columns per K step, SPLIT_K programs per output tile,
    warps and pipeline stages."""

    bm: int
    bn: int
    bk: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


SM_PROGRAMS = 4 * 132  # programs that keep an H100/H200 (132 SMs) busy: loads in flight on every SM


@functools.cache  # called on every launch: eager steps pay for Python
def default_config(m: int, n: int, k: int, group: int) -> Config:
    """A fixed table (no autotuning: the first call may happen inside a CUDA graph capture).

    BM covers the rows in one tile (so each code is decoded once), tl.dot's minimum of 16 below. BN 64 and BK
    512 (raised by the launcher where a 1-bit field needs it): the best or within 3% of it for three of the four
    8B shapes at 16 rows in the H200 sweep. The product is bound by the latency of the codes' loads and of
    the dependent dots, so SPLIT_K divides K among more programs until about SM_PROGRAMS run, keeping >= 8 K
    steps each. Re-tune: scripts/gemm_bench.py --sweep."""
    bm = min(64, max(16, 1 << (m - 1).bit_length()))
    bn, bk = 64, 512
    tiles = triton_cdiv(m, bm) * triton_cdiv(n, bn)
    split = 1
    while tiles * split * 2 <= SM_PROGRAMS and triton_cdiv(k, bk) >= 8 * split:
        split *= 2
    return Config(bm=bm, bn=bn, bk=bk, split_k=split)


def available(x: torch.Tensor) -> bool:
    """True when these kernels can run on x's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton is not None and (x.is_cuda or _INTERPRET)


if triton is not None:
    # History (scripts/gemm_bench.py on the H200, 16 rows, all linears of an 8B step in q2/128, CUDA graph;
    # dequantize + matmul costs 10.5 ms):
    # (1) each word expanded into its codes along a new axis, reshaped to [BN, BK], one dot per tile: 33.7 ms
    #     (default tiles; the reshape shuffles through shared memory);
    # (2) one small dot per code position t of a word: 18.5 ms at the default tiles, 11.7 ms at the best tile
    #     per shape (eval/results/spec-gpu/gemm);
    # (3) GemLite's way, a [BN, BK] tile gathered per column (word c // PER, shift W * (c % PER)) and one dot:
    #     77 ms: from this N-major layout the gathers do not coalesce (GemLite stores the words K-major).
    # Kept: (2) with SPLIT_K programs sharing each output tile's K range (fp32 atomics), so that more programs
    # hide the latency of the dependent dots. Each code position t of a word is its own dot: the [BN, NW] codes
    # at columns j * PER + t meet x at the same columns (a strided load of x, from L1), so no tile changes
    # shape, and the grid is loaded once per word (a group spans whole words). The output is computed
    # transposed, [BN, BM] = W x^T, so the decoded weight is the dot's first operand as it is.

    @triton.jit
    def _field_mm(acc, w_ptr, x_ptr, scale_ptr, low_ptr, rn, rm, k0, M, N, K, groups, words_row, stride_xm,
                  W: tl.constexpr, MULT: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, LOW: tl.constexpr):
        """acc [BN, BM] += (codes * scale * MULT (+ min)) [BN, BK] @ x^T [BK, BM] for one W-bit field."""
        PER: tl.constexpr = 32 // W
        NW: tl.constexpr = BK // PER
        wi = k0 // PER + tl.arange(0, NW)
        words = tl.load(w_ptr + rn[:, None] * words_row + wi[None, :],
                        mask=(rn[:, None] < N) & (wi[None, :] < words_row), other=0)  # [BN, NW]
        g = wi * PER // GROUP  # a word's group (GROUP is a multiple of PER: checked by the caller)
        gok = (rn[:, None] < N) & (g[None, :] < groups)
        s = tl.load(scale_ptr + rn[:, None] * groups + g[None, :], mask=gok, other=0.0).to(tl.float32) * MULT
        if LOW:
            lo = tl.load(low_ptr + rn[:, None] * groups + g[None, :], mask=gok, other=0.0).to(tl.float32)
        for t in tl.static_range(PER):
            w = ((words >> (t * W)) & ((1 << W) - 1)).to(tl.float32) * s
            if LOW:
                w += lo
            col = wi * PER + t
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + col[:, None], mask=(col[:, None] < K) & (rm[None, :] < M),
                         other=0.0)  # [NW, BM]
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        return acc

    @triton.jit
    def _finish(acc, bias_ptr, out_ptr, rm, rn, M, N, stride_om, pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        """acc [BN, BM] into out [M, N]: stored in out's dtype, or (SPLIT_K > 1) added to a zeroed fp32 out."""
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
            acc += tl.where(pid_k == 0, b, 0.0)
        ptrs = out_ptr + rm[None, :] * stride_om + rn[:, None]
        ok = (rm[None, :] < M) & (rn[:, None] < N)
        if SPLIT_K == 1:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(ptrs, acc, mask=ok, sem="relaxed")

    @triton.jit
    def _affine_mm(x_ptr, w_ptr, scale_ptr, low_ptr, bias_ptr, out_ptr, M, N, K, groups, off_b, stride_xm,
                   stride_om, WA: tl.constexpr, WB: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        """A code of two fields c = a + 2**WA * b: (c s + m) = (a s + m) + b (2**WA s), each field its own
        pass over its own section (the second starts off_b words in)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        padded = groups * GROUP
        for k0 in range(pid_k * BK, padded, BK * SPLIT_K):
            acc = _field_mm(acc, w_ptr, x_ptr, scale_ptr, low_ptr, rn, rm, k0, M, N, K, groups, padded * WA // 32,
                            stride_xm, WA, 1, GROUP, BK, True)
            if WB > 0:
                acc = _field_mm(acc, w_ptr + off_b, x_ptr, scale_ptr, low_ptr, rn, rm, k0, M, N, K, groups,
                                padded * WB // 32, stride_xm, WB, 1 << WA, GROUP, BK, False)
        _finish(acc, bias_ptr, out_ptr, rm, rn, M, N, stride_om, pid_k, SPLIT_K, HAS_BIAS)


# tl.dot on the tensor cores takes 16-bit inputs here (float32 would run as tf32 and lose bits against the
# dequantize + matmul path): float32 callers fall back
_DOT_DTYPES = (torch.float16, torch.bfloat16)


def affine_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, *, bits: int,
              group: int, shape, bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor | None:
    """x [..., in] (MIN_ROWS..MAX_ROWS rows, float16/bfloat16) @ W.T for W [out, in] as affine.py stores it.
    None when the kernel does not apply; the caller then dequantizes."""
    n, k = shape
    rows, groups = scale.shape
    x2 = _rows(x, k, MAX_ROWS, MIN_ROWS)
    w = _words(packed)
    if x2 is None or x2.dtype not in _DOT_DTYPES or w is None or rows != n or groups * group < k:
        return None
    padded = groups * group
    (wa, _), *rest = fields(bits)
    wb = rest[0][0] if rest else 0
    m = x2.shape[0]
    # every row of every field starts at an int32 word and a word never spans two groups (groups of 16 with a
    # 1-bit field do neither: they fall back)
    if n * padded >= 2**31 or any(group * f % 32 for f in (wa, wb)):
        return None
    cfg = config or default_config(m, n, k, group)
    # tl.dot needs >= 16 along K: each code position of a W-bit field covers BK * W / 32 columns
    cfg = replace(cfg, bk=max(cfg.bk, group, 16 * 32 // min(f for f in (wa, wb) if f)))
    out = _out(m, n, x, cfg)
    grid = (triton_cdiv(n, cfg.bn), cfg.split_k, triton_cdiv(m, cfg.bm))
    _affine_mm[grid](x2, w, scale, low, bias if bias is not None else out, out, m, n, k, groups,
                     n * padded * wa // 32, x2.stride(0), out.stride(0), WA=wa, WB=wb, GROUP=group, BM=cfg.bm,
                     BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)
    return out.to(x.dtype).view(*x.shape[:-1], n)


def _out(m: int, n: int, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The output buffer: x's dtype, or a zeroed float32 one that the K splits add into (cast once after)."""
    if cfg.split_k == 1:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return torch.zeros(m, n, dtype=torch.float32, device=x.device)
