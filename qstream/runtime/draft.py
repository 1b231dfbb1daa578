"""The in-directory draft of self-speculative decoding, resident beside the target (SubSpec-style).

A shard directory written with a ``draft`` recipe field holds a low-bit copy of every decoder
layer (qstream/shard_draft.py). ``load(DIR, draft=True)`` builds a second model, the draft,
out of the target's own pieces wherever they are on the device anyway:

* every layer the tier plan keeps resident: the target's own module (same weights; the draft
  agrees with the target exactly there),
* every streamed layer: its low-bit copy, resident for good (the draft runs every round and
  must never wait for the disk or the host link),
* embeddings, head, final norm and rotary tables: the target's modules (no second copy).

The draft keeps its own KV cache (a DynamicCache per request, as before). The tier plan
counts the draft first: the low-bit copies of streamed layers and the draft's KV cache come
off the budget with the fixed costs, and a layer made resident costs its bytes minus its
draft copy's (the copy is then not needed). :class:`DraftPlan` says what the draft costs and
how many resident target layers it displaces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BudgetError, QstreamError
from ..store.check import checked_header
from ..store.integrity import file_check
from ..store.manifest import Manifest, read_manifest
from ..store.tensors import views
from .hooks import Binding
from .plan import TierPlan, plan_tiers, size, split_host_disk, spread
from .stats import Stats


@dataclass(frozen=True)
class DraftPlan(TierPlan):
    """A tier plan that also holds the draft resident. ``drafted``: the streamed layers whose
    low-bit copy the draft runs (every other layer it shares with the target)."""

    drafted: tuple[int, ...] = ()
    draft_bytes: int = 0  # the resident low-bit copies
    draft_kv_bytes: int = 0  # the draft's own KV cache
    plain_resident: int = 0  # target layers resident under the same budget without a draft

    def describe(self) -> str:
        shared = len(self.resident)
        n = shared + len(self.streamed)
        if not self.drafted:
            what = ("draft = the target itself (every layer resident, nothing streamed: speculation cannot pay; "
                    "the fallback decodes plainly)")
        else:
            what = (f"draft resident {size(self.draft_bytes + self.draft_kv_bytes)}: {len(self.drafted)} low-bit layer "
                    f"copies {size(self.draft_bytes)} + its KV cache {size(self.draft_kv_bytes)}; shares {shared} of "
                    f"{n} layers, embeddings, head and norms with the target")
        lost = self.plain_resident - shared
        return f"{super().describe()}; {what}; displaces {lost} resident target layer{'s' if lost != 1 else ''} " \
               f"({self.plain_resident} without the draft)"


def plan_with_draft(layer_bytes: list[int], draft_bytes: list[int], *, fixed_bytes: int, draft_kv_bytes: int,
                    budget: int | None, host_budget: int | None, max_slots: int = 4, min_slots: int = 2,
                    preferred_slots: int = 3) -> DraftPlan:
    """plan_tiers' rule (never stream what fits, staging slots, resident layers spread evenly,
    host RAM before disk) with the draft counted first: its KV cache is a fixed cost and every
    streamed layer adds its low-bit copy. The most resident layers k such that
    ``fixed + draft KV + slots + sum(resident) + sum(copies of the others) <= budget``."""
    n = len(layer_bytes)
    plain = plan_tiers(layer_bytes, fixed_bytes=fixed_bytes, budget=budget, host_budget=host_budget,
                       max_slots=max_slots, min_slots=min_slots, preferred_slots=preferred_slots)
    fixed = fixed_bytes + draft_kv_bytes
    common = dict(draft_kv_bytes=draft_kv_bytes, plain_resident=len(plain.resident))
    if budget is None or fixed + sum(layer_bytes) <= budget:
        return DraftPlan(tuple(range(n)), (), (), 0, 0, fixed, budget, host_budget, **common)
    biggest = max(layer_bytes)
    minimum = fixed + min_slots * biggest + sum(draft_bytes)
    if budget < minimum:
        raise BudgetError(
            f"device memory budget {size(budget)} is too small for the target and its draft: they need at least "
            f"{size(minimum)} ({size(fixed)} fixed with the draft's KV cache + {min_slots} x {size(biggest)} layer slots "
            f"+ {size(sum(draft_bytes))} of draft layers); raise --gpu-memory, use a smaller draft scheme, or speculate "
            "with a separate draft (--speculate SCHEME)")
    left = budget - fixed
    s = max(min_slots, min(preferred_slots, max_slots, (left - sum(draft_bytes)) // biggest, n))
    room = left - s * biggest
    k = 0
    for k in range(n, -1, -1):
        keep = set(spread(k, n))
        if sum(layer_bytes[i] if i in keep else draft_bytes[i] for i in range(n)) <= room:
            break
    resident = set(spread(k, n))
    streamed = [i for i in range(n) if i not in resident]
    host, disk = split_host_disk(streamed, layer_bytes, host_budget)
    return DraftPlan(tuple(sorted(resident)), tuple(host), tuple(disk), s, biggest, fixed, budget, host_budget,
                     drafted=tuple(streamed), draft_bytes=sum(draft_bytes[i] for i in streamed), **common)


def draft_data_bytes(manifest: Manifest) -> list[int]:
    """Data bytes of each layer's draft file (what holding it on the device costs)."""
    entries = manifest.draft_files()
    if entries is None:
        raise QstreamError(f"{manifest.root} holds no draft; shard it with `qstream shard ... --draft-scheme q4` (or a "
                           "recipe field `draft: {scheme: q4}`), or speculate with a separate draft (--speculate SCHEME)")
    return [checked_header(manifest, e).data_size for e in entries]


def share_outside_layers(draft_hf: nn.Module, target_hf: nn.Module, layers_prefix: str) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Point every module, parameter and buffer of ``draft_hf`` that is not under the decoder
    layers at the target's (embeddings, final norm, head, rotary tables). Returns the two
    layer lists."""
    d, t = draft_hf, target_hf
    for part in layers_prefix.split("."):
        for name, child in t.named_children():
            if name != part:
                setattr(d, name, child)
        for name, p in t._parameters.items():
            d._parameters[name] = p
        for name, b in t._buffers.items():
            d._buffers[name] = b
        d, t = getattr(d, part), getattr(t, part)
    return d, t


class SharedDraft:
    """The draft model the speculative loop runs (qstream.spec): the same calling convention as
    a StreamedModel (``draft(ids, attention_mask=..., past_key_values=...)`` -> logits)."""

    def __init__(self, target, hf: nn.Module, drafted: tuple[int, ...], plan: DraftPlan):
        self.target, self.hf, self.drafted, self.plan = target, hf, drafted, plan
        self.config, self.device, self.dtype = hf.config, target.device, target.dtype
        self.stats = Stats()
        # tree steps on a static cache, replayed as CUDA graphs (runtime/tree_cache.py); on the CPU
        # the dynamic cache is as fast (tests set ``static`` to run the padded steps there too)
        self.static = self.device.type == "cuda"
        self.pad = self.static  # pad static steps to the graph widths (tests set it on the CPU too)
        self._tree = None
        from .tree_cache import LayerStack, PassThrough, StepGraphs  # imports transformers: not at import time

        parent, _, attr = target.manifest.layers_prefix.rpartition(".")
        self._base, self._attr = hf.get_submodule(parent) if parent else hf, attr
        layers = getattr(self._base, attr)
        # one device only: the layers of a multi-GPU target hand hidden states over in hooks (devices.py)
        one = len(getattr(target, "devices", ())) <= 1
        self.graphs = StepGraphs(layers, self.device) if self.device.type == "cuda" and one else None
        self._stack = nn.ModuleList([LayerStack(self.graphs)] + [PassThrough() for _ in layers[1:]]) \
            if self.graphs is not None else None

    def new_cache(self, batch: int | None = None, length: int | None = None):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def tree_cache(self, rows: int):
        """The draft's cache for a speculative decode that needs at most ``rows`` rows (prompt, new
        tokens and one tree): static when ``static`` (graphable tree steps), else dynamic."""
        from .tree_cache import WIDTHS, TreeCache

        if not self.static:
            return self.new_cache()
        need = rows + max(WIDTHS)
        if self._tree is None or self._tree.capacity < need:
            # one cache reused by every request (its graphs stay valid), grown in steps of 256 rows
            self._tree = TreeCache(self.config.num_hidden_layers, -(-need // 256) * 256)
        self._tree.reset()
        return self._tree

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, *, attention_mask=None, position_ids=None, past_key_values=None,
                cache_position=None, logits_to_keep: int = 0) -> torch.Tensor:
        from .model import attention_backends, cache_kw

        if hasattr(past_key_values, "keep_rows"):  # the static tree cache
            return self._static_forward(input_ids, attention_mask, position_ids, past_key_values, logits_to_keep)
        dev = self.device
        kw = {cache_kw(): past_key_values} if past_key_values is not None else {}
        with attention_backends():
            out = self.hf(input_ids=input_ids.to(dev),
                          attention_mask=None if attention_mask is None else attention_mask.to(dev),
                          position_ids=None if position_ids is None else position_ids.to(dev),
                          cache_position=None if cache_position is None else cache_position.to(dev),
                          use_cache=past_key_values is not None, logits_to_keep=logits_to_keep, **kw)
        self.stats.forwards += 1
        return out.logits

    __call__ = forward

    def _static_forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int):
        """A forward on the static tree cache, padded to a graph width when it has one."""
        from .model import attention_backends, cache_kw
        from .tree_cache import padded_inputs, width_for

        S = input_ids.shape[1]
        w = width_for(S) if self.pad else None
        W = w or S
        ids, pos, mask, slots = padded_inputs(input_ids, position_ids, attention_mask, cache, W, self.dtype)
        dev = self.device
        graphed = w is not None and self.graphs is not None
        if graphed:
            self.graphs.bind(cache)
            cache.write_at = self.graphs.write_at[:W]  # the graphs' slot buffer: same address every replay
            cache.write_at.copy_(slots)
        else:
            cache.write_at = slots.to(dev)
        keep = slice(S - logits_to_keep, S) if logits_to_keep else slice(0, S)  # the real rows only
        real = getattr(self._base, self._attr)
        if graphed:
            setattr(self._base, self._attr, self._stack)  # one graph runs every layer (LayerStack)
        try:
            with attention_backends():
                out = self.hf(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                              use_cache=True, logits_to_keep=keep, **{cache_kw(): cache})
        finally:
            setattr(self._base, self._attr, real)
        cache.length += S
        self.stats.forwards += 1
        return out.logits

    def timing(self) -> dict:
        return self.stats.as_dict()

    def reset_timing(self) -> None:
        self.stats.reset()

    def close(self) -> None:
        """The draft's memory is the target's: closing the target frees it."""


def build_draft(target, manifest: Manifest, plan: DraftPlan, skeleton, swap_linears, buffers_to) -> SharedDraft:
    """The draft of a loaded target: a second skeleton whose non-layer modules and resident
    layers are the target's, and whose streamed layers are their low-bit copies, read (hash
    checked) onto the device. ``skeleton``/``swap_linears``/``buffers_to`` are build.py's."""
    if tuple(plan.drafted) != tuple(plan.streamed):
        raise QstreamError("internal: the draft plan's drafted layers are not the streamed ones")
    dev, dtype = target.device, target.dtype
    hf = skeleton(manifest, dtype)
    d_layers, t_layers = share_outside_layers(hf, target.hf, manifest.layers_prefix)
    entries = manifest.draft_files()
    swap_linears(hf, [entries[i] for i in plan.drafted], dtype)
    for i in range(len(d_layers)):
        if i not in plan.drafted:
            d_layers[i] = t_layers[i]
    for i in plan.drafted:
        e = entries[i]
        header = checked_header(manifest, e)
        buf = torch.empty(header.data_size, dtype=torch.uint8)
        file_check(manifest, e).read_into(header, buf)  # hashed while read, as every layer file
        Binding.of(hf, e).apply(views(buf.to(dev), header), resident=True)
        buffers_to(d_layers[i], dev)
    leftover = [n for n, p in hf.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise QstreamError(f"internal: draft parameter {leftover[0]} was never bound")
    return SharedDraft(target, hf, plan.drafted, plan)


def plan_for(path, gpu_memory, *, max_seq: int | None = None, prefill_chunk: int = 512,
             draft_max_seq: int | None = None) -> DraftPlan:
    """The plan ``load(path, draft=True, gpu_memory=...)`` would make, without reading a weight
    (a meta skeleton sizes the fixed costs): for `qstream inspect --gpu-memory`."""
    from . import build
    from .plan import default_max_seq, parse_bytes

    m = read_manifest(path)
    dtype = build.DTYPES[m.compute_dtype]
    hf = build.skeleton(m, dtype)
    build.swap_linears(hf, [e for e in m.files if e.kind != "draft"], dtype)
    max_seq = max_seq or default_max_seq(m.max_positions)
    head = m.file("head")
    fixed, kv = build.fixed_bytes(hf, m, head, dtype, 1, max_seq, prefill_chunk)
    draft_kv = build.fixed_bytes(hf, m, head, dtype, 1, draft_max_seq or max_seq, 1)[1]
    layers = [checked_header(m, e).data_size for e in m.layer_files()]
    return plan_with_draft(layers, draft_data_bytes(m), fixed_bytes=fixed + kv, draft_kv_bytes=draft_kv,
                           budget=parse_bytes(gpu_memory, what="gpu_memory"), host_budget=None)
