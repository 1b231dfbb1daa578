"""Shared fixtures: tiny random Hugging Face models written in the test, and the
real embedded SmolLM2-135M sharded once per session."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=4, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=4, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=4, vocab_size=256, max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                  num_hidden_layers=4, vocab_size=256, max_position_embeddings=256, head_dim=16),
}


def make_tiny(dirpath: Path, arch: str = "llama", *, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Write a random-weight HF checkpoint (safetensors + config) of a tiny model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY[arch], **overrides)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms: random around their init so they matter
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(dirpath, safe_serialization=True)
    return dirpath


def byte_tokenizer(dirpath: Path):
    """A byte-level BPE without merges (256 byte tokens + <bos> <eos> <pad>), saved next to a model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in ("<bos>", "<eos>", "<pad>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(dirpath)
    return fast


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny(tmp_path / "tiny-llama", "llama")


def shard_to(tmp: Path, model: str | Path, scheme: str, **extra) -> Path:
    from qstream.recipe import parse_recipe
    from qstream.shard import shard

    out = tmp / f"shards-{scheme}"
    recipe = parse_recipe({"model": str(model), "output": str(out), "scheme": scheme, **extra})
    shard(recipe, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_shards(tmp_path_factory):
    """The embedded real model sharded in three recipes (bf16, int8, nf4): computed once."""
    tmp = tmp_path_factory.mktemp("smollm2")
    out = {}
    for scheme in ("bf16", "int8", "nf4"):
        extra = {"overrides": [{"pattern": "lm_head", "scheme": "bf16"}]} if scheme != "bf16" else {}
        out[scheme] = shard_to(tmp, "smollm2-135m", scheme, **extra)
    return out


@pytest.fixture(scope="session")
def smollm2_hf():
    """The transformers model of the embedded GGUF, loaded directly (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qstream.source import smollm2_gguf

    g = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    return model, tok
