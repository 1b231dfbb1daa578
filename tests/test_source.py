"""Model sources: GGUF files of several architectures read through transformers' own
per-architecture conversions, and safetensors models whose decoder layers are not
named ``*.layers.N``. Every case is sharded and run by qstream and must give the
logits transformers gives for the same file."""
from __future__ import annotations

import pytest
import torch

import qstream
from conftest import shard_to
from gguf_writer import make_tiny_gguf
from qstream.errors import SourceError
from qstream.source import open_source, split_units

# fp32 end to end: only summation order differs between qstream and transformers
RTOL = ATOL = 1e-4


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _qstream_logits(tmp_path, model, ids) -> torch.Tensor:
    out = shard_to(tmp_path, model, "fp32", compute_dtype="float32")
    m = qstream.load(out, device="cpu", max_seq=64, max_batch=2)
    try:
        return m(ids)
    finally:
        m.close()


def _gguf_reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma2", "gemma3"])
def test_gguf_shards_equal_transformers_loading_the_same_file(tmp_path, arch):
    path, original = make_tiny_gguf(tmp_path / "g", arch)
    ref = _gguf_reference(path)
    # the writer follows llama.cpp's conventions: transformers undoes them back to the original weights
    sd = ref.state_dict()
    for k, v in original.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-6, msg=f"{arch}: test writer and transformers disagree on {k}")
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids).logits
    got = _qstream_logits(tmp_path, path, ids)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=arch)


@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("gemma3", "F16")])
def test_quantized_gguf_is_dequantized_like_transformers(tmp_path, arch, qtype):
    path, _ = make_tiny_gguf(tmp_path / "g", arch, qtype=qtype)
    ref = _gguf_reference(path)
    src = open_source(str(path))
    sd = ref.state_dict()
    for n in src.names:
        assert torch.equal(src.read(n), sd[n]), n  # same dequantization, bit for bit
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(_qstream_logits(tmp_path, path, ids), want, rtol=RTOL, atol=ATOL)


def test_gguf_units_and_tokenizer(tmp_path):
    path, _ = make_tiny_gguf(tmp_path / "g", "gemma3")
    src = open_source(str(path))
    prefix, units = split_units(src.names, src.layers_prefix)
    assert prefix == "model.layers" and list(units) == ["embed", "layer_000", "layer_001", "head"]
    assert units["embed"] == ["model.embed_tokens.weight"] and units["head"] == ["model.norm.weight"]
    path, _ = make_tiny_gguf(tmp_path / "l", "llama")
    src = open_source(str(path))
    out = tmp_path / "tok"
    out.mkdir()
    assert "tokenizer.json" in src.save_tokenizer(out)
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert AutoTokenizer.from_pretrained(out)("the cat").input_ids == want("the cat").input_ids


def test_gguf_that_transformers_cannot_load_is_refused_in_one_line(tmp_path):
    # llama.cpp writes Mistral as 'llama' named 'mistral'; transformers reads it as Mistral and
    # then finds no gguf-py tensor map for that model type
    path, _ = make_tiny_gguf(tmp_path / "g", "mistral")
    with pytest.raises(SourceError, match=r"transformers cannot load GGUF architecture 'mistral'") as e:
        open_source(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(Exception):  # and transformers itself indeed cannot
        _gguf_reference(path)


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "neox.gguf"
    w = gguf.GGUFWriter(str(path), "gptneox")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SourceError, match=r"transformers cannot load this GGUF .*gptneox is not supported"):
        open_source(str(path))


def test_gguf_missing_a_weight_is_refused_not_left_random(tmp_path):
    path, _ = make_tiny_gguf(tmp_path / "g", "llama", drop="blk.1.ffn_down.weight")
    with pytest.raises(SourceError, match=r"no weights for model.layers.1.mlp.down_proj.weight of LlamaForCausalLM"):
        open_source(str(path))


def test_a_truncated_gguf_is_a_source_error(tmp_path):
    path, _ = make_tiny_gguf(tmp_path / "g", "llama")
    data = path.read_bytes()
    for cut in (100, len(data) - 64):  # in the header, in the tensor data
        path.write_bytes(data[:cut])
        with pytest.raises(SourceError, match="cannot read as GGUF"):
            open_source(str(path))


TINY_HF = {
    # decoder layers at transformer.h.N; the head is tied to wte
    "gpt2": (dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, n_positions=128, vocab_size=256),
             "transformer.h", ["transformer.wte.weight", "transformer.wpe.weight"],
             ["transformer.ln_f.weight", "transformer.ln_f.bias"]),
    # gpt_neox.layers.N; the checkpoint's 'embed_out' is the model's lm_head (transformers renames it)
    "gpt_neox": (dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=128, vocab_size=256, tie_word_embeddings=False),
                 "gpt_neox.layers", ["gpt_neox.embed_in.weight"],
                 ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "lm_head.weight"]),
}


@pytest.mark.parametrize("arch", list(TINY_HF))
def test_safetensors_model_with_another_layer_path_shards_and_runs(tmp_path, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, prefix, embed, head = TINY_HF[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    src = open_source(str(tmp_path / "m"))
    got_prefix, units = split_units(src.names, src.layers_prefix)
    assert got_prefix == prefix and units["embed"] == embed and units["head"] == head
    assert len(units) == 2 + 3
    ids = _ids(256)
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(_qstream_logits(tmp_path, tmp_path / "m", ids), want, rtol=RTOL, atol=ATOL)


def test_split_units_without_a_prefix_keeps_the_old_rule():
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.1.a.weight", "model.norm.weight", "lm_head.weight"]
    prefix, units = split_units(names)
    assert prefix == "model.layers" and units["embed"] == names[:1] and units["head"] == names[3:]
    with pytest.raises(SourceError, match="found no decoder layers"):
        split_units(["transformer.h.0.attn.weight"])
