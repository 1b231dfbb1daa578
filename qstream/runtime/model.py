"""The streamed model's public API: a Hugging Face causal LM whose decoder layers
come from qstream shards under a device memory budget. Made by
:func:`qstream.runtime.build.load`; the streaming mechanism is in hooks.py and
pipeline.py."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import QstreamError
from ..store.manifest import Manifest
from .hooks import Binding, StreamHooks
from .pipeline import Pipeline
from .plan import TierPlan
from .qlinear import QLinear
from .stats import Stats


@functools.cache
def cache_kw() -> str:
    """The keyword transformers' forward takes the KV cache by: `past_key_values` was renamed
    `cache` in 5.2x; accept both (probed lazily: importing this module must not import transformers)."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class StreamedModel:
    """Use ``qstream.load(...)`` to make one."""

    def __init__(self, manifest: Manifest, hf: nn.Module, plan: TierPlan, device: torch.device, compute_dtype: torch.dtype,
                 layers: nn.ModuleList, pipeline: Pipeline | None, bindings: dict[int, Binding], stats: Stats,
                 layer_bytes: list[int], kv_offload: bool, profile: bool):
        self.manifest, self.hf, self.plan, self.device, self.dtype = manifest, hf, plan, device, compute_dtype
        self.config = hf.config
        self.layers, self.pipeline, self.stats = layers, pipeline, stats
        self.layer_bytes = layer_bytes  # data bytes of each layer file, what streaming it moves
        self.kv_offload = kv_offload
        self.profile = profile
        self.hooks = StreamHooks(layers, set(plan.streamed), bindings, pipeline, stats, device=device, profile=profile)

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

    def layer_paths(self, layers) -> list[Path]:
        files = self.manifest.layer_files()
        return [self.manifest.path(files[i]) for i in layers]

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
            kw[cache_kw()] = past_key_values
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
        try:
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
        finally:
            hooks.manual = False
        norm = self._final_norm()
        return [head(j, norm(x)) for j, x in enumerate(hidden)]

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
        if self.pipeline is not None:
            self.pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
