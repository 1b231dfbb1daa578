"""The in-directory draft of self-speculative decoding: sharded into the target's directory
(manifest, checksums, verify, inspect, --force), planned first in the device budget, sharing
the target's resident layers, embeddings and head, and exact (greedy token-identical)."""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

import qstream
from conftest import byte_tokenizer, make_tiny, shard_to
from qstream.errors import BudgetError, RecipeError, ShardError
from qstream.generate import SamplingConfig, generate_ids
from qstream.recipe import parse_recipe
from qstream.runtime.draft import plan_with_draft
from qstream.runtime.plan import plan_tiers
from qstream.speculate import SpecConfig, speculative_generate_ids
from qstream.store.check import manifest_problems
from qstream.store.inspect import inspect_table, verify
from qstream.store.manifest import read_manifest

DRAFT = {"scheme": "q3", "group_size": 32}
# small fixed costs and two staging slots: budgets of a few layers give plans with streamed and resident layers
LOAD = dict(device="cpu", max_seq=96, prefill_chunk=64, max_slots=2, progress=False)


@pytest.fixture(scope="module")
def with_draft(tmp_path_factory):
    """Per architecture: fp32 target shards with a q3 draft in the same directory."""
    out = {}

    def get(arch):
        if arch not in out:
            tmp = tmp_path_factory.mktemp(arch)
            src = make_tiny(tmp / "m", arch)
            out[arch] = shard_to(tmp, src, "fp32", compute_dtype="float32", draft=DRAFT)
        return out[arch]
    return get


def test_recipe_draft_field():
    r = parse_recipe({"model": "m", "output": "o", "draft": {"scheme": "q4"}})
    assert (r.draft.scheme, r.draft.block_size) == ("q4", 64)
    assert r.fingerprint() != parse_recipe({"model": "m", "output": "o"}).fingerprint()
    assert "draft" not in parse_recipe({"model": "m", "output": "o"}).to_dict()  # old fingerprints unchanged
    with pytest.raises(RecipeError, match="not a draft scheme"):
        parse_recipe({"model": "m", "output": "o", "draft": {"scheme": "q8"}})
    with pytest.raises(RecipeError, match="unknown field 'bits'"):
        parse_recipe({"model": "m", "output": "o", "draft": {"scheme": "q3", "bits": 3}})


def test_draft_files_are_manifest_entries_checked_like_any_other(with_draft, tmp_path):
    d = with_draft("llama")
    m = read_manifest(d)
    drafts = m.draft_files()
    assert [f.index for f in drafts] == [0, 1, 2, 3] and all(f.kind == "draft" for f in drafts)
    assert all(len(f.sha256) == 64 and f.xxh3 for f in drafts)
    for f in drafts:
        schemes = {t["scheme"] for n, t in f.tensors.items() if n.endswith("proj.weight")}
        assert schemes == {"q3"}
        assert f.size < 0.3 * m.file("layer", f.index).size  # 3-bit linears vs fp32
    assert [f.kind for f in m.layer_files()] == ["layer"] * 4 and not manifest_problems(m)
    assert verify(d, progress=False).passed
    assert "draft (speculative" in inspect_table(m) and "q3 x28" in inspect_table(m)
    # a damaged draft file is found by verify, and load refuses its bytes
    import shutil
    budget = _mixed_budget(d)
    good = qstream.load(d, draft=True, gpu_memory=budget, **LOAD)
    streamed = good.plan.streamed[0]
    good.close()
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    p = bad / drafts[streamed].name
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert drafts[streamed].name in verify(bad, progress=False).corrupt
    with pytest.raises(ShardError):
        qstream.load(bad, draft=True, gpu_memory=budget, **LOAD)
    # a manifest that lists drafts of some layers only is incomplete
    data = json.loads((bad / "manifest.json").read_text())
    data["files"] = [f for f in data["files"] if f["name"] != drafts[2].name]
    (bad / "manifest.json").write_text(json.dumps(data))
    assert any("no draft file for layer 2" in p for p in manifest_problems(read_manifest(bad)))


def test_force_removes_draft_files_and_a_rerun_resumes_them(tmp_path):
    from qstream.shard import shard

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=2)
    out = tmp_path / "s"
    r = shard(parse_recipe({"model": str(src), "output": str(out), "scheme": "fp32", "compute_dtype": "float32",
                            "draft": DRAFT}), progress=False)
    assert r.files_written == 6  # embed, 2 layers, head, 2 drafts
    again = shard(parse_recipe({"model": str(src), "output": str(out), "scheme": "fp32", "compute_dtype": "float32",
                                "draft": DRAFT}), progress=False)
    assert (again.files_written, again.files_resumed) == (0, 6)
    plain = parse_recipe({"model": str(src), "output": str(out), "scheme": "fp32", "compute_dtype": "float32"})
    with pytest.raises(ShardError, match="--force"):
        shard(plain, progress=False)  # another recipe: the draft is part of the directory's identity
    shard(plain, force=True, progress=False)
    assert not list(out.glob("draft_*")) and read_manifest(out).draft_files() is None


def test_plan_counts_the_draft_first():
    layers, drafts = [100] * 10, [20] * 10
    plain = plan_tiers(layers, fixed_bytes=50, budget=900, host_budget=None)
    p = plan_with_draft(layers, drafts, fixed_bytes=50, draft_kv_bytes=30, budget=900, host_budget=None)
    assert p.plain_resident == len(plain.resident) and len(p.resident) < len(plain.resident)
    assert p.drafted == p.streamed and p.draft_bytes == 20 * len(p.streamed)
    used = p.fixed_bytes + p.slots * p.slot_bytes + 100 * len(p.resident) + p.draft_bytes
    assert used <= 900 and used + 80 > 900  # one more resident layer (+100 -20) would not fit
    assert "displaces" in p.describe() and "low-bit layer copies" in p.describe()
    every = plan_with_draft(layers, drafts, fixed_bytes=50, draft_kv_bytes=30, budget=None, host_budget=None)
    assert every.drafted == () and "the target itself" in every.describe()
    with pytest.raises(BudgetError, match="target and its draft"):
        plan_with_draft(layers, drafts, fixed_bytes=50, draft_kv_bytes=30, budget=400, host_budget=None)


def _ids(n=12, seed=3):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _mixed_budget(d) -> int:
    """A budget with room for the draft, two staging slots and one resident layer of the four: a
    plan with both kinds of layer."""
    full = qstream.load(d, draft=True, **LOAD)  # unlimited: every layer resident, the draft is the target
    sizes, fixed = full.layer_bytes, full.plan.fixed_bytes
    assert full.draft.drafted == ()
    full.close()
    drafts = [f.size for f in read_manifest(d).draft_files()]
    return fixed + 2 * max(sizes) + max(sizes) + sum(drafts)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_in_dir_draft_shares_resident_layers_and_greedy_is_exact(with_draft, arch):
    d = with_draft(arch)
    target = qstream.load(d, draft=True, gpu_memory=_mixed_budget(d), **LOAD)
    draft = target.draft
    plan = target.plan
    assert 0 < len(plan.resident) < 4 and draft.drafted == plan.streamed
    dl, tl = draft.hf.get_submodule(target.manifest.layers_prefix), target.layers
    for i in range(4):
        assert (dl[i] is tl[i]) == (i in plan.resident)
    assert draft.hf.get_input_embeddings() is target.hf.get_input_embeddings()
    assert draft.hf.get_output_embeddings() is target.hf.get_output_embeddings()
    i = plan.streamed[0]
    assert dl[i].self_attn.q_proj.meta["scheme"] == "q3" and tl[i].self_attn.q_proj.meta["scheme"] == "fp32"
    ids = _ids()
    cfg = SamplingConfig(max_new_tokens=24)
    want = generate_ids(target, ids, torch.ones_like(ids), cfg).new_tokens[0]
    for spec in (SpecConfig(budget=32, max_depth=6, fallback=False), SpecConfig(chain=True, max_depth=5, fallback=False)):
        r = speculative_generate_ids(target, draft, ids, cfg, spec)
        assert r.new_tokens[0] == want, spec
    assert r.spec.tokens_per_pass > 1.5  # the shared layers and the q3 copies agree with the target often
    target.close()


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_static_tree_cache_steps_are_exact(with_draft, arch):
    """The draft's static tree cache (runtime/tree_cache.py: padded steps, in-place row keeping; on CUDA
    they replay as graphs) drafts what the dynamic cache drafts, and greedy output stays exact."""
    d = with_draft(arch)
    target = qstream.load(d, draft=True, gpu_memory=_mixed_budget(d), **LOAD)
    draft = target.draft
    ids = _ids()
    cfg = SamplingConfig(max_new_tokens=24)
    want = generate_ids(target, ids, torch.ones_like(ids), cfg).new_tokens[0]
    for spec in (SpecConfig(budget=32, max_depth=6, beam=4, fallback=False), SpecConfig(chain=True, max_depth=5, fallback=False)):
        draft.static = False
        dynamic = speculative_generate_ids(target, draft, ids, cfg, spec)
        draft.static = True
        for pad in (False, True):  # padded to the graph widths (8, 16, ...) as on CUDA, or not
            draft.pad = pad
            static = speculative_generate_ids(target, draft, ids, cfg, spec)
            assert static.new_tokens[0] == want == dynamic.new_tokens[0], (spec, pad)
            assert static.spec.accepted == dynamic.spec.accepted  # the same trees: the same drafts
    target.close()


def test_tree_cache_rows_and_padding():
    from qstream.errors import DraftCacheFull
    from qstream.runtime.tree_cache import TreeCache, padded_inputs, width_for

    assert [width_for(n) for n in (1, 8, 9, 64, 65)] == [8, 8, 16, 64, None]
    c = TreeCache(2, 16)
    c.length = 3
    ids, pos, mask, slots = padded_inputs(torch.tensor([[5, 6]]), None, torch.ones(1, 5), c, 8, torch.float32)
    assert ids.tolist() == [[5, 6, 0, 0, 0, 0, 0, 0]] and pos[0, :2].tolist() == [3, 4]
    assert slots.tolist() == list(range(3, 11))
    allowed = mask[0, 0] == 0
    assert allowed[0].nonzero().flatten().tolist() == [0, 1, 2, 3]  # committed rows and itself
    assert allowed[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert allowed[2:].sum(1).tolist() == [1] * 6  # padding rows: slot 0 only
    with pytest.raises(DraftCacheFull, match=r"the draft's KV cache \(16 rows\) cannot take 16 more after 3$"):
        padded_inputs(torch.tensor([[5]]), None, None, c, 16, torch.float32)
    for layer in c.layers:
        layer.lazy_initialization(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        layer.keys[0, 0, :, 0] = torch.arange(16.0)
    c.length = 8
    c.keep_rows([0, 1, 2, 5, 7])
    assert c.get_seq_length() == 5 and c.layers[1].keys[0, 0, :5, 0].tolist() == [0, 1, 2, 5, 7]
    c.crop(-2)
    assert c.length == 3


def test_load_without_a_draft_says_how_to_make_one(tmp_path):
    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=2)
    d = shard_to(tmp_path, src, "fp32", compute_dtype="float32")
    with pytest.raises(qstream.QstreamError, match="--draft-scheme"):
        qstream.load(d, draft=True, **LOAD)


def test_cli_shard_with_draft_and_bench_speculate_in_dir(tmp_path, capsys):
    from qstream.cli import main

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=2)
    byte_tokenizer(src)
    out = tmp_path / "s"
    assert main(["-q", "shard", "--model", str(src), "--scheme", "fp32", "--output", str(out), "--draft-scheme", "q4",
                 "--device", "cpu"]) == 0
    assert read_manifest(out).draft_files() is not None
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "q4 x14" in capsys.readouterr().out
    assert main(["inspect", str(out), "--gpu-memory", "1GiB"]) == 0
    assert "plan with the draft" in capsys.readouterr().out
    assert main(["-q", "bench", str(out), "--device", "cpu", "--speculate", "--new-tokens", "12", "--tree-budget", "8",
                 "--no-spec-fallback"]) == 0
    text = capsys.readouterr().out
    assert "drafted tokens accepted" in text and "forwards of" in text and "in-directory" in text
    assert "greedy output" in text  # identical or not: bfloat16 on CPU may break near-ties (the fp32 tests check exactness)


def test_a_calibrated_recipe_fits_its_draft_to_the_activations(tmp_path):
    """With calibration, the draft's groups are fitted to the activation-weighted error (imatrix) on the
    inputs the target's layers saw (its codes differ from the calibration-free draft's), and the
    directory still decodes exactly (q2k draft, fp32 target: the calibration serves the draft alone)."""
    from safetensors.torch import load_file

    from qstream.quant import dequantize
    from qstream.store.tensors import stored_keys

    src = make_tiny(tmp_path / "m", "llama")
    byte_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while numbers 0123456789 count. " * 60)
    draft = {"scheme": "q2k", "group_size": 32}
    cal = shard_to(tmp_path / "cal", src, "fp32", compute_dtype="float32", draft=draft,
                   calibration={"text_file": str(text), "tokens": 1024, "method": "imatrix"})
    plain = shard_to(tmp_path / "plain", src, "fp32", compute_dtype="float32", draft=draft)
    ref = load_file(src / "model.safetensors")
    x = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj.weight"  # its inputs (SiLU-gated) are far from white
    errs = {}
    for label, d in (("cal", cal), ("plain", plain)):
        f = read_manifest(d).draft_files()[1]
        meta = f.tensors[name]
        raw = load_file(d / f.name)
        w = dequantize({s: raw[k] for s, k in stored_keys(meta).items()}, meta, dtype=torch.float32)
        errs[label] = w - ref[name]
    assert not torch.equal(errs["cal"], errs["plain"])  # the calibrated fit ran on the draft
    model = qstream.load(cal, draft=True, gpu_memory=_mixed_budget(cal), **LOAD)
    try:
        assert model.draft.drafted  # some layers run their calibrated q2k copy
        cfg = SamplingConfig(max_new_tokens=12)
        want = generate_ids(model, x[:, :8], torch.ones_like(x[:, :8]), cfg).new_tokens[0]
        got = speculative_generate_ids(model, model.draft, x[:, :8], cfg, SpecConfig(budget=8, fallback=False))
    finally:
        model.close()
    assert got.new_tokens[0] == want


def test_a_signround_recipe_tunes_its_draft_on_each_layer_output(tmp_path, caplog):
    """calibration.method signround with a draft: each layer's low-bit copy is fitted (imatrix) and its rounding
    tuned on that layer's output, next to the target's weights (the log says so for every layer), so its codes
    differ from the imatrix draft's; each draft file is written after its layer and a second run resumes it;
    the directory still decodes exactly."""
    import logging

    from safetensors.torch import load_file

    src = make_tiny(tmp_path / "m", "llama")
    byte_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while numbers 0123456789 count. " * 60)
    draft = {"scheme": "q2k", "group_size": 32}
    dirs = {}
    for method in ("imatrix", "signround"):
        with caplog.at_level(logging.INFO, logger="qstream.shard"):
            dirs[method] = shard_to(tmp_path / method, src, "fp32", compute_dtype="float32", draft=draft,
                                    calibration={"text_file": str(text), "tokens": 1024, "method": method})
    tuned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("signround draft layer")]
    assert len(tuned) == 4  # one per decoder layer
    files = {m: read_manifest(d).draft_files() for m, d in dirs.items()}
    differ = 0
    for a, b in zip(files["imatrix"], files["signround"]):
        ta, tb = load_file(dirs["imatrix"] / a.name), load_file(dirs["signround"] / b.name)
        assert ta.keys() == tb.keys() and a.tensors.keys() == b.tensors.keys()
        differ += sum(not torch.equal(ta[k], tb[k]) for k in ta)
    assert differ > 0  # the tuning kept new codes somewhere (it keeps them only where the layer's error drops)
    # the draft files written during the pass are journaled as they go: the same recipe again resumes them all
    from qstream.recipe import parse_recipe
    from qstream.shard import shard

    import qstream.shard as shard_module

    hashed = []  # a resumed file is verified by one full hash, not one per check
    real_hash = shard_module.sha256_file

    def counting_hash(path, **kw):
        hashed.append(Path(path).name)
        return real_hash(path, **kw)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qstream.shard"), \
            mock.patch.object(shard_module, "sha256_file", counting_hash):
        again = shard(parse_recipe({"model": str(src), "output": str(dirs["signround"]), "scheme": "fp32",
                                    "compute_dtype": "float32", "draft": draft,
                                    "calibration": {"text_file": str(text), "tokens": 1024, "method": "signround"}}),
                      progress=False)
    assert again.files_written == 0 and again.files_resumed == len(read_manifest(dirs["signround"]).files)
    assert sorted(hashed) == sorted(set(hashed)) and len(hashed) == again.files_resumed
    assert not [r for r in caplog.records if r.getMessage().startswith("signround draft layer")]  # kept, not re-tuned
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model = qstream.load(dirs["signround"], draft=True, gpu_memory=_mixed_budget(dirs["signround"]), **LOAD)
    try:
        assert model.draft.drafted
        cfg = SamplingConfig(max_new_tokens=12)
        want = generate_ids(model, x, torch.ones_like(x), cfg).new_tokens[0]
        got = speculative_generate_ids(model, model.draft, x, cfg, SpecConfig(budget=8, fallback=False))
    finally:
        model.close()
    assert got.new_tokens[0] == want
