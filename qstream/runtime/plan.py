"""The tier plan: which decoder layers live on the compute device, which stream
from a host-RAM cache, and which stream from disk. Pure arithmetic, no I/O.

Rule: never stream what fits. Fixed costs (head, norms, dequantization
workspace, activations, KV cache) come off the budget first; if every layer fits
in what is left, every layer is resident. Otherwise ``slots`` staging buffers (one
layer each, for overlapped loading) are reserved and as many layers as still fit
stay resident, spread evenly through the stack so the copy engine has work while
resident layers compute. Streamed layers come from host RAM while they fit in
``host_budget``, the rest from disk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BudgetError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: str | int | float | None, *, what: str = "memory") -> int | None:
    """'4GiB' -> 4294967296; None or 'auto' -> None (no limit / auto); ints pass through."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise BudgetError(f"{what}: {value} is negative")
        return int(value)
    s = str(value).strip().lower()
    if s in ("auto", "none", "unlimited", "inf"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s)
    if not m or m[2] not in _UNITS:
        raise BudgetError(f"{what}: cannot read {value!r} as a size; write e.g. 4GiB, 512MiB, 8GB or a number of bytes")
    return int(float(m[1]) * _UNITS[m[2]])


DEFAULT_MAX_SEQ = 4096  # KV room reserved when the caller does not say (capped by the model's own limit)


def default_max_seq(max_positions: int | None) -> int:
    """The sequence length a model reserves KV cache for by default: the model's own limit, at most
    DEFAULT_MAX_SEQ (the one place this policy lives: load, the static cache, chat and serve use it)."""
    return min(max_positions or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)


def size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number readable: 4.00 GiB, 350.0 KiB."""
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class TierPlan:
    resident: tuple[int, ...]
    host: tuple[int, ...]
    disk: tuple[int, ...]
    slots: int  # staging buffers on the compute device for streamed layers
    slot_bytes: int
    fixed_bytes: int
    budget: int | None
    host_budget: int | None

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(sorted(self.host + self.disk))

    def describe(self) -> str:
        gib = 1024**3
        b = "unlimited" if self.budget is None else f"{self.budget / gib:.2f} GiB"
        return (f"device budget {b}: {len(self.resident)} layers resident, {len(self.host)} streamed from host RAM, "
                f"{len(self.disk)} from disk, {self.slots} staging slots of {self.slot_bytes / 2**20:.1f} MiB, "
                f"fixed {self.fixed_bytes / 2**20:.1f} MiB")


def spread(n: int, total: int) -> list[int]:
    """n indices spread evenly over range(total)."""
    return [i for i in range(total) if (i + 1) * n // total > i * n // total]


def split_host_disk(streamed: list[int], layer_bytes: list[int], host_budget: int | None) -> tuple[list[int], list[int]]:
    """Streamed layers cached in host RAM in order while ``host_budget`` (None = unlimited) allows;
    the rest are read from disk."""
    host, disk, used = [], [], 0
    for i in streamed:
        if host_budget is None or used + layer_bytes[i] <= host_budget:
            host.append(i)
            used += layer_bytes[i]
        else:
            disk.append(i)
    return host, disk


def plan_tiers(layer_bytes: list[int], *, fixed_bytes: int, budget: int | None, host_budget: int | None,
               max_slots: int = 4, min_slots: int = 2, preferred_slots: int = 3) -> TierPlan:
    n = len(layer_bytes)
    if budget is None or fixed_bytes + sum(layer_bytes) <= budget:
        return TierPlan(tuple(range(n)), (), (), 0, 0, fixed_bytes, budget, host_budget)
    biggest = max(layer_bytes)
    minimum = fixed_bytes + min_slots * biggest
    if budget < minimum:
        raise BudgetError(
            f"device memory budget {size(budget)} is too small: this model needs at least {size(minimum)} "
            f"({size(fixed_bytes)} fixed + {min_slots} x {size(biggest)} layer slots); raise --gpu-memory or shard "
            "with a smaller scheme")
    left = budget - fixed_bytes
    # three staging slots keep two layers in flight while one computes (prefetch depth 2);
    # a tight budget falls back to two (depth 1) rather than refusing to run
    s = max(min_slots, min(preferred_slots, max_slots, left // biggest, n))
    resident = set(spread(_fit_count(layer_bytes, left - s * biggest), n))
    host, disk = split_host_disk([i for i in range(n) if i not in resident], layer_bytes, host_budget)
    return TierPlan(tuple(sorted(resident)), tuple(host), tuple(disk), s, biggest, fixed_bytes, budget, host_budget)


def _fit_count(layer_bytes: list[int], room: int) -> int:
    k = 0
    for k in range(len(layer_bytes), -1, -1):
        if sum(layer_bytes[i] for i in spread(k, len(layer_bytes))) <= room:
            return k
    return 0



# --- several devices -----------------------------------------------------------------
@dataclass(frozen=True)
class DevicePlan:
    """One device's contiguous share of the layers and its tier plan (global layer indices)."""

    device: int
    layers: range
    plan: TierPlan


def _shift(plan: TierPlan, start: int) -> TierPlan:
    def sh(t: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(i + start for i in t)

    return TierPlan(sh(plan.resident), sh(plan.host), sh(plan.disk), plan.slots, plan.slot_bytes, plan.fixed_bytes,
                    plan.budget, plan.host_budget)


def _streamed_bytes(layer_bytes: list[int], fixed_bytes: int, budget: int | None) -> int | None:
    """Bytes a device streams per pass when it holds ``layer_bytes``; None when it cannot hold them at all."""
    if not layer_bytes:
        return 0
    try:
        p = plan_tiers(layer_bytes, fixed_bytes=fixed_bytes, budget=budget, host_budget=None)
    except BudgetError:
        return None
    return sum(layer_bytes[i] for i in p.streamed)


def partition_layers(layer_bytes: list[int], fixed_bytes: list[int], budgets: list[int | None]) -> list[range]:
    """Contiguous layer ranges, one per device, that minimise the largest number of bytes any one
    device streams per pass: each device streams its share over its own host link, in parallel,
    so a pass costs about what the busiest link moves. Binary search on that maximum; for a given
    maximum, each device takes layers greedily while its streamed bytes stay within it."""
    n, d = len(layer_bytes), len(budgets)
    if d < 1 or len(fixed_bytes) != d:
        raise BudgetError("need one budget and one fixed cost per device")

    def greedy(limit: int) -> list[range] | None:
        out, start = [], 0
        for k in range(d):
            end = start
            while end < n:
                s = _streamed_bytes(layer_bytes[start:end + 1], fixed_bytes[k], budgets[k])
                if s is None or s > limit:
                    break
                end += 1
            out.append(range(start, end))
            start = end
        return out if start == n else None

    lo, hi = 0, sum(layer_bytes)
    best = greedy(hi)
    if best is None:
        raise BudgetError(f"the devices' budgets cannot hold this model even when streaming: each device needs its fixed "
                          f"costs plus two slots of {max(layer_bytes) / 2**20:.0f} MiB; raise the budgets")
    while lo < hi:
        mid = (lo + hi) // 2
        r = greedy(mid)
        if r is None:
            lo = mid + 1
        else:
            hi, best = mid, r
    return best


def plan_devices(layer_bytes: list[int], *, fixed_bytes: list[int], budgets: list[int | None],
                 host_budget: int | None, max_slots: int = 4) -> list[DevicePlan]:
    """Partition the layers over devices (see :func:`partition_layers`) and plan each share's tiers.
    The host RAM budget is shared in layer order."""
    plans, host_left = [], host_budget
    for k, r in enumerate(partition_layers(layer_bytes, fixed_bytes, budgets)):
        share = layer_bytes[r.start:r.stop]
        if not share:
            plans.append(DevicePlan(k, r, TierPlan((), (), (), 0, 0, fixed_bytes[k], budgets[k], host_left)))
            continue
        p = plan_tiers(share, fixed_bytes=fixed_bytes[k], budget=budgets[k], host_budget=host_left, max_slots=max_slots)
        if host_left is not None:
            host_left -= sum(share[i] for i in p.host)
        plans.append(DevicePlan(k, r, _shift(p, r.start)))
    return plans
