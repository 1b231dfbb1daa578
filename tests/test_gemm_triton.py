"""Fused dequantize + small matrix product (qstream/quant/gemm_triton.py) against dequantize + matmul.

Runs on CUDA, or on CPU under Triton's interpreter (see tests/test_gemv_triton.py):

    TRITON_INTERPRET=1 python -m pytest -q tests/test_gemm_triton.py

Skipped without Triton, and on CPU without the interpreter (CI has neither).
"""
from __future__ import annotations

import pytest
import torch
from _triton_kernels import DEV, INTERPRET
from _triton_kernels import check as _check
from _triton_kernels import weights as _weights

from qstream.quant import QuantSpec, dequantize, gemm_triton, get_scheme, quantize
from qstream.runtime.qlinear import QLinear

# Triton 3.5's interpreter gets bfloat16 wrong (numpy has none: values come out as garbage); the GPU runs bf16
HALF = torch.float16 if INTERPRET else torch.bfloat16


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group,n,k,rows", [(32, 40, 200, 8), (64, 24, 300, 3), (128, 17, 200, 5)])
def test_affine_mm_matches_dequantize_matmul(bits, group, n, k, rows):
    """Every bit width's field split, rows padded to whole groups (200 and 300 columns), output and input row
    counts that are not multiples of the tiles (17 outputs, 3 and 5 rows), and a bias."""
    w = _weights(n, k, bits * 1000 + group)
    packed, meta = quantize(w, QuantSpec(f"q{bits}", group))
    w_hat = dequantize(packed, meta, dtype=HALF).float()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(bits)).to(DEV, HALF)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, HALF) if rows == 3 else None
    y = gemm_triton.affine_mm(x, packed[""], packed["scale"], packed["min"], bits=bits, group=group,
                              shape=(n, k), bias=bias)
    assert y is not None and y.shape == (rows, n) and y.dtype == x.dtype
    _check(y, x.float(), w_hat, bias, 1e-2)


@pytest.mark.parametrize("config", [gemm_triton.Config(bm=16, bn=16, bk=32), gemm_triton.Config(bm=32, bn=32, bk=256),
                                    gemm_triton.Config(bm=32, bn=16, bk=64, split_k=3, num_warps=8, num_stages=2),
                                    gemm_triton.Config(bm=16, bn=32, bk=16, split_k=4)])
def test_affine_mm_any_tile_shape(config):
    """Tiles of one group or of several (the launcher raises BK to 512 for the 1-bit field), one row tile or
    several, K split among programs or not (uneven splits): the same product."""
    w = _weights(33, 224, 5)
    packed, meta = quantize(w, QuantSpec("q3", 32))
    w_hat = dequantize(packed, meta, dtype=HALF).float()
    x = torch.randn(7, 224).to(DEV, torch.float16)
    y = gemm_triton.affine_mm(x, packed[""], packed["scale"], packed["min"], bits=3, group=32, shape=(33, 224),
                              config=config)
    _check(y, x.float(), w_hat, None, 1e-2)


@pytest.mark.parametrize("scheme", ["q4", "q2k"])
def test_qlinear_uses_the_small_matmul_kernel(scheme):
    """Through QLinear with a tree step's 8 rows: the scheme's gemv answers (the kernel ran) and agrees with
    the dequantize + F.linear fallback to bf16 rounding."""
    w = _weights(48, 256, 11)
    packed, meta = quantize(w, QuantSpec(scheme, 64))
    q = QLinear(256, 48, bias=False, meta=meta, compute_dtype=HALF)
    q.bind(packed)
    x = torch.randn(1, 8, 256).to(DEV)
    fused = get_scheme(scheme).gemv(x.to(HALF), packed, meta, None)
    assert fused is not None and fused.dtype == HALF and fused.shape == (1, 8, 48)
    y = q(x)
    q.fused = False
    ref = q(x)
    assert (y.float() - ref.float()).abs().max().item() < 2e-2 * ref.float().abs().max().item()


def test_falls_back_when_the_kernel_does_not_apply():
    w = _weights(16, 128, 3)
    packed, meta = quantize(w, QuantSpec("q4", 64))
    args = dict(bits=4, group=64, shape=(16, 128))
    x = torch.randn(4, 128).to(DEV, HALF)
    assert gemm_triton.affine_mm(x, packed[""], packed["scale"], packed["min"], **args) is not None
    many = torch.randn(gemm_triton.MAX_ROWS + 1, 128).to(DEV, HALF)
    assert gemm_triton.affine_mm(many, packed[""], packed["scale"], packed["min"], **args) is None
    assert gemm_triton.affine_mm(x[:1], packed[""], packed["scale"], packed["min"], **args) is None  # GEMV's case
    assert gemm_triton.affine_mm(x.float(), packed[""], packed["scale"], packed["min"], **args) is None
    odd = torch.cat([torch.zeros(1, dtype=torch.uint8, device=DEV), packed[""]])[1:]  # storage 1 byte off alignment
    assert gemm_triton.affine_mm(x, odd, packed["scale"], packed["min"], **args) is None


def test_groups_that_split_a_word_fall_back():
    """q3k at groups of 16: its 1-bit field packs 32 codes a word, two groups; the kernel declines. q4k at 16: 8
    codes a word, inside a group: it runs."""
    w = _weights(8, 64, 4)
    x = torch.randn(4, 64).to(DEV, HALF)
    for bits, runs in ((3, False), (4, True)):
        packed, meta = quantize(w, QuantSpec(f"q{bits}k", 16))
        a = get_scheme(f"q{bits}k").affine_form(packed, meta)
        y = gemm_triton.affine_mm(x, a[""], a["scale"], a["min"], bits=bits, group=16, shape=(8, 64))
        assert (y is not None) == runs
        if runs:
            _check(y, x.float(), dequantize(packed, meta, dtype=HALF).float(), None, 1e-2)


def test_split_k_adds_the_bias_once():
    """K split among 4 programs that add into one float32 output: the bias is added by the first split only."""
    w = _weights(24, 512, 9)
    packed, meta = quantize(w, QuantSpec("q4", 64))
    w_hat = dequantize(packed, meta, dtype=HALF).float()
    x = torch.randn(8, 512).to(DEV, HALF)
    bias = torch.randn(24).to(DEV, HALF)
    y = gemm_triton.affine_mm(x, packed[""], packed["scale"], packed["min"], bits=4, group=64, shape=(24, 512),
                              bias=bias, config=gemm_triton.Config(bm=16, bn=16, bk=64, split_k=4))
    assert y.dtype == HALF
    _check(y, x.float(), w_hat, bias.float(), 1e-2)
