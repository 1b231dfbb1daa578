"""GPTQ calibration while sharding: the error feedback, calibrated shards loading as their dense
twin, the recipe field's validation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, make_tiny
from qstream.errors import RecipeError
from qstream.quant import QuantSpec, dequantize, quantize
from qstream.quant.gptq import gptq_quantize
from qstream.recipe import parse_recipe
from qstream.shard import shard


def _correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    scale = torch.rand(cols, generator=g) * 3 + 0.1  # uneven feature magnitudes, as in LLM activations
    return torch.randn(n, cols, generator=g) @ mix * scale


@pytest.mark.parametrize("grid", ["fit", "minmax"])
@pytest.mark.parametrize("bits,cols", [(4, 192), (3, 200)])  # 200: a partial last group (padding)
def test_gptq_beats_round_to_nearest_on_output_error(bits, cols, grid):
    x = _correlated_inputs(2048, cols)
    w = torch.randn(96, cols, generator=torch.Generator().manual_seed(1)) * 0.05
    h = x.T @ x / x.shape[0]
    packed, meta = gptq_quantize(w, h, bits, 64, grid=grid)
    w_gptq = dequantize(packed, meta, dtype=torch.float32)
    assert w_gptq.shape == w.shape
    ref = quantize(w, QuantSpec(f"q{bits}", 64))  # the fitted (HQQ) scheme, already better than plain RTN
    w_fit = dequantize(*ref, dtype=torch.float32)
    # the same storage: same keys, shapes and dtypes, so the runtime dequantizes GPTQ with q-scheme code
    assert {k: (v.shape, v.dtype) for k, v in packed.items()} == {k: (v.shape, v.dtype) for k, v in ref[0].items()}
    err = lambda wq: float((x @ (wq - w).T).square().mean())  # noqa: E731
    assert err(w_gptq) < 0.8 * err(w_fit)


def test_gptq_with_white_inputs_is_close_to_round_to_nearest():
    """Identity Hessian: no correlation to exploit, error feedback has nothing to move."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    packed, meta = gptq_quantize(w, torch.eye(128), 4, 64)
    w_hat = dequantize(packed, meta, dtype=torch.float32)
    rel = float((w_hat - w).norm() / w.norm())
    assert rel < 0.1


@pytest.fixture
def tiny_with_text(tmp_path) -> tuple[Path, Path]:
    m = make_tiny(tmp_path / "m", "llama")
    byte_tokenizer(m)
    text = tmp_path / "calib.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog while numbers 0123456789 count. " * 80))
    return m, text


@pytest.mark.parametrize("method", ["gptq", "imatrix", "signround"])
def test_calibrated_shards_load_and_equal_their_dense_twin(tiny_with_text, tmp_path, method):
    import qstream
    from qstream.runtime.twin import dense_twin

    m, text = tiny_with_text
    recipe = parse_recipe({"model": str(m), "output": str(tmp_path / "gptq"), "scheme": "q4", "group_size": 32,
                           "compute_dtype": "float32",
                           "calibration": {"text_file": str(text), "tokens": 1024, "method": method,
                                           **({"steps": 10} if method == "signround" else {})}})
    shard(recipe, progress=False)
    plain = parse_recipe({"model": str(m), "output": str(tmp_path / "plain"), "scheme": "q4", "group_size": 32,
                          "compute_dtype": "float32"})
    shard(plain, progress=False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    twin = dense_twin(tmp_path / "gptq")
    model = qstream.load(tmp_path / "gptq", device="cpu", max_seq=64, progress=False)
    with torch.no_grad():
        want = twin(ids).logits
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
    model.close()
    # the calibrated codes differ from the calibration-free ones (GPTQ / the weighted fit actually ran)
    from safetensors.torch import load_file
    a = load_file(tmp_path / "gptq" / "layer_001.safetensors")
    b = load_file(tmp_path / "plain" / "layer_001.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("q_proj.weight"))


def test_calibration_fingerprint_and_old_recipes(tiny_with_text, tmp_path):
    m, text = tiny_with_text
    base = {"model": str(m), "output": str(tmp_path / "o"), "scheme": "q4"}
    with_cal = parse_recipe({**base, "calibration": {"text_file": str(text)}})
    assert with_cal.calibration.tokens == 4096
    assert parse_recipe(base).fingerprint() != with_cal.fingerprint()
    assert "calibration" not in parse_recipe(base).to_dict()


@pytest.mark.parametrize("cal,match", [
    ({"text_file": "/nonexistent/calib.txt"}, r"calibration'\.text_file: file not found"),
    ({"tokens": 64}, r"calibration': missing required field 'text_file'"),
    ({"text_file": "TEXT", "tokens": 0}, r"calibration'\.tokens: must be a positive"),
    ({"text_file": "TEXT", "tokens": "many"}, r"'tokens': expected int"),
    ({"text_file": "TEXT", "tokenz": 5}, r"unknown field 'tokenz'"),
    ({"text_file": "TEXT", "method": "awq"}, r"calibration'\.method: 'awq' is not supported; use one of gptq, imatrix"),
    ({"text_file": "TEXT", "method": "imatrix", "steps": 10}, r"calibration'\.steps: only method signround"),
    ({"text_file": "TEXT", "method": "signround", "steps": 0}, r"calibration'\.steps: must be 1\.\.10000, got 0"),
    ({"text_file": "TEXT", "tokens": 10 ** 6}, r"calibration'\.text_file: .* fewer than the 1000000 tokens"),
])
def test_bad_calibration_fields(tiny_with_text, tmp_path, cal, match):
    m, text = tiny_with_text
    cal = {k: (str(text) if v == "TEXT" else v) for k, v in cal.items()}
    with pytest.raises(RecipeError, match=match) as e:
        parse_recipe({"model": str(m), "output": str(tmp_path / "o"), "scheme": "q4", "calibration": cal})
    assert "\n" not in str(e.value)


def test_text_too_short_in_tokens_is_a_recipe_error(tmp_path):
    """The recipe's byte-size check passes, but the tokenizer makes fewer tokens than asked
    (real tokenizers merge bytes): one RecipeError naming the field, at shard time."""
    from qstream.quant.calibrate import calibration_ids

    text = tmp_path / "t.txt"
    text.write_text("word " * 200)

    def words(t, add_special_tokens=False):  # one token per word, as a BPE would roughly do
        return {"input_ids": list(range(len(t.split())))}

    assert calibration_ids(words, text, 128).shape == (1, 128)
    with pytest.raises(RecipeError, match=r"calibration\.text_file.*200 tokens, fewer than calibration\.tokens = 500"):
        calibration_ids(words, text, 500)


def _linear_bits_and_error(out: Path, src: Path) -> tuple[int, int, float, set[str]]:
    """(stored bits, params, summed squared weight error, schemes) over the quantized 2-D linear weights."""
    from safetensors.torch import load_file

    from qstream.runtime.twin import dense_state_dict
    from qstream.store.manifest import read_manifest

    ref = load_file(src / "model.safetensors")
    dense = dense_state_dict(out, dtype=torch.float32)
    m = read_manifest(out)
    bits = params = 0
    err = 0.0
    schemes = set()
    for e in m.files:
        raw = load_file(m.path(e))
        for name, meta in e.tensors.items():
            if meta["scheme"] in ("bf16", "fp32", "fp16") or len(meta["shape"]) != 2 or e.kind == "embed":
                continue
            schemes.add(meta["scheme"])
            params += meta["shape"][0] * meta["shape"][1]
            bits += 8 * sum(raw[k].numel() * raw[k].element_size() for k in meta["stored"].values())
            err += float((dense[name] - ref[name].float()).square().sum())
    return bits, params, err, schemes


def test_target_bits_per_weight_respects_the_budget_and_beats_uniform(tmp_path):
    from safetensors.torch import load_file, save_file

    m = make_tiny(tmp_path / "m", "llama")
    # real models' weights differ in scale from matrix to matrix (random init does not): make two
    # matrices large, so bits spent there save more error than the same bits anywhere else
    sd = load_file(m / "model.safetensors")
    for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.2.self_attn.o_proj.weight"):
        sd[k] = sd[k] * 8
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    base = {"model": str(m), "group_size": 64, "compute_dtype": "float32"}
    shard(parse_recipe({**base, "output": str(tmp_path / "mixed"), "scheme": "q4", "target_bits_per_weight": 4.5}),
          progress=False)
    shard(parse_recipe({**base, "output": str(tmp_path / "q4"), "scheme": "q4"}), progress=False)
    bits, params, err, schemes = _linear_bits_and_error(tmp_path / "mixed", m)
    u_bits, u_params, u_err, _ = _linear_bits_and_error(tmp_path / "q4", m)
    assert params == u_params
    assert bits <= 4.5 * params
    assert len(schemes) > 1  # a real mix, not the uniform choice again
    assert err < u_err


def test_target_bits_per_weight_overrides_still_win_and_bad_values(tmp_path):
    m = make_tiny(tmp_path / "m", "llama")
    r = parse_recipe({"model": str(m), "output": str(tmp_path / "o"), "group_size": 64, "target_bits_per_weight": 4,
                      "overrides": [{"pattern": "lm_head", "scheme": "bf16"}]})
    shard(r, progress=False)
    from qstream.store.manifest import read_manifest

    head = read_manifest(tmp_path / "o").file("head")
    assert head.tensors["lm_head.weight"]["scheme"] == "bf16"
    for bad, match in [(2, "outside"), (9, "outside"), ("4", "expected int or float"), (True, "expected int or float")]:
        with pytest.raises(RecipeError, match=f"target_bits_per_weight.*{match}"):
            parse_recipe({"model": str(m), "output": "o", "target_bits_per_weight": bad})


def test_target_bits_per_weight_with_calibration(tiny_with_text, tmp_path):
    """Errors weighted by calibration input moments and output loss gradients (head included); the budget holds."""
    m, text = tiny_with_text
    r = parse_recipe({"model": str(m), "output": str(tmp_path / "o"), "group_size": 64, "scheme": "q4",
                      "compute_dtype": "float32", "target_bits_per_weight": 4.5,
                      "calibration": {"text_file": str(text), "tokens": 1024}})
    shard(r, progress=False)
    bits, params, _, _ = _linear_bits_and_error(tmp_path / "o", m)
    assert bits <= 4.5 * params


def test_loss_sensitivity_covers_every_linear(tiny_with_text):
    from qstream.quant.calibrate import loss_sensitivity
    from qstream.source import open_source

    m, _ = tiny_with_text
    src = open_source(str(m))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    sens = loss_sensitivity(src.config, src.read, ids)
    linears = {n for n in src.names if n.endswith("proj.weight") or n == "lm_head.weight"}
    assert linears and linears <= set(sens)
    for n in linears:
        out_s, in_s = sens[n]
        assert out_s.shape == (src.shapes[n][0],) and in_s.shape == (src.shapes[n][1],)
        assert bool((out_s >= 0).all() and (in_s >= 0).all()) and float(out_s.sum()) > 0 and float(in_s.sum()) > 0
