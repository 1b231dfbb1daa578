from __future__ import annotations

import torch

from ..dtypes import DTYPE_NAMES


class PassThrough:
    """Store the tensor in a plain float dtype (a cast, no blocks)."""

    block_sizes = None
    quantized = False

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def quantize(self, w: torch.Tensor, block_size: int | None) -> tuple[dict[str, torch.Tensor], dict]:
        out = w.to(self.dtype).contiguous()
        return {"": out}, {"scheme": self.name, "shape": list(w.shape), "dtype": DTYPE_NAMES[w.dtype]}

    def dequantize(self, packed: dict[str, torch.Tensor], meta: dict, *, dtype: torch.dtype) -> torch.Tensor:
        return packed[""].to(dtype)

    def error_bound(self, block_size: int | None = None) -> float:
        # bf16 keeps 8 mantissa bits: relative error per element <= 2^-9.
        return {torch.float32: 1e-7, torch.float16: 1e-3, torch.bfloat16: 4e-3}[self.dtype]
