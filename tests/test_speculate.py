"""Speculative decoding: greedy output identical to plain decoding, sampling that keeps the
target's distribution, the tree mask honoured by each architecture, and the fallback."""
from __future__ import annotations

import math

import pytest
import torch

import qstream
from conftest import byte_tokenizer, make_tiny, shard_to
from qstream.errors import QstreamError
from qstream.generate import SamplingConfig, generate, generate_ids
from qstream.speculate import (SpecConfig, Tree, picker, speculative_generate, speculative_generate_ids, verify,
                               walk)

ARCHS = ["llama", "qwen2", "mistral", "gemma"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per architecture: (fp32 target shards, nf4 draft of the same weights, fp32 shards of an
    unrelated random model: a draft that is rarely right)."""
    out = {}

    def get(arch):
        if arch not in out:
            tmp = tmp_path_factory.mktemp(arch)
            src = make_tiny(tmp / "m", arch)
            other = make_tiny(tmp / "o", arch, seed=1)
            out[arch] = (shard_to(tmp, src, "fp32", compute_dtype="float32"),
                         shard_to(tmp, src, "nf4", compute_dtype="float32"),
                         shard_to(tmp / "other-shards", other, "fp32", compute_dtype="float32"))
        return out[arch]
    return get


def _ids(n=12, seed=3, vocab=256):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _plain(model, ids, cfg, eos=frozenset()):
    return generate_ids(model, ids, torch.ones_like(ids), cfg, eos=eos).new_tokens[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_token_identical_to_plain_greedy(pairs, arch):
    t_dir, d_dir, _ = pairs(arch)
    target, draft = qstream.load(t_dir, device="cpu"), qstream.load(d_dir, device="cpu")
    cfg = SamplingConfig(max_new_tokens=24)
    ids = _ids()
    want = _plain(target, ids, cfg)
    for spec in (SpecConfig(budget=32, max_depth=6, fallback=False), SpecConfig(chain=True, max_depth=6, fallback=False),
                 SpecConfig(budget=16, max_depth=4, beam=2, branch=3, fallback=False)):
        r = speculative_generate_ids(target, draft, ids, cfg, spec)
        assert r.new_tokens[0] == want, spec
        assert r.spec.mode == ("chain" if spec.chain else "tree")
        assert sum(r.spec.accepted) + r.spec.plain_steps + 1 >= len(want)
    # the nf4 copy of the same weights agrees with the target often: more than one token a pass
    assert r.spec.tokens_per_pass > 1.5
    target.close()
    draft.close()


def test_greedy_with_penalty_and_eos_matches_plain(pairs):
    t_dir, d_dir, _ = pairs("llama")
    target, draft = qstream.load(t_dir, device="cpu"), qstream.load(d_dir, device="cpu")
    ids = _ids()
    cfg = SamplingConfig(max_new_tokens=30, repetition_penalty=1.3)
    assert speculative_generate_ids(target, draft, ids, cfg, SpecConfig(budget=24, fallback=False)).new_tokens[0] == \
        _plain(target, ids, cfg)
    full = _plain(target, ids, SamplingConfig(max_new_tokens=30))
    eos = {full[7]}  # a token the greedy output really produces: both stop at its first occurrence
    cfg = SamplingConfig(max_new_tokens=30)
    got = speculative_generate_ids(target, draft, ids, cfg, SpecConfig(budget=24, fallback=False), eos=eos).new_tokens[0]
    assert got == _plain(target, ids, cfg, eos) and len(got) <= 7


def test_a_bad_draft_is_still_exact_and_the_fallback_switches_to_plain(pairs):
    t_dir, _, o_dir = pairs("llama")
    target, bad = qstream.load(t_dir, device="cpu"), qstream.load(o_dir, device="cpu")
    ids = _ids()
    cfg = SamplingConfig(max_new_tokens=24)
    want = _plain(target, ids, cfg)
    r = speculative_generate_ids(target, bad, ids, cfg, SpecConfig(budget=16, fallback=False))
    assert r.new_tokens[0] == want and r.spec.mode == "tree" and r.spec.fell_back_after is None
    # a plain step that costs nothing: no pass can ever pay, plain decoding takes over after the first one
    r = speculative_generate_ids(target, bad, ids, cfg, SpecConfig(budget=16, plain_step_s=1e-9, warmup_rounds=3))
    assert r.new_tokens[0] == want
    assert r.spec.mode == "plain" and r.spec.fell_back_after == 1 and r.spec.plain_steps > 0 and "fell back" in r.spec.note
    # a plain step dearer than any pass: never falls back
    r = speculative_generate_ids(target, bad, ids, cfg, SpecConfig(budget=16, plain_step_s=1e3, warmup_rounds=1))
    assert r.new_tokens[0] == want and r.spec.fell_back_after is None and r.spec.plain_steps == 0
    # measured: the first decode step is a plain one, timed
    r = speculative_generate_ids(target, bad, ids, cfg, SpecConfig(budget=16))
    assert r.new_tokens[0] == want and r.spec.plain_steps >= 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_forward_equals_a_forward_per_path(pairs, arch, attn):
    """The premise of tree verification: one forward over a tree (4D mask, position = prefix
    + depth) gives every node the logits a plain forward over its own path gives."""
    t_dir, _, _ = pairs(arch)
    m = qstream.load(t_dir, device="cpu")
    m.hf.set_attn_implementation(attn)
    prefix = _ids(9)[0].tolist()
    tree = Tree.rooted(prefix[-1])
    a = tree.add(0, 11, -1.0)
    b = tree.add(0, 12, -1.0)
    c = tree.add(a, 13, -1.0)
    d = tree.add(b, 14, -1.0)
    e = tree.add(a, 15, -1.0)
    f = tree.add(c, 16, -1.0)
    nodes = [a, b, c, d, e, f]
    cache = m.new_cache()
    m(torch.tensor([prefix[:-1]]), past_key_values=cache)
    got = verify(m, cache, tree, nodes, len(prefix) - 1, chain=False)
    assert cache.get_seq_length() == len(prefix) + len(nodes)
    for j, node in enumerate([0] + nodes):
        path = prefix + [tree.tokens[i] for i in tree.path[node][1:]]
        want = m(torch.tensor([path]))[0, -1]
        torch.testing.assert_close(got[j], want, rtol=1e-4, atol=1e-4, msg=f"{arch}/{attn} node {node}")
    m.close()


def test_text_api_matches_generate(tmp_path):
    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=3)
    tok = byte_tokenizer(src)
    t_dir = shard_to(tmp_path, src, "fp32", compute_dtype="float32")
    d_dir = shard_to(tmp_path, src, "nf4", compute_dtype="float32")
    target, draft = qstream.load(t_dir, device="cpu", max_batch=2), qstream.load(d_dir, device="cpu")
    cfg = SamplingConfig(max_new_tokens=16, chat=False)
    prompts = ["hello there", "a b c d e"]
    streamed = []
    r = speculative_generate(target, draft, tok, prompts, cfg, SpecConfig(budget=16, fallback=False),
                             on_text=lambda i, d: streamed.append((i, d)))
    for i, p in enumerate(prompts):
        plain = []
        assert r.texts[i] == generate(target, tok, [p], cfg, on_text=lambda j, d: plain.append(d)).texts[0]
        assert "".join(d for j, d in streamed if j == i) == "".join(plain)  # streamed as plain decoding streams it
    assert r.decode_steps > 0 and r.spec.passes > 0 and r.tokens_per_s > 0


def test_bad_configs_are_refused():
    for kw in ({"budget": 0}, {"budget": 5000}, {"max_depth": 0}, {"beam": 0}, {"ema": 0}, {"warmup_rounds": 0}):
        with pytest.raises(QstreamError):
            SpecConfig(**kw)
    assert SpecConfig(budget=64, max_depth=8, chain=True).shape(False) == (8, 8, 1, 1)


# -- sampling keeps the target's distribution ------------------------------------------
Z_1E4 = 3.719  # standard normal quantile of 1 - 1e-4: a false alarm once in 10,000 runs


def chi2_limit(df: int) -> float:
    """Chi-square quantile at 1 - 1e-4 (Wilson-Hilferty; within a few percent for df >= 3)."""
    return df * (1 - 2 / (9 * df) + Z_1E4 * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (the rest pooled into one)."""
    stat, df, pool_o, pool_e = 0.0, -1, 0, 0.0
    for k, p in probs.items():
        e = n * p
        if e >= 5:
            stat += (counts.get(k, 0) - e) ** 2 / e
            df += 1
        else:
            pool_o, pool_e = pool_o + counts.get(k, 0), pool_e + e
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        df += 1
    return stat, df


def test_the_acceptance_walk_samples_the_target_distribution():
    """The rule alone, on a fixed tree over 5 tokens: the first two emitted tokens follow
    p(t1) p(t2 | t1) of the target, whatever the tree holds."""
    g = torch.Generator().manual_seed(0)
    V = 5
    tree = Tree.rooted(0)
    a, b = tree.add(0, 1, -0.1), tree.add(0, 3, -0.2)  # root's children: tokens 1 and 3
    c = tree.add(a, 2, -0.3)
    nodes = [a, b, c]
    rows = torch.randn(4, V, generator=g) * 1.5  # target logits at root, a, b, c
    p = torch.softmax(rows, -1)
    # t2 given a t1 outside the tree comes from the next round: the target at that prefix,
    # modelled by one more fixed row
    leaf = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    cond = {1: p[1], 3: p[2]}
    exact = {(i, j): float(p[0, i] * cond.get(i, leaf)[j]) for i in range(V) for j in range(V)}
    cfg = SamplingConfig(temperature=1.0)
    gen = torch.Generator().manual_seed(1)
    n, counts = 20000, {}
    for _ in range(n):
        toks, path = walk(tree, nodes, picker(rows, cfg, gen, None, V), stop=lambda t: False, room=2)
        if len(toks) == 1:
            toks.append(int(torch.multinomial(leaf, 1, generator=gen)))
        counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
    stat, df = chi2(counts, exact, n)
    assert stat < chi2_limit(df), (stat, df)
    # the test has power: the same draws are far from the draft's own (uniform) proposal
    stat_u, df_u = chi2(counts, {k: 1 / V ** 2 for k in exact}, n)
    assert stat_u > chi2_limit(df_u)


@pytest.mark.slow
def test_speculative_sampling_draws_from_the_target(tmp_path):
    """End to end on an 8-token vocabulary: the first two sampled tokens follow the target's
    joint distribution, not the (different) draft's."""
    src = make_tiny(tmp_path / "t", "llama", vocab_size=8, num_hidden_layers=2)
    oth = make_tiny(tmp_path / "d", "llama", vocab_size=8, num_hidden_layers=2, seed=5)
    target = qstream.load(shard_to(tmp_path, src, "fp32", compute_dtype="float32"), device="cpu")
    draft = qstream.load(shard_to(tmp_path / "draft-shards", oth, "fp32", compute_dtype="float32"), device="cpu")
    prompt = [1, 2, 3, 4]

    def joint(m):
        with torch.no_grad():
            p1 = torch.softmax(m(torch.tensor([prompt]))[0, -1].float(), -1)
            p2 = torch.softmax(m(torch.tensor([prompt + [i] for i in range(8)]))[:, -1].float(), -1)
        return {(i, j): float(p1[i] * p2[i, j]) for i in range(8) for j in range(8)}

    exact, other = joint(target), joint(draft)
    spec = SpecConfig(budget=6, max_depth=2, beam=3, branch=3, fallback=False)
    n, counts = 1200, {}
    ids = torch.tensor([prompt])
    for s in range(n):
        r = speculative_generate_ids(target, draft, ids, SamplingConfig(max_new_tokens=2, temperature=1.0, seed=s), spec)
        k = tuple(r.new_tokens[0])
        counts[k] = counts.get(k, 0) + 1
    stat, df = chi2(counts, exact, n)
    assert stat < chi2_limit(df), (stat, df)
    stat_o, df_o = chi2(counts, other, n)
    assert stat_o > chi2_limit(df_o), (stat_o, df_o)


@pytest.mark.slow
def test_smollm2_nf4_draft_is_exact_and_accepts_several_tokens(tmp_path):
    """The real model. Rule for exactness: the target is SmolLM2's bf16 weights computed in
    float32 (bf16 arithmetic makes a tree forward and a one-token forward round differently,
    so near-ties could flip); the draft is its nf4 shards. Greedy output must equal plain
    greedy decoding on the same shards token for token."""
    from qstream.generate import load_tokenizer

    t_dir = shard_to(tmp_path, "smollm2-135m", "bf16", compute_dtype="float32")
    d_dir = shard_to(tmp_path, "smollm2-135m", "nf4", compute_dtype="float32")
    tok = load_tokenizer(t_dir)
    target, draft = qstream.load(t_dir, device="cpu"), qstream.load(d_dir, device="cpu")
    cfg = SamplingConfig(max_new_tokens=32)
    prompts = ["What is the capital of France?", "Write a haiku about the sea."]
    r = speculative_generate(target, draft, tok, prompts, cfg, SpecConfig(budget=32, max_depth=8, fallback=False))
    for i, p in enumerate(prompts):
        assert r.new_tokens[i] == generate(target, tok, [p], cfg).new_tokens[0], p
    assert r.spec.tokens_per_pass > 2.0, r.spec.as_dict()


def test_cli_glue_speculate_and_draft(tmp_path, monkeypatch):
    import argparse

    from qstream.cli.common import add_runtime_args
    from qstream.cli.spec import add_spec_args, draft_dir, spec_config, spec_summary, speculative_run
    from qstream.generate import load_tokenizer

    monkeypatch.setenv("QSTREAM_CACHE", str(tmp_path / "cache"))
    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=2)
    byte_tokenizer(src)
    t_dir = shard_to(tmp_path, src, "fp32", compute_dtype="float32")
    p = argparse.ArgumentParser()
    add_runtime_args(p)
    add_spec_args(p)
    p.add_argument("-q", "--quiet", action="store_true")
    assert spec_config(p.parse_args([str(t_dir)])) is None
    with pytest.raises(QstreamError, match="not both"):
        spec_config(p.parse_args([str(t_dir), "--speculate", "--draft", str(t_dir)]))
    a = p.parse_args([str(t_dir), "--device", "cpu", "--speculate", "--tree-budget", "8", "-q"])
    spec = spec_config(a)
    assert (spec.budget, spec.fallback) == (8, True)
    d = draft_dir(a)  # the target's source sharded nf4 into the cache
    assert d != t_dir and str(d).startswith(str(tmp_path / "cache")) and "nf4" in d.name
    tok = load_tokenizer(t_dir)
    cfg = SamplingConfig(max_new_tokens=10, chat=False)
    r, model = speculative_run(a, tok, ["hello"], cfg, spec, need=32)
    plain = qstream.load(t_dir, device="cpu")
    assert r.new_tokens[0] == generate(plain, tok, ["hello"], cfg).new_tokens[0]
    assert "tokens/pass" in spec_summary(r)
    a = p.parse_args([str(t_dir), "--device", "cpu", "--draft", str(d), "--chain", "--tree-depth", "3", "-q"])
    assert draft_dir(a) == d and spec_config(a).shape(False) == (3, 3, 1, 1)


def test_a_sliding_window_cache_decodes_plainly_and_says_so(tmp_path):
    src = make_tiny(tmp_path / "m", "mistral", num_hidden_layers=2, sliding_window=8)
    t_dir = shard_to(tmp_path, src, "fp32", compute_dtype="float32")
    target = qstream.load(t_dir, device="cpu")
    ids = _ids()
    cfg = SamplingConfig(max_new_tokens=12)
    r = speculative_generate_ids(target, target, ids, cfg, SpecConfig(budget=8))
    assert r.spec.mode == "plain" and "cannot be re-indexed" in r.spec.note and r.spec.passes == 0
    assert r.new_tokens[0] == _plain(target, ids, cfg)


def test_keep_rows_moves_the_accepted_path_into_place():
    from transformers import DynamicCache

    from qstream.speculate import keep_rows

    cache = DynamicCache()
    k = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).view(2, 3, 10, 4)
    cache.update(k.clone(), -k.clone(), 0)
    keep = [0, 1, 2, 3, 5, 8]
    keep_rows(cache, keep)
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(cache.layers[0].keys, k[:, :, keep])
    torch.testing.assert_close(cache.layers[0].values, -k[:, :, keep])
    keep_rows(cache, [0, 1, 2])  # a prefix: cropped
    torch.testing.assert_close(cache.layers[0].keys, k[:, :, :3])
