"""Command-line habits: runs without a recipe (SOURCE sharded into the cache on first use),
prompts from stdin, short flags, chat, sampling options, the KV reservation from the request,
perplexity with its standard error."""
from __future__ import annotations

import io
import sys

import pytest
import torch

from conftest import byte_tokenizer, make_tiny, shard_to
from qstream.cli import main
from qstream.generate import SamplingConfig, penalize, sample


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A tiny llama with a byte-level tokenizer (no chat template), as a Hugging Face directory."""
    src = make_tiny(tmp_path_factory.mktemp("cli") / "m", "llama", vocab_size=259, bos_token_id=256, eos_token_id=300,
                    pad_token_id=258, initializer_range=0.3)
    byte_tokenizer(src)
    return src


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QSTREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _run(capsys, argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_model_source_is_sharded_into_the_cache_once_and_reused(tiny_src, cache, capsys):
    argv = ["generate", str(tiny_src), "-p", "abc", "-n", "5", "--device", "cpu", "--scheme", "int8", "--block-size", "64"]
    code, out, err = _run(capsys, argv)
    assert code == 0 and "sharding" in err and str(cache) in err
    made = [p for p in (cache / "shards").iterdir()]
    assert len(made) == 1 and (made[0] / "manifest.json").is_file() and "int8" in made[0].name
    code2, out2, err2 = _run(capsys, argv)
    assert code2 == 0 and "sharding" not in err2 and out2 == out  # reused, same greedy text
    # another scheme is another cache entry, never the wrong shards
    code3, _, err3 = _run(capsys, [*argv[:-4], "--scheme", "fp32"])
    assert code3 == 0 and "sharding" in err3 and len(list((cache / "shards").iterdir())) == 2


def test_shard_without_a_recipe(tiny_src, tmp_path, capsys):
    out = tmp_path / "s"
    code, text, _ = _run(capsys, ["shard", "--model", str(tiny_src), "--scheme", "nf4", "--output", str(out), "-q"])
    assert code == 0 and (out / "manifest.json").is_file() and "ratio vs 16-bit" in text
    code, _, err = _run(capsys, ["shard"])
    assert code == 2 and err.startswith("qstream: error: give a recipe file, or --model")
    code, _, err = _run(capsys, ["shard", "--model", str(tiny_src), "--scheme", "nf9", "--output", str(tmp_path / "t")])
    assert code == 2 and "unknown scheme 'nf9'" in err and not (tmp_path / "t").exists()


def test_prompt_from_stdin_equals_prompt_flag(tiny_src, tmp_path, capsys, monkeypatch):
    d = shard_to(tmp_path, tiny_src, "fp32", compute_dtype="float32")
    code, out_flag, _ = _run(capsys, ["generate", str(d), "-p", "hello", "-n", "6", "--device", "cpu"])
    code2, out_stdin, _ = _run(capsys, ["generate", str(d), "-n", "6", "--device", "cpu"], stdin="hello\n",
                               monkeypatch=monkeypatch)
    assert code == code2 == 0 and out_flag == out_stdin and out_flag.strip()
    code, _, err = _run(capsys, ["generate", str(d), "--device", "cpu"], stdin="", monkeypatch=monkeypatch)
    assert code == 2 and "pipe one to standard input" in err


def test_kv_room_comes_from_the_request_and_too_long_prompts_fail(tiny_src, tmp_path, capsys):
    d = shard_to(tmp_path, tiny_src, "fp32", compute_dtype="float32")  # max_position_embeddings 256
    code, _, err = _run(capsys, ["generate", str(d), "-p", "x" * 250, "-n", "20", "--device", "cpu"])
    assert code == 2 and "exceeds the model's context of 256 tokens" in err
    code, _, err = _run(capsys, ["generate", str(d), "-p", "x", "--max-context", "999", "--device", "cpu"])
    assert code == 2 and "--max-context 999 exceeds" in err
    code, _, err = _run(capsys, ["generate", str(d), "-p", "x" * 200, "-n", "20", "--device", "cpu"])
    assert code == 0


def test_chat_keeps_the_conversation_and_exits(tiny_src, tmp_path, capsys, monkeypatch):
    d = shard_to(tmp_path, tiny_src, "fp32", compute_dtype="float32")
    code, out, _ = _run(capsys, ["chat", str(d), "-n", "4", "--device", "cpu"], stdin="hi\n\nthere\n/exit\nnever\n",
                        monkeypatch=monkeypatch)
    assert code == 0 and len(out.strip().splitlines()) == 2  # two answers, the line after /exit is not read


def test_top_k_one_is_greedy_and_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    cfg = SamplingConfig(temperature=1.0, top_k=1, seed=0)
    for s in range(20):
        assert sample(logits, cfg, torch.Generator().manual_seed(s)).item() == 1
    seen = torch.tensor([[False, True, False, True]])
    torch.testing.assert_close(penalize(logits, seen, 2.0), torch.tensor([[0.1, 1.5, 2.9, -2.0]]))
    greedy = SamplingConfig(repetition_penalty=2.0)
    assert sample(logits, greedy, None, seen).item() == 2  # the seen favourite is pushed below the next one
    with pytest.raises(Exception, match="top_k"):
        SamplingConfig(top_k=-1)


def test_version_and_help_teach(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("qstream 0.")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "SOURCE" in text and "--top-k" in text


def test_perplexity_prints_its_standard_error_and_warns_on_short_texts(tiny_src, tmp_path, capsys):
    d = shard_to(tmp_path, tiny_src, "fp32", compute_dtype="float32")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    code, out, err = _run(capsys, ["eval", "ppl", str(d), "--text-file", str(text), "--context", "64", "--device", "cpu", "-q"])
    assert code == 0 and " +/- " in out and "noisy" in err
    ppl, se = (float(x) for x in out.split("perplexity ")[1].split(" over")[0].split(" +/- "))
    assert 0 < se < ppl
