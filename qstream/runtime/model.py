"""The streamed model: a Hugging Face causal LM whose decoder layers come from
qstream shards under a device memory budget.

The skeleton is built on the meta device from the manifest's config; linear
layers become QLinear; embeddings stay in host RAM (on CUDA); the head, final
norm and as many layers as the plan allows are resident; the other layers are
bound, just before their forward, to tensors the pipeline streamed in, through
forward hooks that ``close()`` removes again.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import BudgetError, QstreamError, ShardError
from ..manifest import FileEntry, Header, Manifest, read_header, read_manifest
from ..quant import DTYPES
from .pipeline import Pipeline, Stats, read_into, views
from .plan import TierPlan, parse_bytes, plan_tiers
from .qlinear import HostEmbedding, QLinear

log = logging.getLogger(__name__)


def _cache_kw() -> str:
    # transformers renamed `past_key_values` to `cache` in 5.2x; accept both
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_KW = _cache_kw()


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
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise QstreamError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if d.type not in ("cuda", "cpu"):
        raise QstreamError(f"unsupported device {device!r}; use cuda or cpu")
    return d


@dataclass(frozen=True)
class _Binding:
    qlinears: tuple  # (QLinear, {suffix: key}, bias key | None)
    params: tuple  # (module, attr, key)


class StreamedModel:
    """Use ``qstream.load(...)`` to make one."""

    def __init__(self, manifest: Manifest, hf: nn.Module, plan: TierPlan, device: torch.device, compute_dtype: torch.dtype,
                 layers: nn.ModuleList, pipeline: Pipeline | None, bindings: dict[int, _Binding], stats: Stats,
                 kv_offload: bool, profile: bool):
        self.manifest, self.hf, self.plan, self.device, self.dtype = manifest, hf, plan, device, compute_dtype
        self.config = hf.config
        self.layers, self.pipeline, self.bindings, self.stats = layers, pipeline, bindings, stats
        self.kv_offload = kv_offload
        self.profile = profile
        self._hooks: list = []
        self._manual = False  # layer-major mode drives acquire/release itself
        self._t_layer: dict[int, object] = {}
        self._install_hooks()

    # -- binding -----------------------------------------------------------------
    def _bind(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        _binding_apply(self.bindings[layer], tensors)

    def _install_hooks(self) -> None:
        streamed = set(self.plan.streamed)
        for i, layer in enumerate(self.layers):
            if i in streamed or self.profile:
                self._hooks.append(layer.register_forward_pre_hook(self._make_pre(i, i in streamed)))
                self._hooks.append(layer.register_forward_hook(self._make_post(i, i in streamed)))

    def _make_pre(self, i: int, streamed: bool):
        def pre(module, args):
            if streamed and not self._manual:
                self._bind(i, self.pipeline.acquire(i))
            self._timer_start(i)
        return pre

    def _make_post(self, i: int, streamed: bool):
        def post(module, args, output):
            self._timer_stop(i)
            if streamed and not self._manual:
                self.pipeline.release(i)
                self.stats.layer_visits += 1
        return post

    def _timer_start(self, i: int) -> None:
        if not self.profile:
            return
        if self.device.type == "cuda":
            self._t_layer[i] = self.stats.timed("compute_s")
        else:
            self._t_layer[i] = time.perf_counter()

    def _timer_stop(self, i: int) -> None:
        if not self.profile or i not in self._t_layer:
            return
        start = self._t_layer.pop(i)
        if self.device.type == "cuda":
            start()
        else:
            self.stats.compute_s += time.perf_counter() - start

    def set_profile(self, on: bool) -> None:
        """Turn the timing breakdown on or off (CUDA events cost a little on the hot path)."""
        self.profile = on
        if self.pipeline is not None:
            self.pipeline.profile = on
        for m in self.hf.modules():
            if isinstance(m, QLinear):
                m.stats = self.stats if on else None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._install_hooks()

    # -- running -------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config, offloading=self.kv_offload)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, cache_position=None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, S, V] (or the last ``logits_to_keep`` positions) for input_ids [B, S]."""
        dev = self.device
        kw = {}
        if past_key_values is not None:
            kw[_CACHE_KW] = past_key_values
        out = self.hf(
            input_ids=input_ids.to(dev),
            attention_mask=None if attention_mask is None else attention_mask.to(dev),
            position_ids=None if position_ids is None else position_ids.to(dev),
            cache_position=None if cache_position is None else cache_position.to(dev),
            use_cache=past_key_values is not None,
            logits_to_keep=logits_to_keep,
            **kw,
        )
        self.stats.forwards += 1
        return out.logits

    __call__ = forward

    @torch.inference_mode()
    def layer_major(self, batches: list[dict[str, torch.Tensor]], head):
        """Push every batch through layer i before loading layer i+1: one pass over the
        weights for a whole corpus. ``head(batch_index, hidden [B, S, H])`` receives the
        final-norm output of each batch (apply ``self.logits`` to it) and returns anything;
        the list of its results is returned."""
        hidden, kwargs = [], []

        class _Caught(Exception):
            pass

        def catch(module, args, kw):
            hidden.append(args[0] if args else kw.pop("hidden_states"))
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
            raise _Caught

        h = self.layers[0].register_forward_pre_hook(catch, with_kwargs=True, prepend=True)
        try:
            for b in batches:
                try:
                    self.hf.base_model(input_ids=b["input_ids"].to(self.device),
                                       attention_mask=None if b.get("attention_mask") is None else b["attention_mask"].to(self.device),
                                       use_cache=False)
                except _Caught:
                    pass
        finally:
            h.remove()
        streamed = set(self.plan.streamed)
        self._manual = True
        try:
            for i, layer in enumerate(self.layers):
                if i in streamed:
                    self._bind(i, self.pipeline.acquire(i))
                for j in range(len(hidden)):
                    out = layer(hidden[j], **kwargs[j])
                    hidden[j] = out[0] if isinstance(out, tuple) else out
                if i in streamed:
                    self.pipeline.release(i)
                    self.stats.layer_visits += 1
        finally:
            self._manual = False
        norm = self._final_norm()
        return [head(j, norm(x)) for j, x in enumerate(hidden)]

    def _final_norm(self) -> nn.Module:
        base = self.hf.get_submodule(self.manifest.data["layers_prefix"].rsplit(".", 1)[0])
        # the name differs by architecture: Llama family, Phi, GPT-2, GPT-NeoX
        for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            if isinstance(getattr(base, name, None), nn.Module):
                return getattr(base, name)
        raise QstreamError(f"layer-major evaluation does not know the final norm of {type(self.hf).__name__}")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(hidden)  # [B, S, V]

    def timing(self) -> dict:
        """The breakdown since load (or the last ``reset_timing``): seconds and bytes."""
        d = self.stats.as_dict()
        d["compute_only_s"] = max(d["compute_s"] - d["dequant_s"], 0.0)
        return d

    def reset_timing(self) -> None:
        self.stats.reset()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.pipeline is not None:
            self.pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------
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


def _skeleton(manifest: Manifest, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = hf_config(manifest)
    with init_empty_weights(include_buffers=False):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    return hf


def _swap_linears(hf: nn.Module, entries: list[FileEntry], dtype: torch.dtype) -> None:
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


def _binding(hf: nn.Module, entry: FileEntry) -> _Binding:
    qls, params = [], []
    for name, meta in entry.tensors.items():
        path, attr = name.rsplit(".", 1)
        mod = hf.get_submodule(path)
        if isinstance(mod, QLinear):
            if attr == "weight":
                bias = f"{path}.bias" if mod.has_bias else None
                qls.append((mod, {("" if k == "data" else k): v for k, v in meta["stored"].items()}, bias))
            # biases are passed with their weight
        else:
            params.append((mod, attr, meta["stored"]["data"]))
    return _Binding(tuple(qls), tuple(params))


def _fixed_bytes(hf, manifest: Manifest, head: FileEntry, dtype: torch.dtype, max_batch: int, max_seq: int,
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
    act = tokens * (6 * hidden + 3 * inter) * item + max_batch * heads * chunk * max_seq * item + 2 * max_batch * vocab * 4
    kv_heads = getattr(c, "num_key_value_heads", heads) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = 2 * manifest.num_layers * max_batch * max_seq * kv_heads * head_dim * item
    # CUDA context and allocator slack are outside the budget's control; count what qstream allocates
    return head.size + workspace + act, kv


def load(path: str | Path, *, device: str | torch.device | None = "auto", gpu_memory: str | int | None = None,
         host_memory: str | int | None = "auto", max_batch: int = 1, max_seq: int | None = None, prefill_chunk: int = 512,
         max_slots: int = 4, profile: bool = True, verify: bool = False, cold_disk: bool = False,
         progress: bool = True) -> StreamedModel:
    """Open a shard directory for inference.

    gpu_memory: budget on the compute device ("4GiB"; None = unlimited) covering weights,
        staging buffers, activations and KV cache. On CPU it bounds the resident layers.
    host_memory: host RAM for caching streamed layers ("auto" = half the available RAM;
        0 = stream every non-resident layer from disk).
    max_batch / max_seq: the largest batch and sequence the budget must leave room for.
    verify: recompute every shard checksum first (slow for big models; see `qstream verify`).
    cold_disk: drop disk-tier files from the page cache after each read (honest disk benchmarks).
    """
    dev = resolve_device(device)
    manifest = read_manifest(path)
    if verify:
        from ..shardinfo import verify as verify_dir

        rep = verify_dir(path, progress=False)
        if not rep.passed:
            raise ShardError(f"{path}: missing {rep.missing}, corrupt {rep.corrupt}; re-run `qstream shard`")
    dtype = DTYPES[manifest.compute_dtype]
    if dev.type == "cpu" and dtype == torch.float16:
        log.info("float16 compute on CPU is slow; consider compute_dtype bfloat16 or float32")
    budget = parse_bytes(gpu_memory, what="gpu_memory")
    host_budget = available_host_memory() // 2 if host_memory in ("auto", None) else parse_bytes(host_memory, what="host_memory")
    max_seq = max_seq or min(int(getattr_cfg(manifest, "max_position_embeddings", 4096)), 4096)

    entries = {(e.kind, e.index): e for e in manifest.files}
    layer_entries = [entries.get(("layer", i)) for i in range(manifest.num_layers)]
    if any(e is None for e in layer_entries) or ("embed", None) not in entries or ("head", None) not in entries:
        raise ShardError(f"{path}/manifest.json lists an incomplete set of files; re-shard")
    headers: dict[int, Header] = {i: read_header(manifest.path(e), expected_size=e.size) for i, e in enumerate(layer_entries)}

    hf = _skeleton(manifest, dtype)
    _swap_linears(hf, manifest.files, dtype)
    stats = Stats()
    if profile:
        for m in hf.modules():
            if isinstance(m, QLinear):
                m.stats = stats
    prefix = manifest.data["layers_prefix"]
    layers = hf.get_submodule(prefix)
    bindings = {i: _binding(hf, e) for i, e in enumerate(layer_entries)}

    # buffers the skeleton made for real (rotary tables, ...) go to the device
    for mod in hf.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = b.to(dev)

    # embeddings: host RAM on CUDA, in place on CPU
    embed_e, head_e = entries[("embed", None)], entries[("head", None)]
    embed_t = _load_file(manifest, embed_e, torch.device("cpu"))
    for name, t in embed_t.items():
        mpath, attr = name.rsplit(".", 1)
        mod = hf.get_submodule(mpath)
        if dev.type == "cuda" and isinstance(mod, nn.Embedding):
            parent, child = mpath.rsplit(".", 1)
            setattr(hf.get_submodule(parent), child, HostEmbedding(t, dev, mod.padding_idx))
        else:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    head_t = _load_file(manifest, head_e, dev)
    _binding_apply(_binding(hf, head_e), head_t)

    fixed, kv = _fixed_bytes(hf, manifest, head_e, dtype, max_batch, max_seq, prefill_chunk)
    kv_offload = False
    if budget is not None:
        min_layer = max(h.data_size for h in headers.values())
        if fixed + kv + 2 * min_layer > budget and dev.type == "cuda":
            kv_offload = True  # keep only the layers in use on the device
            kv = 2 * kv // manifest.num_layers
    plan = plan_tiers([h.data_size for h in headers.values()], fixed_bytes=fixed + kv, budget=budget,
                      host_budget=host_budget if dev.type == "cuda" or budget is not None else None,
                      max_slots=max_slots)
    log.info("%s", plan.describe())

    # resident layers: read once, keep on the device for good; host-tier layers: read into (pinned) RAM
    host_layers = {}
    todo = sorted(plan.resident + plan.host)
    total = sum(headers[i].data_size for i in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="load", disable=not progress or total < 256 << 20) as bar:
        for i in todo:
            pinned = dev.type == "cuda" and i in plan.host
            buf = torch.empty(headers[i].data_size, dtype=torch.uint8, pin_memory=pinned)
            read_into(manifest.path(layer_entries[i]), headers[i], buf)
            if i in plan.host:
                host_layers[i] = buf
            else:
                _binding_apply(bindings[i], views(buf.to(dev), headers[i]))
            bar.update(headers[i].data_size)
    pipeline = None
    if plan.streamed:
        pipeline = Pipeline(device=dev, streamed=list(plan.streamed), host_layers=host_layers, disk_layers=list(plan.disk),
                            paths={i: manifest.path(layer_entries[i]) for i in plan.streamed},
                            headers={i: headers[i] for i in plan.streamed}, slots=max(plan.slots, 2),
                            slot_bytes=plan.slot_bytes, stats=stats, profile=profile, cold=cold_disk)
    return StreamedModel(manifest, hf, plan, dev, dtype, layers, pipeline, bindings, stats, kv_offload, profile)


def getattr_cfg(manifest: Manifest, key: str, default):
    v = manifest.config.get(key)
    return default if v is None else v


def _binding_apply(b: _Binding, tensors: dict[str, torch.Tensor]) -> None:
    for q, keys, bias_key in b.qlinears:
        q.bind({suffix: tensors[key] for suffix, key in keys.items()}, tensors[bias_key] if bias_key else None)
    for module, attr, key in b.params:
        module._parameters[attr] = nn.Parameter(tensors[key], requires_grad=False)


def _load_file(manifest: Manifest, e: FileEntry, dev: torch.device) -> dict[str, torch.Tensor]:
    p = manifest.path(e)
    h = read_header(p, expected_size=e.size)
    buf = torch.empty(h.data_size, dtype=torch.uint8)
    read_into(p, h, buf)
    return views(buf.to(dev), h)
