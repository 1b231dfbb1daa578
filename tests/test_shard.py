"""The sharding pipeline: overrides, format, resume, verify, bad input, memory."""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import make_tiny, write_recipe
from qstream.cli import main
from qstream.errors import ShardError
from qstream.store import read_manifest
from qstream.recipe import parse_recipe
from qstream.shard import shard

ROOT = Path(__file__).resolve().parents[1]


def _recipe(src, out, **kw):
    return parse_recipe({"model": str(src), "output": str(out), **kw})


def test_overrides_land_where_the_recipe_says(tmp_path, caplog):
    src = make_tiny(tmp_path / "m", "llama")
    out = tmp_path / "s"
    r = _recipe(src, out, scheme="nf4", block_size=128, overrides=[
        {"pattern": "model.layers.0.*", "scheme": "int8"},
        {"pattern": "model.layers.*.mlp.down_proj", "scheme": "fp4", "block_size": 64},
        {"pattern": "lm_head", "scheme": "bf16"},
        {"pattern": "model.nothing.*", "scheme": "int8"},
    ])
    with caplog.at_level(logging.WARNING):
        shard(r, progress=False)
    assert "'model.nothing.*' matches no quantizable module" in caplog.text
    m = read_manifest(out)
    t = {name: meta for f in m.files for name, meta in f.tensors.items()}
    assert t["model.layers.0.mlp.down_proj.weight"]["scheme"] == "int8"  # first match wins
    assert t["model.layers.0.self_attn.q_proj.weight"]["scheme"] == "int8"
    assert t["model.layers.2.mlp.down_proj.weight"] == {**t["model.layers.2.mlp.down_proj.weight"], "scheme": "fp4", "block_size": 64}
    assert t["model.layers.2.mlp.up_proj.weight"]["scheme"] == "nf4"
    assert t["model.layers.2.mlp.up_proj.weight"]["block_size"] == 128
    assert t["lm_head.weight"]["scheme"] == "bf16"
    # norms and embeddings are never quantized
    assert t["model.layers.1.input_layernorm.weight"]["scheme"] == "bf16"
    assert t["model.embed_tokens.weight"]["scheme"] == "bf16"
    assert t["model.norm.weight"]["scheme"] == "bf16"


def test_format_golden(tmp_path):
    """The on-disk layout other tools rely on: file names, stored tensor names, dtypes, metadata."""
    src = make_tiny(tmp_path / "m", "llama")
    out = tmp_path / "s"
    shard(_recipe(src, out, scheme="nf4", block_size=64), progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["embed.safetensors", "generation_config.json", "head.safetensors", "layer_000.safetensors", "layer_001.safetensors",
                     "layer_002.safetensors", "layer_003.safetensors", "manifest.json"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "qstream-shards" and m["version"] == 1 and m["num_layers"] == 4
    assert m["layers_prefix"] == "model.layers" and m["compute_dtype"] == "bfloat16"
    assert [f["name"] for f in m["files"]] == ["embed.safetensors"] + [f"layer_{i:03d}.safetensors" for i in range(4)] + ["head.safetensors"]
    for f in m["files"]:
        assert len(f["sha256"]) == 64 and f["size"] == (out / f["name"]).stat().st_size
    with safe_open(out / "layer_001.safetensors", framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["qstream"])
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        a = f.get_tensor("model.layers.1.self_attn.q_proj.weight.absmax")
        n = f.get_tensor("model.layers.1.input_layernorm.weight")
    assert "model.layers.1.mlp.up_proj.weight.absmax" in keys and len(keys) == 7 * 2 + 2
    assert str(q.dtype) == "torch.uint8" and tuple(q.shape) == (64 * 64 // 2, 1)
    assert str(a.dtype) == "torch.float32" and tuple(a.shape) == (64 * 64 // 64,)
    assert str(n.dtype) == "torch.bfloat16"
    assert meta["model.layers.1.self_attn.q_proj.weight"] == {
        "scheme": "nf4", "shape": [64, 64], "dtype": "float32", "block_size": 64,
        "stored": {"data": "model.layers.1.self_attn.q_proj.weight", "absmax": "model.layers.1.self_attn.q_proj.weight.absmax"}}


def test_resume_after_interruption_is_byte_identical(tmp_path, monkeypatch):
    src = make_tiny(tmp_path / "m", "qwen2")  # tied embeddings: stored once, in the head file (5 files)
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    shard(_recipe(src, clean, scheme="nf4"), progress=False)

    import qstream.shard as sh

    real = sh.atomic_write_bytes
    calls = {"n": 0}

    def dying(path, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed while writing the 4th file
        real(path, data)

    monkeypatch.setattr(sh, "atomic_write_bytes", dying)
    with pytest.raises(KeyboardInterrupt):
        shard(_recipe(src, broken, scheme="nf4"), progress=False)
    monkeypatch.setattr(sh, "atomic_write_bytes", real)
    assert not (broken / "manifest.json").exists()
    with pytest.raises(ShardError, match="unfinished shard run"):
        read_manifest(broken)
    r = shard(_recipe(src, broken, scheme="nf4"), progress=False)
    assert (r.files_resumed, r.files_written) == (3, 2)
    for p in clean.glob("*.safetensors"):
        assert (broken / p.name).read_bytes() == p.read_bytes(), p.name
    assert not list(broken.glob(".*tmp*")) and not (broken / ".journal.json").exists()
    # a complete directory: a rerun rewrites nothing
    assert shard(_recipe(src, broken, scheme="nf4"), progress=False).files_written == 0


def test_verify_names_every_corrupt_or_missing_file(tmp_path, capsys):
    src = make_tiny(tmp_path / "m", "llama")
    out = tmp_path / "s"
    shard(_recipe(src, out, scheme="int8"), progress=False)
    assert main(["-q", "verify", str(out)]) == 0
    p = out / "layer_001.safetensors"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01  # one flipped bit
    p.write_bytes(bytes(b))
    (out / "layer_003.safetensors").unlink()
    capsys.readouterr()
    assert main(["-q", "verify", str(out)]) == 1
    o = capsys.readouterr()
    assert "CORRUPT  layer_001.safetensors" in o.out and "MISSING  layer_003.safetensors" in o.out
    assert "layer_002" not in o.out


def test_manifest_names_that_leave_the_directory_are_refused(tmp_path, capsys):
    src = make_tiny(tmp_path / "m", "llama")
    out = tmp_path / "s"
    shard(_recipe(src, out, scheme="bf16"), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["files"][1]["name"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="refusing file name"):
        read_manifest(out)
    assert main(["-q", "verify", str(out)]) == 2
    assert "refusing file name '../../etc/passwd'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown-key", "bad-scheme", "bad-block", "missing-model", "other-model", "foreign-dir"])
def test_bad_input_exits_2_with_one_line_and_no_complete_output(tmp_path, capsys, case):
    src = make_tiny(tmp_path / "m", "llama")
    out = tmp_path / "out"
    fields = {"model": str(src), "output": str(out), "scheme": "nf4"}
    expect = {
        "unknown-key": ("bits", "unknown field 'bits'"),
        "bad-scheme": ("scheme", "unknown scheme 'nf3'"),
        "bad-block": ("block_size", "block size 100 is not supported by nf4"),
        "missing-model": ("model", "model path does not exist"),
        "other-model": (None, "holds shards of another model or recipe"),
        "foreign-dir": (None, "is not empty and holds no qstream shards"),
    }[case]
    if case == "unknown-key":
        fields["bits"] = 4
    elif case == "bad-scheme":
        fields["scheme"] = "nf3"
    elif case == "bad-block":
        fields["block_size"] = 100
    elif case == "missing-model":
        fields["model"] = str(tmp_path / "nowhere")
    elif case == "other-model":
        shard(_recipe(src, out, scheme="int8"), progress=False)
    elif case == "foreign-dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    recipe = write_recipe(tmp_path / "r.yaml", **fields)
    capsys.readouterr()
    assert main(["-q", "shard", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("qstream: error:") and expect[1] in err, err
    after = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert after == before  # nothing written, nothing half-written


def test_force_replaces_another_models_shards(tmp_path):
    src = make_tiny(tmp_path / "m", "llama")
    out = tmp_path / "out"
    shard(_recipe(src, out, scheme="int8"), progress=False)
    shard(_recipe(src, out, scheme="nf4"), force=True, progress=False)
    assert {t["scheme"] for f in read_manifest(out).files for t in f.tensors.values()} == {"nf4", "bf16"}


def test_cli_error_has_no_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", model=str(tmp_path / "none"), output=str(tmp_path / "o"))
    p = subprocess.run([sys.executable, "-m", "qstream.cli", "shard", str(recipe)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("qstream: error: model path does not exist")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_peak_rss_stays_near_two_layers(tmp_path):
    """A model of 8 layers of 64 MiB each (fp32 on disk): sharding must not hold the model."""
    src = make_tiny(tmp_path / "big", "llama", hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                    num_key_value_heads=8, num_hidden_layers=8, vocab_size=512)
    layer_bytes = (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert total > 7 * layer_bytes
    recipe = write_recipe(tmp_path / "r.yaml", model=str(src), output=str(tmp_path / "o"), scheme="nf4")
    code = ("import resource, sys; from qstream.cli import main; import transformers, bitsandbytes; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; rc = main(['-q', 'shard', sys.argv[1]]); "
            "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    base_kib, peak_kib = map(int, p.stdout.split()[-2:])
    grew = (peak_kib - base_kib) * 1024
    assert grew < 3 * layer_bytes, f"peak RSS grew {grew / 2**20:.0f} MiB; one layer is {layer_bytes / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB"


@pytest.mark.slow
def test_real_model_nf4_shards_inspect_and_verify(smollm2_shards, capsys):
    out = smollm2_shards["nf4"]
    m = read_manifest(out)
    assert m.num_layers == 30 and m.data["model"]["architecture"] == "LlamaForCausalLM"
    assert "tokenizer.json" in m.tokenizer_files
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "layer_029.safetensors" in table and "nf4 x7" in table and "4.5" in table
    assert main(["-q", "verify", str(out)]) == 0
    sizes = {f.kind: f.size for f in m.files if f.kind != "layer"}
    layer = m.file("layer", 0).size
    assert layer * 3.3 < 3_540_096 * 2  # 4.5 bits per weight against 16
    # SmolLM2 ties its embeddings: the matrix is stored once, in the head file (bf16 by the fixture's override)
    assert "embed" not in sizes and sizes["head"] > 49152 * 576 * 2 and m.embedding["name"] == "model.embed_tokens.weight"
