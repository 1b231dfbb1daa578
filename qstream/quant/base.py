from __future__ import annotations

from typing import Protocol

import torch


class Scheme(Protocol):
    name: str
    # Supported block sizes, or None for formats without blocks.
    block_sizes: tuple[int, ...] | None
    # True when the stored tensor is a packed code (needs dequantization).
    quantized: bool

    def quantize(self, w: torch.Tensor, block_size: int | None) -> tuple[dict[str, torch.Tensor], dict]: ...

    def dequantize(self, packed: dict[str, torch.Tensor], meta: dict, *, dtype: torch.dtype) -> torch.Tensor: ...

    def error_bound(self, block_size: int | None) -> float:
        """Relative Frobenius error this scheme is expected to stay under on Gaussian weights."""
        ...
