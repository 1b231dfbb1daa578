"""Tiny GGUF files written from random transformers models, the way llama.cpp's
convert_hf_to_gguf.py writes real ones: GGUF tensor names, q/k rows permuted for
the Llama family, Gemma norms stored as w + 1, and a small byte-level BPE
tokenizer in the metadata so transformers can build a tokenizer from the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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
