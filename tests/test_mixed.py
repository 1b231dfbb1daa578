"""Mixed precision to a size budget: the allocator (pure arithmetic)."""
from __future__ import annotations

import itertools
import random

import pytest

from qstream.errors import RecipeError
from qstream.quant.mixed import Option, allocate


def _brute(choices, budget):
    names = list(choices)
    best = None
    for combo in itertools.product(*(range(len(choices[n])) for n in names)):
        bits = sum(choices[n][i].bits for n, i in zip(names, combo))
        err = sum(choices[n][i].error for n, i in zip(names, combo))
        if bits <= budget and (best is None or err < best):
            best = err
    return best


def test_allocation_fits_the_budget_and_is_near_the_optimum():
    rng = random.Random(0)
    for _ in range(30):
        choices = {}
        for m in range(5):
            n = rng.randint(1000, 5000)
            sens = rng.uniform(0.1, 10.0)  # some weights matter more
            choices[f"w{m}"] = [Option(b, n * b, sens * n * 4.0 ** -b) for b in (2, 3, 4, 8)]
        budget = int(sum(c[0].bits for c in choices.values()) * rng.uniform(1.2, 3.5))
        got = allocate(choices, budget)
        assert sum(o.bits for o in got.values()) <= budget
        err = sum(o.error for o in got.values())
        assert err <= 1.02 * _brute(choices, int(0.99 * budget)) + 1e-9  # optimal up to the 1% rounding


def test_sensitive_weights_get_more_bits_than_uniform_at_the_same_size():
    choices = {"robust": [Option(b, 1000 * b, 1.0 * 4.0 ** -b) for b in (2, 3, 4, 5)],
               "fragile": [Option(b, 1000 * b, 50.0 * 4.0 ** -b) for b in (2, 3, 4, 5)]}
    got = allocate(choices, 8000)  # uniform would be 4 bits each
    assert got["fragile"].spec > got["robust"].spec
    uniform = choices["robust"][2].error + choices["fragile"][2].error
    assert sum(o.error for o in got.values()) < uniform


def test_a_budget_below_the_smallest_scheme_is_refused():
    with pytest.raises(RecipeError, match="target_bits_per_weight"):
        allocate({"w": [Option(2, 2000, 1.0), Option(4, 4000, 0.1)]}, 1999)
