"""The multi-device planner: contiguous shares that balance what each device streams (pure arithmetic)."""
from __future__ import annotations

import pytest

from qstream.errors import BudgetError
from qstream.runtime.plan import partition_layers, plan_devices, plan_tiers

MiB = 2**20


def _streamed(plans, layer_bytes):
    return [sum(layer_bytes[i] for i in p.plan.streamed) for p in plans]


def test_equal_devices_get_equal_contiguous_shares():
    L = [100 * MiB] * 80
    for d in (1, 2, 4):
        ranges = partition_layers(L, [50 * MiB] * d, [2000 * MiB] * d)
        assert [len(r) for r in ranges] == [80 // d] * d
        assert ranges[0].start == 0 and ranges[-1].stop == 80
        assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


def test_streamed_bytes_per_device_shrink_with_more_devices_and_stay_balanced():
    L = [100 * MiB] * 80
    one = _streamed(plan_devices(L, fixed_bytes=[50 * MiB], budgets=[2000 * MiB], host_budget=None), L)
    two = _streamed(plan_devices(L, fixed_bytes=[50 * MiB] * 2, budgets=[2000 * MiB] * 2, host_budget=None), L)
    four = _streamed(plan_devices(L, fixed_bytes=[50 * MiB] * 4, budgets=[2000 * MiB] * 4, host_budget=None), L)
    assert max(two) <= 0.55 * one[0] and max(four) <= 0.3 * one[0]
    assert max(four) - min(four) <= 100 * MiB


def test_a_bigger_device_takes_a_bigger_share():
    L = [100 * MiB] * 80
    plans = plan_devices(L, fixed_bytes=[50 * MiB] * 2, budgets=[6000 * MiB, 2000 * MiB], host_budget=None)
    assert len(plans[0].layers) > len(plans[1].layers)
    s = _streamed(plans, L)
    assert abs(s[0] - s[1]) <= 100 * MiB


def test_each_share_is_planned_like_a_single_device_and_host_ram_is_shared():
    L = [100 * MiB + i for i in range(40)]
    plans = plan_devices(L, fixed_bytes=[50 * MiB] * 2, budgets=[1500 * MiB] * 2, host_budget=1000 * MiB)
    covered = sorted(i for p in plans for i in (*p.plan.resident, *p.plan.streamed))
    assert covered == list(range(40))
    for p in plans:
        alone = plan_tiers(L[p.layers.start:p.layers.stop], fixed_bytes=50 * MiB, budget=1500 * MiB, host_budget=None)
        assert len(p.plan.resident) == len(alone.resident)
        assert all(i in p.layers for i in (*p.plan.resident, *p.plan.streamed))
    host = sum(L[i] for p in plans for i in p.plan.host)
    assert host <= 1000 * MiB and any(p.plan.disk for p in plans)


def test_budgets_too_small_for_two_slots_are_refused():
    with pytest.raises(BudgetError, match="two slots"):
        partition_layers([100 * MiB] * 8, [50 * MiB] * 2, [200 * MiB] * 2)
