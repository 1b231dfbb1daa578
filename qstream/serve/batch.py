"""The batched KV cache of the running sequences as pure tensor operations: merge a newly
prefilled sequence in by left-padding along the sequence axis, drop finished rows, and trim
leading columns that are padding in every row.

Left padding keeps every row's newest token in the last column, so one decode step feeds
one token per row at one shared ``cache_position``; the attention mask hides the padding and
position ids stay per sequence, which is exactly how ``generate_ids`` runs a left-padded batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import QstreamError


def check_cache(cache) -> None:
    """Only full-attention layers can be padded and merged: a sliding-window layer keeps a
    window of the newest tokens per layer, and padding would shift what it keeps."""
    from transformers.cache_utils import DynamicLayer

    bad = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if bad:
        raise QstreamError(f"qstream serve needs full-attention KV caches; this model's cache has {', '.join(sorted(bad))} layers")


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]  # F.pad lists the last dimension first
    return F.pad(t, pad)


def merge(cache, mask: torch.Tensor | None, new_cache, new_mask: torch.Tensor):
    """Append the rows of ``new_cache`` (mask ``new_mask`` [b, Ln]) to ``cache`` (mask [B, Lb]);
    the shorter side is left-padded to the longer. ``cache`` None means an empty batch.
    Returns (cache, mask); ``cache`` is modified in place."""
    if cache is None:
        return new_cache, new_mask
    lb, ln = mask.shape[1], new_mask.shape[1]
    length = max(lb, ln)
    for old, new in zip(cache.layers, new_cache.layers):
        dev = old.keys.device  # an offloaded cache may hold this layer in host memory right now
        old.keys = torch.cat([_pad_left(old.keys, length - lb, 2), _pad_left(new.keys.to(dev), length - ln, 2)], 0)
        old.values = torch.cat([_pad_left(old.values, length - lb, 2), _pad_left(new.values.to(dev), length - ln, 2)], 0)
    mask = torch.cat([_pad_left(mask, length - lb, 1), _pad_left(new_mask, length - ln, 1)], 0)
    return cache, mask


def select(cache, mask: torch.Tensor, keep: list[int]):
    """Keep the rows ``keep`` (in order), then trim leading all-padding columns. Returns
    (cache, mask), or (None, None) when no row is kept."""
    if not keep:
        return None, None
    if keep != list(range(mask.shape[0])):
        for layer in cache.layers:
            idx = torch.tensor(keep, device=layer.keys.device)
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        mask = mask[keep]
    return trim(cache, mask)


def trim(cache, mask: torch.Tensor):
    """Drop leading columns that no row attends to; the cache then never grows longer than
    its longest sequence, whatever the order in which sequences came and went."""
    first = int(mask.any(0).int().argmax())  # the first column some row uses
    if first > 0:
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, first:].contiguous()
            layer.values = layer.values[:, :, first:].contiguous()
        mask = mask[:, first:]
    return cache, mask
