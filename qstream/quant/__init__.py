"""Quantization schemes behind one interface.

A scheme is a pure pair, as in hqq:

    packed, meta = quantize(w, spec)      # dict[str, Tensor], dict (JSON-able)
    w_hat = dequantize(packed, meta, dtype=torch.bfloat16)

No I/O inside. ``packed`` maps a suffix to a tensor: ``""`` is the main tensor
(stored under the weight's own name), other suffixes are stored as
``NAME.SUFFIX`` (e.g. ``NAME.absmax``). ``meta`` holds only JSON types, so it
goes straight into the manifest and the safetensors header.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dtypes import DTYPE_NAMES, DTYPES
from ..errors import RecipeError
from .affine import Affine
from .base import Scheme
from .bnb4 import FourBit
from .int8 import Int8Blockwise
from .kquant import KAffine
from .passthrough import PassThrough

SCHEMES: dict[str, Scheme] = {
    "nf4": FourBit("nf4"),
    "fp4": FourBit("fp4"),
    "int8": Int8Blockwise(),
    # fitted affine groups (HQQ-style, calibration-free): 2 to 8 bits
    **{f"q{b}": Affine(b) for b in (2, 3, 4, 5, 6, 8)},
    # the same with each group's scale and min as 6-bit codes (llama.cpp's k-quant layout): groups of 32 at
    # the bits of q-schemes at 64
    **{f"q{b}k": KAffine(b) for b in (2, 3, 4, 5, 6)},
    "bf16": PassThrough("bf16", torch.bfloat16),
    "fp16": PassThrough("fp16", torch.float16),
    "fp32": PassThrough("fp32", torch.float32),
}



@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is stored: a scheme name and (for block formats) a block size."""

    scheme: str
    block_size: int | None = None

    def __post_init__(self) -> None:
        check_spec(self.scheme, self.block_size)


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise RecipeError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None


def check_spec(scheme: str, block_size: int | None, *, where: str = "scheme") -> None:
    s = get_scheme(scheme)
    if s.block_sizes is None:
        return
    if block_size not in s.block_sizes:
        raise RecipeError(
            f"{where}: block size {block_size} is not supported by {scheme}; "
            f"use one of {', '.join(map(str, s.block_sizes))}"
        )


def quantize(w: torch.Tensor, spec: QuantSpec, *, importance: torch.Tensor | None = None
             ) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize one weight. Returns the tensors to store and the JSON metadata. ``importance`` [in]
    (calibration's mean squared input of each column): the fitted affine schemes (q2 ... q8, q2k ...
    q6k) fit each group to the importance-weighted error; the other schemes have no such fit and
    quantize as without it. The stored format is the same either way."""
    scheme = get_scheme(spec.scheme)
    if importance is not None and isinstance(scheme, Affine):
        return scheme.quantize(w, spec.block_size, importance=importance.to(w.device))
    return scheme.quantize(w, spec.block_size)


def dequantize(packed: dict[str, torch.Tensor], meta: dict, *, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`, on whatever device ``packed`` lives on."""
    return get_scheme(meta["scheme"]).dequantize(packed, meta, dtype=dtype)


__all__ = ["SCHEMES", "DTYPES", "DTYPE_NAMES", "QuantSpec", "Scheme", "get_scheme", "check_spec", "quantize", "dequantize"]
