"""The one table of dtype names used in recipes, manifests and scheme metadata."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# the pass-through scheme that stores a tensor in a compute dtype (norms, biases, embeddings)
KEEP_SCHEME = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
