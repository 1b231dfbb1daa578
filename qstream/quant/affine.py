"""Fitted asymmetric group quantization, 2 to 8 bits (schemes ``q2`` ... ``q8``).

Each row of a weight is cut into groups of ``block_size`` (the group size); a group
stores b-bit codes and a grid ``w = code * scale + min`` fitted without calibration data
(:mod:`.hqq`: HQQ's proximal solver plus a least-squares refit, never worse than
round-to-nearest), or, with calibration (``importance`` per input column, shard's
``calibration: {method: imatrix}``), by :func:`.hqq.fit_weighted` on the importance-weighted
error. Rows whose length is not a multiple of the group size are padded
internally with their last value; the padding is masked out of the fit and cut off on
dequantization.

Stored: ``""`` uint8 [rows * padded_cols * bits / 8] (codes, :mod:`.bitpack` layout),
``scale`` and ``min`` float16 [rows, groups]. float16 rather than bfloat16: the grid
needs mantissa (11 bits against 8), not range (LLM weights are far inside float16's);
codes are computed against the rounded values, so storage rounding shifts the grid
instead of adding error. Bits per weight: bits + 32 / group size (4.5 for q4 at 64,
4.25 at 128).

Dequantization is pure torch (unpack, one multiply-add in float32, a cast) on whatever
device holds the tensors; float32 because ``code * scale + min`` loses up to a
code step in bfloat16 once codes exceed 2**8 / 2 (8 bits) or cancel against ``min``.
"""
from __future__ import annotations

import math

import torch

from ..dtypes import DTYPE_NAMES
from ..errors import RecipeError
from . import affine_triton, bitpack, gemm_triton, gemv_triton
from .hqq import FitConfig, fit, fit_weighted

GROUP_SIZES = (32, 64, 128, 256)
# float16 scale and min per group
_GRID_BITS = 32

# Relative Frobenius error on Gaussian weights at group 32, and its growth per doubling of
# the group (measured: tests/test_quant_affine.py prints them), with ~10% headroom.
_BOUNDS = {2: (0.34, 0.022), 3: (0.165, 0.022), 4: (0.080, 0.012), 5: (0.039, 0.006), 6: (0.019, 0.003),
           8: (0.0048, 0.0008)}


class Affine:
    block_sizes = GROUP_SIZES
    quantized = True

    def __init__(self, bits: int, cfg: FitConfig = FitConfig()):
        if bits not in _BOUNDS:
            raise RecipeError(f"bits {bits} is not supported; use one of {', '.join(map(str, _BOUNDS))}")
        self.bits = bits
        self.name = f"q{bits}"
        self.cfg = cfg

    def bits_per_weight(self, block_size: int, cols: int | None = None) -> float:
        """Stored bits per weight of rows of ``cols`` columns padded to whole groups (the same for any row length)."""
        return self.bits + _GRID_BITS / block_size

    def _check_group(self, block_size: int | None) -> int:
        if block_size not in self.block_sizes:
            raise RecipeError(f"field 'block_size' (group size) {block_size} is not supported by {self.name}; "
                              f"use one of {', '.join(map(str, self.block_sizes))}")
        return block_size

    def quantize(self, w: torch.Tensor, block_size: int | None,
                 importance: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """``importance`` [in] (optional, e.g. calibration's mean squared input of each column):
        each group's grid minimizes the importance-weighted squared error (:func:`.hqq.fit_weighted`)
        instead of HQQ's unweighted objective. The stored format is the same either way."""
        g = self._check_group(block_size)
        x, mask, imp = self._groups(w, g, importance)
        if imp is None:
            codes, scale, low = fit(x, self.bits, mask=mask, cfg=self.cfg)
        else:
            codes, scale, low = fit_weighted(x, self.bits, imp, mask=mask)
        rows = math.prod(w.shape[:-1])
        groups = x.shape[0] // rows
        packed = {"": bitpack.pack(codes, self.bits), "scale": scale.view(rows, groups), "min": low.view(rows, groups)}
        meta = {"scheme": self.name, "shape": list(w.shape), "dtype": DTYPE_NAMES.get(w.dtype, "float32"), "block_size": g}
        return packed, meta

    def _groups(self, w: torch.Tensor, g: int, importance: torch.Tensor | None):
        """w [..., cols] -> (groups [G, g] float32, padding mask [G, g] or None, importance [G, g] or None).
        Rows are padded to whole groups by repeating their last value (every group's min and max stay)."""
        if w.dim() == 0 or w.numel() == 0:
            raise ValueError(f"{self.name}: cannot quantize a tensor of shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point weight, got {w.dtype}")
        if w.abs().amax().item() > torch.finfo(torch.float16).max:
            raise ValueError(f"{self.name}: weight magnitude exceeds float16's range (the grid is stored in float16)")
        cols = w.shape[-1]
        x = w.reshape(-1, cols).float()
        pad = -cols % g
        mask = None
        if pad:
            x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1)
            mask = torch.ones_like(x)
            mask[:, cols:] = 0
            mask = mask.view(-1, g)
        imp = None
        if importance is not None:
            if importance.shape != (cols,):
                raise ValueError(f"{self.name}: importance has shape {tuple(importance.shape)}, expected ({cols},)")
            imp = importance.float().to(x.device).clamp_min(0)
            imp = torch.cat([imp, imp.new_zeros(pad)]).expand(x.shape[0], -1).reshape(-1, g)
        return x.reshape(-1, g), mask, imp

    def affine_form(self, packed: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        """Codes plus float16 scale and min per group: the stored form itself (k-schemes expand their grid)."""
        return packed

    def dequantize(self, packed: dict[str, torch.Tensor], meta: dict, *, dtype: torch.dtype) -> torch.Tensor:
        shape = torch.Size(meta["shape"])
        g = meta["block_size"]
        scale, low = packed["scale"], packed["min"]
        if affine_triton.available(scale) and len(shape) == 2:
            return affine_triton.dequantize(packed[""], scale, low, bits=self.bits, group=g, shape=shape, dtype=dtype)
        rows, groups = scale.shape
        codes = bitpack.unpack(packed[""], self.bits, rows * groups * g).view(rows * groups, g)
        w = torch.addcmul(low.reshape(-1, 1).float(), codes.float(), scale.reshape(-1, 1).float())
        return w.view(rows, groups * g)[:, :shape[-1]].reshape(shape).to(dtype)

    def gemv(self, x: torch.Tensor, packed: dict[str, torch.Tensor], meta: dict,
             bias: torch.Tensor | None) -> torch.Tensor | None:
        """x [.., in] -> x @ W.T straight from the packed codes (one fused Triton kernel, no dequantized
        weight): the small-matmul kernel for 2 to gemm_triton.MAX_ROWS rows (a draft's tree steps), else
        the GEMV kernel (one row; more when the first declines). None when neither applies (no Triton or
        CUDA, more rows, a weight that is not 2-D), so the caller dequantizes instead."""
        if len(meta["shape"]) != 2 or not gemv_triton.available(x):
            return None
        for kernel in (gemm_triton.affine_mm, gemv_triton.affine_gemv):
            y = kernel(x, packed[""], packed["scale"], packed["min"], bits=self.bits, group=meta["block_size"],
                       shape=meta["shape"], bias=bias)
            if y is not None:
                return y
        return None

    def join_rows(self, metas: list[dict]) -> dict | None:
        """The metadata of the weight whose rows are the given weights' rows one after the other
        (runtime/fuse.py), or None when concatenating the stored tensors would not join them: only a
        one-field width (2, 4, 8 bits) stores its codes row after row; 3, 5 and 6 bits store each
        bit field for the whole matrix in turn (bitpack)."""
        first = metas[0]
        if len(bitpack.fields(self.bits)) != 1:
            return None
        for m in metas:
            if (m["scheme"] != first["scheme"] or m["block_size"] != first["block_size"] or len(m["shape"]) != 2
                    or m["shape"][-1] != first["shape"][-1] or m["dtype"] != first["dtype"]):
                return None
        return {**first, "shape": [sum(m["shape"][0] for m in metas), first["shape"][-1]]}

    def error_bound(self, block_size: int) -> float:
        base, per_doubling = _BOUNDS[self.bits]
        return base + per_doubling * math.log2(block_size / 32)
