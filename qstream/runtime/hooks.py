"""The mechanism that makes a Hugging Face model stream: bindings of stored
tensors to modules, and forward hooks that acquire a streamed layer from the
pipeline just before it runs and release it right after. Everything installed
here is removed again by :meth:`StreamHooks.remove` (undoable wrapping, as in
accelerate's hooks)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..store.manifest import FileEntry
from ..store.tensors import MAIN, stored_keys
from .qlinear import QLinear


def set_param(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    """Point a module's parameter at ``tensor`` without copying (the one place that does so)."""
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


@dataclass(frozen=True)
class Binding:
    """Where each tensor of one shard file goes: QLinears get their packed tensors (and
    bias), other parameters are pointed at their tensor."""

    qlinears: tuple  # (QLinear, {suffix: key}, bias key | None)
    params: tuple  # (module, attr, key)

    @staticmethod
    def of(hf: nn.Module, entry: FileEntry) -> "Binding":
        qls, params = [], []
        for name, meta in entry.tensors.items():
            path, attr = name.rsplit(".", 1)
            mod = hf.get_submodule(path)
            if isinstance(mod, QLinear):
                if attr == "weight":
                    qls.append((mod, stored_keys(meta), f"{path}.bias" if mod.has_bias else None))
                # biases are passed with their weight
            else:
                params.append((mod, attr, meta["stored"][MAIN]))
        return Binding(tuple(qls), tuple(params))

    def apply(self, tensors: dict[str, torch.Tensor], *, resident: bool = False) -> None:
        """``resident``: the tensors stay bound for good, so each QLinear may convert them once into
        its scheme's run-time form (QLinear.settle). Streamed tensors are left as they are: a CUDA
        graph captured on a staging slot must read the slot itself on every replay."""
        for q, keys, bias_key in self.qlinears:
            q.bind({suffix: tensors[key] for suffix, key in keys.items()}, tensors[bias_key] if bias_key else None)
            if resident:
                q.settle()
        for module, attr, key in self.params:
            set_param(module, attr, tensors[key])


class StreamHooks:
    """Forward hooks on the decoder layers: bind streamed layers before they run and
    release their staging slot after; time every layer when profiling."""

    def __init__(self, layers: nn.ModuleList, streamed: set[int], bindings: dict[int, Binding], pipeline, stats, *,
                 device: torch.device, profile: bool):
        self.layers, self.streamed, self.bindings, self.pipeline, self.stats = layers, streamed, bindings, pipeline, stats
        self.device, self.profile = device, profile
        self.manual = False  # layer-major mode drives acquire/release itself
        # runs of resident layers timed as one (start -> last layer): with CUDA graphs a run is
        # one replay, and per-layer events would cost more than the run's compute
        self.runs: dict[int, int] = {}
        self._handles: list = []
        self._t_layer: dict[int, object] = {}
        self.install()

    def install(self) -> None:
        ends = {e: s for s, e in self.runs.items()}
        for i, layer in enumerate(self.layers):
            streamed = i in self.streamed
            if not (streamed or self.profile):
                continue
            pre, post = (i, i) if streamed or not self.runs else (None, None)
            if not streamed and i in self.runs:
                pre, post = i, (i if self.runs[i] == i else None)
            elif not streamed and i in ends:
                post = ends[i]  # stops the timer its run's first layer started
            if pre is not None:
                self._handles.append(layer.register_forward_pre_hook(self._pre(pre, streamed)))
            if post is not None:
                self._handles.append(layer.register_forward_hook(self._post(post, streamed)))

    def set_runs(self, runs: dict[int, int]) -> None:
        self.remove()
        self.runs = dict(runs)
        self.install()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def acquire(self, i: int) -> None:
        self.bindings[i].apply(self.pipeline.acquire(i))

    def release(self, i: int) -> None:
        self.pipeline.release(i)
        self.stats.layer_visits += 1

    def _pre(self, i: int, streamed: bool):
        def pre(module, args):
            if streamed and not self.manual:
                self.acquire(i)
            self._timer_start(i)
        return pre

    def _post(self, i: int, streamed: bool):
        def post(module, args, output):
            self._timer_stop(i)
            if streamed and not self.manual:
                self.release(i)
        return post

    def _timer_start(self, i: int) -> None:
        if self.profile:
            self._t_layer[i] = self.stats.timed("compute_s") if self.device.type == "cuda" else time.perf_counter()

    def _timer_stop(self, i: int) -> None:
        if not self.profile or i not in self._t_layer:
            return
        start = self._t_layer.pop(i)
        if self.device.type == "cuda":
            start()
        else:
            self.stats.compute_s += time.perf_counter() - start
