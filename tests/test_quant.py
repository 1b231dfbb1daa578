import json

import pytest
import torch

from qstream.errors import RecipeError
from qstream.quant import SCHEMES, QuantSpec, dequantize, get_scheme, quantize


def _specs():
    for name, s in SCHEMES.items():
        for bs in (s.block_sizes or (None,)):
            yield name, bs


@pytest.mark.parametrize("name,block_size", list(_specs()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_scheme_bound(name, block_size, dtype):
    torch.manual_seed(0)
    w = torch.randn(96, 160, dtype=dtype)  # 15360 elements: not a multiple of every block size
    packed, meta = quantize(w, QuantSpec(name, block_size))
    json.dumps(meta)  # metadata must be JSON as-is (it goes into the manifest)
    assert all(isinstance(t, torch.Tensor) for t in packed.values())
    back = dequantize(packed, meta, dtype=torch.float32)
    assert back.shape == w.shape
    err = ((back - w.float()).norm() / w.float().norm()).item()
    scheme = get_scheme(name)
    assert err <= scheme.error_bound(block_size), f"{name}/{block_size}/{dtype}: relative error {err:.4f}"
    if scheme.quantized:
        stored = sum(t.numel() * t.element_size() for t in packed.values())
        bits = 8 * stored / w.numel()
        # codes plus one float32 absmax per block (bitsandbytes) or a float16 scale and min per group (q2..q8)
        bpw = getattr(scheme, "bits_per_weight", None)
        if bpw:  # groups run along rows, which are padded to whole groups
            padded = -(-w.shape[1] // block_size) * block_size
            expected = bpw(block_size, cols=padded) * padded / w.shape[1]
        else:
            expected = (4 if name in ("nf4", "fp4") else 8) + 32 / block_size
        assert bits == pytest.approx(expected, abs=0.05)


def test_error_grows_with_block_size():
    torch.manual_seed(1)
    w = torch.randn(256, 256) * torch.logspace(-2, 0, 256)  # uneven magnitudes: small blocks help
    errs = []
    for bs in (32, 256, 4096):
        p, m = quantize(w, QuantSpec("nf4", bs))
        errs.append(((dequantize(p, m, dtype=torch.float32) - w).norm() / w.norm()).item())
    assert errs[0] < errs[1] < errs[2]


def test_fours_are_half_bytes():
    w = torch.randn(64, 64)
    p, _ = quantize(w, QuantSpec("nf4", 64))
    assert p[""].dtype == torch.uint8 and p[""].numel() == 64 * 64 // 2


@pytest.mark.parametrize("name,bs", [("nf4", 48), ("int8", 32), ("fp4", 8192), ("int8", None)])
def test_unsupported_block_size_is_refused(name, bs):
    with pytest.raises(RecipeError, match="block size"):
        QuantSpec(name, bs)


def test_unknown_scheme():
    with pytest.raises(RecipeError, match="unknown scheme 'int3'"):
        QuantSpec("int3", 64)
