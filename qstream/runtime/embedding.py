"""Token embeddings: kept in host RAM (on CUDA), or looked up from the stored head of a tied model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShardError
from ..quant import bitpack
from ..quant.affine import Affine
from ..quant.bnb4 import FourBit
from ..quant.passthrough import PassThrough
from .qlinear import QLinear


class HostEmbedding(nn.Module):
    """Token embeddings kept in host RAM: a lookup reads a few rows, so the
    table never needs device memory; only the [B, S, H] result is copied."""

    def __init__(self, weight: torch.Tensor, device: torch.device):
        super().__init__()
        self.weight_host = weight  # [V, H], deliberately not a registered parameter
        self.device = device
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, S]
        out = F.embedding(ids.to("cpu"), self.weight_host)  # [B, S, H]
        return out.to(self.device, non_blocking=False)


class HeadEmbedding(nn.Module):
    """The embedding of a tied model whose matrix is stored once, as the head: a lookup gathers the
    rows' codes (and scales) from the head's packed tensors, where the head lives, and dequantizes
    only those rows. No second copy of the matrix exists, on disk or in memory."""

    def __init__(self, head: QLinear, *, scale: float | torch.Tensor | None = None):
        super().__init__()
        self.head = head  # bound later (or rebound): the lookup always reads its current tensors
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.scale = scale  # models that scale their embeddings (Gemma's embed_scale) keep doing so

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, S]
        packed = self.head.packed
        if not packed:
            raise RuntimeError("HeadEmbedding used before the head's weights were bound")
        dev = packed[""].device
        rows = gather_rows(self.head.scheme, packed, self.head.meta, ids.reshape(-1).to(dev), self.head.compute_dtype)
        out = rows.view(*ids.shape, self.embedding_dim)  # [B, S, H]
        return out if self.scale is None else out * self.scale


def tie_embedding_to_head(hf: nn.Module, embedding: dict | None) -> None:
    """Replace the embedding module by a HeadEmbedding over the head (``embedding``: the manifest's
    record of a matrix stored once; None: nothing to do)."""
    if embedding is None:
        return
    mpath = embedding["name"].rsplit(".", 1)[0]
    head = hf.get_submodule(embedding["tensor"].rsplit(".", 1)[0])
    if not isinstance(head, QLinear):
        raise ShardError(f"the embedding is stored as {embedding['tensor']}, which is not a linear layer's weight; re-shard")
    scale = getattr(hf.get_submodule(mpath), "embed_scale", None)
    parent, child = mpath.rsplit(".", 1) if "." in mpath else ("", mpath)
    setattr(hf.get_submodule(parent) if parent else hf, child, HeadEmbedding(head, scale=scale))


def gather_rows(scheme, packed: dict[str, torch.Tensor], meta: dict, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` [N] of a stored [V, C] matrix, dequantized: [N, C], equal to
    ``scheme.dequantize(packed, meta)[rows]`` but reading only those rows' codes."""
    if isinstance(scheme, PassThrough):
        return packed[""][rows].to(dtype)
    if isinstance(scheme, Affine):
        return _affine_rows(scheme, packed, meta, rows, dtype)
    return _flat_block_rows(scheme, packed, meta, rows, dtype)


def _affine_rows(scheme: Affine, packed: dict[str, torch.Tensor], meta: dict, rows: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """q2 ... q8: every row is padded to whole groups and each bit field (bitpack) is stored row after
    row, so a row's bytes are one contiguous slice of every field's segment."""
    packed = scheme.affine_form(packed, meta)  # q2k ... q6k: the 6-bit grid as float16 scales (quant/kquant.py)
    V, C = meta["shape"]
    padded = C + (-C % meta["block_size"])
    parts, start = [], 0
    for width, _ in bitpack.fields(scheme.bits):
        per_row = padded * width // 8  # whole bytes: group sizes are multiples of 8
        parts.append(packed[""][start:start + V * per_row].view(V, per_row)[rows].reshape(-1))
        start += V * per_row
    sub = {"": torch.cat(parts) if len(parts) > 1 else parts[0], "scale": packed["scale"][rows], "min": packed["min"][rows]}
    return scheme.dequantize(sub, {**meta, "shape": [rows.numel(), C]}, dtype=dtype)


def _flat_block_rows(scheme, packed: dict[str, torch.Tensor], meta: dict, rows: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' blockwise formats (nf4, fp4, int8) cut the flattened matrix into blocks, which
    need not start at a row: gather the blocks covering each row, dequantize them, cut the row out."""
    V, C = meta["shape"]
    B = meta["block_size"]
    codes = packed[""].reshape(-1)
    per_byte = 2 if isinstance(scheme, FourBit) else 1  # codes a byte
    nb = -(-C // B) + (1 if C % B else 0)  # blocks a row can touch
    first = rows * C // B  # [N]
    blocks = (first[:, None] + torch.arange(nb, device=rows.device)).clamp_(max=packed["absmax"].numel() - 1)  # [N, nb]
    step = B // per_byte  # bytes a block
    idx = (blocks[..., None] * step + torch.arange(step, device=rows.device)).reshape(-1)
    sub_codes = codes[idx.clamp_(max=codes.numel() - 1)]  # the last block may be short: clamped bytes are cut below
    n = rows.numel()
    sub = {"": sub_codes.view(-1, 1) if per_byte > 1 else sub_codes, "absmax": packed["absmax"][blocks.reshape(-1)]}
    flat = scheme.dequantize(sub, {**meta, "shape": [n * nb * B]}, dtype=dtype).view(n, nb * B)
    offset = rows * C - first * B  # where each row starts inside its first block
    return flat.gather(1, offset[:, None] + torch.arange(C, device=rows.device))  # [N, C]
