"""Fused dequantize + matrix-vector product for batch-1 decode, in Triton (issues 12 and 13).

At batch 1 a linear layer is a GEMV: every weight byte is read once and used for a single
multiply-add, so the cost is the bytes read. Dequantizing to a dense weight first (affine_triton)
writes and re-reads 2 bytes per weight, 4.5x the bytes of a q4 code. These kernels read the packed
codes and their group's grid once and never materialise the weight.

One program computes BN output rows for one input row (up to 8 rows run side by side, the codes of the
second from L2), walking K in tiles of BK columns:

* Codes are loaded as int32 words (a word holds 32/W codes of a W-bit field; the bitpack layout
  puts code i of a field at bit W * (i % (32/W)) of word i // (32/W), see _words_bcast): 16-byte
  vector loads instead of byte loads. Every row and section start is 4-byte aligned because the
  padded row length is a multiple of the group size (>= 32 codes).
* The "loop" tile is shaped [rows, groups in tile, words per group] from the start, so the per-group
  scaling needs no reshape (a layout shuffle through shared memory on the GPU).
* Affine grid, per group:  sum_k (c_k*s + m) x_k = s * sum_k c_k x_k + m * sum_k x_k. The inner
  loop is shift, mask, convert, multiply-add per code; scale and min are applied once per word.
  A two-field code c = a + 2**WA * b splits the same way: the fields are summed separately.
* fp32 accumulation in a register tile, summed across threads once after the K loop; the output (and
  bias) in x's dtype.

Checked without a GPU: Triton compiles both kernels for sm_90a (triton.compile with a GPUTarget, ptxas
-v): the "loop" affine kernel of the default q4 tile uses 64 registers, no spills, one 16-byte load per
row of codes and 2 shared-memory round trips per program (the final reduction).

No split-K: a split needs a zeroed fp32 buffer and a final cast, two more launches per linear
(~2 us each inside a CUDA graph, ~1 ms over the 224 linears of an 8B step). Small outputs use
fewer rows per program instead, so every shape still launches >= ~4 programs per SM.

The layouts: :mod:`.bitpack` for q2..q8 (fields low bits first, each packed on its own, first code
in the lowest bits); bitsandbytes for nf4/fp4 (two codes a byte, the FIRST code in the HIGH nibble,
one float32 absmax per block; qstream stores no double quantization: compress_statistics=False).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .bitpack import fields

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers fall back to dequantize + matmul
    triton = None

# Most input rows a launch handles: each row is a program of its own that decodes the codes again (read
# from L2: the rows of one row block run side by side); past a few rows dequantize + dense matmul wins.
MAX_ROWS = 8
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (tests without a GPU).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# nf4/fp4: "bnb" (bitsandbytes' kernel) or "triton" (ours). bnb stays the default until a GPU
# benchmark (scripts/gemv_bench.py) shows ours faster; QSTREAM_NF4_GEMV=triton selects ours.
NF4_KERNEL = os.environ.get("QSTREAM_NF4_GEMV", "bnb")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Config:
    """Launch shape: BN output rows x BK columns per loop step, Triton warps and pipeline stages."""

    bn: int
    bk: int
    num_warps: int = 4
    num_stages: int = 3
    # How codes meet x. "loop": one pass per code position in the int32 word, each with a strided load of
    # x (L1 hits); every tile keeps the layout of its load, so the loop body has no layout conversion. "bcast":
    # a word (nf4: a byte) is expanded into its codes along a trailing axis and met by a contiguous x tile:
    # one vector load of x per word, but Triton spreads that axis over threads (warp shuffles and shared
    # memory in the sm_90 PTX of the affine kernel). nf4 defaults to "bcast" (its byte -> value-pair table
    # halves the table loads), the affine formats to "loop"; scripts/gemv_bench.py measures both.
    mode: str = "loop"

    def __post_init__(self) -> None:
        if self.mode not in ("bcast", "loop"):
            raise ValueError(f"mode must be 'bcast' or 'loop', got {self.mode!r}")


@functools.cache  # called on every launch: eager decode pays for Python
def default_config(n: int, k: int, bits: int, group: int, mode: str = "loop") -> Config:
    """A fixed table for Hopper (H100/H200, 132 SMs): no autotuning, so the first call inside a CUDA
    graph capture launches a kernel instead of benchmarking candidates.

    BN: the largest of 8/4/2/1 that still gives >= 512 programs (~4 per SM). Triton does not
    software-pipeline this K loop (no cp.async in the sm_90a PTX), so loads in flight come from resident
    programs, not stages. BK: about 2 KB of codes per tile (16 bytes per thread with 4 warps: one vector
    load), at least one group; larger tiles made Triton pick layouts that convert through shared memory
    (scripts/gemv_ptx.py). A guess, not a measurement: re-tune with ``scripts/gemv_bench.py --sweep``."""
    bn = next((b for b in (8, 4, 2) if triton_cdiv(n, b) >= 512), 1)
    # codes per row per tile for ~2 KB of packed codes per tile; a power of two (tl.arange), >= one group
    bk = _pow2_floor(2048 * 8 // max(bits, 1) // bn)
    bk = max(group, min(bk, 1024, _pow2_floor(max(k, group))))
    return Config(bn=bn, bk=bk, mode=mode)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_floor(v: int) -> int:
    return 1 << (v.bit_length() - 1)


def available(x: torch.Tensor) -> bool:
    """True when a fused kernel can run on x's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton is not None and (x.is_cuda or _INTERPRET)


def _rows(x: torch.Tensor, k: int, most: int = MAX_ROWS, least: int = 1) -> torch.Tensor | None:
    """x [..., k] as a contiguous [M, k] with least <= M <= most, or None when the fused path does not apply."""
    if x.shape[-1] != k or x.dtype not in _DTYPES or x.numel() == 0 or not least <= x.numel() // k <= most:
        return None
    return x.reshape(-1, k).contiguous()


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """uint8 codes viewed as int32 words; None when the storage is not 4-byte aligned (a bound slice)."""
    t = t.reshape(-1)
    if t.numel() % 4 or t.data_ptr() % 4 or not t.is_contiguous():
        return None
    return t.view(torch.int32)


if triton is not None:
    # Reductions are deferred: each loop step adds scaled per-word partial sums into a register tile
    # (elementwise, no data leaves its thread) and the tile is summed across threads once, after the loop.
    # Summing per step cost warp shuffles and shared-memory round trips on every step (PTX for sm_90).
    # One input row per program (the grid runs the rows of x side by side, so a second row's codes come
    # from L2): a leading row axis made Triton lay the tiles out apart from their loads, and convert
    # between the two layouts through shared memory once per code position.

    @triton.jit
    def _words_bcast(w_ptr, x_ptr, scale_ptr, low_ptr, rn, k0, N, K, groups,
                     W: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     LOW: tl.constexpr):
        """Columns k0 .. k0+BK of one bit field, per int32 word: scale * sum_t code_t x_t, plus (LOW) min *
        sum_t x_t. [BN, BK * W / 32]. Each word is expanded into its codes along a trailing axis and met
        by a contiguous slice of x: one vector load of x per word."""
        PER: tl.constexpr = 32 // W  # codes per word
        NW: tl.constexpr = BK // PER
        words_row = groups * (GROUP // PER)
        wi = k0 // PER + tl.arange(0, NW)
        words = tl.load(w_ptr + rn[:, None] * words_row + wi[None, :],
                        mask=(rn[:, None] < N) & (wi[None, :] < words_row), other=0)
        ti = tl.arange(0, PER)
        # code t of word j: bits W*t .. W*t+W-1 (bitpack: first code lowest; little-endian bytes)
        c = ((words[:, :, None] >> (ti[None, None, :] * W)) & ((1 << W) - 1)).to(tl.float32)  # [BN, NW, PER]
        col = wi[:, None] * PER + ti[None, :]  # [NW, PER]; padded columns (col >= K) read x as 0
        xv = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
        dot = tl.sum(c * xv[None, :, :], axis=2)
        g = (wi * PER) // GROUP  # each word's group: the grid is gathered per word, not reshaped
        goff = rn[:, None] * groups + g[None, :]
        gok = (rn[:, None] < N) & (g[None, :] < groups)
        out = dot * tl.load(scale_ptr + goff, mask=gok, other=0.0).to(tl.float32)
        if LOW:
            lo = tl.load(low_ptr + goff, mask=gok, other=0.0).to(tl.float32)
            out += tl.sum(xv, axis=1)[None, :] * lo
        return out

    @triton.jit
    def _words_loop(w_ptr, x_ptr, scale_ptr, low_ptr, rn, g, N, K, groups,
                    W: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
                    LOW: tl.constexpr):
        """As _words_bcast for the groups g, as [BN, NG, words per group], one pass per code position t
        with a strided load of x: fewer live registers, PER times the x load instructions."""
        PER: tl.constexpr = 32 // W
        GW: tl.constexpr = GROUP // PER
        words_row = groups * GW
        wi = tl.arange(0, GW)
        off = rn[:, None, None] * words_row + g[None, :, None] * GW + wi[None, None, :]
        ok = (rn[:, None, None] < N) & (g[None, :, None] < groups)
        words = tl.load(w_ptr + off, mask=ok, other=0)  # [BN, NG, GW]
        part = tl.zeros([BN, NG, GW], dtype=tl.float32)
        xw = tl.zeros([NG, GW], dtype=tl.float32)
        col0 = (g[:, None] * GW + wi[None, :]) * PER  # column of code 0 of each word
        for t in tl.static_range(PER):
            c = ((words >> (t * W)) & ((1 << W) - 1)).to(tl.float32)
            col = col0 + t
            xv = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
            part += c * xv[None, :, :]
            if LOW:
                xw += xv
        goff = rn[:, None] * groups + g[None, :]
        gok = (rn[:, None] < N) & (g[None, :] < groups)
        out = part * tl.load(scale_ptr + goff, mask=gok, other=0.0).to(tl.float32)[:, :, None]
        if LOW:
            lo = tl.load(low_ptr + goff, mask=gok, other=0.0).to(tl.float32)
            out += xw[None, :, :] * lo[:, :, None]
        return out

    @triton.jit
    def _affine_gemv(x_ptr, w_ptr, scale_ptr, low_ptr, bias_ptr, out_ptr, M, N, K, groups, off_b, stride_xm,
                     stride_om, WA: tl.constexpr, WB: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, HAS_BIAS: tl.constexpr, BCAST: tl.constexpr):
        """A code of two fields c = a + 2**WA * b: sum_k (c s + m) x = s (sum a x + 2**WA sum b x) + m sum x,
        so each field is its own pass over its own section (the second starts off_b words in)."""
        pid = tl.program_id(0)
        m = pid % M  # input row: the rows of one row block run side by side
        rn = (pid // M) * BN + tl.arange(0, BN)
        x_ptr += m * stride_xm
        if BCAST:
            acc_a = tl.zeros([BN, BK * WA // 32], dtype=tl.float32)
            if WB > 0:
                acc_b = tl.zeros([BN, BK * WB // 32], dtype=tl.float32)
            for k0 in range(0, groups * GROUP, BK):
                acc_a += _words_bcast(w_ptr, x_ptr, scale_ptr, low_ptr, rn, k0, N, K, groups, WA, GROUP, BN, BK,
                                      True)
                if WB > 0:
                    acc_b += _words_bcast(w_ptr + off_b, x_ptr, scale_ptr, low_ptr, rn, k0, N, K, groups, WB, GROUP,
                                          BN, BK, False)
            acc = tl.sum(acc_a, axis=1)
            if WB > 0:
                acc += tl.sum(acc_b, axis=1) * (1 << WA)
        else:
            NG: tl.constexpr = BK // GROUP
            gi = tl.arange(0, NG)
            acc_a = tl.zeros([BN, NG, GROUP * WA // 32], dtype=tl.float32)
            if WB > 0:
                acc_b = tl.zeros([BN, NG, GROUP * WB // 32], dtype=tl.float32)
            for g0 in range(0, groups, NG):
                acc_a += _words_loop(w_ptr, x_ptr, scale_ptr, low_ptr, rn, g0 + gi, N, K, groups, WA, GROUP, BN, NG,
                                     True)
                if WB > 0:
                    acc_b += _words_loop(w_ptr + off_b, x_ptr, scale_ptr, low_ptr, rn, g0 + gi, N, K, groups, WB,
                                         GROUP, BN, NG, False)
            acc = tl.sum(tl.sum(acc_a, axis=2), axis=1)
            if WB > 0:
                acc += tl.sum(tl.sum(acc_b, axis=2), axis=1) * (1 << WA)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _nf4_gemv(x_ptr, w_ptr, absmax_ptr, lut_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                  BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, BCAST: tl.constexpr):
        """BCAST: w_ptr is the uint8 codes and lut_ptr a [256, 2] float32 table (byte -> its two values, in
        column order): one 8-byte table load per byte instead of one 4-byte load per code. Otherwise w_ptr is
        the codes as int32 words and lut_ptr the 16-value table. K % BS == 0 (checked by the caller)."""
        pid = tl.program_id(0)
        m = pid % M
        rn = (pid // M) * BN + tl.arange(0, BN)
        x_ptr += m * stride_xm
        blocks = K // BS  # absmax blocks per row
        if BCAST:
            NY: tl.constexpr = BK // 2  # bytes per row per tile
            hi = tl.arange(0, 2)
            acc3 = tl.zeros([BN, NY], dtype=tl.float32)
            for k0 in range(0, K, BK):
                yi = k0 // 2 + tl.arange(0, NY)
                by = tl.load(w_ptr + rn[:, None] * (K // 2) + yi[None, :],
                             mask=(rn[:, None] < N) & (yi[None, :] < K // 2), other=0).to(tl.int32)
                v = tl.load(lut_ptr + by[:, :, None] * 2 + hi[None, None, :])  # [BN, NY, 2]
                col = yi[:, None] * 2 + hi[None, :]
                xv = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
                blk = yi * 2 // BS
                am = tl.load(absmax_ptr + rn[:, None] * blocks + blk[None, :],
                             mask=(rn[:, None] < N) & (blk[None, :] < blocks), other=0.0)
                acc3 += tl.sum(v * xv[None, :, :], axis=2) * am
            acc = tl.sum(acc3, axis=1)
        else:  # "loop": one pass per nibble position of an int32 word, a 16-value table load per code
            NB: tl.constexpr = BK // BS  # absmax blocks per tile
            GW: tl.constexpr = BS // 8  # int32 words per block (8 codes a word)
            words_row = blocks * GW
            wi = tl.arange(0, GW)
            bi = tl.arange(0, NB)
            acc4 = tl.zeros([BN, NB, GW], dtype=tl.float32)
            for b0 in range(0, blocks, NB):
                b = b0 + bi
                off = rn[:, None, None] * words_row + b[None, :, None] * GW + wi[None, None, :]
                ok = (rn[:, None, None] < N) & (b[None, :, None] < blocks)
                words = tl.load(w_ptr + off, mask=ok, other=0)
                part = tl.zeros([BN, NB, GW], dtype=tl.float32)
                col0 = (b[:, None] * GW + wi[None, :]) * 8
                for t in tl.static_range(8):
                    # little-endian word: code t sits in byte t // 2, the even code in its high nibble
                    c = (words >> (8 * (t // 2) + 4 * (1 - t % 2))) & 15
                    v = tl.load(lut_ptr + c)  # 16 floats: stays in L1
                    col = col0 + t
                    xv = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
                    part += v * xv[None, :, :]
                am = tl.load(absmax_ptr + rn[:, None] * blocks + b[None, :],
                             mask=(rn[:, None] < N) & (b[None, :] < blocks), other=0.0)
                acc4 += part * am[:, :, None]
            acc = tl.sum(tl.sum(acc4, axis=2), axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


_PAIRS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _pair_table(lut: torch.Tensor) -> torch.Tensor:
    """[256, 2] float32: byte b -> (lut[b >> 4], lut[b & 15]), the values of its first and second code
    (bitsandbytes puts the first in the high nibble). Built once per code table: inside a CUDA graph
    capture it must already exist (load()'s warm-up and the benchmark's untimed steps build it)."""
    key = (lut.data_ptr(), lut.device)
    t = _PAIRS.get(key)
    if t is None:
        b = torch.arange(256, device=lut.device)
        t = _PAIRS[key] = torch.stack([lut[b >> 4], lut[b & 15]], dim=1).float().contiguous()
    return t


def affine_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, *, bits: int,
                group: int, shape, bias: torch.Tensor | None = None,
                config: Config | None = None) -> torch.Tensor | None:
    """x [..., in] (at most MAX_ROWS rows) @ W.T for W [out, in] stored as affine.py stores it (bitpack codes
    of rows padded to whole groups, float16 scale and min [out, groups]). None when the fused kernel does not
    apply (no Triton, too many rows, misaligned storage); the caller then dequantizes."""
    n, k = shape
    rows, groups = scale.shape
    x2 = _rows(x, k)
    w = _words(packed)
    if x2 is None or w is None or rows != n or groups * group < k:
        return None
    padded = groups * group
    if n * padded >= 2**31:  # int32 offsets in the kernel
        return None
    (wa, _), *rest = fields(bits)
    wb = rest[0][0] if rest else 0
    m = x2.shape[0]
    cfg = config or default_config(n, k, bits, group)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (m * triton_cdiv(n, cfg.bn),)
    _affine_gemv[grid](x2, w, scale, low, bias if bias is not None else out, out, m, n, k, groups,
                       n * padded * wa // 32, x2.stride(0), out.stride(0), WA=wa, WB=wb, GROUP=group,
                       BN=cfg.bn, BK=max(cfg.bk, group), HAS_BIAS=bias is not None,
                       BCAST=cfg.mode == "bcast", num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*x.shape[:-1], n)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, *, block: int, shape,
             bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor | None:
    """x [..., in] @ W.T for W [out, in] in bitsandbytes' 4-bit layout (nf4 or fp4: ``lut`` is the 16-value
    code table, ``absmax`` float32 per block of ``block`` flat elements). None when it does not apply
    (rows not a whole number of blocks, too many rows, misaligned storage)."""
    n, k = shape
    x2 = _rows(x, k)
    cfg = config or default_config(n, k, 4, block, "bcast")
    w = packed.reshape(-1) if cfg.mode == "bcast" else _words(packed)  # "loop" reads int32 words
    if x2 is None or w is None or k % block or block < 8 or absmax.dtype != torch.float32 or n * k >= 2**31:
        return None
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (m * triton_cdiv(n, cfg.bn),)
    bcast = cfg.mode == "bcast"
    _nf4_gemv[grid](x2, w, absmax, _pair_table(lut) if bcast else lut.float(),
                    bias if bias is not None else out, out, m, n, k, x2.stride(0), out.stride(0), BS=block,
                    BN=cfg.bn, BK=max(cfg.bk, block), HAS_BIAS=bias is not None, BCAST=bcast,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*x.shape[:-1], n)
