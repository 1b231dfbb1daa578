"""Importance-weighted grids (imatrix) and GPTQ's column orders: the parts of issue 13's
calibrated recipes that can be checked on tiny tensors."""
from __future__ import annotations

import pytest
import torch

from qstream.quant import QuantSpec, dequantize, quantize
from qstream.quant.affine import Affine
from qstream.quant.gptq import gptq_quantize
from qstream.quant.hqq import fit, fit_weighted


def _inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs whose feature magnitudes span ~2 decades (log-normal), as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    return torch.randn(n, cols, generator=g) @ mix * torch.exp(torch.randn(cols, generator=g))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("cols,group", [(256, 64), (200, 128)])  # 200: padded last group
def test_importance_round_trip_every_bit_width(bits, cols, group):
    w = torch.randn(48, cols, generator=torch.Generator().manual_seed(bits))
    imp = torch.rand(cols, generator=torch.Generator().manual_seed(9)) + 0.5
    scheme = Affine(bits)
    packed, meta = scheme.quantize(w, group, importance=imp)
    plain = quantize(w, QuantSpec(f"q{bits}", group))[0]
    # the stored format is the plain scheme's: the runtime cannot tell them apart
    assert {k: (v.shape, v.dtype) for k, v in packed.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    w_hat = dequantize(packed, meta, dtype=torch.float32)
    assert w_hat.shape == w.shape
    assert float((w_hat - w).norm() / w.norm()) < scheme.error_bound(group)


@pytest.mark.parametrize("bits", [3, 4])
def test_weighted_fit_beats_plain_fit_on_the_weighted_error(bits):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=g)
    imp = torch.exp(2 * torch.randn(512, 64, generator=g))  # a few columns matter far more than others
    werr = lambda q, s, lo: float((imp * (x - (q.float() * s.float() + lo.float())).square()).sum())  # noqa: E731
    plain = werr(*fit(x, bits))
    weighted = werr(*fit_weighted(x, bits, imp))
    assert weighted < 0.7 * plain
    # equal importance: the weighted fit is still a good unweighted fit (within 5% of HQQ's)
    ones = torch.ones_like(x)
    e = lambda q, s, lo: float((x - (q.float() * s.float() + lo.float())).square().sum())  # noqa: E731
    assert e(*fit_weighted(x, bits, ones)) < 1.05 * e(*fit(x, bits))


def test_wrong_importance_shape_is_refused():
    with pytest.raises(ValueError, match=r"importance has shape \(3,\), expected \(64,\)"):
        Affine(4).quantize(torch.randn(4, 64), 64, importance=torch.ones(3))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_act_order_lowers_output_error(bits):
    x = _inputs(2048, 256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    h = x.T @ x / x.shape[0]
    err = {}
    for order in ("none", "group", "static"):
        packed, meta = gptq_quantize(w, h, bits, 64, act_order=order)
        err[order] = float((x @ (dequantize(packed, meta, dtype=torch.float32) - w).T).square().mean())
    assert err["group"] < err["none"]
    assert err["static"] < err["none"]
    # the importance-weighted group grid is what makes GPTQ strong on uneven inputs
    packed, meta = gptq_quantize(w, h, bits, 64, grid="fit", act_order="none")
    assert err["none"] < float((x @ (dequantize(packed, meta, dtype=torch.float32) - w).T).square().mean())


def test_gptq_bad_options():
    with pytest.raises(ValueError, match="act_order 'sideways'"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), 4, 64, act_order="sideways")
