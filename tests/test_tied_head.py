"""Tied embeddings stored once: the head file holds the one copy of the embedding/head matrix (8-bit by
default in recipes of fewer bits), the manifest says so, and the runtime looks the embedding up from the
head's codes. Old manifests (a separate embedding file) keep loading; untied models are unchanged."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny, shard_to, write_recipe
from qstream.cli import main
from qstream.errors import RecipeError, ShardError
from qstream.quant import QuantSpec, dequantize, get_scheme, quantize
from qstream.recipe import parse_recipe
from qstream.runtime.embedding import gather_rows
from qstream.store.manifest import FileEntry, read_manifest
from qstream.store.tensors import save_bytes


def _files(d):
    return {f["name"]: f for f in json.loads((d / "manifest.json").read_text())["files"]}


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tied") / "m", "qwen2")  # tie_word_embeddings=True


def test_a_tied_model_stores_the_matrix_once_in_the_head_file(tied_src, tmp_path):
    d = shard_to(tmp_path, tied_src, "nf4", compute_dtype="float32")
    files = _files(d)
    assert "embed.safetensors" not in files and not (d / "embed.safetensors").exists()
    stored = [t for f in files.values() for t in f["tensors"]]
    assert "model.embed_tokens.weight" not in stored and stored.count("lm_head.weight") == 1
    head = files["head.safetensors"]["tensors"]["lm_head.weight"]
    assert (head["scheme"], head["block_size"]) == ("q8", 64)  # the default for a 4-bit recipe
    assert read_manifest(d).embedding == {"from": "head", "tensor": "lm_head.weight", "name": "model.embed_tokens.weight"}
    # the 16-bit equivalent counts the matrix once, as the shards store it
    params = sum(p for f in files.values() for p in (torch.Size(m["shape"]).numel() for m in f["tensors"].values()))
    assert read_manifest(d).dense_bytes == 2 * params


def test_an_untied_model_keeps_its_embedding_file(tmp_path):
    src = make_tiny(tmp_path / "m", "llama")
    d = shard_to(tmp_path, src, "nf4")
    files = _files(d)
    assert "model.embed_tokens.weight" in files["embed.safetensors"]["tensors"]
    assert files["head.safetensors"]["tensors"]["lm_head.weight"]["scheme"] == "nf4"
    assert read_manifest(d).embedding is None


@pytest.mark.parametrize("fields, want", [
    ({}, ("q8", 64)),
    ({"tied_head": "q6"}, ("q6", 64)),
    ({"tied_head": {"scheme": "int8", "group_size": 128}}, ("int8", 128)),
    ({"tied_head": "q6", "overrides": [{"pattern": "lm_head", "scheme": "bf16"}]}, ("bf16", None)),  # overrides win
    ({"scheme": "int8"}, ("int8", 64)),  # 8-bit recipes keep their own scheme
    ({"scheme": "bf16"}, ("bf16", None)),
])
def test_the_tied_head_spec(fields, want):
    r = parse_recipe({"model": "m", "output": "o", "scheme": "nf4", **fields})
    spec, why = r.tied_head_spec()
    assert (spec.scheme, spec.block_size) == want and why


def test_a_recipe_without_tied_head_keeps_its_fingerprint_and_one_with_it_differs():
    base = {"model": "m", "output": "o", "scheme": "nf4"}
    assert "tied_head" not in parse_recipe(base).to_dict()
    with_field = parse_recipe({**base, "tied_head": "q6"})
    assert with_field.fingerprint() != parse_recipe(base).fingerprint()
    assert with_field.to_dict()["tied_head"] == {"scheme": "q6"}


@pytest.mark.parametrize("value, msg", [
    ("q7", "unknown scheme 'q7'"),
    ({"scheme": "q8", "group_size": 100}, "block size 100 is not supported by q8"),
    ({"schema": "q8"}, "unknown field 'schema'"),
    (8, "expected str or dict"),
])
def test_a_bad_tied_head_is_one_line_and_exit_2(tmp_path, capsys, value, msg):
    with pytest.raises(RecipeError, match=msg):
        parse_recipe({"model": "m", "output": "o", "tied_head": value})
    recipe = write_recipe(tmp_path / "r.yaml", model="smollm2-135m", output=str(tmp_path / "out"), tied_head=value)
    code = main(["shard", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qstream: error: ") and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme, block, shape", [
    ("q8", 64, (40, 96)), ("q8", 128, (40, 96)), ("q6", 64, (40, 96)), ("q4", 32, (33, 65)),
    ("int8", 64, (40, 96)), ("int8", 64, (33, 65)), ("nf4", 64, (33, 65)), ("fp4", 128, (40, 96)), ("bf16", None, (40, 96)),
])
def test_gathered_rows_equal_the_dequantized_matrix_rows(scheme, block, shape):
    torch.manual_seed(0)
    packed, meta = quantize(torch.randn(shape), QuantSpec(scheme, block))
    rows = torch.tensor([0, shape[0] - 1, 7, 7, 3])
    full = dequantize(packed, meta, dtype=torch.float32)
    assert torch.equal(gather_rows(get_scheme(scheme), packed, meta, rows, torch.float32), full[rows])


def _reference(src, spec: QuantSpec):
    """The source model with its tied matrix replaced by the dequantized 8-bit one (fp32 elsewhere)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    w = ref.get_input_embeddings().weight
    with torch.no_grad():
        w.copy_(dequantize(*quantize(w.detach().clone(), spec), dtype=torch.float32))
    assert ref.get_output_embeddings().weight.data_ptr() == w.data_ptr()  # tied: the head follows
    return ref


def _greedy(forward, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_an_8bit_stored_once_head_runs_like_its_dequantized_reference(tied_src, tmp_path):
    import qstream

    from qstream.recipe import parse_recipe
    from qstream.shard import shard

    d = tmp_path / "shards-fp32"
    # quantized on the CPU like the reference: the fitted q8 grid found on a GPU differs by ~1e-3 in the logits
    shard(parse_recipe({"model": str(tied_src), "output": str(d), "scheme": "fp32", "compute_dtype": "float32",
                        "tied_head": {"scheme": "q8", "group_size": 64}}), progress=False, device="cpu")
    ref = _reference(tied_src, QuantSpec("q8", 64))
    model = qstream.load(d, device="cpu", progress=False)
    try:
        ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).float(), ref(ids).logits, rtol=1e-4, atol=1e-4)
            got = _greedy(lambda x: model(x), ids, 8)
            want = _greedy(lambda x: ref(x).logits, ids, 8)
        assert torch.equal(got, want)
    finally:
        model.close()


def _to_old_layout(d, src) -> None:
    """Rewrite a stored-once directory as qstream wrote tied models before: the embedding in its own
    16-bit file, no 'embedding' field."""
    from safetensors.torch import load_file

    from qstream.store.integrity import fast_digest
    import hashlib

    w = load_file(str(next(src.glob("*.safetensors"))))["model.embed_tokens.weight"].float()
    meta = {"model.embed_tokens.weight": {"scheme": "fp32", "shape": list(w.shape), "dtype": "float32",
                                          "stored": {"data": "model.embed_tokens.weight"}}}
    data = save_bytes({"model.embed_tokens.weight": w}, {"qstream": json.dumps(meta, sort_keys=True)})
    (d / "embed.safetensors").write_bytes(data)
    m = json.loads((d / "manifest.json").read_text())
    del m["embedding"]
    m["files"].insert(0, FileEntry("embed.safetensors", "embed", None, len(data), hashlib.sha256(data).hexdigest(), meta,
                                   fast_digest(data)).to_dict())
    (d / "manifest.json").write_text(json.dumps(m))


def test_an_old_manifest_with_a_separate_embedding_still_loads(tied_src, tmp_path):
    import qstream
    from qstream.store.inspect import verify

    d = shard_to(tmp_path, tied_src, "fp32", compute_dtype="float32", tied_head="q8")
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = _reference(tied_src, QuantSpec("q8", 64))
    _to_old_layout(d, tied_src)
    assert read_manifest(d).embedding is None and verify(d, progress=False).passed
    model = qstream.load(d, device="cpu", progress=False)
    try:
        with torch.no_grad():
            got = model(ids).float()
        # the embedding is the exact fp32 one now, the head still 8-bit: close to, not equal to, the reference
        torch.testing.assert_close(got, ref(ids).logits, rtol=0.05, atol=0.05)
        assert type(model.hf.model.embed_tokens).__name__ != "HeadEmbedding"
    finally:
        model.close()


def test_resharding_an_old_layout_directory_rewrites_it_stored_once(tied_src, tmp_path):
    d = shard_to(tmp_path, tied_src, "fp32", compute_dtype="float32", tied_head="q8")
    _to_old_layout(d, tied_src)
    shard_to(tmp_path, tied_src, "fp32", compute_dtype="float32", tied_head="q8")  # same recipe: resumes
    assert not (d / "embed.safetensors").exists() and read_manifest(d).embedding is not None


def test_a_resumed_head_in_another_scheme_is_rewritten(tied_src, tmp_path):
    """The same fingerprint can mean another layout after an upgrade: a file is resumed only if its specs match."""
    d = shard_to(tmp_path, tied_src, "fp32", compute_dtype="float32", tied_head="q8")
    m = json.loads((d / "manifest.json").read_text())
    head = next(f for f in m["files"] if f["name"] == "head.safetensors")
    head["tensors"]["lm_head.weight"]["scheme"] = "q6"  # as if an older qstream had chosen q6
    (d / "manifest.json").write_text(json.dumps(m))
    from qstream.recipe import parse_recipe as pr
    from qstream.shard import shard

    r = shard(pr({"model": str(tied_src), "output": str(d), "scheme": "fp32", "compute_dtype": "float32", "tied_head": "q8"}),
              progress=False)
    assert r.files_written == 1 and _files(d)["head.safetensors"]["tensors"]["lm_head.weight"]["scheme"] == "q8"


@pytest.mark.parametrize("bad, msg", [
    ({"from": "embed", "tensor": "lm_head.weight", "name": "model.embed_tokens.weight"}, "field 'embedding' must be"),
    ({"from": "head", "tensor": "model.norm.weight", "name": "model.embed_tokens.weight"}, "does not hold as a matrix"),
    ("head", "field 'embedding' must be"),
])
def test_a_damaged_embedding_field_is_refused(tied_src, tmp_path, bad, msg):
    import qstream

    d = shard_to(tmp_path, tied_src, "fp32", compute_dtype="float32")
    m = json.loads((d / "manifest.json").read_text())
    m["embedding"] = bad
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=msg):
        qstream.load(d, device="cpu", progress=False)


@pytest.mark.parametrize("extra", [{}, {"target_bits_per_weight": 4.5}])
def test_calibration_starts_from_the_stored_once_embedding(tmp_path, extra):
    """GPTQ (and the calibrated knapsack) need the embedding to start: with no embed file it is the stored head."""
    import qstream
    from conftest import byte_tokenizer
    from qstream.runtime.twin import dense_twin
    from qstream.shard import shard

    src = make_tiny(tmp_path / "m", "qwen2")
    byte_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while numbers 0123456789 count. " * 80)
    out = tmp_path / "gptq"
    shard(parse_recipe({"model": str(src), "output": str(out), "scheme": "q4", "group_size": 32, "compute_dtype": "float32",
                        "calibration": {"text_file": str(text), "tokens": 1024}, **extra}), progress=False)
    files = _files(out)
    assert "embed.safetensors" not in files
    assert files["head.safetensors"]["tensors"]["lm_head.weight"]["scheme"] == "q8"  # the knapsack leaves it alone
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    model = qstream.load(out, device="cpu", max_seq=64, progress=False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(ids), dense_twin(out)(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        model.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head", ["q8", "int8", "nf4", "bf16"])
def test_on_cuda_the_embedding_is_gathered_where_the_head_lives(tied_src, tmp_path, head):
    """The head is on the GPU; the lookup gathers and dequantizes rows there and matches the CPU run."""
    import qstream

    d = shard_to(tmp_path, tied_src, "nf4", compute_dtype="float32", tied_head=head)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    cpu = qstream.load(d, device="cpu", progress=False)
    gpu = qstream.load(d, device="cuda", max_seq=64, max_batch=2, progress=False)
    try:
        emb = gpu.hf.model.embed_tokens
        assert type(emb).__name__ == "HeadEmbedding" and emb.head.packed[""].is_cuda
        with torch.no_grad():
            assert emb(ids.cuda()).is_cuda
            torch.testing.assert_close(gpu(ids.cuda()).float().cpu(), cpu(ids).float(), rtol=2e-3, atol=2e-3)
    finally:
        gpu.close()
        cpu.close()
