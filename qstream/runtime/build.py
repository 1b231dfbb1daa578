"""``load()``: open a shard directory as a StreamedModel.

The skeleton is built on the meta device from the manifest's config (no memory),
linear layers become QLinear, and tensors are attached without copies: embeddings
stay in host RAM (on CUDA), the head and as many layers as the tier plan allows are
read once onto the device, the rest are bound at run time by the pipeline.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..dtypes import DTYPES
from ..errors import QstreamError, ShardError
from ..store.inspect import require_verified
from ..store.manifest import FileEntry, Manifest, read_manifest
from ..store.check import (CONFIG_ERRORS, check_tokenizer_files, checked_header, config_error, manifest_problems,
                           raise_first, shape_problems)
from ..store.integrity import FileCheck, file_check
from ..store.tensors import read_file, regroup, relayout, views
from .draft import build_draft, draft_data_bytes, plan_with_draft
from .embedding import HostEmbedding, tie_embedding_to_head
from .fuse import attach, file_groups, plan_groups
from .fused_norm import fused_norms
from .hooks import Binding, set_param
from .model import StreamedModel
from .pipeline import Pipeline
from .plan import default_max_seq, parse_bytes, plan_tiers
from .qlinear import QLinear
from .stats import Stats

log = logging.getLogger(__name__)

PROGRESS_MIN_BYTES = 256 << 20  # below this a load is too quick for a progress bar to help


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise QstreamError(f"unknown device {device!r}; use cuda, cuda:N, cpu or auto") from None
    if d.type not in ("cuda", "cpu"):
        raise QstreamError(f"unsupported device {device!r}; use cuda, cuda:N, cpu or auto")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise QstreamError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return d


def hf_config(manifest: Manifest):
    """The transformers config of a shard directory, with the head untied (shard.py stores it on its own)."""
    from transformers import AutoConfig

    cfg = dict(manifest.config)
    model_type = cfg.pop("model_type")
    for k in ("transformers_version", "_name_or_path", "architectures"):
        cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.tie_word_embeddings = False
    return config


def skeleton(manifest: Manifest, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device; buffers (rotary tables) are real,
    computed on the CPU as the model's own constructor computes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            hf = AutoModelForCausalLM.from_config(hf_config(manifest), dtype=dtype)
    except CONFIG_ERRORS as e:
        raise config_error(manifest, e) from None
    return hf.eval()


def swap_linears(hf: nn.Module, entries: list[FileEntry], dtype: torch.dtype) -> None:
    """Replace every nn.Linear whose weight the shards store by a QLinear of its scheme."""
    for e in entries:
        for name, meta in e.tensors.items():
            path, attr = name.rsplit(".", 1)
            if attr != "weight":
                continue
            try:
                mod = hf.get_submodule(path)
            except AttributeError:
                raise ShardError(f"shards do not fit the model: no module {path!r} in {type(hf).__name__}") from None
            if isinstance(mod, nn.Linear):
                parent, child = path.rsplit(".", 1) if "." in path else ("", path)
                q = QLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, meta={**meta, "name": path},
                            compute_dtype=dtype)
                setattr(hf.get_submodule(parent) if parent else hf, child, q)


def fixed_bytes(hf, manifest: Manifest, head: FileEntry, dtype: torch.dtype, max_batch: int, max_seq: int,
                chunk: int) -> tuple[int, int]:
    """Device bytes that do not depend on the tier plan, and the KV cache bytes."""
    c = hf.config
    item = torch.finfo(dtype).bits // 8
    # a dequantized weight and its successor in flight (pass-through weights are used in place)
    biggest = max((m.in_features * m.out_features for m in hf.modules() if isinstance(m, QLinear) and m.scheme.quantized), default=0)
    workspace = 2 * biggest * item
    hidden = c.hidden_size
    inter = getattr(c, "intermediate_size", 4 * hidden)
    heads = c.num_attention_heads
    vocab = c.vocab_size
    tokens = max_batch * chunk
    # activations of one chunk: residual, q/k/v/o and MLP intermediates, attention scores, logits in float32
    act = tokens * (6 * hidden + 3 * inter) * item + max_batch * heads * chunk * max_seq * item + 2 * max_batch * vocab * 4
    kv_heads = getattr(c, "num_key_value_heads", heads) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = 2 * manifest.num_layers * max_batch * max_seq * kv_heads * head_dim * item
    # CUDA context and allocator slack are outside the budget's control; count what qstream allocates
    return head.size + workspace + act, kv


def prepare(manifest: Manifest, layer_entries: list[FileEntry], dtype: torch.dtype, profile: bool):
    """What load() and load_devices() share before any weight is read: the skeleton checked against
    the manifest, with QLinears swapped in, its Stats, the decoder layers and one Binding per layer file."""
    hf = skeleton(manifest, dtype)
    raise_first(manifest.root, shape_problems(manifest, {n: tuple(p.shape) for n, p in hf.named_parameters()}))
    swap_linears(hf, [e for e in manifest.files if e.kind != "draft"], dtype)  # draft copies: runtime/draft.py
    stats = Stats()
    if profile:
        for m in hf.modules():
            if isinstance(m, QLinear):
                m.stats = stats
    layers = hf.get_submodule(manifest.layers_prefix)
    bindings = {i: Binding.of(hf, e) for i, e in enumerate(layer_entries)}
    return hf, stats, layers, bindings


def _attach_embeddings(hf: nn.Module, tensors: dict[str, torch.Tensor], dev: torch.device) -> None:
    """Embeddings: host RAM on CUDA (a lookup reads a few rows), in place on CPU."""
    for name, t in tensors.items():
        mpath, attr = name.rsplit(".", 1)
        mod = hf.get_submodule(mpath)
        if dev.type == "cuda" and isinstance(mod, nn.Embedding):
            parent, child = mpath.rsplit(".", 1)
            setattr(hf.get_submodule(parent), child, HostEmbedding(t, dev))
        else:
            set_param(mod, attr, t)


def _buffers_to(hf: nn.Module, dev: torch.device) -> None:
    """Buffers the skeleton made for real (rotary tables, ...) go to the device."""
    for mod in hf.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(dev)


def _read_tiers(manifest: Manifest, entries: list[FileEntry], headers: list, plan, bindings: dict[int, Binding],
                dev: torch.device, progress: bool, checks: dict[int, FileCheck], fuse: bool) -> dict[int, torch.Tensor]:
    """Resident layers are read once and kept on the device for good (with sibling linears
    laid out back to back when ``fuse``, see fuse.py); host-tier layers are read into (pinned,
    on CUDA) RAM and returned for the pipeline."""
    host_layers = {}
    todo = sorted(plan.resident + plan.host)
    total = sum(headers[i].data_size for i in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="load", disable=not progress or total < PROGRESS_MIN_BYTES) as bar:
        for i in todo:
            buf = torch.empty(headers[i].data_size, dtype=torch.uint8, pin_memory=dev.type == "cuda" and i in plan.host)
            checks[i].read_into(headers[i], buf)  # hashed while read: corrupt bytes never reach a tensor
            if i in plan.host:
                host_layers[i] = buf
            else:
                header, groups = headers[i], plan_groups(bindings[i]) if fuse else []
                if groups:
                    header = regroup(header, file_groups(groups))
                    buf = relayout(buf, headers[i], header)
                tensors = views(buf.to(dev), header)
                bindings[i].apply(tensors, resident=True)
                attach(groups, tensors)
            bar.update(headers[i].data_size)
    return host_layers


# one function on purpose: each step is a helper call; what remains is the order they must run in
def load(path: str | Path, *, device: str | torch.device | None = "auto", gpu_memory: str | int | None = None,
         host_memory: str | int | None = "auto", max_batch: int = 1, max_seq: int | None = None, prefill_chunk: int = 512,
         max_slots: int = 4, profile: bool = True, verify: bool = False, cold_disk: bool = False,
         progress: bool = True, decode: str = "auto", warmup: bool = True, fuse: bool | None = None,
         devices: list[str] | str | None = None, draft: bool = False, draft_max_seq: int | None = None) -> StreamedModel:
    """Open a shard directory for inference.

    gpu_memory: budget on the compute device ("4GiB"; None = unlimited) covering weights,
        staging buffers, activations and KV cache. On CPU it bounds the resident layers.
    host_memory: host RAM for caching streamed layers ("auto" = half the available RAM;
        0 = stream every non-resident layer from disk).
    max_batch / max_seq: the largest batch and sequence the budget must leave room for.
    verify: recompute every shard checksum first (slow for big models; see `qstream verify`).
    cold_disk: drop disk-tier files from the page cache after each read (honest disk benchmarks).
    decode: "auto" (CUDA graphs of decoder layers over a static KV cache on CUDA, eager on CPU), "graph",
        "static" (static cache, no graphs) or "eager" (dynamic cache); see runtime/graphs.py.
    warmup: on CUDA, run a short generation before returning (kernels, graphs), so that the
        first real steps run at full speed and the cost shows up as load time.
    fuse: fused kernels (None = on CUDA): one matrix-vector product for q/k/v and for gate/up
        of resident layers at batch 1 (runtime/fuse.py), RMSNorm in one kernel (fused_norm.py).
    devices: several devices of one host ("cuda:0,cuda:1" or a list), each holding and streaming
        a contiguous share of the layers (runtime/devices.py); ``gpu_memory`` is then the budget
        of each device, or a list of one per device. ``device`` must be left at "auto".
    draft: also hold the directory's low-bit draft resident (``model.draft``, for speculative
        decoding), counted first in the budget; see runtime/draft.py. draft_max_seq: the draft's
        KV room (default max_seq).
    """
    if devices is not None:
        from .devices import load_devices  # devices.py builds on this module's helpers: imported here, not in a cycle

        if device not in ("auto", None):
            raise QstreamError("give either device or devices, not both")
        if draft:
            raise QstreamError("the in-directory draft runs on one device; drop devices or speculate with --draft SOURCE")
        return load_devices(path, devices=devices, gpu_memory=gpu_memory, host_memory=host_memory, max_batch=max_batch,
                            max_seq=max_seq, prefill_chunk=prefill_chunk, max_slots=max_slots, profile=profile,
                            verify=verify, cold_disk=cold_disk, progress=progress, decode=decode, warmup=warmup, fuse=fuse)
    dev = resolve_device(device)
    manifest = read_manifest(path)
    if verify:
        require_verified(path)
    raise_first(manifest.root, manifest_problems(manifest))  # completeness and the fields used below
    check_tokenizer_files(manifest)
    dtype = DTYPES[manifest.compute_dtype]
    if dev.type == "cpu" and dtype == torch.float16:
        log.info("float16 compute on CPU is slow; consider compute_dtype bfloat16 or float32")
    budget = parse_bytes(gpu_memory, what="gpu_memory")
    host_budget = available_host_memory() // 2 if host_memory in ("auto", None) else parse_bytes(host_memory, what="host_memory")
    max_seq = max_seq or default_max_seq(manifest.max_positions)

    layer_entries = manifest.layer_files()
    head_e = manifest.file("head")
    # manifest_problems requires an embed file unless a tied embedding is stored once, in the head file
    embed_e = next((f for f in manifest.files if f.kind == "embed"), None)
    headers = [checked_header(manifest, e) for e in layer_entries]  # each header against the manifest
    checks = {i: file_check(manifest, e) for i, e in enumerate(layer_entries)}
    layer_bytes = [h.data_size for h in headers]

    hf, stats, layers, bindings = prepare(manifest, layer_entries, dtype, profile)
    _buffers_to(hf, dev)
    if embed_e is not None:
        _attach_embeddings(hf, read_file(manifest.path(embed_e), header=checked_header(manifest, embed_e),
                                         check=file_check(manifest, embed_e)), dev)
    Binding.of(hf, head_e).apply(read_file(manifest.path(head_e), header=checked_header(manifest, head_e), device=dev,
                                           check=file_check(manifest, head_e)), resident=True)
    tie_embedding_to_head(hf, manifest.embedding)
    head = hf.get_output_embeddings()
    if dev.type == "cpu" and isinstance(head, QLinear) and head.scheme.quantized:
        # no fused kernel on CPU: dequantizing the whole head every step cost 2.6x the decode time
        # of SmolLM2 (q8 head); one dense copy in RAM is what the 16-bit head used to cost
        head.keep_dense = True

    fixed, kv = fixed_bytes(hf, manifest, head_e, dtype, max_batch, max_seq, prefill_chunk)
    # a KV cache that would crowd out two layer slots is offloaded to host RAM, layer by layer
    kv_offload = budget is not None and dev.type == "cuda" and fixed + kv + 2 * max(layer_bytes) > budget
    if kv_offload:
        kv = 2 * kv // manifest.num_layers  # only the layers in use stay on the device
    if draft:  # the draft's copies and KV cache come off the budget first (runtime/draft.py)
        plan = plan_with_draft(layer_bytes, draft_data_bytes(manifest), fixed_bytes=fixed + kv,
                               draft_kv_bytes=fixed_bytes(hf, manifest, head_e, dtype, 1, draft_max_seq or max_seq, 1)[1],
                               budget=budget, host_budget=host_budget if dev.type == "cuda" or budget is not None else None,
                               max_slots=max_slots)
    else:
        plan = plan_tiers(layer_bytes, fixed_bytes=fixed + kv, budget=budget,
                          host_budget=host_budget if dev.type == "cuda" or budget is not None else None,
                          max_slots=max_slots)
    log.info("%s", plan.describe())

    fuse = dev.type == "cuda" if fuse is None else fuse
    if fuse:
        log.info("fused RMSNorm kernel in %d norms", fused_norms(hf))
    host_layers = _read_tiers(manifest, layer_entries, headers, plan, bindings, dev, progress, checks, fuse)
    pipeline = None
    if plan.streamed:
        pipeline = Pipeline(device=dev, streamed=list(plan.streamed), host_layers=host_layers, disk_layers=list(plan.disk),
                            paths={i: manifest.path(layer_entries[i]) for i in plan.streamed},
                            headers={i: headers[i] for i in plan.streamed}, slots=max(plan.slots, 2),
                            slot_bytes=plan.slot_bytes, stats=stats, profile=profile, cold=cold_disk,
                            checks={i: checks[i] for i in plan.disk})
    model = StreamedModel(manifest, hf, plan, dev, dtype, layers, pipeline, bindings, stats, layer_bytes, kv_offload, profile,
                          max_batch=max_batch, max_seq=max_seq, decode=decode, warmup=warmup)
    if draft:
        model.draft = build_draft(model, manifest, plan, skeleton, swap_linears, _buffers_to)
    return model
