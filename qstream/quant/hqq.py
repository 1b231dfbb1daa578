"""Calibration-free fitting of an affine grid per group: x ~= q * scale + low, q in [0, 2**bits).

Three steps, each kept per group only where it lowers that group's squared error, so the
result is never worse than round-to-nearest (RTN) with the same stored precision:

1. RTN: scale = (max - min) / qmax, low = min.
2. HQQ's half-quadratic proximal solver (Badri & Shaji 2023, hqq's
   ``optimize_weights_proximal_legacy``): with the scale fixed, alternate
   codes = round(x / scale + zero), a sparse residual e = shrink_lp(x - dequant) and the
   closed-form zero = mean(codes - (x - e) / scale). The lp-shrink (p < 1) lets a few
   outliers keep large errors instead of dragging the whole grid, which is what RTN gets
   wrong on heavy-tailed groups. hqq stops globally at the first iteration that does not
   lower the mean absolute error; we keep the best zero per group instead.
3. Least squares: with the codes fixed, (scale, low) has a closed-form L2 optimum
   (a line fit of x on q); re-round and repeat. HQQ never moves the scale; this does.

Finally scale and low are rounded to their storage dtype and the codes recomputed with the
rounded values, so storage rounding shifts the grid instead of adding error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FitConfig:
    # hqq's defaults (lp_norm 0.7, beta 10, kappa 1.01, 20 iterations)
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    # least-squares refits after the proximal solver: 6 rounds take the 4-bit Gaussian error
    # from 0.0858 (HQQ alone, group 64) to 0.0834; each round costs ~1/10 of the HQQ loop
    ls_rounds: int = 6
    # stop when a step lowers the squared error by less than this fraction
    tol: float = 1e-3
    # groups fitted at once: bounds the float32 temporaries (~10 x chunk x 4 bytes)
    chunk: int = 1 << 22


def _masked_mean(v: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return v.mean(dim=1, keepdim=True)
    return (v * mask).sum(dim=1, keepdim=True) / count


def _sq_err(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    d = x - (q * scale + low)
    d = d * d
    if mask is not None:
        d = d * mask
    return d.sum(dim=1, keepdim=True)


def codes_for(x: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest grid codes (float) of x for a grid; a zero scale (constant group) codes 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - low) / safe).clamp_(0, qmax)
    return torch.where(scale > 0, q, torch.zeros_like(q))


def rtn(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of each row of x [G, g] (padding must repeat a real value of the row)."""
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    return (hi - lo) / qmax, lo


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |.|^p / beta (generalized soft threshold)."""
    a = x.abs()
    if p == 1:
        t = torch.full_like(a, 1.0 / beta)
    else:
        # |x|^(p-1) is infinite at 0, where the result is 0 anyway
        t = a.clamp_min(1e-12).pow(p - 1) / beta
    return torch.sign(x) * (a - t).clamp_min_(0)


# one function on purpose: the HQQ iteration keeps its running best per group in locals
def _fit_chunk(x: torch.Tensor, mask: torch.Tensor | None, qmax: int, cfg: FitConfig, store: torch.dtype):
    count = None if mask is None else mask.sum(dim=1, keepdim=True)
    r_scale, r_low = rtn(x, qmax)
    best_scale, best_low = r_scale.clone(), r_low.clone()
    best_err = _sq_err(x, codes_for(x, r_scale, r_low, qmax), r_scale, r_low, mask)

    def consider(scale, low):
        nonlocal best_scale, best_low, best_err
        err = _sq_err(x, codes_for(x, scale, low, qmax), scale, low, mask)
        better = (err < best_err) & (scale > 0)
        before = float(best_err.sum())
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, low, best_low)
        best_err = torch.where(better, err, best_err)
        return float(best_err.sum()) < before * (1 - cfg.tol)  # worth another round

    # 2. HQQ proximal steps on the zero point (in code units), scale fixed at RTN's. Each step
    # first scores the zero it starts from (the dequantized grid is needed for the step anyway).
    live = r_scale > 0
    scale = torch.where(live, r_scale, torch.ones_like(r_scale))
    inv = 1.0 / scale
    zero = -r_low * inv
    best_zero = zero
    beta = cfg.beta
    total = float(best_err.sum())
    for i in range(cfg.iters + 1):
        q = torch.addcmul(zero, x, inv).round_().clamp_(0, qmax)
        d = x - (q - zero) * scale
        if i:  # i == 0 is RTN, scored above
            err = (d * d if mask is None else d * d * mask).sum(dim=1, keepdim=True)
            better = (err < best_err) & live
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
            now = float(best_err.sum())
            if now > total * (1 - cfg.tol):
                break  # hqq's early stop, on the chunk's total: the last step gained (almost) nothing
            total = now
        if i == cfg.iters:
            break
        e = _shrink_lp(d, beta, cfg.lp_norm)
        zero = _masked_mean(q - (x - e) * inv, mask, count)
        beta *= cfg.kappa
    best_low = torch.where(live, -best_zero * scale, r_low)

    # 3. least-squares line fit of x on the best codes, then re-round
    for _ in range(cfg.ls_rounds):
        q = codes_for(x, best_scale, best_low, qmax)
        w = torch.ones_like(x) if mask is None else mask
        n = w.sum(dim=1, keepdim=True)
        sq, sx = (w * q).sum(1, keepdim=True), (w * x).sum(1, keepdim=True)
        sqq, sqx = (w * q * q).sum(1, keepdim=True), (w * q * x).sum(1, keepdim=True)
        den = n * sqq - sq * sq
        ok = den > 0
        a = torch.where(ok, (n * sqx - sq * sx) / torch.where(ok, den, torch.ones_like(den)), best_scale)
        c = torch.where(ok, (sx - a * sq) / n, best_low)
        if not consider(a, c):
            break

    # 4. storage rounding, codes recomputed with the stored grid; RTN (stored alike) as the floor
    out_scale, out_low = best_scale.to(store), best_low.to(store)
    rs, rl = r_scale.to(store), r_low.to(store)
    q = codes_for(x, out_scale.float(), out_low.float(), qmax)
    rq = codes_for(x, rs.float(), rl.float(), qmax)
    worse = _sq_err(x, rq, rs.float(), rl.float(), mask) < _sq_err(x, q, out_scale.float(), out_low.float(), mask)
    q = torch.where(worse, rq, q)
    return q.to(torch.uint8), torch.where(worse, rs, out_scale), torch.where(worse, rl, out_low)


@torch.inference_mode()
def fit(x: torch.Tensor, bits: int, *, mask: torch.Tensor | None = None, cfg: FitConfig = FitConfig(),
        store: torch.dtype = torch.float16, rtn_only: bool = False):
    """Fit groups ``x`` [G, g] (float32; mask [G, g] of 0/1 marks real elements, padding must
    repeat a real value of its group). Returns codes uint8 [G, g], scale and low [G, 1] in ``store``."""
    qmax = (1 << bits) - 1
    if rtn_only:
        cfg = FitConfig(iters=0, ls_rounds=0, chunk=cfg.chunk)
    rows = max(1, cfg.chunk // x.shape[1])
    outs = [_fit_chunk(x[i:i + rows], None if mask is None else mask[i:i + rows], qmax, cfg, store)
            for i in range(0, x.shape[0], rows)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


# Importance-weighted fit (llama.cpp's imatrix quantization, ``make_qkx2_quants``): the scale search
# tries inverse scales (qmax + RMIN + RDELTA * k) / (max - min) for k < NSTEP, each followed by the
# weighted least-squares (scale, min) for its codes; llama.cpp uses -1, 0.1, 20. We search a wider
# band (qmax - 2 .. qmax + 1): the extra candidates with fewer levels clip the outer weights, which
# pays when their importance is low (AWQ's clip search does the same by shrinking the range).
RMIN, RDELTA, NSTEP = -2.0, 0.2, 16  # 0.2 instead of 0.1: half the time, +0.2% weighted error (4-bit)
REFITS = 4  # codes <-> least-squares alternations after the search (llama.cpp: 1 .. 10, stops when stuck)


def _wls(x: torch.Tensor, q: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """Weighted least-squares line x ~= q * scale + low per row; rows with one distinct code keep (scale, low)."""
    n = w.sum(1, keepdim=True)
    wq = w * q
    sq, sx = wq.sum(1, keepdim=True), (w * x).sum(1, keepdim=True)
    sqq, sqx = (wq * q).sum(1, keepdim=True), (wq * x).sum(1, keepdim=True)
    den = n * sqq - sq * sq
    ok = (den > 1e-12 * n * sqq) & (n > 0)
    safe = torch.where(ok, den, torch.ones_like(den))
    a = torch.where(ok, (n * sqx - sq * sx) / safe, scale)
    c = torch.where(ok, (sx - a * sq) / torch.where(n > 0, n, torch.ones_like(n)), low)
    return a, c


def _wfit_chunk(x: torch.Tensor, w: torch.Tensor, qmax: int, store: torch.dtype):
    def werr(scale, low):
        d = x - (codes_for(x, scale, low, qmax) * scale + low)
        return (w * d * d).sum(1, keepdim=True)

    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    r_scale, r_low = (hi - lo) / qmax, lo
    best_s, best_l = r_scale.clone(), r_low.clone()
    best = werr(r_scale, r_low)
    rng = hi - lo
    live = rng > 0
    inv_rng = torch.where(live, 1.0 / torch.where(live, rng, torch.ones_like(rng)), torch.zeros_like(rng))

    def consider(s, l):
        nonlocal best_s, best_l, best
        e = werr(s, l)
        better = (e < best) & (s > 0)
        best_s, best_l, best = torch.where(better, s, best_s), torch.where(better, l, best_l), torch.where(better, e, best)

    for k in range(NSTEP):
        iscale = (qmax + RMIN + RDELTA * k) * inv_rng
        q = ((x - lo) * iscale).round_().clamp_(0, qmax)
        consider(*_wls(x, q, w, best_s, best_l))
    for _ in range(REFITS):
        consider(*_wls(x, codes_for(x, best_s, best_l, qmax), w, best_s, best_l))
    # storage rounding: codes against the stored grid, the stored min-max grid as the floor
    s16, l16, rs, rl = best_s.to(store), best_l.to(store), r_scale.to(store), r_low.to(store)
    q = codes_for(x, s16.float(), l16.float(), qmax)
    rq = codes_for(x, rs.float(), rl.float(), qmax)
    e_fit = (w * (x - (q * s16.float() + l16.float())).square()).sum(1, keepdim=True)
    e_rtn = (w * (x - (rq * rs.float() + rl.float())).square()).sum(1, keepdim=True)
    worse = e_rtn < e_fit
    return torch.where(worse, rq, q).to(torch.uint8), torch.where(worse, rs, s16), torch.where(worse, rl, l16)


@torch.inference_mode()
def fit_weighted(x: torch.Tensor, bits: int, importance: torch.Tensor, *, mask: torch.Tensor | None = None,
                 store: torch.dtype = torch.float16, chunk: int = 1 << 22):
    """Fit groups ``x`` [G, g] minimizing sum importance * (x - dequant)^2 per group (importance [G, g]
    >= 0, e.g. the mean squared input activation of each weight's column: the output error of a
    linear, up to cross-column correlations). Same outputs as :func:`fit`; never worse than the
    min-max grid on the weighted error. Padding (mask 0) gets no weight."""
    qmax = (1 << bits) - 1
    w = importance.float() if mask is None else importance.float() * mask
    rows = max(1, chunk // x.shape[1])
    outs = [_wfit_chunk(x[i:i + rows].float(), w[i:i + rows], qmax, store) for i in range(0, x.shape[0], rows)]
    return tuple(torch.cat(parts) for parts in zip(*outs))
