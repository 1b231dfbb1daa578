from pathlib import Path

import pytest

from qstream.errors import RecipeError
from qstream.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_first_match_wins():
    r = parse_recipe({"model": "m", "output": "o", "overrides": [
        {"pattern": "model.layers.0.*", "scheme": "int8"},
        {"pattern": "model.layers.*", "scheme": "fp4", "block_size": 128},
        {"pattern": "lm_head", "scheme": "bf16"},
    ]})
    assert r.scheme == "nf4" and r.block_size == 64 and r.compute_dtype == "bfloat16"
    assert r.spec_for("model.layers.0.mlp.up_proj")[0].scheme == "int8"
    assert r.spec_for("model.layers.0.mlp.up_proj")[0].block_size == 64
    assert r.spec_for("model.layers.3.mlp.up_proj")[0] .scheme == "fp4"
    assert r.spec_for("model.layers.3.mlp.up_proj")[0].block_size == 128
    assert r.spec_for("lm_head")[0].scheme == "bf16" and r.spec_for("lm_head")[0].block_size is None
    assert r.spec_for("model.norm")[0].scheme == "nf4"


@pytest.mark.parametrize("data,match", [
    ({"model": "m", "output": "o", "schema": "nf4"}, "unknown field 'schema'"),
    ({"output": "o"}, "missing required field 'model'"),
    ({"model": "m", "output": "o", "block_size": "64"}, "field 'block_size': expected int"),
    ({"model": "m", "output": "o", "block_size": True}, "field 'block_size': expected int"),
    ({"model": "m", "output": "o", "scheme": "q7"}, "unknown scheme 'q7'"),
    ({"model": "m", "output": "o", "scheme": "nf4", "block_size": 48}, "block size 48 is not supported by nf4"),
    ({"model": "m", "output": "o", "compute_dtype": "fp8"}, "compute_dtype"),
    ({"model": "m", "output": "o", "overrides": [{"pattern": "x"}]}, r"overrides\[0\]: missing required field 'scheme'"),
    ({"model": "m", "output": "o", "overrides": [{"pattern": "x", "scheme": "nf4", "bits": 4}]}, r"overrides\[0\]: unknown field 'bits'"),
    ({"model": "m", "output": "o", "overrides": [{"pattern": "x", "scheme": "int8", "block_size": 32}]}, r"overrides\[0\].block_size: block size 32"),
    ({"model": "m", "output": "o", "overrides": "lm_head"}, "field 'overrides': expected list"),
    (["model", "m"], "expected a mapping"),
])
def test_bad_recipes_name_the_field(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


def test_yaml_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    r = load_recipe(path)
    assert r.model and r.output


def test_fingerprint_ignores_output_but_not_schemes():
    a = parse_recipe({"model": "m", "output": "o1"})
    b = parse_recipe({"model": "m", "output": "o2"})
    c = parse_recipe({"model": "m", "output": "o1", "scheme": "int8"})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
