"""Mixed precision to a size budget: choose one scheme per weight so that the total
predicted error is smallest while the bits stay within the budget.

The choice is a multiple-choice knapsack, solved exactly by dynamic programming over the
budget cut into ``BUCKETS_PER_WEIGHT`` x (number of weights) units (each option's bits are
rounded up, so the choice always fits; the rounding wastes at most 1% of the budget), then
the bits left over buy the upgrades with the best error saved per bit. Pure arithmetic: the
errors come from the caller (a weight-space proxy, or the output error on calibration
activations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import RecipeError
from . import dequantize, quantize

BUCKETS_PER_WEIGHT = 100  # budget units per weight: rounding loses at most one unit per weight (1%)


@dataclass(frozen=True)
class Option:
    spec: object  # what the caller stores for this choice (a QuantSpec)
    bits: int  # storage bits of the weight with this option (codes + scales)
    error: float  # predicted damage (same unit for every weight)


def allocate(choices: dict[str, list[Option]], budget_bits: int) -> dict[str, Option]:
    """One option per weight, total bits <= ``budget_bits``, smallest total error (up to the
    rounding above). A budget below the smallest choice is a RecipeError naming the minimum."""
    if not choices:
        return {}
    smallest = sum(min(o.bits for o in opts) for opts in choices.values())
    if budget_bits < smallest:
        raise RecipeError(f"target_bits_per_weight: the budget ({budget_bits} bits) is below what the smallest scheme "
                          f"reaches ({smallest} bits); raise it or add a smaller candidate scheme")
    names = list(choices)
    units = BUCKETS_PER_WEIGHT * len(names)
    unit = budget_bits / units
    inf = float("inf")
    dp = np.full(units + 1, inf)
    dp[0] = 0.0  # dp[c]: least error of the weights so far using exactly c units
    back = []
    for n in names:
        new = np.full(units + 1, inf)
        arg = np.zeros(units + 1, dtype=np.int16)
        for i, o in enumerate(choices[n]):
            c = math.ceil(o.bits / unit - 1e-9)
            if c > units:
                continue
            cand = np.full(units + 1, inf)
            cand[c:] = dp[:units + 1 - c] + o.error
            better = cand < new
            new[better], arg[better] = cand[better], i
        dp = new
        back.append(arg)
    c = int(np.argmin(dp))
    if not math.isfinite(dp[c]):  # rounding made the smallest choice overflow: fall back to it
        pick = {n: min(range(len(choices[n])), key=lambda i: choices[n][i].bits) for n in names}
    else:
        pick = {}
        for n, arg in zip(reversed(names), reversed(back)):
            i = int(arg[c])
            pick[n] = i
            c -= math.ceil(choices[n][i].bits / unit - 1e-9)
    return _fill(choices, pick, budget_bits)


def _fill(choices: dict[str, list[Option]], pick: dict[str, int], budget_bits: int) -> dict[str, Option]:
    """Spend the bits the rounding left over on the upgrades that save the most error per bit."""
    bits = sum(choices[n][i].bits for n, i in pick.items())
    while True:
        best, best_gain = None, 0.0
        for n, opts in choices.items():
            cur = opts[pick[n]]
            for i, o in enumerate(opts):
                extra = o.bits - cur.bits
                if extra > 0 and bits + extra <= budget_bits and o.error < cur.error:
                    gain = (cur.error - o.error) / extra
                    if gain > best_gain:
                        best, best_gain = (n, i, extra), gain
        if best is None:
            break
        n, i, extra = best
        pick[n], bits = i, bits + extra
    return {n: choices[n][i] for n, i in pick.items()}


def options_for(w: torch.Tensor, specs: list, *, input_scale: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None) -> list[Option]:
    """Quantize ``w`` [out, in] with each candidate spec and measure what it costs: the stored
    bits and the error. Without calibration the error is the squared Frobenius norm of the weight
    error (what the output error is for white inputs); with ``input_scale`` [in] (the mean squared
    input activation of each input feature, from calibration text) each column is weighted by it,
    the diagonal of the layer's input second moment; with ``output_scale`` [out] too (the mean squared
    loss gradient of each output feature) each row is weighted by it as well, which makes the errors of
    different layers comparable (the loss change, to second order)."""
    out = []
    wf = w.float()
    for spec in specs:
        # with calibration, the fit the calibrated shard will use for this choice (imatrix: weighted grids)
        packed, meta = quantize(w, spec, importance=input_scale)
        err = (dequantize(packed, meta, dtype=torch.float32) - wf).square()
        if input_scale is not None:
            err = err * input_scale.to(err.device)
        if output_scale is not None:
            err = err * output_scale.to(err.device).unsqueeze(1)
        bits = 8 * sum(t.numel() * t.element_size() for t in packed.values())
        out.append(Option(spec, bits, float(err.sum())))
    return out
