"""The dense twin of a shard directory: a plain transformers model whose weights
are the shards' dequantized tensors. The reference every streamed result is
checked against (tests, perplexity cross-checks)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..quant import dequantize
from ..store.manifest import read_manifest
from ..store.tensors import read_file, unpack_stored
from .build import skeleton


def dense_state_dict(path: str | Path, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    m = read_manifest(path)
    dtype = dtype or DTYPES[m.compute_dtype]
    sd = {}
    for e in m.files:
        raw = read_file(m.path(e), expected_size=e.size)
        for name, meta in e.tensors.items():
            sd[name] = dequantize(unpack_stored(meta, raw), meta, dtype=dtype)
    if m.embedding is not None:  # a tied matrix stored once: the embedding is the head's tensor
        sd[m.embedding["name"]] = sd[m.embedding["tensor"]]
    return sd


def dense_twin(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu"):
    """A transformers AutoModelForCausalLM holding the dequantized shard weights: the same
    meta-device skeleton the runtime builds, with the weights attached (assign=True)."""
    m = read_manifest(path)
    dtype = dtype or DTYPES[m.compute_dtype]
    model = skeleton(m, dtype)
    model.load_state_dict(dense_state_dict(path, dtype=dtype), assign=True, strict=False)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"dense twin: parameters missing from the shards: {leftover[:3]}")
    return model.to(device).eval()
