"""GPTQ (Frantar et al. 2022): quantize a linear weight column by column, feeding each
column's rounding error forward into the columns not yet quantized, weighted by the
inverse of the layer's input Hessian H = X^T X / N (X: calibration inputs of the linear).

Follows the reference ``fasterquant`` (IST-DASLab/gptq, gptq.py): dead inputs (zero
diagonal) are dropped, H is damped by ``damp * mean(diag H)``, the upper Cholesky factor
of H^-1 drives the updates, columns are processed in blocks (lazy batch updates) and
each block's error is applied to the rest of the matrix at once. Differences:

- the grid of a group is the affine grid of :mod:`.affine` (codes in [0, 2**bits),
  ``w = code * scale + min``), taken from the CURRENT, error-fed weights of the group when
  the group starts (the reference reads the block-stale matrix there), with scale and min
  rounded to their float16 storage first, so the codes are the ones dequantization will see.
  ``grid="fit"`` (default) fits it with :func:`.hqq.fit` (HQQ + least squares, never worse
  than min-max on the group's weights); ``grid="minmax"`` is the reference's min-max grid
  without forcing zero into the range. On SmolLM2-135M q4 g64, min-max GPTQ measured +32.5%
  perplexity, worse than calibration-free HQQ (+28.4%): the fitted grid matters there;
- the output is the packed format of :class:`.affine.Affine` exactly, so the runtime's
  existing ``q2`` ... ``q8`` dequantization reads GPTQ shards unchanged.
"""
from __future__ import annotations

import torch

from ..dtypes import DTYPE_NAMES
from . import bitpack
from .hqq import codes_for, fit

BLOCK = 128  # columns per lazy batch update (the reference's default)
DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (the reference's percdamp)


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, *, block: int = BLOCK,
               damp: float = DAMP, grid: str = "fit") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 [rows, cols], scale and min float16 [rows, ceil(cols / group)] of ``w``
    [rows, cols] given its input Hessian ``h`` [cols, cols]."""
    W = w.float().clone()
    rows, cols = W.shape
    H = h.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1  # an input that is always zero: its column's error costs nothing
    W[:, dead] = 0
    idx = torch.arange(cols)
    H[idx, idx] += damp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    qmax = (1 << bits) - 1
    groups = -(-cols // group)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, groups, dtype=torch.float16)
    lows = torch.zeros(rows, groups, dtype=torch.float16)
    # a block of whole groups, so that a group's grid always comes from up-to-date weights
    block = max(1, block // group) * group
    scale = low = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                g = col // group
                x = W1[:, i:i + group]
                if grid == "fit":  # :mod:`.hqq`'s fit (proximal solver + least squares, never worse than min-max)
                    n = x.shape[1]
                    xp = torch.cat([x, x[:, -1:].expand(-1, group - n)], dim=1) if n < group else x
                    mask = None
                    if n < group:
                        mask = torch.zeros_like(xp)
                        mask[:, :n] = 1
                    _, s16, l16 = fit(xp.contiguous(), bits, mask=mask)
                    s16, l16 = s16.view(-1), l16.view(-1)
                else:  # min-max
                    s16 = ((x.amax(1) - x.amin(1)) / qmax).to(torch.float16)
                    l16 = x.amin(1).to(torch.float16)
                scales[:, g], lows[:, g] = s16, l16
                scale, low = s16.float().unsqueeze(1), l16.float().unsqueeze(1)
            wc = W1[:, i:i + 1]
            q = codes_for(wc, scale, low, qmax)
            codes[:, col] = q.squeeze(1).to(torch.uint8)
            err = (wc - (q * scale + low)).squeeze(1) / Hinv1[i, i]
            Err1[:, i] = err
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, lows


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, *, scheme: str | None = None,
                  block: int = BLOCK, damp: float = DAMP, grid: str = "fit") -> tuple[dict[str, torch.Tensor], dict]:
    """``(packed, meta)`` of scheme ``q{bits}`` (see :mod:`.affine`) for weight ``w`` [out, in]."""
    if w.dim() != 2:
        raise ValueError(f"GPTQ needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    codes, scale, low = gptq_codes(w, h, bits, group, block=block, damp=damp, grid=grid)
    pad = -cols % group
    if pad:  # padding codes are cut off on dequantization: repeat the last one, as affine pads values
        codes = torch.cat([codes, codes[:, -1:].expand(-1, pad)], dim=1)
    packed = {"": bitpack.pack(codes.contiguous(), bits), "scale": scale, "min": low}
    meta = {"scheme": scheme or f"q{bits}", "shape": list(w.shape), "dtype": DTYPE_NAMES.get(w.dtype, "float32"),
            "block_size": group}
    return packed, meta
