"""Model sources: GGUF files of several architectures read through transformers' own
per-architecture conversions, and safetensors models whose decoder layers are not
named ``*.layers.N``. Every case is sharded and run by qstream and must give the
logits transformers gives for the same file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import qstream
from conftest import shard_to
from qstream.errors import SourceError
from qstream.source import open_source, split_units

# -- tiny GGUF files, written from random transformers models, the way llama.cpp's
# convert_hf_to_gguf.py writes real ones: GGUF tensor names, q/k rows permuted for
# the Llama family, Gemma norms stored as w + 1, and a small byte-level BPE
# tokenizer in the metadata so transformers can build a tokenizer from the file.

# hf config, gguf architecture, general.name (transformers reads a llama file named exactly
# "mistral" as Mistral), and whether llama.cpp permutes q/k rows (LlamaModel.modify_tensors does)
TINY_GGUF = {
    "llama": (dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False), "llama", "tiny", True),
    "mistral": (dict(model_type="mistral", num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False),
                "llama", "mistral", True),
    "qwen2": (dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True), "qwen2", "tiny", False),
    "phi3": (dict(model_type="phi3", num_key_value_heads=4, tie_word_embeddings=False), "phi3", "tiny", False),
    "gemma2": (dict(model_type="gemma2", num_key_value_heads=2, head_dim=16, sliding_window=64), "gemma2", "tiny", False),
    "gemma3": (dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=16, sliding_window=64), "gemma3", "tiny", False),
}
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0)
SPECIAL = ["<|bos|>", "<|eos|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "o n", "Ġ a", "r e", "a t"]


def _vocab() -> tuple[list[str], list[int]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = byte_chars + merged + SPECIAL
    types = [1] * (len(byte_chars) + len(merged)) + [3] * len(SPECIAL)  # 1 NORMAL, 3 CONTROL
    return tokens, types


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(dirpath: Path, arch: str, *, seed: int = 0, qtype: str = "F32", drop: str | None = None) -> tuple[Path, dict]:
    """Write DIR/model.gguf; return its path and the random model's state dict (float32).
    qtype: storage of 2-D weights (F32, F16, Q8_0, ...); drop: a GGUF tensor name to leave out."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_kw, gguf_arch, name, permute = TINY_GGUF[arch]
    tokens, types = _vocab()
    config = AutoConfig.for_model(**{**COMMON, **hf_kw, "vocab_size": len(tokens)})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms: random around their init so they matter
                p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / "model.gguf"
    w = gguf.GGUFWriter(str(path), gguf_arch)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_embedding_length(config.hidden_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(10000.0)  # the default of every config used here
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if gguf_arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if gguf_arch.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(config.sliding_window)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index(SPECIAL[0]))
    w.add_eos_token_id(tokens.index(SPECIAL[1]))
    w.add_pad_token_id(tokens.index(SPECIAL[1]))  # Phi-3's config default (32000) lies outside this vocabulary

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch),
                                     config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for hf_name, t in sd.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for tied embeddings
        base, suffix = hf_name.rsplit(".", 1)
        g = names.get_name(base)
        assert g is not None, hf_name
        a = t.numpy().astype(np.float32)
        if permute and g.endswith("attn_q"):
            a = _permute(a, config.num_attention_heads, config.num_attention_heads)
        elif permute and g.endswith("attn_k"):
            a = _permute(a, config.num_attention_heads, config.num_key_value_heads)
        if gguf_arch.startswith("gemma") and g.endswith("norm"):
            a = a + 1  # llama.cpp Gemma2Model/Gemma3Model: RMSNorm weights stored with +1 folded in
        full = f"{g}.{suffix}"
        if full == drop:
            continue
        if a.ndim == 2 and qtype != "F32":
            qt = gguf.GGMLQuantizationType[qtype]
            if qt == gguf.GGMLQuantizationType.F16:
                w.add_tensor(full, a.astype(np.float16))
            else:
                w.add_tensor(full, gguf.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(full, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, sd


# fp32 end to end: only summation order differs between qstream and transformers
RTOL = ATOL = 1e-4


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _qstream_logits(tmp_path, model, ids) -> torch.Tensor:
    """qstream's logits of the fp32 shards; layer-major evaluation (perplexity) must agree."""
    out = shard_to(tmp_path, model, "fp32", compute_dtype="float32")
    m = qstream.load(out, device="cpu", max_seq=64, max_batch=2)
    try:
        got = m(ids)
        (lm,) = m.layer_major([{"input_ids": ids}], lambda j, h: m.logits(h))
        torch.testing.assert_close(lm, got, rtol=RTOL, atol=ATOL, msg="layer-major")
        return got
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
