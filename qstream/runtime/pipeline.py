"""Mechanism of streaming: host cache, disk reader thread, device staging slots.

The forward pass visits streamed layers in the same order every time, so the
pipeline runs cyclically ahead of it: while layer g computes, layers g+1 .. g+S-1
(S = staging slots) are being read and copied, across the end of one forward
and into the next. ``acquire(layer)`` returns the layer's tensors on the compute
device (waiting only if they are not there yet); ``release(layer)`` hands its slot
back. Copies run on their own CUDA stream; events order them against compute,
so the host thread never waits for the GPU. Buffers are allocated once.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import torch

from ..errors import ShardError
from ..store.tensors import Header, read_into, views
from .stats import Stats

log = logging.getLogger(__name__)

class DiskReader:
    """A thread reading disk-tier layers, cyclically, into a ring of (pinned) host buffers."""

    def __init__(self, order: list[int], paths: dict[int, Path], headers: dict[int, Header], nbuf: int,
                 buf_bytes: int, *, pin: bool, stats: Stats, start_pos: int = 0, cold: bool = False,
                 checks: dict | None = None):
        self.order, self.paths, self.headers, self.stats, self.cold = order, paths, headers, stats, cold
        self.checks = checks or {}  # layer -> FileCheck: every read (first and re-reads) is hashed
        self.bufs = [torch.empty(buf_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(nbuf)]
        self.free = [threading.Semaphore(1) for _ in range(nbuf)]
        self.ready: dict[int, threading.Event] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.stop = False
        self.pos = start_pos
        self.copy_done: list = [None] * nbuf  # CUDA events the reader waits on before reusing a buffer
        self.thread = threading.Thread(target=self._run, name="qstream-reader", daemon=True)
        self.thread.start()

    def _event(self, g: int) -> threading.Event:
        with self.lock:
            return self.ready.setdefault(g, threading.Event())

    def _run(self) -> None:
        g = self.pos
        try:
            while not self.stop:
                k = g % len(self.bufs)
                self.free[k].acquire()
                if self.stop:
                    return
                if self.copy_done[k] is not None:
                    self.copy_done[k].synchronize()  # the H2D copy out of this buffer has finished
                layer = self.order[g % len(self.order)]
                t = time.perf_counter()
                if layer in self.checks:
                    self.checks[layer].read_into(self.headers[layer], self.bufs[k], cold=self.cold)
                else:
                    read_into(self.paths[layer], self.headers[layer], self.bufs[k], cold=self.cold)
                self.stats.read_s += time.perf_counter() - t
                self.stats.bytes_read += self.headers[layer].data_size
                self._event(g).set()
                g += 1
        except BaseException as e:  # handed to the consumer, which raises it
            self.error = e
            with self.lock:
                for ev in self.ready.values():
                    ev.set()
            self._event(g).set()

    def get(self, g: int) -> torch.Tensor:
        """Buffer holding global item g; blocks until read. Raises the reader's error, never hangs."""
        ev = self._event(g)
        while not ev.wait(timeout=1.0):
            if not self.thread.is_alive() and self.error is None:
                raise ShardError("the shard reader thread stopped unexpectedly")
        if self.error is not None:
            raise self.error if isinstance(self.error, ShardError) else ShardError(f"reading shards failed: {self.error}")
        with self.lock:
            self.ready.pop(g, None)
        return self.bufs[g % len(self.bufs)]

    def put(self, g: int, copy_event=None) -> None:
        k = g % len(self.bufs)
        self.copy_done[k] = copy_event
        self.free[k].release()

    def close(self) -> None:
        self.stop = True
        for s in self.free:
            s.release()
        self.thread.join(timeout=5)


class Pipeline:
    """Streams the non-resident layers of one model. See the module docstring."""

    def __init__(self, *, device: torch.device, streamed: list[int], host_layers: dict[int, torch.Tensor],
                 disk_layers: list[int], paths: dict[int, Path], headers: dict[int, Header], slots: int,
                 slot_bytes: int, stats: Stats, profile: bool, cold: bool = False, checks: dict | None = None):
        self.device, self.order, self.headers, self.stats, self.profile = device, streamed, headers, stats, profile
        self.pos = {layer: i for i, layer in enumerate(streamed)}
        self.host = host_layers  # layer -> CPU uint8 buffer (pinned on CUDA)
        self.disk = set(disk_layers)
        self.paths = paths
        self.cuda = device.type == "cuda"
        self.nslots = slots
        disk_order = [l for l in streamed if l in self.disk]
        self._disk_pos = {layer: i for i, layer in enumerate(disk_order)}
        self.reader = None
        if disk_order:
            self.reader = DiskReader(disk_order, paths, headers, max(2, slots), slot_bytes, pin=self.cuda, stats=stats,
                                     cold=cold, checks=checks)
        self.disk_cycle = len(disk_order)
        if self.cuda:
            self.slot_bufs = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
            self.copy_stream = torch.cuda.Stream(device)
            # one reusable event per slot and direction: recording again after a wait was queued is safe
            self.copy_done = [torch.cuda.Event() for _ in range(slots)]
            self.free_ev = [torch.cuda.Event() for _ in range(slots)]
            self.slot_free = [None] * slots
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.issued = 0  # global index of the next item to load
        self.consumed = 0  # global index of the item compute needs next
        self._held: dict[int, tuple[int, object]] = {}
        # several devices: issue the copy into a slot when the slot is released rather than at the
        # next acquire, so this device's link keeps moving while other devices compute (disk
        # layers wait for the next acquire: fetching them would block the host thread)
        self.issue_on_release = False
        # tests only: spin the copy stream this many GPU cycles before each copy, so that a
        # consumer that does not wait for the copy reads stale data and fails
        self.copy_delay_cycles = 0

    # global index g -> (layer, disk global index)
    def _layer(self, g: int) -> int:
        return self.order[g % len(self.order)]

    def _disk_index(self, g: int) -> int:
        cycle, i = divmod(g, len(self.order))
        return cycle * self.disk_cycle + self._disk_pos[self.order[i]]

    def _issue(self, g: int) -> None:
        """Start loading global item g into slot g % nslots (CUDA) or make it ready (CPU)."""
        layer = self._layer(g)
        n = self.headers[layer].data_size
        if not self.cuda:
            return  # CPU: host-tier layers are used in place; disk layers come from the reader ring
        k = g % self.nslots
        s = self.copy_stream
        if self.slot_free[k] is not None:
            s.wait_event(self.slot_free[k])
        if layer in self.disk:
            src = self.reader.get(self._disk_index(g))
        else:
            src = self.host[layer]
        with torch.cuda.stream(s):
            if self.copy_delay_cycles:
                torch.cuda._sleep(self.copy_delay_cycles)
            done = self.stats.timed("copy_s", s) if self.profile else None
            self.slot_bufs[k][:n].copy_(src[:n], non_blocking=True)
            if done:
                done()
            self.copy_done[k].record(s)
        self.stats.bytes_copied += n
        if layer in self.disk:
            ev = torch.cuda.Event()
            ev.record(s)
            self.reader.put(self._disk_index(g), ev)

    def _sync_to(self, layer: int) -> None:
        """Compute asked for a layer out of the cyclic order (an interrupted forward): restart there."""
        if self.cuda:
            self.copy_stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        # drain reader items issued but never consumed
        if self.reader is not None:
            self.reader.close()
        cycle = self.consumed // len(self.order) + 1
        g = cycle * len(self.order) + self.pos[layer]
        self.issued = self.consumed = g
        if self.cuda:
            self.slot_free = [None] * self.nslots
        if self.reader is not None:
            r = self.reader
            self.reader = DiskReader(r.order, r.paths, r.headers, len(r.bufs), r.bufs[0].numel(), pin=self.cuda,
                                     stats=self.stats, start_pos=self._disk_index(g), cold=r.cold, checks=r.checks)
            del r

    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        if self._layer(self.consumed) != layer:
            log.debug("pipeline resync at layer %d", layer)
            self._sync_to(layer)
        g = self.consumed
        # keep nslots items in flight (CPU: the reader thread runs ahead on its own)
        ahead = self.nslots if self.cuda else 1
        while self.issued < g + ahead:
            self._issue(self.issued)
            self.issued += 1
        hdr = self.headers[layer]
        if self.cuda:
            k = g % self.nslots
            cur = torch.cuda.current_stream(self.device)
            done = self.stats.timed("stall_s", cur) if self.profile else None
            cur.wait_event(self.copy_done[k])
            if done:
                done()
            key = (layer, k)
            if key not in self._views:
                self._views[key] = views(self.slot_bufs[k], hdr)
            v = self._views[key]
            self._held[layer] = (g, None)
        else:
            if layer in self.disk:
                t = time.perf_counter()
                d = self._disk_index(g)
                buf = self.reader.get(d)
                self.stats.stall_s += time.perf_counter() - t
                v = views(buf, hdr)
                self._held[layer] = (g, d)
            else:
                key = (layer, -1)
                if key not in self._views:
                    self._views[key] = views(self.host[layer], hdr)
                v = self._views[key]
                self._held[layer] = (g, None)
        self.stats.bytes_streamed += hdr.data_size
        self.consumed = g + 1
        return v

    def cycle_steps(self) -> int:
        """Passes after which every streamed layer has been in every staging slot (CUDA graphs are
        captured per (layer, slot))."""
        n = len(self.order)
        return math.lcm(n, self.nslots) // n if self.cuda else 1

    def slot_of(self, layer: int) -> int:
        """The staging slot an acquired layer is in (CUDA): its tensors' addresses, which a
        CUDA graph of the layer bakes in."""
        return self._held[layer][0] % self.nslots

    def release(self, layer: int) -> None:
        g, d = self._held.pop(layer)
        if self.cuda:
            k = g % self.nslots
            self.free_ev[k].record(torch.cuda.current_stream(self.device))
            self.slot_free[k] = self.free_ev[k]
            nxt = g + self.nslots  # the item that lands in this slot next
            if self.issue_on_release and self.issued == nxt and self._layer(nxt) not in self.disk:
                self._issue(nxt)
                self.issued += 1
        elif d is not None:
            self.reader.put(d)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
