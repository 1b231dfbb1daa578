"""SignRound (quant/signround.py): untuned offsets reproduce the fitted weight exactly, tuning lowers
a layer's output error without changing the stored format, and it never makes it worse."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qstream.quant import QuantSpec, dequantize, quantize
from qstream.quant.signround import Rounding, RoundConfig, tune_layer, tunable


def _weight(rows=24, cols=80, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("scheme,group", [("q2", 32), ("q3", 64), ("q4", 32), ("q8", 64), ("q2k", 16), ("q3k", 32),
                                          ("q4k", 64), ("q6k", 32)])
def test_zero_offsets_reproduce_the_fitted_weight(scheme, group):
    w = _weight()  # 80 columns: a padded last group at every group size
    packed, meta = quantize(w, QuantSpec(scheme, group))
    assert tunable(meta)
    r = Rounding(w, packed, meta)
    want = dequantize(packed, meta, dtype=torch.float32)
    torch.testing.assert_close(r.weight().detach(), want, rtol=0, atol=1e-6)
    out = r.result()
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in packed.items()}
    torch.testing.assert_close(dequantize(out, meta, dtype=torch.float32), want, rtol=0, atol=1e-6)


def test_not_tunable():
    assert not tunable(quantize(_weight(), QuantSpec("nf4", 64))[1])


class _Block(nn.Module):
    """A residual MLP block: what tune_layer sees of a decoder layer (kwargs sliced per batch)."""

    def __init__(self, h=64, f=96, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up = nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(f, h, generator=g) / h ** 0.5)
            self.down.weight.copy_(torch.randn(h, f, generator=g) / f ** 0.5)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, scale=None):
        y = x + self.down(torch.nn.functional.silu(self.up(x)))
        return y * scale if scale is not None else y


@pytest.mark.parametrize("scheme,group", [("q3", 32), ("q2k", 32)])
def test_tuning_lowers_the_output_error(scheme, group):
    block = _Block()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 32, 64, generator=g) * (torch.rand(64, generator=g) * 3 + 0.2)  # uneven features
    scale = torch.rand(6, 1, 1, generator=g) + 0.5  # a per-sequence kwarg: must be sliced with x
    with torch.no_grad():
        y = block(x, scale=scale)
    weights = {n: block.get_parameter(n).clone() for n in ("up.weight", "down.weight")}
    fits = {n: quantize(w, QuantSpec(scheme, group)) for n, w in weights.items()}
    roundings = {n: Rounding(weights[n], *fits[n]) for n in weights}
    before, after = tune_layer(block, roundings, x, y, {"scale": scale}, RoundConfig(steps=60, batch=2))
    assert after < 0.9 * before
    # the returned error is the error of the stored result
    tuned = {n: dequantize(roundings[n].result(), fits[n][1], dtype=torch.float32) for n in weights}
    with torch.no_grad():
        out = torch.func.functional_call(block, tuned, (x,), {"scale": scale})
    assert float((out - y).square().mean()) == pytest.approx(after, rel=1e-4)
    changed = sum(int((roundings[n].result()[""] != fits[n][0][""]).sum()) for n in weights)
    assert changed > 0


def test_tuning_never_returns_a_worse_result():
    """A learning rate far too large scrambles the codes: the untuned rounding is kept."""
    block = _Block(seed=2)
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = block(x)
    w = block.up.weight.clone()
    packed, meta = quantize(w, QuantSpec("q4", 32))
    r = Rounding(w, packed, meta)
    before, after = tune_layer(block, {"up.weight": r}, x, y, {}, RoundConfig(steps=5, lr=5.0))
    assert after == before
    torch.testing.assert_close(r.result()[""], packed[""])


def test_default_steps_are_a_few_passes_over_the_sequences():
    assert RoundConfig().steps_for(8) == 24 and RoundConfig(batch=2).steps_for(8) == 12
    assert RoundConfig(steps=5).steps_for(8) == 5
