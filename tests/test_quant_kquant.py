"""q2k ... q6k: affine groups whose scale and min are 6-bit codes under float16 super-block scales."""
import json

import pytest
import torch

from qstream.errors import RecipeError
from qstream.quant import SCHEMES, QuantSpec, dequantize, quantize
from qstream.quant.affine import Affine
from qstream.quant.kquant import GRID_MAX, K_GROUP_SIZES, super_layout

BITS = (2, 3, 4, 5, 6)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("groups,expected", [(28, (3, 10)), (152, (19, 8)), (5, (1, 5)), (18, (2, 9)), (8, (1, 8)),
                                             (17, (2, 9))])
def test_super_layout(groups, expected):
    n, per = super_layout(groups)
    assert (n, per) == expected
    assert (n - 1) * per < groups <= n * per  # every super-block holds at least one group


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", K_GROUP_SIZES)
def test_round_trip_within_bound_and_bits(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(24, 896) * torch.logspace(-1, 0, 896)  # uneven columns, 896 = 28 groups of 32
    scheme = SCHEMES[f"q{bits}k"]
    packed, meta = quantize(w, QuantSpec(scheme.name, group))
    json.dumps(meta)
    back = dequantize(packed, meta, dtype=torch.float32)
    assert back.shape == w.shape
    assert _rel(back, w) <= scheme.error_bound(group)
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    assert 8 * stored / w.numel() == pytest.approx(scheme.bits_per_weight(group, cols=896), abs=0.01)
    assert scheme.bits_per_weight(group, cols=896) <= bits + 0.5 + 16 / group  # 4.5 bits for q4k at 32


@pytest.mark.parametrize("bits", BITS)
def test_grid_costs_little_and_beats_twice_the_group(bits):
    """The 6-bit grid at groups of 32 keeps most of float16's gain: better than the float16 grid at 64,
    which costs as many bits."""
    torch.manual_seed(10 + bits)
    w = torch.randn(64, 1024)
    k = _rel(dequantize(*quantize(w, QuantSpec(f"q{bits}k", 32)), dtype=torch.float32), w)
    f32 = _rel(dequantize(*quantize(w, QuantSpec(f"q{bits}", 32)), dtype=torch.float32), w)
    f64 = _rel(dequantize(*quantize(w, QuantSpec(f"q{bits}", 64)), dtype=torch.float32), w)
    # measured: within 1% of float16 at 2-4 bits, 4% at 5, 10% at 6 bits (finer codes need a finer grid)
    assert k <= (1.05 if bits <= 4 else 1.15) * f32
    assert k < f64 - (0.5 if bits <= 4 else 0.2) * (f64 - f32)


def test_affine_form_is_what_dequantize_uses():
    torch.manual_seed(2)
    w = torch.randn(16, 200)  # padded to 7 groups of 32
    scheme = SCHEMES["q4k"]
    packed, meta = scheme.quantize(w, 32)
    flat = scheme.affine_form(packed, meta)
    assert set(flat) == {"", "scale", "min"} and flat["scale"].dtype == torch.float16
    assert flat["scale"].shape == (16, 7)
    assert torch.equal(Affine.dequantize(scheme, flat, meta, dtype=torch.float32),
                       dequantize(packed, meta, dtype=torch.float32))
    assert (flat["min"] <= 0).all()
    # the scales are 6-bit multiples of their super-block's d
    ratio = flat["scale"].float() / packed["d"].float().repeat_interleave(7, dim=1)
    assert torch.allclose(ratio, ratio.round(), atol=0.05) and ratio.max() <= GRID_MAX + 0.5


def test_positive_groups_and_zero_rows():
    w = torch.zeros(4, 64)
    w[1] = torch.linspace(1.0, 2.0, 64)  # all positive: the min is clamped to 0
    w[2, :32] = -0.5
    back = dequantize(*quantize(w, QuantSpec("q4k", 32)), dtype=torch.float32)
    assert torch.equal(back[0], w[0]) and torch.equal(back[3], w[3])
    assert (back[1] - w[1]).abs().max() < 2.0 / 15  # within one step of the widened grid
    assert torch.allclose(back[2, :32], w[2, :32], atol=1e-3)


def test_importance_lowers_the_weighted_error():
    torch.manual_seed(3)
    w = torch.randn(32, 512)
    imp = torch.rand(512) ** 4
    scheme = SCHEMES["q4k"]

    def werr(p, m):
        return ((dequantize(p, m, dtype=torch.float32) - w).square() * imp).sum().item()

    assert werr(*scheme.quantize(w, 32, importance=imp)) < 0.95 * werr(*scheme.quantize(w, 32))


@pytest.mark.parametrize("bs", [128, 48, None])
def test_unsupported_group_size(bs):
    with pytest.raises(RecipeError, match="block size"):
        QuantSpec("q4k", bs)
    with pytest.raises(RecipeError, match="'block_size'"):
        SCHEMES["q4k"].quantize(torch.randn(4, 64), bs)


def test_not_two_dimensional_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        SCHEMES["q4k"].quantize(torch.randn(64), 32)


# --- recipes and shards -------------------------------------------------------------------------

def test_recipe_rules_for_the_k_family(tmp_path):
    from qstream.recipe import parse_recipe

    text = tmp_path / "calib.txt"
    text.write_text("x" * 5000)
    base = {"model": "m", "output": "o", "scheme": "q4k", "group_size": 32}
    # the k-schemes' grids come from the importance-weighted fit: the default method there
    assert parse_recipe({**base, "calibration": {"text_file": str(text)}}).calibration.method == "imatrix"
    assert parse_recipe({**base, "scheme": "q4", "calibration": {"text_file": str(text)}}).calibration.method == "gptq"
    with pytest.raises(RecipeError, match="calibration.method.*gptq does not support q4k"):
        parse_recipe({**base, "calibration": {"text_file": str(text), "method": "gptq"}})
    with pytest.raises(RecipeError, match="gptq does not support q6k"):
        parse_recipe({**base, "scheme": "q4", "group_size": 64, "overrides": [{"pattern": "x", "scheme": "q6k", "group_size": 32}],
                      "calibration": {"text_file": str(text), "method": "gptq"}})
    # the candidates of target_bits_per_weight stay in the recipe's family
    names = {(s.scheme, s.block_size) for s in parse_recipe({**base, "target_bits_per_weight": 4.5}).target_candidates()}
    assert names == {("q2k", 32), ("q3k", 32), ("q4k", 32), ("q5k", 32), ("q6k", 32), ("q3k", 64), ("q4k", 64), ("q3k", 16), ("q8", 64)}
    assert all(not s.scheme.endswith("k") for s in parse_recipe({**base, "scheme": "q4", "group_size": 64}).target_candidates())
    assert parse_recipe({"model": "m", "output": "o", "scheme": "q3k"}).block_size == 32  # the k default group
    # `head` is the other spelling of `tied_head`
    assert parse_recipe({**base, "head": "q8"}).to_dict() == parse_recipe({**base, "tied_head": "q8"}).to_dict()
    with pytest.raises(RecipeError, match="'head' is an alias of 'tied_head'"):
        parse_recipe({**base, "head": "q8", "tied_head": "q8"})


def test_k_shards_budget_untied_head_and_runtime(tmp_path):
    """A mixed k recipe with imatrix calibration on an untied tiny llama: the head keeps the recipe's
    head scheme (out of the knapsack), the decoder stays within its bits, and the streamed and the
    all-resident model (grids expanded once, QLinear.settle) give the dense twin's logits."""
    import qstream
    from conftest import byte_tokenizer, make_tiny
    from qstream.recipe import parse_recipe
    from qstream.runtime.qlinear import QLinear
    from qstream.runtime.twin import dense_twin
    from qstream.shard import shard
    from qstream.store.manifest import read_manifest

    m = make_tiny(tmp_path / "m", "llama", hidden_size=128, intermediate_size=256)
    byte_tokenizer(m)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while numbers 0123456789 count. " * 60)
    out = tmp_path / "k"
    shard(parse_recipe({"model": str(m), "output": str(out), "scheme": "q4k", "group_size": 32, "compute_dtype": "float32",
                        "target_bits_per_weight": 4.5, "head": "q8", "calibration": {"text_file": str(text), "tokens": 1024}}),
          progress=False)
    man = read_manifest(out)
    assert man.file("head").tensors["lm_head.weight"]["scheme"] == "q8"
    bits = params = 0
    schemes = set()
    for e in man.files:
        if e.kind != "layer":
            continue
        for name, meta in e.tensors.items():
            if len(meta["shape"]) == 2:
                schemes.add(meta["scheme"])
                params += meta["shape"][0] * meta["shape"][1]
                bits += SCHEMES[meta["scheme"]].bits_per_weight(meta["block_size"], cols=meta["shape"][1]) \
                    * meta["shape"][0] * meta["shape"][1]
    assert schemes <= {"q2k", "q3k", "q4k", "q5k", "q6k", "q8"} and "q4k" in schemes | {"q3k"}
    assert bits <= 4.5 * params * 1.01  # the grid codes' padding to whole bytes is not in bits_per_weight
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = dense_twin(out)(ids).logits
        model = qstream.load(out, device="cpu", max_seq=32, progress=False)  # all resident: grids expanded once
        torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
        assert all("grid" not in q.packed for q in model.hf.modules() if isinstance(q, QLinear) and q.packed)
        fixed = model.plan.fixed_bytes
        model.close()
        layer = max(e.size for e in man.files if e.kind == "layer")
        model = qstream.load(out, device="cpu", gpu_memory=fixed + 2 * layer, host_memory=0, max_seq=32, progress=False)
        assert model.plan.disk  # streamed from disk: the stored grids, expanded on every call
        torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
        model.close()
