"""KV caches of a speculating model: length, rows kept after a round (the accepted tree path is
not contiguous), and whether a model takes the tree mask."""
from __future__ import annotations

import torch


# Architectures whose transformers 5.x attention was checked (tests/test_speculate.py) to
# honour a custom 4D additive mask with explicit position ids, under sdpa and eager. Others
# draft a chain, which needs only the ordinary causal mask.
TREE_MASK_ARCHS = frozenset({"llama", "qwen2", "mistral", "gemma"})
TREE_MASK_ATTN = frozenset({"sdpa", "eager"})  # flash/flex kernels take no additive 4D mask


def ones(width: int) -> torch.Tensor:
    """A 2D all-visible mask: the model builds the causal mask itself (chains need no more)."""
    return torch.ones(1, width, dtype=torch.long)


def cache_len(cache) -> int:
    return cache.get_seq_length()


def gatherable(cache) -> bool:
    """Rows of a cache can be re-indexed when every layer is a plain growing DynamicLayer
    (sliding-window layers drop rows and would need the window in the tree mask too)."""
    from transformers.cache_utils import DynamicLayer

    if hasattr(cache, "keep_rows"):  # the draft's static tree cache (runtime/tree_cache.py)
        return True
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def keep_rows(cache, keep: list[int]) -> None:
    """Keep cache rows ``keep`` (sorted, distinct) of every layer, in that order. Rows before the
    first gap stay where they are; only the rows after it (the accepted tree path, a few
    tokens) are copied down, in place, and the rest is cut off as a view: a round costs a
    copy of the path, not of the whole context."""
    if hasattr(cache, "keep_rows"):  # a static cache re-orders its rows in place
        cache.keep_rows(keep)
        return
    n = cache_len(cache)
    p = next((j for j, k in enumerate(keep) if k != j), len(keep))  # keep[:p] == range(p)
    if p == len(keep):
        if len(keep) < n:
            cache.crop(-(n - len(keep)))
        return
    tail = torch.tensor(keep[p:])
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            i = tail.to(layer.keys.device)
            # index_select copies first, so the overlapping in-place write is safe (rows only move down)
            layer.keys[..., p:len(keep), :] = layer.keys.index_select(-2, i)
            layer.values[..., p:len(keep), :] = layer.values.index_select(-2, i)
            layer.keys = layer.keys[..., :len(keep), :]
            layer.values = layer.values[..., :len(keep), :]


def tree_mode(model) -> tuple[bool, str]:
    """(chain forced, why) for a model."""
    cfg = model.config
    attn = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if cfg.model_type not in TREE_MASK_ARCHS:
        return True, f"tree attention not verified for {cfg.model_type}: chain drafting"
    if attn not in TREE_MASK_ATTN:
        return True, f"attention {attn} takes no custom 4D mask: chain drafting"
    return False, ""
