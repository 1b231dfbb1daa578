"""Rounding tuned on a whole decoder layer's output (SignRound, the method of Intel's AutoRound:
Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent", 2023).

The importance-weighted fit (:mod:`.hqq`) gives every group of a linear its grid and rounds each
weight to the nearest code: the best each weight can do on its own. But what the model computes
is the layer's output, where the errors of the weights of one row, and of the layer's seven
linears, add up or cancel. SignRound keeps every grid as fitted (the stored format and its bits
do not change) and learns, per weight, whether to round up or down:

    code = clamp(round((w - min) / scale + v), 0, qmax)      v in [-0.5, 0.5], starts at 0

minimizing the mean squared error between the layer's output with the quantized weights (on the
inputs that went through the already-quantized layers before it) and the unquantized model's
output of the same layer (on its own inputs), so a layer also makes up for some of the error
upstream. ``round`` passes gradients straight through; ``v`` moves by ``lr * sign(grad)`` with a
learning rate decaying linearly to 0 (the paper's signed gradient descent: every weight moves at
the same pace whatever its gradient's scale, and ``lr = 1 / steps`` lets it cross at most one
rounding boundary). By default it runs a few passes over the calibration sequences: more
overfits a small calibration set (see DEFAULT_EPOCHS). The tuned codes are kept only if they lower the error over all calibration
tokens.

``Rounding`` is one weight's grid and offsets; :func:`tune_layer` runs the loop on a layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import bitpack, get_scheme
from .affine import Affine

# Steps per layer, by default a few passes over the calibration sequences: the paper's 200 steps are
# ~3 passes over its 512 x 2048 tokens; over qstream's default 8 x 512 they are 25 passes and overfit
# the calibration text (SmolLM2 q4k g64: +4.72% perplexity at 20 steps, +5.67% at 200; imatrix alone +7.88%)
DEFAULT_EPOCHS = 3
BATCH = 1  # calibration sequences of calibrate.SEQ tokens per step


@dataclass(frozen=True)
class RoundConfig:
    steps: int | None = None  # None: DEFAULT_EPOCHS passes over the calibration sequences
    batch: int = BATCH
    lr: float | None = None  # None: 1 / steps

    def steps_for(self, sequences: int) -> int:
        return self.steps if self.steps is not None else max(1, DEFAULT_EPOCHS * sequences // self.batch)


def tunable(meta: dict) -> bool:
    """Whether a stored weight has codes on a per-group affine grid (q2 ... q8, q2k ... q6k)."""
    return isinstance(get_scheme(meta["scheme"]), Affine) and len(meta["shape"]) == 2


class Rounding:
    """One weight's fixed grid and trainable rounding offsets ``v`` [groups, group size]."""

    def __init__(self, w: torch.Tensor, packed: dict[str, torch.Tensor], meta: dict):
        scheme = get_scheme(meta["scheme"])
        self.scheme, self.packed, self.meta = scheme, packed, meta
        form = scheme.affine_form(packed, meta)  # k-schemes: the 6-bit grid as float16 scale and min
        rows, cols = meta["shape"]
        g = meta["block_size"]
        groups = form["scale"].shape[1]
        self.shape = (rows, cols)
        self.qmax = (1 << scheme.bits) - 1
        self.scale = form["scale"].reshape(-1, 1).float().to(w.device)
        self.low = form["min"].reshape(-1, 1).float().to(w.device)
        x = w.reshape(rows, cols).float()
        if groups * g > cols:  # padding as Affine._groups does: the last value repeated (its codes are never used)
            x = torch.cat([x, x[:, -1:].expand(-1, groups * g - cols)], dim=1)
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        # a constant group (zero scale) codes 0 whatever v is: its z is 0 and its scale 0
        self.z = torch.where(self.scale > 0, (x.view(-1, g) - self.low) / safe, torch.zeros(()))
        self.v = torch.zeros_like(self.z, requires_grad=True)

    def _codes(self) -> torch.Tensor:
        u = self.z + self.v
        return (u + (u.round() - u).detach()).clamp(0, self.qmax)  # round with a straight-through gradient

    def weight(self) -> torch.Tensor:
        """The dequantized weight [rows, cols] as a differentiable function of ``v``."""
        rows, cols = self.shape
        w = self._codes() * self.scale + self.low
        return w.view(rows, -1)[:, :cols]

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        """The stored tensors with the tuned codes (grid tensors unchanged)."""
        codes = self._codes().to(torch.uint8)
        return {**self.packed, "": bitpack.pack(codes.reshape(-1).to(self.packed[""].device), self.scheme.bits)}


def _rows(v, idx: torch.Tensor, n: int):
    """Slice a layer keyword argument along the batch of calibration sequences (tensors of leading
    size ``n``, also inside tuples such as the rotary (cos, sin)); anything else is shared."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n and n > 1:
        return v.index_select(0, idx.to(v.device))
    if isinstance(v, tuple):
        return tuple(_rows(e, idx, n) for e in v)
    return v


def _run(layer: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = torch.func.functional_call(layer, weights, (x,), kwargs, strict=False)
    return out[0] if isinstance(out, tuple) else out


def _error(layer, roundings: dict[str, Rounding], x, y, kwargs, batch: int) -> float:
    """Mean squared output error over all calibration sequences."""
    n = x.shape[0]
    total = 0.0
    with torch.no_grad():
        weights = {k: r.weight() for k, r in roundings.items()}
        for s in range(0, n, batch):
            idx = torch.arange(s, min(s + batch, n))
            out = _run(layer, weights, x[idx], {k: _rows(v, idx, n) for k, v in kwargs.items()})
            total += (out.float() - y[idx].float()).square().sum().item()
    return total / y.numel()


def tune_layer(layer: nn.Module, roundings: dict[str, Rounding], x: torch.Tensor, y: torch.Tensor, kwargs: dict,
               cfg: RoundConfig = RoundConfig(), generator: torch.Generator | None = None) -> tuple[float, float]:
    """Tune ``roundings`` (parameter path in ``layer`` -> Rounding) so that ``layer`` on inputs ``x``
    [N, T, H] reproduces ``y`` [N, T, H]; ``kwargs`` as the layer takes them (attention mask, rotary
    tables). Offsets that do not lower the error over all N sequences are reset to 0. Returns the
    mean squared error before and after."""
    n = x.shape[0]
    steps = cfg.steps_for(n)
    rate = cfg.lr if cfg.lr is not None else 1.0 / steps
    before = _error(layer, roundings, x, y, kwargs, cfg.batch)
    params = [r.v for r in roundings.values()]
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:cfg.batch]
        out = _run(layer, {k: r.weight() for k, r in roundings.items()}, x[idx],
                   {k: _rows(v, idx, n) for k, v in kwargs.items()})
        loss = (out.float() - y[idx].float()).square().mean()
        grads = torch.autograd.grad(loss, params)
        lr = rate * (1 - step / steps)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g.sign()).clamp_(-0.5, 0.5)
    after = _error(layer, roundings, x, y, kwargs, cfg.batch)
    if after >= before:  # tuning made it worse on the whole set: keep the nearest codes
        with torch.no_grad():
            for p in params:
                p.zero_()
        after = before
    return before, after
