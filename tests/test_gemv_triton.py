"""Fused dequantize+GEMV kernels (qstream/quant/gemv_triton.py) against dequantize + matmul.

Runs on CUDA, or on CPU under Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/test_gemv_triton.py

(with a Triton install; the interpreter reads the variable when the kernels are defined, so it must be
set before Python starts). Skipped without Triton, and on CPU without the interpreter (CI has neither).
"""
from __future__ import annotations

import pytest
import torch
from _triton_kernels import DEV
from _triton_kernels import check as _check
from _triton_kernels import weights as _weights

from qstream.quant import QuantSpec, dequantize, gemv_triton, get_scheme, quantize
from qstream.quant.bnb4 import _code
from qstream.runtime.qlinear import QLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group,n,k,rows", [(32, 40, 200, 1), (64, 24, 300, 3), (128, 17, 200, 1)])
def test_affine_gemv_matches_dequantize_matmul(bits, group, n, k, rows):
    """Every bit width's field split, rows padded to whole groups (200 and 300 columns), an output count
    that is not a multiple of the row block, several input rows, and a bias."""
    w = _weights(n, k, bits * 1000 + group)
    packed, meta = quantize(w, QuantSpec(f"q{bits}", group))
    w_hat = dequantize(packed, meta, dtype=torch.float32)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(bits)).to(DEV)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV) if rows == 3 else None
    y = gemv_triton.affine_gemv(x, packed[""], packed["scale"], packed["min"], bits=bits, group=group,
                                shape=(n, k), bias=bias)
    assert y is not None and y.shape == (rows, n) and y.dtype == x.dtype
    _check(y, x, w_hat, bias, 1e-5)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("config", [gemv_triton.Config(bn=1, bk=32), gemv_triton.Config(bn=16, bk=512),
                                    gemv_triton.Config(bn=4, bk=64, mode="bcast"),
                                    gemv_triton.Config(bn=2, bk=512, mode="bcast")])
def test_affine_gemv_any_tile_shape_and_mode(bits, config):
    """One group per tile or the whole row in one, one output row per program or 16, both ways of meeting x
    ("loop", the default, and "bcast"): the same product."""
    w = _weights(33, 224, 5)
    packed, meta = quantize(w, QuantSpec(f"q{bits}", 32))
    w_hat = dequantize(packed, meta, dtype=torch.float32)
    x = torch.randn(2, 224).to(DEV)
    y = gemv_triton.affine_gemv(x, packed[""], packed["scale"], packed["min"], bits=bits, group=32, shape=(33, 224),
                                config=config)
    _check(y, x, w_hat, None, 1e-5)


@pytest.mark.parametrize("mode", ["bcast", "loop"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block,n,k,rows", [(32, 40, 192, 1), (64, 24, 256, 2), (128, 9, 512, 1)])
def test_nf4_gemv_matches_bitsandbytes_dequantize(mode, quant_type, block, n, k, rows):
    w = _weights(n, k, block)
    packed, meta = quantize(w, QuantSpec(quant_type, block))
    w_hat = dequantize(packed, meta, dtype=torch.float32)
    x = torch.randn(rows, k).to(DEV)
    bias = torch.randn(n).to(DEV) if rows == 2 else None
    y = gemv_triton.nf4_gemv(x, packed[""], packed["absmax"], _code(quant_type, packed[""].device), block=block,
                             shape=(n, k), bias=bias, config=gemv_triton.Config(bn=4, bk=128, mode=mode))
    assert y is not None and y.shape == (rows, n)
    _check(y, x, w_hat, bias, 1e-5)


@pytest.mark.parametrize("scheme", ["q4", "q2", "nf4"])
def test_qlinear_uses_the_fused_kernel_in_bfloat16(monkeypatch, scheme):
    """Through QLinear (the decode path): the scheme's gemv answers, in the compute dtype, and agrees with the
    dequantize + F.linear fallback to bf16 rounding."""
    monkeypatch.setattr(gemv_triton, "NF4_KERNEL", "triton")
    w = _weights(48, 256, 11)
    packed, meta = quantize(w, QuantSpec(scheme, 64))
    q = QLinear(256, 48, bias=False, meta=meta, compute_dtype=torch.bfloat16)
    q.bind(packed)
    x = torch.randn(1, 1, 256).to(DEV)
    fused = get_scheme(scheme).gemv(x.bfloat16(), packed, meta, None)
    assert fused is not None and fused.dtype == torch.bfloat16 and fused.shape == (1, 1, 48)
    y = q(x)
    q.fused = False
    ref = q(x)
    _check(y.float(), x.bfloat16().float(), dequantize(packed, meta, dtype=torch.bfloat16).float(), None, 2e-2)
    assert (y.float() - ref.float()).abs().max().item() < 2e-2 * ref.float().abs().max().item()


def test_falls_back_when_the_kernel_does_not_apply():
    w = _weights(16, 128, 3)
    packed, meta = quantize(w, QuantSpec("q4", 64))
    args = dict(bits=4, group=64, shape=(16, 128))
    many = torch.randn(gemv_triton.MAX_ROWS + 1, 128).to(DEV)
    assert gemv_triton.affine_gemv(many, packed[""], packed["scale"], packed["min"], **args) is None
    odd = torch.cat([torch.zeros(1, dtype=torch.uint8, device=DEV), packed[""]])[1:]  # storage 1 byte off alignment
    x = torch.randn(1, 128).to(DEV)
    assert gemv_triton.affine_gemv(x, odd, packed["scale"], packed["min"], **args) is None
    assert gemv_triton.affine_gemv(x.long(), packed[""], packed["scale"], packed["min"], **args) is None
