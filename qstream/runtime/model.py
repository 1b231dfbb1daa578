"""The streamed model's public API: a Hugging Face causal LM whose decoder layers
come from qstream shards under a device memory budget. Made by
:func:`qstream.runtime.build.load`; the streaming mechanism is in hooks.py and
pipeline.py."""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import QstreamError
from ..generate import SamplingConfig, generate_ids
from ..store.manifest import Manifest
from .graphs import LayerGraphs
from .hooks import Binding, StreamHooks
from .pipeline import Pipeline
from .plan import TierPlan, default_max_seq
from .qlinear import QLinear
from .stats import Stats


@functools.cache
def cache_kw() -> str:
    """The keyword transformers' forward takes the KV cache by: `past_key_values` was renamed
    `cache` in 5.2x; accept both (probed lazily: importing this module must not import transformers)."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


DECODE_MODES = ("auto", "graph", "static", "eager")
# attention implementations whose masks qstream can build itself for static-cache decode steps
# (sdpa: boolean, True = attend; eager: additive float); others keep the dynamic cache
STATIC_ATTN = ("sdpa", "eager")

log = logging.getLogger(__name__)


def attention_backends():
    """The scaled-dot-product attention kernels qstream's forwards may use: every backend but cuDNN's.
    cuDNN's fused attention (which torch prefers on Hopper when a mask is given) builds an execution
    plan for every new shape, ~2 ms of CPU time per call on an H200 (scripts/spec_profile_gpu.sh: 67% of
    a speculative round's CPU time), and tree, chunked and dynamic-cache forwards get a new shape almost
    every call; the memory-efficient kernel takes the same masks without a plan."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def static_cache_problem(config, kv_offload: bool) -> str | None:
    """Why a static KV cache (and so CUDA-graph decode) cannot serve this model, or None."""
    if kv_offload:
        return "the KV cache is offloaded to host RAM under this budget"
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in STATIC_ATTN:
        return f"attention implementation {impl!r} takes no prepared masks"
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return "the model has sliding-window or other non-full attention layers"
    if types is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    return None


class StreamedModel:
    """Use ``qstream.load(...)`` to make one."""

    def __init__(self, manifest: Manifest, hf: nn.Module, plan: TierPlan, device: torch.device, compute_dtype: torch.dtype,
                 layers: nn.ModuleList, pipeline: Pipeline | None, bindings: dict[int, Binding], stats: Stats,
                 layer_bytes: list[int], kv_offload: bool, profile: bool, max_batch: int = 1, max_seq: int | None = None,
                 decode: str = "auto", warmup: bool = True):
        self.manifest, self.hf, self.plan, self.device, self.dtype = manifest, hf, plan, device, compute_dtype
        self.config = hf.config
        self.layers, self.pipeline, self.stats = layers, pipeline, stats
        self.layer_bytes = layer_bytes  # data bytes of each layer file, what streaming it moves
        self.kv_offload = kv_offload
        self.profile = profile
        self.hooks = StreamHooks(layers, set(plan.streamed), bindings, pipeline, stats, device=device, profile=profile)
        self.max_batch = max_batch
        self.max_seq = max_seq or default_max_seq(manifest.max_positions)
        self.graphs: LayerGraphs | None = None
        self._static: tuple[int, object] | None = None  # (batch, StaticCache) reused by every generation
        self.warmup_s = 0.0
        self.draft = None  # the resident in-directory draft when loaded with draft=True (runtime/draft.py)
        self.decode_mode, self.decode_note = self._decode_mode(decode)
        log.info("decode: %s", self.decode_note)
        if self.decode_mode == "graph":
            self.graphs = self._make_graphs()
            self.hooks.set_runs(self.graphs.seg_end)  # profile timers per replayed run, not per layer
        if warmup and device.type == "cuda":
            self.warm_up()

    def _make_graphs(self):
        return LayerGraphs(self.layers, streamed=set(self.plan.streamed), device=self.device,
                           slot_of=self.pipeline.slot_of if self.pipeline is not None else None)

    def _graph_streams(self) -> list:
        """The side streams graphs are captured on (one per device)."""
        return [self.graphs.stream] if self.graphs is not None else []

    def _decode_mode(self, decode: str) -> tuple[str, str]:
        """The decode path this model will use, and a line saying why (shown by -v)."""
        if decode not in DECODE_MODES:
            raise QstreamError(f"unknown decode mode {decode!r}; use one of {', '.join(DECODE_MODES)}")
        if decode == "eager":
            return "eager", "eager (asked for): dynamic KV cache, layers launched kernel by kernel"
        problem = static_cache_problem(self.config, self.kv_offload)
        if problem:
            return "eager", f"eager: no static KV cache because {problem}"
        if decode == "static":
            return "static", "static KV cache, no CUDA graphs (asked for)"
        if self.device.type != "cuda":
            if decode == "graph":
                return "static", f"static KV cache; no CUDA graphs on {self.device.type}"
            # auto on CPU: the dynamic cache attends only over the tokens so far (faster than static)
            return "eager", f"eager: CUDA graphs need a CUDA device, this model runs on {self.device.type}"
        return "graph", "CUDA graphs (one per run of resident layers, one per streamed layer and slot) over a static KV cache"

    def set_profile(self, on: bool) -> None:
        """Turn the timing breakdown on or off (CUDA events cost a little on the hot path)."""
        self.profile = on
        if self.pipeline is not None:
            self.pipeline.profile = on
        for m in self.hf.modules():
            if isinstance(m, QLinear):
                m.stats = self.stats if on else None
        self.hooks.remove()
        self.hooks.profile = on
        self.hooks.install()

    # -- what streams ------------------------------------------------------------------
    def tier_bytes(self) -> dict[str, int]:
        """Bytes each tier moves per pass over the weights: host (pinned RAM) and disk."""
        return {"host": sum(self.layer_bytes[i] for i in self.plan.host),
                "disk": sum(self.layer_bytes[i] for i in self.plan.disk)}

    def tier_bytes_by_device(self) -> dict[str, dict[str, int]]:
        """tier_bytes() of each device's share (one device here; several in MultiDeviceModel)."""
        return {str(self.device): self.tier_bytes()}

    def all_devices(self) -> list[torch.device]:
        return [self.device]

    def layer_paths(self, layers) -> list[Path]:
        files = self.manifest.layer_files()
        return [self.manifest.path(files[i]) for i in layers]

    # -- running -------------------------------------------------------------------
    def new_cache(self, batch: int | None = None, length: int | None = None):
        """A KV cache for ``batch`` sequences of up to ``length`` tokens: the model's static
        cache (reset, same addresses, so captured graphs stay valid) when the decode mode uses
        one and it is large enough, else a fresh dynamic cache."""
        from transformers import DynamicCache

        if self.decode_mode != "eager" and batch is not None and length is not None and length <= self.max_seq:
            return self.static_cache(batch)
        return DynamicCache(config=self.config, offloading=self.kv_offload)

    @torch.inference_mode()
    def static_cache(self, batch: int):
        from transformers import StaticCache

        if self._static is not None and self._static[0] == batch:
            cache = self._static[1]
            cache.reset()
        else:
            if self.graphs is not None:
                self.graphs.reset()  # graphs of another batch size point into the old cache
            self._static = None
            cache = StaticCache(config=self.config, max_cache_len=self.max_seq)
            self._static = (batch, cache)
        if self.graphs is not None:
            self.graphs.active = cache
        return cache

    def is_static(self, cache) -> bool:
        return self._static is not None and cache is self._static[1]

    def decode_mask(self, mask: torch.Tensor, cache) -> torch.Tensor | None:
        """The 4-D attention mask of a single-token step on the static cache, made from the 2-D
        padding mask [B, L] of the sequence so far: [B, 1, 1, max_seq], True / 0.0 where a token
        may be attended. Built here so transformers skips its own mask code (Python work and a
        new tensor every step); None for a dynamic cache (the model builds its mask then)."""
        if not self.is_static(cache):
            return None
        B, L = mask.shape
        m = torch.zeros(B, 1, 1, self.max_seq, dtype=torch.bool)
        m[:, 0, 0, :L] = mask.bool()
        m = m.to(self.device)
        if getattr(self.config, "_attn_implementation", "eager") == "sdpa":
            return m
        return torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(~m, torch.finfo(self.dtype).min)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, cache_position=None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, S, V] (or the last ``logits_to_keep`` positions) for input_ids [B, S]."""
        dev = self.device
        kw = {}
        if past_key_values is not None:
            kw[cache_kw()] = past_key_values
        with attention_backends():
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
        if self.graphs is not None and past_key_values is not None and past_key_values is self.graphs.active:
            self.graphs.step += 1  # per-step inputs are copied into the graphs' buffers once per step
        return out.logits

    __call__ = forward

    @torch.inference_mode()
    def layer_major(self, batches: list[dict[str, torch.Tensor]], head: Callable, *,
                    on_layer: Callable[[int], None] | None = None):
        """Push every batch through layer i before loading layer i+1: one pass over the
        weights for a whole corpus. ``head(batch_index, hidden [B, S, H])`` receives the
        final-norm output of each batch (apply ``self.logits`` to it) and returns anything;
        the list of its results is returned. ``on_layer(i)`` is called after layer i ran on
        every batch (progress bars)."""
        hidden, kwargs = self._embed_batches(batches)
        hooks = self.hooks
        hooks.manual = True
        runs = hooks.runs
        hooks.set_runs({})  # a layer runs once per batch here: time layers, not graph runs
        try:
            with attention_backends():
                self._layers_over(hidden, kwargs, on_layer)
        finally:
            hooks.manual = False
            hooks.set_runs(runs)
        norm = self._final_norm()
        return [head(j, norm(x)) for j, x in enumerate(hidden)]

    def _layers_over(self, hidden: list[torch.Tensor], kwargs: list[dict], on_layer) -> None:
        """Layer after layer over every batch (in place in ``hidden``), a streamed layer loaded once."""
        hooks = self.hooks
        for i, layer in enumerate(self.layers):
            streamed = i in hooks.streamed
            if streamed:
                hooks.acquire(i)
            for j in range(len(hidden)):
                out = layer(hidden[j], **kwargs[j])
                hidden[j] = out[0] if isinstance(out, tuple) else out
            if streamed:
                hooks.release(i)
            if on_layer is not None:
                on_layer(i)

    def _embed_batches(self, batches):
        """Each batch's input to layer 0 and the keyword arguments the model passes every layer
        (masks, rotary embeddings), caught by stopping the model's own forward at layer 0: the
        model prepares them exactly as it would for a normal forward."""
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
        return hidden, kwargs

    def _final_norm(self) -> nn.Module:
        base = self.hf.get_submodule(self.manifest.layers_prefix.rsplit(".", 1)[0])
        # the name differs by architecture: Llama family, Phi, GPT-2, GPT-NeoX
        for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            if isinstance(getattr(base, name, None), nn.Module):
                return getattr(base, name)
        raise QstreamError(f"layer-major evaluation does not know the final norm of {type(self.hf).__name__}")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(hidden)  # [B, S, V]

    @torch.inference_mode()
    def warm_up(self, prompt_tokens: int = 4, steps: int | None = None) -> float:
        """Run a short generation so that a fresh process decodes at full speed from its first
        step: kernels load, cuBLAS and bitsandbytes initialise, the static cache is allocated
        and every decode graph is captured (a streamed layer needs one graph per staging slot
        it can land in: lcm(streamed, slots) / streamed steps visit them all). Called by
        load(), so its time counts as load time. Returns the seconds it took."""
        t = time.perf_counter()
        cycle = self.pipeline.cycle_steps() if self.pipeline is not None else 1
        steps = steps or cycle + 2  # captures of every (layer, slot) key, then replays only
        vocab = self.config.vocab_size
        ids = torch.arange(prompt_tokens).remainder(vocab).repeat(self.max_batch, 1)
        was = self.profile
        self.set_profile(False)
        try:
            sides = [s for s in self._graph_streams() if s is not None]
            if sides:
                # the eager warm-up step runs on the streams graphs are captured on, so that
                # per-stream state (cuBLAS workspaces) exists before any capture
                for side in sides:
                    side.wait_stream(torch.cuda.current_stream(side.device))
                self.graphs.enabled = False
                try:
                    with contextlib.ExitStack() as on_sides:
                        for side in sides:
                            on_sides.enter_context(torch.cuda.stream(side))
                        generate_ids(self, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=2))
                finally:
                    self.graphs.enabled = True
                for side in sides:
                    torch.cuda.current_stream(side.device).wait_stream(side)
            generate_ids(self, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=steps))
            for d in self.all_devices():
                if d.type == "cuda":
                    torch.cuda.synchronize(d)
        finally:
            self.set_profile(was)
            self.reset_timing()
        self.warmup_s = time.perf_counter() - t
        log.info("warm-up %.2f s; decode: %s", self.warmup_s, self.describe_decode())
        return self.warmup_s

    def describe_decode(self) -> str:
        if self.graphs is not None:
            return self.graphs.describe()
        return self.decode_note

    def timing(self) -> dict:
        """The breakdown since load (or the last ``reset_timing``): seconds and bytes."""
        d = self.stats.as_dict()
        d["compute_only_s"] = max(d["compute_s"] - d["dequant_s"], 0.0)
        return d

    def reset_timing(self) -> None:
        self.stats.reset()

    def close(self) -> None:
        """Remove every hook and stop the reader thread."""
        self.hooks.remove()
        if self.graphs is not None:
            self.graphs.remove()
        self._static = None
        if self.pipeline is not None:
            self.pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
