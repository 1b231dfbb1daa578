"""Token embeddings kept in host RAM (on CUDA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
