"""The dense twin of a shard directory: a plain transformers model whose weights
are the shards' dequantized tensors. The reference every streamed result is
checked against (tests, perplexity cross-checks)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..manifest import read_manifest
from ..quant import DTYPES, dequantize


def dense_state_dict(path: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    m = read_manifest(path)
    dtype = dtype or DTYPES[m.compute_dtype]
    sd = {}
    for e in m.files:
        raw = load_file(str(m.path(e)))
        for name, meta in e.tensors.items():
            packed = {("" if k == "data" else k): raw[v] for k, v in meta["stored"].items()}
            sd[name] = dequantize(packed, meta, dtype=dtype)
    return sd


def dense_twin(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu"):
    """A transformers AutoModelForCausalLM holding the dequantized shard weights."""
    from transformers import AutoModelForCausalLM

    from .model import hf_config

    m = read_manifest(path)
    dtype = dtype or DTYPES[m.compute_dtype]
    config = hf_config(m)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = dense_state_dict(path, dtype=dtype)
    model.load_state_dict(sd, assign=True, strict=False)
    # buffers made on meta (rotary tables) are rebuilt on the real device
    model = _rebuild_meta_buffers(model, config, device)
    return model.to(device).eval()


def _rebuild_meta_buffers(model, config, device):
    for name, mod in model.named_modules():
        if any(b is not None and b.is_meta for b in mod._buffers.values()):
            parent_name, child = name.rsplit(".", 1) if "." in name else ("", name)
            with torch.device(device):
                fresh = type(mod)(config=config)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"dense twin: parameters missing from the shards: {leftover[:3]}")
    return model
