"""A static KV cache for the in-directory draft's tree steps, and CUDA graphs of those steps.

Why: a speculative round runs ~8 draft forwards, each a few rows (the tree's best unexpanded
nodes) through every decoder layer. Eagerly, each is ~1000 small kernels launched from Python:
~30-40 ms of CPU time on an H200 for a 30-layer model whose GPU work is ~1 ms
(scripts/spec_profile_gpu.sh), so drafting cost more than the pass over the streamed weights
it is meant to save. Replayed as one CUDA graph the launches cost ~nothing (gpt-fast's decode
graph, applied to tree steps).

What makes a tree step graphable:
- the cache is static: ``capacity`` rows per layer, allocated once; a forward writes its rows at
  the slots in ``write_at`` (a tensor, so a graph reads the slots of each replay from the same
  address), and attention reads all ``capacity`` rows under a 4-D mask that admits only the
  committed rows and each row's own tree path;
- every forward is padded to a fixed width (8, 16, 32 or 64 rows): padding rows attend to slot 0
  only, write into slots past the real rows (overwritten later, never admitted by a mask);
- the length of the cache is tracked here, not read from the tensors (rows are re-ordered after
  each round: :meth:`TreeCache.keep_rows`).

:class:`StepGraphs` captures the loop over the draft's decoder layers (embeddings, rotary tables,
final norm and head stay eager: the model's own code prepares them) per padded width, after one
eager warm-up forward of that width (Triton autotuning and lazy allocations happen outside the
capture). Without CUDA the same padded steps run eagerly (what the CPU tests check).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import DraftCacheFull
from .graphs import _flat, record_graph, untimed

log = logging.getLogger(__name__)

WIDTHS = (8, 16, 32, 64)  # padded rows of a graphed draft forward: a few graphs cover every tree step


def width_for(rows: int) -> int | None:
    """The padded width of a forward of ``rows`` rows (None: too many, run it unpadded)."""
    return next((w for w in WIDTHS if rows <= w), None)


class _TreeLayer(CacheLayerMixin):
    """One decoder layer's rows of a :class:`TreeCache`."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "TreeCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        cap = self.owner.capacity
        self.device = key_states.device
        self.keys = torch.zeros(b, h, cap, d, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(b, h, cap, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        at = self.owner.write_at
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.capacity, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.capacity


class TreeCache(Cache):
    """A static KV cache of ``capacity`` rows per layer whose length and write slots are set by
    the draft (runtime/draft.py), not inferred from its tensors."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.write_at: torch.Tensor | None = None  # the slots the next forward writes
        super().__init__(layers=[_TreeLayer(self) for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` rows (negative: drop that many), as DynamicCache.crop."""
        self.length = max_length if max_length >= 0 else max(self.length + max_length, 0)

    def reset(self) -> None:
        self.length = 0

    def keep_rows(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (sorted, distinct) in that order: the rows after the first gap (the
        accepted tree path) are copied down in place; the tensors keep their size and address."""
        p = next((j for j, k in enumerate(keep) if k != j), len(keep))
        if p < len(keep):
            for layer in self.layers:
                if layer.is_initialized:
                    i = torch.tensor(keep[p:], device=layer.keys.device)
                    # index_select copies first, so the overlapping write is safe (rows only move down)
                    layer.keys[:, :, p:len(keep)] = layer.keys.index_select(2, i)
                    layer.values[:, :, p:len(keep)] = layer.values.index_select(2, i)
        self.length = len(keep)


def padded_inputs(ids: torch.Tensor, pos: torch.Tensor | None, mask: torch.Tensor | None, cache: TreeCache,
                  width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [1, W], position ids [1, W], additive mask [1, 1, W, capacity], write slots [W]) of a
    forward of S = ids.shape[1] rows on ``cache``, padded to W = ``width`` rows. ``mask`` is what
    the speculative loop passes: 2-D [1, n + S] (the rows are a causal chain over the cache's
    admitted columns) or additive 4-D [1, 1, S, n + S] (a tree), n = the cache's length."""
    S, n, cap = ids.shape[1], cache.length, cache.capacity
    if n + width > cap:
        # the speculative loop sizes the cache for the prompt, the new tokens and one tree: a bound, not a guess
        raise DraftCacheFull(f"the draft's KV cache ({cap} rows) cannot take {width} more after {n}")
    allow = torch.zeros(width, cap, dtype=torch.bool)
    if mask is None or mask.dim() == 2:
        cols = torch.ones(n + S, dtype=torch.bool) if mask is None else mask[0, :n + S].bool()
        causal = torch.arange(n + S)[None, :] <= (n + torch.arange(S))[:, None]
        allow[:S, :n + S] = causal & cols
    else:
        allow[:S, :n + S] = mask[0, 0, :, :n + S] == 0
    allow[S:, 0] = True  # padding rows: one admitted column, so their softmax stays finite
    add = torch.zeros(1, 1, width, cap, dtype=dtype).masked_fill_(~allow.view(1, 1, width, cap), torch.finfo(dtype).min)
    p = torch.zeros(1, width, dtype=torch.long)
    p[:, :S] = torch.arange(n, n + S) if pos is None else pos
    x = torch.zeros(1, width, dtype=ids.dtype)
    x[:, :S] = ids
    return x, p, add, torch.arange(n, n + width)


class StepGraphs:
    """CUDA graphs of a draft's decoder layers, one per padded width, on one TreeCache."""

    def __init__(self, layers: nn.ModuleList, device: torch.device):
        self.layers, self.device = layers, device
        self.graphs: dict[int, tuple] = {}  # width -> (graph, static hidden, static kwargs, output)
        self.warm: set[int] = set()  # widths that ran eagerly once (the warm-up before a capture)
        self.cache: TreeCache | None = None  # the cache the graphs write into
        self.write_at: torch.Tensor | None = None  # that cache's static slot buffer
        self.stream = torch.cuda.Stream(device)
        self.pool = None
        self.captures = self.replays = 0
        self.reason: str | None = None  # why graphs are off, when they are

    def bind(self, cache: TreeCache) -> None:
        """Graphs bake in the cache's addresses: a new cache drops them."""
        if cache is not self.cache:
            self.graphs.clear()
            self.warm.clear()
            self.cache = cache
            self.write_at = torch.zeros(max(WIDTHS), dtype=torch.long, device=self.device)

    def run(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The layers over ``hidden`` [1, W, H]: replayed, captured, or (the first time for a width,
        or when graphs are off) eager."""
        w = hidden.shape[1]
        g = self.graphs.get(w)
        if g is None and (self.reason is not None or w not in self.warm):
            self.warm.add(w)
            return _layers(self.layers, hidden, kwargs)
        if g is None:
            g = self._capture(hidden, kwargs)
            if g is None:
                return _layers(self.layers, hidden, kwargs)
        graph, h, kw, out = g
        h.copy_(hidden)
        for k, dst in kw.items():
            for d, s in zip(_tensors(dst), _tensors(kwargs[k])):
                d.copy_(s)
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, hidden: torch.Tensor, kwargs: dict):
        h = hidden.clone()
        kw = {k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone()) if _tensors(v) else v
              for k, v in kwargs.items()}
        try:
            with untimed(self.layers):
                graph, out = record_graph(lambda: _layers(self.layers, h, kw), self.stream, self.device, self.pool)
        except RuntimeError as e:  # a layer that cannot be captured: eager from now on, and say why
            self.reason = f"capturing the draft's layers failed: {str(e).splitlines()[0]}"
            log.warning("draft tree steps run eagerly: %s", self.reason)
            torch.cuda.synchronize(self.device)
            return None
        if self.pool is None:
            self.pool = graph.pool()
        self.captures += 1
        self.graphs[hidden.shape[1]] = (graph, h, {k: v for k, v in kw.items() if _tensors(v)}, out)
        return self.graphs[hidden.shape[1]]


def _tensors(v) -> list[torch.Tensor]:
    return _flat(v) or []


def _layers(layers: nn.ModuleList, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layers' own forwards, not their module calls: the target's hooks on the layers the draft
    shares only time them, and a timing event recorded inside a capture is invalid outside it."""
    for layer in layers:
        out = layer.forward(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class LayerStack(nn.Module):
    """Stands in for the first decoder layer while a graphed draft forward runs: it runs every
    layer (through :class:`StepGraphs`); :class:`PassThrough` stands in for the others."""

    def __init__(self, graphs: StepGraphs):
        super().__init__()
        self.graphs = graphs

    def forward(self, hidden_states, **kwargs):
        return self.graphs.run(hidden_states, kwargs)


class PassThrough(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states
