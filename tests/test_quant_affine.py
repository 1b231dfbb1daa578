"""Fitted affine group schemes q2 ... q8: packing, fitting, error bounds, odd shapes, bad input."""
import json

import pytest
import torch

from qstream.errors import RecipeError
from qstream.quant import SCHEMES, QuantSpec, dequantize, quantize
from qstream.quant import bitpack
from qstream.quant.affine import GROUP_SIZES
from qstream.quant.hqq import fit
from qstream.recipe import parse_recipe

BITS = (2, 3, 4, 5, 6, 8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_exact(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (8 * 37,), generator=g, dtype=torch.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * bits // 8  # dense
    assert torch.equal(bitpack.unpack(packed, bits, codes.numel()), codes)


def test_pack_layout_is_per_byte_for_4_and_2_bits():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8)
    assert bitpack.pack(codes, 4).tolist() == [0x21, 0x43, 0x65, 0x87]  # low nibble first
    two = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0], dtype=torch.uint8)
    assert bitpack.pack(two, 2).tolist() == [0b11100100, 0b00011011]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_bound(bits, group, dtype):
    torch.manual_seed(0)
    w = torch.randn(16, 512, dtype=dtype)
    packed, meta = quantize(w, QuantSpec(f"q{bits}", group))
    json.dumps(meta)
    assert packed[""].dtype == torch.uint8
    assert packed["scale"].dtype == packed["min"].dtype == torch.float16
    back = dequantize(packed, meta, dtype=dtype)
    assert back.shape == w.shape and back.dtype == dtype
    scheme = SCHEMES[f"q{bits}"]
    err = _rel(back, w)
    assert err <= scheme.error_bound(group), f"q{bits}/g{group}/{dtype}: {err:.4f}"
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    assert 8 * stored / w.numel() == pytest.approx(scheme.bits_per_weight(group))
    # the codes survive packing exactly: re-quantizing the dequantized grid reproduces them
    codes = bitpack.unpack(packed[""], bits, w.numel()).view(-1, group).float()
    grid = codes * packed["scale"].float().reshape(-1, 1) + packed["min"].float().reshape(-1, 1)
    assert torch.equal(grid.view(w.shape).to(dtype), back)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
def test_fit_beats_round_to_nearest(bits, kind):
    torch.manual_seed(1)
    if kind == "gaussian":
        x = torch.randn(64, 512)
    else:
        x = torch.distributions.StudentT(2.5).sample((64, 512))
    for group in (64, 128):
        xs = x.view(-1, group)
        errs = {}
        for rtn_only in (True, False):
            q, s, m = fit(xs, bits, rtn_only=rtn_only)
            errs[rtn_only] = _rel(q.float() * s.float() + m.float(), xs)
        assert errs[False] < errs[True], f"q{bits}/g{group}/{kind}: fitted {errs[False]:.4f} vs rtn {errs[True]:.4f}"


def test_error_falls_with_bits():
    torch.manual_seed(2)
    w = torch.randn(64, 256)
    errs = [_rel(dequantize(*quantize(w, QuantSpec(f"q{b}", 64)), dtype=torch.float32), w) for b in BITS]
    assert errs == sorted(errs, reverse=True)
    # each extra bit about halves the error
    assert all(0.35 < b / a < 0.65 for a, b in zip(errs[:4], errs[1:5]))


@pytest.mark.parametrize("shape", [(7, 100), (3, 33), (1, 1), (130,), (2, 3, 70), (5, 256)])
def test_odd_shapes(shape):
    torch.manual_seed(3)
    w = torch.randn(*shape)
    packed, meta = quantize(w, QuantSpec("q4", 64))
    back = dequantize(packed, meta, dtype=torch.float32)
    assert back.shape == w.shape
    assert _rel(back, w) < 0.12
    assert torch.isfinite(back).all()


def test_constant_and_zero_rows_are_exact():
    w = torch.zeros(4, 96)
    w[1] = 0.25
    w[2, :64] = -3.0  # two constant groups of 32
    packed, meta = quantize(w, QuantSpec("q3", 32))
    back = dequantize(packed, meta, dtype=torch.float32)
    assert torch.equal(back, w)


def test_padding_does_not_change_the_real_groups():
    torch.manual_seed(4)
    w = torch.randn(8, 128)
    full = dequantize(*quantize(w, QuantSpec("q4", 64)), dtype=torch.float32)
    cut = dequantize(*quantize(w[:, :100], QuantSpec("q4", 64)), dtype=torch.float32)
    assert torch.equal(cut[:, :64], full[:, :64])


@pytest.mark.parametrize("name,bs", [("q4", 48), ("q3", 16), ("q8", 512), ("q2", None)])
def test_unsupported_group_size(name, bs):
    with pytest.raises(RecipeError, match="block size"):
        QuantSpec(name, bs)
    with pytest.raises(RecipeError, match="'block_size'"):
        SCHEMES[name].quantize(torch.randn(4, 64), bs)


@pytest.mark.parametrize("name", ["q1", "q7", "q16"])
def test_unsupported_bits(name):
    with pytest.raises(RecipeError, match="field 'scheme': unknown scheme"):
        parse_recipe({"model": "m", "output": "o", "scheme": name})


def test_group_size_alias():
    r = parse_recipe({"model": "m", "output": "o", "scheme": "q4", "group_size": 128,
                      "overrides": [{"pattern": "a.*", "scheme": "q8", "group_size": 256}]})
    assert r.block_size == 128 and r.overrides[0].block_size == 256
    same = parse_recipe({"model": "m", "output": "o", "scheme": "q4", "block_size": 128,
                         "overrides": [{"pattern": "a.*", "scheme": "q8", "block_size": 256}]})
    assert r.fingerprint() == same.fingerprint()
    with pytest.raises(RecipeError, match="'group_size' is an alias of 'block_size'"):
        parse_recipe({"model": "m", "output": "o", "scheme": "q4", "group_size": 128, "block_size": 64})
    with pytest.raises(RecipeError, match=r"overrides\[0\].*'group_size'"):
        parse_recipe({"model": "m", "output": "o", "scheme": "q4",
                      "overrides": [{"pattern": "a", "scheme": "q4", "group_size": 64, "block_size": 64}]})
    with pytest.raises(RecipeError, match="field 'block_size'"):
        parse_recipe({"model": "m", "output": "o", "scheme": "q4", "group_size": 96})


def test_non_float_input_is_refused():
    with pytest.raises(ValueError, match="floating-point"):
        SCHEMES["q4"].quantize(torch.ones(4, 64, dtype=torch.int32), 64)
