"""8-bit blockwise format of bitsandbytes (dynamic 8-bit code, one absmax per block).

Stored: ``""`` uint8 with the weight's shape, ``absmax`` float32 [ceil(numel/block)].
"""
from __future__ import annotations

import functools
import math

import torch

from ..dtypes import DTYPE_NAMES

BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@functools.cache
def _code(device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.create_dynamic_map().to(device)


class Int8Blockwise:
    name = "int8"
    block_sizes = BLOCK_SIZES
    quantized = True

    def quantize(self, w: torch.Tensor, block_size: int | None) -> tuple[dict[str, torch.Tensor], dict]:
        import bitsandbytes.functional as F

        q, state = F.quantize_blockwise(w.float().contiguous(), code=_code(w.device), blocksize=block_size)
        meta = {"scheme": "int8", "shape": list(w.shape), "dtype": DTYPE_NAMES[w.dtype], "block_size": block_size}
        return {"": q, "absmax": state.absmax.float()}, meta

    def dequantize(self, packed: dict[str, torch.Tensor], meta: dict, *, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as F

        q = packed[""]
        state = F.QuantState(absmax=packed["absmax"], code=_code(q.device), blocksize=meta["block_size"], dtype=torch.float32)
        out = F.dequantize_blockwise(q, state)
        return out.to(dtype)

    def error_bound(self, block_size: int) -> float:
        # Gaussian weights: 0.0096 at block 64 rising to 0.0135 at 4096
        return 0.011 + 0.0006 * math.log2(block_size / 64)
