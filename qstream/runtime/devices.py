"""Several devices of one host, one process: each device holds a contiguous share of the
decoder layers and streams the non-resident part of its share over its own host link.

Why: a streamed model's bytes per token are bounded by one GPU's host link. With D GPUs each
streams about 1/D of those bytes, in parallel, and their resident capacities add up.

How (each piece reuses the single-device mechanism):
- the tier plan partitions the layers by each device's budget (plan.py ``plan_devices``);
- every device with streamed layers has its own :class:`Pipeline` (staging slots, copy stream,
  disk reader, its share of the host cache); :class:`DevicePipelines` sends each acquire and
  release to the pipeline of the layer's device, so StreamHooks work unchanged. Each pipeline
  issues the copy into a slot as soon as the slot is released (``issue_on_release``): the next
  token's layers then cross this device's link while the other devices compute;
- :class:`HandOver` pre-hooks on the layers move the hidden state and the per-step tensors
  (mask, rotary cos/sin, positions) to the layer's device when a range begins (torch peer
  copies, ordered against both devices' streams by torch), and make that device current so
  CUDA graphs and timing events land on it;
- the KV cache of a layer lives on its device (transformers allocates cache layers lazily
  where their keys are); embeddings and the model's own buffers stay on the first device, the
  final norm and the head sit on the device of the last layer;
- CUDA graphs: one :class:`LayerGraphs` per device range (:class:`DeviceGraphs`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..dtypes import DTYPES
from ..errors import BudgetError, QstreamError
from ..store.check import check_tokenizer_files, checked_header, manifest_problems, raise_first
from ..store.inspect import require_verified
from ..store.integrity import file_check
from ..store.manifest import read_manifest
from ..store.tensors import read_file
from . import build  # build.load() imports this module only when devices are given: no cycle at import time
from .fused_norm import fused_norms
from .graphs import LayerGraphs
from .hooks import Binding
from .model import StreamedModel
from .pipeline import Pipeline
from .plan import DevicePlan, TierPlan, default_max_seq, parse_bytes, partition_layers, plan_devices, size

log = logging.getLogger(__name__)


# -- arguments ---------------------------------------------------------------------------
def parse_devices(devices: str | list | tuple, *, allow_repeat: bool = False) -> list[torch.device]:
    """'cuda:0,cuda:1' or a list -> devices. One type for all; a CUDA device at most once (two
    shares on one GPU would share its link: nothing to gain) unless ``allow_repeat`` (a
    diagnostic: the whole multi-device path, peer hand-over aside, on a machine with one GPU).
    CPU may repeat (tests exercise the per-range machinery with ["cpu", "cpu"])."""
    items = [s.strip() for s in devices.split(",")] if isinstance(devices, str) else [str(d).strip() for d in devices]
    if not items or any(not s for s in items):
        raise QstreamError(f"--devices {devices!r}: give a comma-separated list such as cuda:0,cuda:1")
    out = []
    for s in items:
        try:
            d = torch.device(s)
        except RuntimeError:
            raise QstreamError(f"--devices: unknown device {s!r}; use cuda:N or cpu") from None
        if d.type not in ("cuda", "cpu"):
            raise QstreamError(f"--devices: unsupported device {s!r}; use cuda:N or cpu")
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise QstreamError(f"--devices: {s} requested but CUDA is not available")
            d = torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())
            if d.index >= torch.cuda.device_count():
                raise QstreamError(f"--devices: {s} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
        out.append(d)
    if len({d.type for d in out}) > 1:
        raise QstreamError(f"--devices {devices!r} mixes CPU and CUDA; give CUDA devices only (or CPU only)")
    cuda = [d for d in out if d.type == "cuda"]
    if len(set(cuda)) != len(cuda) and not allow_repeat:
        raise QstreamError(f"--devices {devices!r} names a GPU twice; each GPU takes one share of the layers")
    return out


def parse_budgets(gpu_memory, n: int) -> list:
    """One budget for every device, or one per device ('4GiB,8GiB' or a list)."""
    if isinstance(gpu_memory, str) and "," in gpu_memory:
        gpu_memory = [s.strip() for s in gpu_memory.split(",")]
    if isinstance(gpu_memory, (list, tuple)):
        if len(gpu_memory) != n:
            raise BudgetError(f"gpu_memory: {len(gpu_memory)} budgets for {n} devices; give one, or one per device")
        return list(gpu_memory)
    return [gpu_memory] * n


# -- the plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MultiPlan(TierPlan):
    """The union of the devices' tier plans (what single-device code reads: resident, host,
    disk, streamed) and the per-device plans."""

    parts: tuple = ()  # DevicePlan per device
    devices: tuple = ()  # torch.device per part

    def describe(self) -> str:
        return "; ".join(f"{d} layers {p.layers.start}-{p.layers.stop - 1}: {p.plan.describe()}" if len(p.layers)
                         else f"{d}: no layers" for d, p in zip(self.devices, self.parts))


def plan_shares(layer_bytes: list[int], *, base_fixed: int, head_bytes: int, kv_bytes: int, budgets: list,
                host_budget: int | None, max_slots: int) -> list[DevicePlan]:
    """Per-device plans. A device's fixed cost is the shared part (workspace, activations), its
    share of the KV cache, and the head on the last device; the KV share depends on the
    partition, so partition with an estimate and repeat with the larger of the estimate and
    the outcome until it holds (a few rounds: shares only grow)."""
    n, d = len(layer_bytes), len(budgets)
    kv_layer = -(-kv_bytes // n)
    counts = [n // d + (k < n % d) for k in range(d)]  # first estimate: an even split

    def fixed(cs):
        return [base_fixed + kv_layer * c + (head_bytes if k == d - 1 else 0) for k, c in enumerate(cs)]

    if all(b is None for b in budgets):
        # nothing streams anywhere: split evenly so that the devices' memories add up
        starts = [sum(counts[:k]) for k in range(d + 1)]
        ranges = [range(starts[k], starts[k + 1]) for k in range(d)]
        return [DevicePlan(k, r, TierPlan(tuple(r), (), (), 0, 0, fixed(counts)[k], None, host_budget))
                for k, r in enumerate(ranges)]
    for _ in range(d + 2):
        got = [len(r) for r in partition_layers(layer_bytes, fixed(counts), budgets)]
        if all(g <= c for g, c in zip(got, counts)):
            break
        counts = [max(g, c) for g, c in zip(got, counts)]
    else:
        raise BudgetError("cannot place the KV cache next to the layers on these budgets; raise --gpu-memory")
    plans = plan_devices(layer_bytes, fixed_bytes=fixed(counts), budgets=budgets, host_budget=host_budget,
                         max_slots=max_slots)
    last = plans[-1]
    # a device with layers was checked by its tier plan; the last one holds the head even without layers
    if not len(last.layers) and budgets[-1] is not None and base_fixed + head_bytes > budgets[-1]:
        raise BudgetError(f"the last device's budget {size(budgets[-1])} cannot hold the head and working memory "
                          f"({size(base_fixed + head_bytes)}); raise its budget (--gpu-memory A,B gives one per device)")
    return plans


def merge_plans(parts: list[DevicePlan], devices: list[torch.device]) -> MultiPlan:
    def cat(attr):
        return tuple(sorted(i for p in parts for i in getattr(p.plan, attr)))

    live = [p.plan for p in parts if len(p.layers)]
    budgets = [p.plan.budget for p in parts]
    return MultiPlan(cat("resident"), cat("host"), cat("disk"), max((p.slots for p in live), default=0),
                     max((p.slot_bytes for p in live), default=0), max(p.fixed_bytes for p in live),
                     None if None in budgets else sum(budgets), live[0].host_budget, tuple(parts), tuple(devices))


# -- streaming -----------------------------------------------------------------------------
class DevicePipelines:
    """The Pipeline interface over one pipeline per device: each layer goes to its device's."""

    def __init__(self, pipelines: dict[int, Pipeline]):
        self.by_layer = pipelines  # layer -> its device's pipeline
        self.parts = list({id(p): p for p in pipelines.values()}.values())

    @property
    def profile(self) -> bool:
        return self.parts[0].profile

    @profile.setter
    def profile(self, on: bool) -> None:
        for p in self.parts:
            p.profile = on

    @property
    def copy_delay_cycles(self) -> int:
        return self.parts[0].copy_delay_cycles

    @copy_delay_cycles.setter
    def copy_delay_cycles(self, n: int) -> None:  # tests only, see Pipeline
        for p in self.parts:
            p.copy_delay_cycles = n

    def cycle_steps(self) -> int:
        return max(p.cycle_steps() for p in self.parts)

    def acquire(self, layer: int) -> dict[str, torch.Tensor]:
        return self.by_layer[layer].acquire(layer)

    def release(self, layer: int) -> None:
        self.by_layer[layer].release(layer)

    def slot_of(self, layer: int) -> int:
        return self.by_layer[layer].slot_of(layer)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def move(v: Any, dev: torch.device) -> Any:
    """A layer input on ``dev``: tensors (also inside tuples and lists) copied there, anything else as is."""
    if isinstance(v, torch.Tensor):
        return v if v.device == dev else v.to(dev, non_blocking=True)
    if isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v):
        moved = [move(t, dev) for t in v]
        return v if all(a is b for a, b in zip(moved, v)) else type(v)(moved)  # the same object when nothing moved
    return v


class HandOver:
    """Forward pre-hooks that give every layer of a range its inputs on the range's device.
    The model passes the same mask / rotary / position objects to every layer of a pass, so
    each is copied once per range and pass (memo by identity, reset at the range's first
    layer); the same moved objects reaching every layer also lets the range's CUDA graphs
    copy them into their static buffers once per step."""

    def __init__(self, layers: nn.ModuleList, ranges: list[range], devices: list[torch.device],
                 tail: tuple[nn.Module, ...] = (), tail_device: torch.device | None = None):
        """``tail``: the modules after the layers (final norm, head), which live on ``tail_device``
        (the last device, also when the layers all fit on earlier ones)."""
        self._handles = []
        for r, dev in zip(ranges, devices):
            memo: dict[int, tuple[Any, Any]] = {}
            # the first device's range gets its inputs from the model's own code, on that device:
            # only its first layer needs a hook (to make the device current), not a per-layer check
            home = r.start == 0 and dev == devices[0]
            for i in (r[:1] if home else r):
                h = layers[i].register_forward_pre_hook(self._hook(dev, memo, first=i == r.start), with_kwargs=True,
                                                        prepend=True)
                self._handles.append(h)
        for k, mod in enumerate(tail):
            self._handles.append(mod.register_forward_pre_hook(self._hook(tail_device, {}, first=k == 0), with_kwargs=True,
                                                               prepend=True))

    @staticmethod
    def _hook(dev: torch.device, memo: dict, *, first: bool):
        def pre(module, args, kwargs):
            if first:
                memo.clear()
                if dev.type == "cuda":
                    torch.cuda.set_device(dev)  # graphs replay and timers record on this device's streams
            args = tuple(move(a, dev) for a in args)
            out = {}
            for k, v in kwargs.items():
                hit = memo.get(id(v))
                if hit is not None and hit[0] is v:
                    out[k] = hit[1]
                else:
                    out[k] = move(v, dev)
                    memo[id(v)] = (v, out[k])  # keeps v alive: its id stays unique within the pass
            return args, out
        return pre

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# -- CUDA graphs -----------------------------------------------------------------------------
class DeviceGraphs:
    """What StreamedModel uses of LayerGraphs, over one LayerGraphs per device range (a graph,
    its static buffers and memory pool belong to one device). Layer indices in and out are global."""

    def __init__(self, layers: nn.ModuleList, ranges: list[range], devices: list[torch.device], streamed: set[int],
                 slot_of: Callable[[int], int] | None):
        self.parts: list[tuple[int, LayerGraphs]] = []
        for r, dev in zip(ranges, devices):
            if not len(r):
                continue
            local = {i - r.start for i in streamed if i in r}
            s = r.start
            self.parts.append((s, LayerGraphs([layers[i] for i in r], streamed=local, device=dev,
                                              slot_of=None if slot_of is None else (lambda j, s=s: slot_of(j + s)))))
        self.seg_end = {a + s: b + s for s, g in self.parts for a, b in g.seg_end.items()}
        self.streamed = set(streamed)
        self.n_layers = len(layers)

    def _set(self, name: str, value) -> None:
        for _, g in self.parts:
            setattr(g, name, value)

    active = property(lambda self: self.parts[0][1].active, lambda self, v: self._set("active", v))
    enabled = property(lambda self: self.parts[0][1].enabled, lambda self, v: self._set("enabled", v))
    step = property(lambda self: self.parts[0][1].step, lambda self, v: self._set("step", v))

    @property
    def streams(self) -> list:
        return [g.stream for _, g in self.parts]

    @property
    def reason(self) -> str | None:
        return next((f"{g.device}: {g.reason}" for _, g in self.parts if g.reason), None)

    @property
    def captures(self) -> int:
        return sum(g.captures for _, g in self.parts)

    @property
    def replays(self) -> int:
        return sum(g.replays for _, g in self.parts)

    @property
    def layer_replays(self) -> int:
        return sum(g.layer_replays for _, g in self.parts)

    def covered(self) -> set[int]:
        return {j + s for s, g in self.parts for j in g.covered()}

    def reset(self) -> None:
        for _, g in self.parts:
            g.reset()

    def remove(self) -> None:
        for _, g in self.parts:
            g.remove()

    def describe(self) -> str:
        per = []
        for s, g in self.parts:
            state = f"eager ({g.reason})" if g.reason else f"{len(g.graphs)} graphs"
            per.append(f"{g.device} {state}")
        return (f"CUDA-graph decode per device ({', '.join(per)}), covering {len(self.covered())} of {self.n_layers} "
                f"layers, {self.replays} replays so far")


# -- the model ---------------------------------------------------------------------------------
class MultiDeviceModel(StreamedModel):
    """A StreamedModel whose layers are spread over several devices (see the module docstring).
    ``device`` is the first device: inputs go there; logits come back on the last one."""

    def __init__(self, manifest, hf, plan: MultiPlan, layers: nn.ModuleList, *, devices: list[torch.device],
                 ranges: list[range], tail: tuple[nn.Module, ...], **kw):
        self.devices, self.ranges = devices, ranges
        # installed before StreamedModel's warm-up runs the model
        self.handover = HandOver(layers, ranges, devices, tail, devices[-1])
        super().__init__(manifest, hf, plan, devices[0], layers=layers, **kw)

    def _make_graphs(self):
        return DeviceGraphs(self.layers, self.ranges, self.devices, set(self.plan.streamed),
                            self.pipeline.slot_of if self.pipeline is not None else None)

    def _graph_streams(self) -> list:
        return self.graphs.streams if self.graphs is not None else []

    def tier_bytes_by_device(self) -> dict[str, dict[str, int]]:
        names = [str(d) for d in self.devices]
        if len(set(names)) < len(names):  # CPU "devices" repeat: number them
            names = [f"{n}#{k}" for k, n in enumerate(names)]
        return {n: {"host": sum(self.layer_bytes[i] for i in p.plan.host),
                    "disk": sum(self.layer_bytes[i] for i in p.plan.disk)}
                for n, p in zip(names, self.plan.parts)}

    def _home(self):
        """Run with the first device current, and leave the caller's current device as it was
        (the hand-over hooks switch devices during a pass)."""
        import contextlib

        return torch.cuda.device(self.devices[0]) if self.devices[0].type == "cuda" else contextlib.nullcontext()

    def forward(self, *args, **kw):
        with self._home():
            return super().forward(*args, **kw)

    __call__ = forward

    def layer_major(self, *args, **kw):
        with self._home():
            return super().layer_major(*args, **kw)

    def warm_up(self, *args, **kw):
        with self._home():
            return super().warm_up(*args, **kw)

    def all_devices(self) -> list[torch.device]:
        return list(self.devices)

    def close(self) -> None:
        self.handover.remove()
        super().close()



def tail_modules(hf: nn.Module, manifest) -> tuple[nn.Module, ...]:
    """The modules that run after the decoder layers, in order: the final norm (named by
    architecture, as StreamedModel._final_norm finds it) when there is one, and the head."""
    base = hf.get_submodule(manifest.layers_prefix.rsplit(".", 1)[0])
    norm = next((getattr(base, n) for n in ("norm", "final_layernorm", "ln_f", "final_layer_norm")
                 if isinstance(getattr(base, n, None), nn.Module)), None)
    return tuple(m for m in (norm, hf.get_output_embeddings()) if m is not None)


# -- load ------------------------------------------------------------------------------------
# one function on purpose, like build.load: each step is a helper call, in the order they must run
def load_devices(path, *, devices, gpu_memory=None, host_memory="auto", max_batch: int = 1, max_seq: int | None = None,
                 prefill_chunk: int = 512, max_slots: int = 4, profile: bool = True, verify: bool = False,
                 cold_disk: bool = False, progress: bool = True, decode: str = "auto",
                 warmup: bool = True, fuse: bool | None = None, allow_repeat: bool = False) -> MultiDeviceModel:
    """``load(path, devices=[...])``: the arguments of :func:`qstream.runtime.build.load`, with
    ``gpu_memory`` a budget for each device or a list of one per device. ``allow_repeat``: see
    :func:`parse_devices` (not offered by ``load()`` or the CLI)."""

    devs = parse_devices(devices, allow_repeat=allow_repeat)
    budgets = [parse_bytes(b, what="gpu_memory") for b in parse_budgets(gpu_memory, len(devs))]
    first, cuda = devs[0], devs[0].type == "cuda"
    manifest = read_manifest(path)
    if verify:
        require_verified(path)
    raise_first(manifest.root, manifest_problems(manifest))
    check_tokenizer_files(manifest)
    dtype = DTYPES[manifest.compute_dtype]
    host_budget = (build.available_host_memory() // 2 if host_memory in ("auto", None)
                   else parse_bytes(host_memory, what="host_memory"))
    max_seq = max_seq or default_max_seq(manifest.max_positions)

    layer_entries = manifest.layer_files()
    embed_e, head_e = manifest.file("embed"), manifest.file("head")
    headers = [checked_header(manifest, e) for e in layer_entries]
    checks = {i: file_check(manifest, e) for i, e in enumerate(layer_entries)}
    layer_bytes = [h.data_size for h in headers]

    hf, stats, layers, bindings = build.prepare(manifest, layer_entries, dtype, profile)
    if (any(d.type == "cuda" for d in devs) if fuse is None else fuse):
        fused_norms(hf)

    fixed, kv = build.fixed_bytes(hf, manifest, head_e, dtype, max_batch, max_seq, prefill_chunk)
    parts = plan_shares(layer_bytes, base_fixed=fixed - head_e.size, head_bytes=head_e.size, kv_bytes=kv,
                        budgets=budgets, host_budget=host_budget if cuda or any(b is not None for b in budgets) else None,
                        max_slots=max_slots)
    plan = merge_plans(parts, devs)
    ranges = [p.layers for p in parts]
    log.info("%s", plan.describe())
    for d, r in zip(devs, ranges):
        if not len(r):
            log.info("%s gets no layers (the devices before it hold them without streaming more)%s", d,
                     "; it holds the head" if d is devs[-1] else "")
    last = devs[-1]  # the head's device: the plan counted the head there

    build._buffers_to(hf, first)
    for r, d in zip(ranges, devs):
        for i in r:
            build._buffers_to(layers[i], d)  # per-layer buffers (rotary tables of older architectures)
    build._attach_embeddings(hf, read_file(manifest.path(embed_e), header=checked_header(manifest, embed_e),
                                           check=file_check(manifest, embed_e)), first)
    Binding.of(hf, head_e).apply(read_file(manifest.path(head_e), header=checked_header(manifest, head_e), device=last,
                                           check=file_check(manifest, head_e)), resident=True)

    pipes: dict[int, Pipeline] = {}
    for p, d in zip(parts, devs):
        host_layers = build._read_tiers(manifest, layer_entries, headers, p.plan, bindings, d, progress, checks,
                                          d.type == "cuda" if fuse is None else fuse)
        if not p.plan.streamed:
            continue
        pipe = Pipeline(device=d, streamed=list(p.plan.streamed), host_layers=host_layers, disk_layers=list(p.plan.disk),
                        paths={i: manifest.path(layer_entries[i]) for i in p.plan.streamed},
                        headers={i: headers[i] for i in p.plan.streamed}, slots=max(p.plan.slots, 2),
                        slot_bytes=p.plan.slot_bytes, stats=stats, profile=profile, cold=cold_disk,
                        checks={i: checks[i] for i in p.plan.disk})
        pipe.issue_on_release = True
        pipes.update({i: pipe for i in p.plan.streamed})
    pipeline = DevicePipelines(pipes) if pipes else None
    return MultiDeviceModel(manifest, hf, plan, layers, devices=devs, ranges=ranges, tail=tail_modules(hf, manifest),
                            compute_dtype=dtype,
                            pipeline=pipeline, bindings=bindings, stats=stats, layer_bytes=layer_bytes, kv_offload=False,
                            profile=profile, max_batch=max_batch, max_seq=max_seq, decode=decode, warmup=warmup)
