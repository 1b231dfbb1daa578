"""Where the time went: seconds and bytes of a run, with CUDA timing events taken
from a pool (creating events in the hot loop costs more than what they measure)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

EVENT_POOL = 4096  # events made at once; when they run out, pending pairs are resolved (one sync)


class EventPool:
    """Timing events made once and reused: creating CUDA events in the hot loop costs more
    than what they measure. When the pool runs out, pending pairs are resolved (one sync)."""

    def __init__(self, n: int = EVENT_POOL):
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        self.i = 0

    def take(self) -> torch.cuda.Event:
        e = self.events[self.i]
        self.i += 1
        return e


@dataclass
class Stats:
    """Where the time went. Seconds are sums over the run; stall is compute waiting for data."""

    read_s: float = 0.0
    copy_s: float = 0.0
    dequant_s: float = 0.0
    compute_s: float = 0.0
    stall_s: float = 0.0
    bytes_read: int = 0  # from disk
    bytes_copied: int = 0  # host -> device
    bytes_streamed: int = 0  # bytes of streamed layers consumed by compute
    forwards: int = 0
    layer_visits: int = 0
    _pending: list = field(default_factory=list, repr=False)  # (kind, start_event, end_event)
    _pool: EventPool | None = field(default=None, repr=False)

    def event(self) -> torch.cuda.Event:
        """A recorded-later timing event from the pool (resolving pending pairs when it runs dry)."""
        if self._pool is None or self._pool.i >= len(self._pool.events):
            self.resolve()
            # a fresh pool: events of timers still open belong to the old one and stay valid
            self._pool = EventPool()
        return self._pool.take()

    def timed(self, kind: str, stream=None):
        """Record a start event now; returns a function that records the end event."""
        a = self.event()
        a.record(stream) if stream is not None else a.record()

        def done() -> None:
            b = self.event()
            b.record(stream) if stream is not None else b.record()
            self._pending.append((kind, a, b))
        return done

    def resolve(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            for kind, a, b in self._pending:
                b.synchronize()  # events of other devices (several GPUs): a no-op for a finished one
                setattr(self, kind, getattr(self, kind) + a.elapsed_time(b) / 1000)
            self._pending.clear()

    def as_dict(self) -> dict:
        self.resolve()
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def reset(self) -> None:
        self.resolve()
        for k, v in Stats().__dict__.items():
            if not k.startswith("_"):
                setattr(self, k, v)
