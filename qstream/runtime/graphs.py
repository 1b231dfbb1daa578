"""CUDA graphs for single-token decode steps, one graph per decoder layer (gpt-fast's
idea, applied layer by layer so that streamed layers keep their pipeline).

Why per layer: a decode step of an 8B model is ~1000 small kernels; launched one by one
from Python the step is bound by launch overhead (~30 ms), replayed as graphs it is a
few dozen launches. Whole-step graphs would have to contain the pipeline's cross-stream
waits on copies that are issued at run time; per-layer graphs leave those waits where
they are: the stream hook acquires a streamed layer (the compute stream waits on the
event of its copy) *before* the layer's graph is replayed on that stream, and releases
it after, so a graph never reads a staging slot before its copy finished.

A graph bakes in addresses. What makes them fixed:
- the KV cache is static (allocated once, written in place) and owned by the model;
- every layer graph reads its input from one static hidden-state buffer and writes its
  output back into it, so nothing allocated inside a graph outlives its replay (all
  graphs can share one memory pool);
- the other per-step inputs (mask, rotary cos/sin, positions) are copied once per step
  into static buffers;
- a streamed layer's tensors live in the staging slot the pipeline put it in: its graph
  is keyed by (layer, slot), and each key is captured once.

Consecutive resident layers form one segment and share one graph (captured at the first
layer of the run, replayed there; the other layers of the run then return the buffer at
once): an all-resident 8B step is one replay instead of 32, and Python runs no layer code.

Anything that does not fit (another batch size, a new kwargs layout, a failed capture)
runs eagerly and ``reason`` says why.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
from torch import nn

from .qlinear import QLinear

log = logging.getLogger(__name__)


def _flat(v: Any) -> list[torch.Tensor] | None:
    """The tensors of a layer input (a tensor or a tuple of tensors), or None for other values."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return list(v)
    return None


def _sig(v: Any):
    ts = _flat(v)
    if ts is not None:
        return tuple((tuple(t.shape), t.dtype) for t in ts)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return ("obj", id(v))  # e.g. the cache object: graphs are only valid for the one they were captured with


class LayerGraphs:
    """Replays decoder layers as CUDA graphs while ``active`` is a static cache object and
    the call is a single-token step on it; any other call runs the layer's own forward."""

    def __init__(self, layers: nn.ModuleList, *, streamed: set[int], slot_of: Callable[[int], int] | None,
                 device: torch.device):
        self.layers, self.streamed, self.slot_of, self.device = layers, streamed, slot_of, device
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple] = {}  # extra (non-hidden) outputs of tuple-returning layers
        self.pool = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.active = None  # the cache object whose decode steps are graphed (set by the model)
        self.enabled = True  # False: every call runs eagerly (the model's warm-up step)
        self.capture_ok = True  # False: replay what exists, capture nothing new (eager for the rest)
        self.reason: str | None = None  # why graphs are off, when they are
        self.hidden: torch.Tensor | None = None  # [B, 1, H] static in/out of every layer graph
        self.static: dict[str, list[torch.Tensor]] = {}  # kwarg name -> static tensors
        self.sig = None  # kwargs layout the graphs were captured for
        self.step = 0  # bumped by the model once per decode step
        self._copied: dict[str, tuple[int, Any]] = {}  # name -> (step, source object) copied this step
        self.captures = 0
        self.replays = 0
        self.layer_replays = 0  # layer forwards served by replays
        self._done = (-1, -1)  # (step, last layer) a segment replay has covered
        # runs of consecutive resident layers: start -> last layer; member -> start
        self.seg_end: dict[int, int] = {}
        self.seg_of: dict[int, int] = {}
        start = None
        for i in range(len(layers) + 1):
            resident = i < len(layers) and i not in streamed
            if resident and start is None:
                start = i
            elif not resident and start is not None:
                self.seg_end[start] = i - 1
                for j in range(start + 1, i):
                    self.seg_of[j] = start
                start = None
        self._orig: dict[int, Callable] = {}
        for i, layer in enumerate(layers):
            self._orig[i] = layer.forward
            layer.forward = self._wrap(i)

    def remove(self) -> None:
        for i, layer in enumerate(self.layers):
            if "forward" in layer.__dict__:
                del layer.forward
        self.reset()

    def reset(self) -> None:
        """Drop every graph (their addresses refer to a cache that is going away)."""
        self.graphs.clear()
        self.outputs.clear()
        self.static.clear()
        self._copied.clear()
        self._done = (-1, -1)
        self.hidden = None
        self.sig = None
        self.pool = None
        self.active = None

    def disable(self, reason: str) -> None:
        if self.reason is None:
            log.info("decode graphs off: %s", reason)
        self.reason = reason
        self.capture_ok = False
        self.graphs.clear()

    # -- the wrapped forward -----------------------------------------------------------
    def _wrap(self, i: int):
        orig = self._orig[i]

        def forward(hidden_states, *args, **kwargs):
            if self.active is None or not self.enabled or args or hidden_states.shape[1] != 1 or not self._for_active(kwargs):
                return orig(hidden_states, *args, **kwargs)
            return self._run(i, orig, hidden_states, kwargs)
        return forward

    def _for_active(self, kwargs: dict) -> bool:
        c = kwargs.get("cache", kwargs.get("past_key_values"))
        return c is self.active

    def _run(self, i: int, orig: Callable, hidden: torch.Tensor, kwargs: dict):
        if i in self.seg_of:
            step, last = self._done
            if step == self.step and last >= i and hidden is self.hidden:
                extra = self.outputs.get((self.seg_of[i], -1))
                return self.hidden if extra is None else (self.hidden, *extra)  # the segment's graph ran this layer
            return orig(hidden, **kwargs)  # its segment ran eagerly
        key = (i, self.slot_of(i) if i in self.streamed else -1)
        g = self.graphs.get(key)
        if g is None and not self.capture_ok:
            return orig(hidden, **kwargs)
        sig = tuple((k, _sig(v)) for k, v in kwargs.items()) + (("hidden", tuple(hidden.shape), hidden.dtype),)
        if self.sig is None:
            self._make_static(hidden, kwargs, sig)
        elif sig != self.sig:
            self.disable(f"layer {i} got inputs of another layout than the captured graphs ({len(sig)} kwargs)")
            return orig(hidden, **kwargs)
        try:
            self._load(hidden, kwargs)
        except _PerLayerInputs as e:
            self.disable(str(e))
            return orig(hidden, **kwargs)
        if g is None:
            g = self._capture(i, key, orig, kwargs)
            if g is None:
                return orig(hidden, **kwargs)
        g.replay()
        last = self.seg_end.get(i, i)
        self._done = (self.step, last)
        self.replays += 1
        self.layer_replays += last - i + 1
        extra = self.outputs.get(key)
        return self.hidden if extra is None else (self.hidden, *extra)

    def _make_static(self, hidden: torch.Tensor, kwargs: dict, sig) -> None:
        self.sig = sig
        self.hidden = hidden.clone()
        self.static = {k: [t.clone() for t in ts] for k, v in kwargs.items() if (ts := _flat(v)) is not None}

    def _load(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """Copy this step's inputs into the static buffers: the hidden state unless it is the
        buffer itself (the previous layer's graph output), the rest once per step."""
        if hidden is not self.hidden:
            self.hidden.copy_(hidden)
        for k, dst in self.static.items():
            src = kwargs[k]
            seen = self._copied.get(k)
            if seen is not None and seen[0] == self.step:
                if seen[1] is not src:
                    # per-layer inputs (e.g. sliding-window masks): one static set cannot serve them
                    raise _PerLayerInputs(k)
                continue
            for d, s in zip(dst, _flat(src)):
                if d is not s:
                    d.copy_(s)
            self._copied[k] = (self.step, src)

    def _static_kwargs(self, kwargs: dict) -> dict:
        out = dict(kwargs)
        for k, ts in self.static.items():
            out[k] = ts[0] if isinstance(kwargs[k], torch.Tensor) else type(kwargs[k])(ts)
        return out

    def _capture(self, i: int, key, orig: Callable, kwargs: dict):
        """Capture layer i's forward on the static buffers. Capturing does not run it."""
        kw = self._static_kwargs(kwargs)
        run = range(i, self.seg_end.get(i, i) + 1)  # the layers this graph covers

        def body():
            h = self.hidden
            for j in run:
                out = self._orig[j](h, **kw)
                h = out[0] if isinstance(out, tuple) else out
            self.hidden.copy_(h)
            return out

        try:
            with untimed([self.layers[j] for j in run]):
                g, out = self._record(body)
        except RuntimeError as e:  # a layer that cannot be captured: say so, run eagerly from now on
            self.disable(f"capturing layer {i} failed: {str(e).splitlines()[0]}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return None
        if isinstance(out, tuple):
            self.outputs[key] = tuple(out[1:])
        self.graphs[key] = g
        self.captures += 1
        return g

    def _record(self, body: Callable):
        g, out = record_graph(body, self.stream, self.device, self.pool)
        if self.pool is None:
            self.pool = g.pool()
        return g, out

    def covered(self) -> set[int]:
        """The layers some captured graph runs."""
        return {j for (i, _) in self.graphs for j in range(i, self.seg_end.get(i, i) + 1)}

    def describe(self) -> str:
        if self.reason:
            return f"eager decode ({self.reason})"
        return (f"CUDA-graph decode: {len(self.graphs)} graphs covering {len(self.covered())} of {len(self.layers)} layers "
                f"({len(self.seg_end)} resident runs, {len(self.streamed)} streamed layers x their slots), "
                f"{self.replays} replays so far")


@contextlib.contextmanager
def untimed(layers):
    """The layers' QLinear timing off while a graph is captured: timing events cannot live inside one."""
    qls = [m for layer in layers for m in layer.modules() if isinstance(m, QLinear)]
    saved = [q.stats for q in qls]
    for q in qls:
        q.stats = None
    try:
        yield
    finally:
        for q, st in zip(qls, saved):
            q.stats = st


def record_graph(body: Callable, stream: torch.cuda.Stream, device: torch.device, pool=None):
    """A CUDA graph of ``body`` (captured on the side ``stream``, into ``pool``) and what ``body``
    returned while being captured (capturing does not run it)."""
    g = torch.cuda.CUDAGraph()
    cur = torch.cuda.current_stream(device)
    stream.wait_stream(cur)
    with torch.cuda.stream(stream):
        # thread_local: the disk reader thread may sync on events while this thread captures
        g.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = body()
        finally:
            g.capture_end()
    cur.wait_stream(stream)
    return g, out


class _PerLayerInputs(RuntimeError):
    def __init__(self, name: str):
        super().__init__(f"layers get different {name!r} tensors within one step")
