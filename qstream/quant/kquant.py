"""Affine groups with a quantized grid (schemes ``q2k`` ... ``q6k``), llama.cpp's k-quant layout.

Plain ``q4`` at groups of 64 spends 32 bits per group on a float16 scale and min: 4.5 bits per
weight. Smaller groups fit the weights better (the error of 4-bit codes on 32 weights is ~10% lower
than on 64) but at float16 they cost 5 bits. Here each group's scale and min are themselves 6-bit
codes against two float16 numbers per *super-block* of about 8 groups (Q4_K's layout):

    scale = sc * d        min = -m * dmin        sc, m in [0, 63]        w = code * scale + min

Bits per weight at groups of 32: bits + 12/32 + 32/256 = bits + 0.5 (q4k 4.5, q3k 3.5), the bits of
q4 at groups of 64 with half the group size. The min is stored as a non-negative multiple of ``-dmin``
(a group's min is <= 0 unless all its weights are positive, then it is clamped to 0, as llama.cpp does).

Super-blocks are cut along each row: ``n = max(1, groups // 8)`` of them, ``ceil(groups / n)`` groups
each (the last may be shorter), so rows of 896 columns (28 groups) get 3 super-blocks of 10, 10 and 8
groups and the overhead stays <= 32 / 256 bits per weight for any row of >= 8 groups.

Fitting: each group's float grid comes from :func:`.hqq.fit` (or :func:`.hqq.fit_weighted` with an
importance per column, the imatrix calibration); the super-block's d and dmin are the largest scale
and -min over 63; the 6-bit codes are rounded, the weight codes recomputed against the quantized grid,
then ``REFITS`` rounds of (weighted) least squares on (scale, min) for the fixed codes, re-rounded to
6 bits and kept per group only where they lower the error.

Stored: ``""`` codes as in :mod:`.affine` (:mod:`.bitpack`, rows padded to whole groups), ``grid``
uint8, the 6-bit sc then m codes of every group (bitpacked, padded to a multiple of 8 codes each),
``d`` and ``dmin`` float16 [rows, super-blocks]. ``affine_form`` expands the grid to the float16
scale and min of :mod:`.affine` (what dequantization and the fused GEMV use); the runtime does that once
for resident weights.
"""
from __future__ import annotations

import math

import torch

from ..dtypes import DTYPE_NAMES
from . import bitpack, gemv_triton
from .affine import Affine
from .hqq import _wls, codes_for, fit, fit_weighted

GRID_BITS = 6  # bits of each group's scale code and min code
GRID_MAX = (1 << GRID_BITS) - 1
SUPER_GROUPS = 8  # groups per super-block (Q4_K: 8 groups of 32 = 256 weights)
K_GROUP_SIZES = (16, 32, 64)
REFITS = 2  # least-squares rounds on the quantized grid


def super_layout(groups: int) -> tuple[int, int]:
    """(super-blocks per row, groups per super-block) for a row of ``groups`` groups."""
    n = max(1, groups // SUPER_GROUPS)
    per = -(-groups // n)
    return -(-groups // per), per


def _pad8(n: int) -> int:
    return n + (-n % 8)


class KAffine(Affine):
    """Fitted affine groups whose scale and min are 6-bit codes under a float16 pair per super-block."""

    block_sizes = K_GROUP_SIZES

    def __init__(self, bits: int):
        super().__init__(bits)
        self.name = f"q{bits}k"

    def bits_per_weight(self, block_size: int, cols: int | None = None) -> float:
        """Per group 2 x 6 bits, per super-block 2 x 16 bits: exact for rows of ``cols`` columns padded
        to whole groups; without ``cols``, for long rows (super-blocks of SUPER_GROUPS groups)."""
        if cols is None:
            return self.bits + 2 * GRID_BITS / block_size + 32 / (SUPER_GROUPS * block_size)
        groups = -(-cols // block_size)
        return self.bits + 2 * GRID_BITS / block_size + 32 * super_layout(groups)[0] / (groups * block_size)

    def quantize(self, w: torch.Tensor, block_size: int | None,
                 importance: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        g = self._check_group(block_size)
        if w.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight, got shape {tuple(w.shape)}")
        x, mask, imp = self._groups(w, g, importance)  # [G, g] float32
        rows = x.shape[0] * g // _padded_cols(w.shape[-1], g)
        qmax = (1 << self.bits) - 1
        groups = x.shape[0] // rows
        if imp is None:
            _, scale, low = fit(x, self.bits, mask=mask, cfg=self.cfg, store=torch.float32)
            weight = mask if mask is not None else torch.ones_like(x)
        else:
            _, scale, low = fit_weighted(x, self.bits, imp, mask=mask, store=torch.float32)
            weight = imp if mask is None else imp * mask
        nsb, per = super_layout(groups)

        def sb_max(v: torch.Tensor) -> torch.Tensor:  # [rows, groups] -> [rows, nsb] (max over each super-block)
            v = torch.nn.functional.pad(v, (0, nsb * per - groups))
            return v.view(rows, nsb, per).amax(dim=2)

        def spread(v: torch.Tensor) -> torch.Tensor:  # [rows, nsb] -> [rows * groups, 1]
            return v.repeat_interleave(per, dim=1)[:, :groups].reshape(-1, 1)

        # min <= 0 (see the module docstring): an all-positive group gets min 0 and the scale that reaches its max
        top = x.amax(dim=1, keepdim=True) if mask is None else torch.where(mask > 0, x, x.new_zeros(())).amax(1, keepdim=True)
        scale = torch.where(low > 0, top / qmax, scale)
        scale = scale.view(rows, groups).clamp_min(0)
        neg = (-low).view(rows, groups).clamp_min(0)
        d = (sb_max(scale) / GRID_MAX).to(torch.float16)
        dmin = (sb_max(neg) / GRID_MAX).to(torch.float16)
        # float16 rounding may leave d * 63 just below the largest scale: the codes are clamped below
        d_g, dmin_g = spread(d.float()), spread(dmin.float())

        def grid_codes(s: torch.Tensor, n: torch.Tensor):
            sc = torch.where(d_g > 0, (s / torch.where(d_g > 0, d_g, 1)).round(), torch.zeros_like(s)).clamp_(0, GRID_MAX)
            sc = torch.where((s > 0) & (d_g > 0), sc.clamp(min=1), sc)  # a live group keeps a non-zero step
            m = torch.where(dmin_g > 0, (n / torch.where(dmin_g > 0, dmin_g, 1)).round(), torch.zeros_like(n)).clamp_(0, GRID_MAX)
            return sc, m

        def err_of(sc, m):
            s, lo = _grid_values(sc, m, d_g, dmin_g)
            q = codes_for(x, s, lo, qmax)
            e = (weight * (x - (q * s + lo)).square()).sum(1, keepdim=True)
            return e, q

        sc, m = grid_codes(scale.reshape(-1, 1), neg.reshape(-1, 1))
        best_err, best_q = err_of(sc, m)
        for _ in range(REFITS):
            s, lo = _grid_values(sc, m, d_g, dmin_g)
            a, c = _wls(x, best_q.float(), weight, s, lo)
            sc2, m2 = grid_codes(a.clamp_min(0), (-c).clamp_min(0))
            e2, q2 = err_of(sc2, m2)
            better = e2 < best_err
            sc, m = torch.where(better, sc2, sc), torch.where(better, m2, m)
            best_err, best_q = torch.where(better, e2, best_err), torch.where(better, q2, best_q)
        n_pad = _pad8(rows * groups)
        codes6 = torch.zeros(2 * n_pad, dtype=torch.uint8, device=x.device)
        codes6[:rows * groups] = sc.reshape(-1).to(torch.uint8)
        codes6[n_pad:n_pad + rows * groups] = m.reshape(-1).to(torch.uint8)
        packed = {"": bitpack.pack(best_q.to(torch.uint8), self.bits), "grid": bitpack.pack(codes6, GRID_BITS),
                  "d": d, "dmin": dmin}
        meta = {"scheme": self.name, "shape": list(w.shape), "dtype": DTYPE_NAMES.get(w.dtype, "float32"),
                "block_size": g}
        return packed, meta

    def affine_form(self, packed: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        """The same weight in :mod:`.affine`'s stored form: codes plus float16 scale and min per group
        (a weight already in that form, settled by QLinear.settle, as it is)."""
        if "grid" not in packed:
            return packed
        rows, cols = meta["shape"]
        g = meta["block_size"]
        groups = _padded_cols(cols, g) // g
        nsb, per = super_layout(groups)
        n = rows * groups
        n_pad = _pad8(n)
        codes6 = bitpack.unpack(packed["grid"], GRID_BITS, 2 * n_pad)
        sc, m = codes6[:n].view(rows, groups), codes6[n_pad:n_pad + n].view(rows, groups)
        d = packed["d"].float().repeat_interleave(per, dim=1)[:, :groups]
        dmin = packed["dmin"].float().repeat_interleave(per, dim=1)[:, :groups]
        scale, low = _grid_values(sc.float(), m.float(), d, dmin)
        return {"": packed[""], "scale": scale.to(torch.float16), "min": low.to(torch.float16)}

    resident_form = affine_form  # what QLinear.settle keeps for weights bound for good
    # join_rows (inherited): the codes join as q-schemes' do; the 6-bit grids do not, so runtime/fuse.py
    # joins the members' resident forms (float16 scale and min) instead

    def dequantize(self, packed: dict[str, torch.Tensor], meta: dict, *, dtype: torch.dtype) -> torch.Tensor:
        return super().dequantize(self.affine_form(packed, meta), meta, dtype=dtype)

    def gemv(self, x: torch.Tensor, packed: dict[str, torch.Tensor], meta: dict,
             bias: torch.Tensor | None) -> torch.Tensor | None:
        if "grid" in packed:  # a streamed weight: expand its grid, but only when the fused kernel will run
            if len(meta["shape"]) != 2 or not gemv_triton.available(x):
                return None
            packed = self.affine_form(packed, meta)
        return super().gemv(x, packed, meta, bias)

    def error_bound(self, block_size: int) -> float:
        # the 6-bit grid costs a little against float16's (tests/test_quant_kquant.py compares the two)
        base, per_doubling = _K_BOUNDS[self.bits]
        return base + per_doubling * math.log2(block_size / 32)


def _grid_values(sc: torch.Tensor, m: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor):
    """Float16-exact (scale, min) of 6-bit codes: what dequantization uses, so the fit rounds against it."""
    return (sc * d).to(torch.float16).float(), (-(m * dmin)).to(torch.float16).float()


def _padded_cols(cols: int, g: int) -> int:
    return cols + (-cols % g)


# Relative Frobenius error on Gaussian weights at group 32 and its growth per doubling of the group,
# with ~10% headroom over q-schemes' (checked by tests/test_quant.py and tests/test_quant_kquant.py)
_K_BOUNDS = {2: (0.36, 0.022), 3: (0.17, 0.022), 4: (0.083, 0.012), 5: (0.041, 0.006), 6: (0.021, 0.003)}
