"""Evaluation harnesses: perplexity paths agree with transformers, the bnb NF4 reference, bad
input, and lm-evaluation-harness (offline, on tiny models with a byte-level tokenizer)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import qstream
from conftest import byte_tokenizer, make_tiny, shard_to
from qstream.cli import main
from qstream.errors import EvalError
from qstream.eval.data import sliding_windows, tokenize_corpus
from qstream.eval.perplexity import perplexity, perplexity_reference
from qstream.eval.reference import bnb_nf4_reference, bnb_nf4_round_trip
from qstream.generate import load_tokenizer
from qstream.runtime.twin import dense_twin

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "eval" / "tasks"
SAMPLE = REPO / "eval" / "data" / "sample.txt"
TEXT = SAMPLE.read_text()[:5000]  # ~5000 byte tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama with peaked logits (large init, so a misaligned token changes the NLL) and a
    tokenizer, sharded fp32 and nf4 (lm_head fp32), both computing in float32."""
    tmp = tmp_path_factory.mktemp("eval")
    src = make_tiny(tmp / "m", "llama", vocab_size=259, initializer_range=0.3, num_hidden_layers=4,
                    bos_token_id=256, eos_token_id=257, pad_token_id=258)
    byte_tokenizer(src)
    return {
        "src": src,
        "fp32": shard_to(tmp, src, "fp32", compute_dtype="float32"),
        "nf4": shard_to(tmp, src, "nf4", compute_dtype="float32", overrides=[{"pattern": "lm_head", "scheme": "fp32"}]),
    }


def _disk_budget(out, *, max_batch, max_seq):
    """A budget that streams every layer from disk."""
    from qstream.store import read_header, read_manifest

    probe = qstream.load(out, device="cpu", max_batch=max_batch, max_seq=max_seq, progress=False)
    fixed = probe.plan.fixed_bytes
    probe.close()
    m = read_manifest(out)
    layer = max(read_header(m.path(e)).data_size for e in m.files if e.kind == "layer")
    return dict(gpu_memory=fixed + 2 * layer, host_memory=0)


def close(a, b, rel=1e-4):
    return abs(a - b) <= rel * abs(b)


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n,context,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 16, 7), (1000, 64, 63)])
def test_windows_score_each_token_once(n, context, stride):
    ws = sliding_windows(n, context, stride)
    scored = [w.begin + p for w in ws for p in range(w.score_from, w.length)]
    assert len(scored) == len(set(scored))  # never twice
    assert all(w.length <= context and w.score_from >= 1 for w in ws)
    assert ws[0].begin == 0 and ws[0].score_from == 1
    # the last window reaches the end, unless all it would hold is one token it cannot score
    assert ws[-1].end == n or (stride == context and ws[-1].end == n - 1)
    if stride < context:
        assert sorted(scored) == list(range(1, n))  # every token but the first
    else:
        assert len(scored) == n - math.ceil(n / context)  # every token but each window's first
    assert [w.begin for w in ws] == list(range(0, ws[-1].begin + 1, stride))


# ----------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("scheme", ["fp32", "nf4"])
@pytest.mark.parametrize("stride", [64, 24])
def test_ppl_plain_layer_major_and_transformers_agree(tiny, scheme, stride):
    out, context = tiny[scheme], 64
    ref = perplexity_reference(dense_twin(out), TEXT, context=context, stride=stride, tokenizer=load_tokenizer(out))
    m = qstream.load(out, device="cpu", max_batch=3, max_seq=context, progress=False)
    plain = perplexity(m, TEXT, context=context, stride=stride, batch_size=3, layer_major=False, progress=False)
    lm = perplexity(m, TEXT, context=context, stride=stride, batch_size=3, layer_major=True, progress=False)
    m.close()
    assert not plain["layer_major"] and lm["layer_major"]
    assert plain["tokens_scored"] == lm["tokens_scored"] == ref["tokens_scored"]
    n = ref["corpus_tokens"]
    assert ref["tokens_scored"] == (n - 1 if stride < context else n - math.ceil(n / context))
    assert close(plain["perplexity"], ref["perplexity"]) and close(lm["perplexity"], ref["perplexity"])
    assert 1 < ref["perplexity"] < 1e6


def test_ppl_settings_change_the_number(tiny):
    """The comparison above could not tell a misaligned window if the number were insensitive."""
    ids = tokenize_corpus(TEXT, load_tokenizer(tiny["fp32"]))
    twin = dense_twin(tiny["fp32"])
    a = perplexity_reference(twin, ids, context=64, stride=64)["perplexity"]
    b = perplexity_reference(twin, ids, context=64, stride=24)["perplexity"]
    c = perplexity_reference(twin, ids[1:], context=64, stride=64)["perplexity"]
    assert not close(a, b, 1e-3) and not close(a, c, 1e-3)


def test_ppl_layer_major_under_a_streaming_budget(tiny):
    out, context = tiny["fp32"], 64
    ref = perplexity_reference(dense_twin(out), TEXT, context=context, stride=32, tokenizer=load_tokenizer(out))
    m = qstream.load(out, device="cpu", max_batch=4, max_seq=context, progress=False,
                     **_disk_budget(out, max_batch=4, max_seq=context))
    assert len(m.plan.disk) == 4 and not m.plan.resident
    v0 = m.stats.layer_visits
    auto = perplexity(m, TEXT, context=context, stride=32, batch_size=4, progress=False)  # auto: layer-major
    assert auto["layer_major"] and auto["passes"] == 1
    assert m.stats.layer_visits - v0 == 4  # one pass over the weights for the whole corpus
    # a small hidden-state budget splits the corpus into several passes: same number
    small = perplexity(m, TEXT, context=context, stride=32, batch_size=4, progress=False,
                       hidden_budget=8 * 2 * context * 64 * 4)
    plain = perplexity(m, TEXT, context=context, stride=32, batch_size=4, layer_major=False, progress=False)
    m.close()
    assert small["passes"] > 1
    for r in (auto, small, plain):
        assert close(r["perplexity"], ref["perplexity"]), r
    # and from a directory, with the budget given to load()
    d = perplexity(out, TEXT, context=context, stride=32, batch_size=4, device="cpu", progress=False, limit=5,
                   **_disk_budget(out, max_batch=4, max_seq=context))
    assert d["layer_major"] and d["windows"] == 5


def test_bnb_nf4_reference_equals_qstream_nf4_from_the_same_weights(tiny):
    """qstream's nf4 shards are bitsandbytes NF4 of the same fp32 weights (blocks of 64), so
    rounding the fp32 dense twin through bitsandbytes must give the nf4 shards' perplexity."""
    ids = tokenize_corpus(TEXT, load_tokenizer(tiny["fp32"]))
    ref = bnb_nf4_reference(tiny["fp32"], ids, context=64, device="cpu", progress=False)
    nf4 = perplexity(tiny["nf4"], ids, context=64, device="cpu", progress=False)
    fp32 = perplexity(tiny["fp32"], ids, context=64, device="cpu", progress=False)
    assert ref["quantized_linears"] == 4 * 7 and ref["blocksize"] == 64
    assert close(ref["perplexity"], nf4["perplexity"]) and close(ref["baseline_perplexity"], fp32["perplexity"])
    assert not close(ref["perplexity"], ref["baseline_perplexity"], 1e-3)  # it did round something
    with pytest.raises(EvalError, match="needs an uncompressed shard directory.*holds nf4 weights"):
        bnb_nf4_reference(tiny["nf4"], ids, context=64, device="cpu", progress=False)


def test_bnb_round_trip_matches_qstream_nf4_on_awkward_shapes():
    from qstream.quant import QuantSpec, dequantize, quantize

    w = torch.randn(96, 576) * 0.05  # last dim not a multiple of 128: bitsandbytes' 2-D CPU bug
    got = bnb_nf4_round_trip(w)
    packed, meta = quantize(w, QuantSpec("nf4", 64))
    torch.testing.assert_close(got, dequantize(packed, meta, dtype=torch.float32), rtol=0, atol=0)
    err = ((got - w).norm() / w.norm()).item()
    assert 0.03 < err < 0.15


# ----------------------------------------------------------------------------- CLI and bad input
def _cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qstream: error: "), err
    return err[0]


def test_cli_ppl_writes_result_json(tiny, tmp_path, capsys):
    out = tmp_path / "r" / "ppl.json"
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["-q", "eval", "ppl", str(tiny["nf4"]), "--device", "cpu", "--text-file", str(tmp_path / "t.txt"),
                 "--context", "64", "--stride", "32", "--batch-size", "2", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    m = qstream.load(tiny["nf4"], device="cpu", max_seq=64, max_batch=2, progress=False)
    want = perplexity(m, TEXT, context=64, stride=32, progress=False)["perplexity"]
    m.close()
    assert close(d["ppl"]["perplexity"], want)
    assert d["kind"] == "ppl" and d["variant"] == "nf4" and d["model"] == str(tiny["src"])
    assert d["shards"] == str(tiny["nf4"]) and d["recipe"]["scheme"] == "nf4"
    assert d["shard_bytes"] == sum(p.stat().st_size for p in tiny["nf4"].glob("*.safetensors"))
    assert 4 < d["bits_per_weight_layers"] < 6  # nf4 codes + absmax + fp32 norms of a tiny model
    assert {"qstream", "torch", "transformers"} <= set(d["versions"]) and "cpus" in d["machine"]
    assert "eval ppl" in d["command"] and d["data"]["sha256"] and d["ppl"]["stride"] == 32
    # the bnb reference from the CLI, on the uncompressed directory
    ref = tmp_path / "ref.json"
    assert main(["-q", "eval", "ppl", str(tiny["fp32"]), "--device", "cpu", "--text-file", str(tmp_path / "t.txt"),
                 "--context", "64", "--stride", "32", "--bnb-nf4-reference", "--json", str(ref)]) == 0
    r = json.loads(ref.read_text())
    assert r["variant"] == "bnb-nf4-reference" and close(r["ppl"]["perplexity"], want)


def test_cli_ppl_local_dataset_files(tiny, tmp_path, capsys):
    rows = [{"text": t, "other": 1} for t in TEXT[:3000].split("\n\n")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "d.json"
    assert main(["-q", "eval", "ppl", str(tiny["fp32"]), "--device", "cpu", "--dataset", str(tmp_path / "d.jsonl"),
                 "--context", "64", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    want = perplexity(tiny["fp32"], [r["text"] for r in rows], context=64, device="cpu", progress=False)
    assert close(d["ppl"]["perplexity"], want["perplexity"]) and d["data"]["rows"] == len(rows)
    msg = _cli_error(capsys, ["eval", "ppl", str(tiny["fp32"]), "--dataset", str(tmp_path / "d.jsonl"),
                              "--context", "64", "--text-column", "body", "--json", str(tmp_path / "x.json")])
    assert "no column 'body'" in msg and "text, other" in msg and "--text-column" in msg
    assert not (tmp_path / "x.json").exists()


@pytest.fixture
def offline(monkeypatch):
    """Hub access fails at once (as with no network, minus the retries)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_bad_input_is_one_line_exit_2_and_no_json(tiny, tmp_path, capsys, offline):
    d = str(tiny["fp32"])
    j = tmp_path / "out.json"
    (tmp_path / "empty.txt").write_text(" \n\n ")
    (tmp_path / "ok.txt").write_text(TEXT)
    ok = ["--text-file", str(tmp_path / "ok.txt")]
    cases = [
        (["--text-file", str(tmp_path / "missing.txt")], ["text file not found", "missing.txt"]),
        (["--text-file", str(tmp_path / "empty.txt")], ["empty.txt", "holds no text"]),
        ([*ok, "--context", "512"], ["--context 512", "max_position_embeddings (256)", "--context 256"]),
        ([*ok, "--context", "64", "--stride", "65"], ["--stride 65", "between 1 and --context (64)"]),
        ([*ok, "--context", "64", "--stride", "0"], ["--stride 0"]),
        (["--dataset", str(tmp_path / "nope.jsonl")], ["dataset file not found", "nope.jsonl"]),
        (["--dataset", "wikitext:wikitext-2-raw-v1:test"], ["cannot load dataset 'wikitext:wikitext-2-raw-v1:test'",
                                                            "need internet", "--text-file"]),
        (["--dataset", "a:b:c:d"], ["NAME[:CONFIG[:SPLIT]]"]),
        ([*ok, "--json", str(tmp_path)], ["is a directory"]),
    ]
    for extra, needles in cases:
        argv = ["eval", "ppl", d, "--device", "cpu", "--context", "64", "--json", str(j), *extra]  # later options win
        msg = _cli_error(capsys, argv)
        for n in needles:
            assert n in msg, (extra, msg)
        assert not j.exists(), extra
    msg = _cli_error(capsys, ["eval", "ppl", str(tiny["nf4"]), *ok, "--context", "64", "--bnb-nf4-reference", "--json", str(j)])
    assert "uncompressed shard directory" in msg and not j.exists()
    msg = _cli_error(capsys, ["eval", "ppl", str(tmp_path / "no-shards"), *ok, "--json", str(j)])
    assert "shard directory not found" in msg
    msg = _cli_error(capsys, ["eval", "lm-eval", d, "--tasks", "no_such_task_xyz", "--include-path", str(TASKS),
                              "--json", str(j)])
    assert "unknown lm-eval task(s) no_such_task_xyz" in msg and "--include-path" in msg and not j.exists()
    msg = _cli_error(capsys, ["eval", "lm-eval", d, "--tasks", "qstream_tiny_qa", "--include-path", str(tmp_path / "x")])
    assert "--include-path" in msg and "no such directory" in msg
    with pytest.raises(EvalError, match="at least 2"):
        perplexity(tiny["fp32"], [1], context=64, device="cpu", progress=False)


# ----------------------------------------------------------------------------- lm-evaluation-harness
def test_lm_eval_end_to_end_offline(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the task's data file must not depend on the current directory
    out = tmp_path / "lm.json"
    assert main(["-q", "eval", "lm-eval", str(tiny["nf4"]), "--device", "cpu", "--tasks", "qstream_tiny_qa",
                 "--include-path", str(TASKS), "--batch-size", "4", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    res = d["lm_eval"]["results"]["qstream_tiny_qa"]
    assert 0 <= res["acc,none"] <= 1 and 0 <= res["acc_norm,none"] <= 1
    assert d["lm_eval"]["n-samples"]["qstream_tiny_qa"]["effective"] == 20
    assert d["kind"] == "lm-eval" and d["variant"] == "nf4" and d["shards"] == str(tiny["nf4"])
    assert "qstream_tiny_qa: acc" in capsys.readouterr().out


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.inference_mode()
def _manual_loglik(twin, tok, ctx: str, cont: str) -> tuple[float, bool]:
    c = tok.encode(ctx, add_special_tokens=False)
    whole = tok.encode(ctx + cont, add_special_tokens=False)
    n = len(whole) - len(c)
    logp = torch.log_softmax(twin(torch.tensor([whole])).logits[0].float(), -1)
    tgt = torch.tensor(whole[-n:])
    rows = logp[len(whole) - n - 1:len(whole) - 1]
    return rows.gather(-1, tgt[:, None]).sum().item(), bool((rows.argmax(-1) == tgt).all())


@pytest.mark.parametrize("budget", ["resident", "disk"])
def test_loglikelihood_matches_the_dense_twin(tiny, budget):
    from qstream.eval.harness import register_lm_eval

    out = tiny["nf4"]
    tok = load_tokenizer(out)
    twin = dense_twin(out)
    kw = {} if budget == "resident" else _disk_budget(out, max_batch=3, max_seq=129)
    m = qstream.load(out, device="cpu", max_batch=3, max_seq=129, progress=False, **kw)
    lm = register_lm_eval()(model=m, tokenizer=tok, batch_size=3, max_length=128)
    assert lm.layer_major == (budget == "disk")
    pairs = [("Question: What is two plus two?\nAnswer:", " four"), ("The sky is", " blue"), ("A", "bc"),
             ("Computers add numbers", " with gates and carries."), ("x" * 40, " y" * 10)]
    got = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want, want_greedy = _manual_loglik(twin, tok, ctx, cont)
        assert abs(lp - want) <= 1e-4 * abs(want) + 1e-4, (ctx, lp, want)
        assert greedy == want_greedy
    # greedy continuation: its own argmax tokens are "greedy"
    ids = tok.encode("The sky is", add_special_tokens=False)
    nxt = twin(torch.tensor([ids])).logits[0, -1].argmax().item()
    (_, g), = lm.loglikelihood(_requests("loglikelihood", [("The sky is", tok.decode([nxt]))]), disable_tqdm=True)
    assert g
    # rolling: the whole text after a prefix token, in one window (text shorter than max_length)
    text = "Punched cards taught an early lesson about data."
    (roll,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    full = [lm.prefix_token_id] + tok.encode(text, add_special_tokens=False)
    with torch.inference_mode():
        logp = torch.log_softmax(twin(torch.tensor([full])).logits[0].float(), -1)
    want = logp[:-1].gather(-1, torch.tensor(full[1:])[:, None]).sum().item()
    assert abs(roll - want) <= 1e-4 * abs(want)
    # longer than max_length: several windows, every token scored once
    long = TEXT[:400]
    (roll_long,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(long,)]), disable_tqdm=True)
    assert roll_long < 0 and math.isfinite(roll_long)
    m.close()


def test_generate_until_stops_and_matches_greedy(tiny):
    from qstream.eval.harness import register_lm_eval

    out = tiny["fp32"]
    tok = load_tokenizer(out)
    twin = dense_twin(out)
    m = qstream.load(out, device="cpu", max_batch=2, max_seq=129, progress=False)
    lm = register_lm_eval()(model=m, tokenizer=tok, batch_size=2, max_length=128)
    prompts = ["Counting before machines", "The abacus is"]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    greedy = []
    for x in ids:
        g = twin.generate(torch.tensor([x]), max_new_tokens=12, do_sample=False, pad_token_id=258, eos_token_id=257)
        greedy.append(tok.decode(g[0, len(x):], skip_special_tokens=True))
    stop = greedy[0][3:5]  # a string the first continuation contains
    got = lm.generate_until(_requests("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 12}),
                                                         (prompts[1], {"until": ["\x00never"], "max_gen_toks": 12})]),
                            disable_tqdm=True)
    assert got[0] == greedy[0][:greedy[0].index(stop)]
    assert got[1] == greedy[1]
    m.close()


def test_python_m_entry_runs_lm_eval_cli_with_qstream_model(tiny, tmp_path, monkeypatch):
    from qstream.eval.harness import lm_eval_main

    monkeypatch.setattr("sys.argv", ["x"])
    lm_eval_main(["--model", "qstream", "--model_args", f"path={tiny['fp32']},device=cpu,batch_size=4",
                  "--tasks", "qstream_tiny_qa", "--include_path", str(TASKS), "--limit", "3",
                  "--output_path", str(tmp_path / "o")])
    files = list((tmp_path / "o").rglob("results_*.json"))
    assert len(files) == 1
    r = json.loads(files[0].read_text())["results"]["qstream_tiny_qa"]
    assert 0 <= r["acc,none"] <= 1


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_model_ppl_paths_agree_with_transformers(smollm2_shards):
    out = smollm2_shards["bf16"]
    tok = load_tokenizer(out)
    ids = tokenize_corpus(SAMPLE.read_text(), tok)
    kw = dict(context=256, stride=128, limit=6)
    ref = perplexity_reference(dense_twin(out), ids, **kw)
    m = qstream.load(out, device="cpu", max_batch=3, max_seq=256, progress=False,
                     **_disk_budget(out, max_batch=3, max_seq=256))
    plain = perplexity(m, ids, batch_size=3, layer_major=False, progress=False, **kw)
    lm = perplexity(m, ids, batch_size=3, layer_major=True, progress=False, **kw)
    m.close()
    assert close(plain["perplexity"], lm["perplexity"], 1e-4)
    assert close(lm["perplexity"], ref["perplexity"], 2e-3)  # bf16: transformers' nn.Linear vs QLinear
    assert 5 < ref["perplexity"] < 100  # a real model reads English
