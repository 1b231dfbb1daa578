"""A linear layer whose weight is stored in a qstream scheme and dequantized on
the fly, on the device that holds it. Tensors are bound from outside (the
streamed model points them into staging buffers), so the module owns no memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import get_scheme


class QLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, meta: dict, compute_dtype: torch.dtype,
                 stats=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.meta = meta
        self.scheme = get_scheme(meta["scheme"])
        self.compute_dtype = compute_dtype
        self.packed: dict[str, torch.Tensor] = {}
        self.bias_t: torch.Tensor | None = None
        self.has_bias = bias
        self.stats = stats  # set to a Stats to time dequantization with CUDA events
        self.fused = True  # use a scheme's fused single-row kernel when it has one
        self.shared = None  # (FusedGemv, index) when this layer's rows are joined with its siblings' (fuse.py)
        self.keep_dense = False  # dequantize once and keep the result (the head on CPU, see build.py)
        self._dense: torch.Tensor | None = None

    def bind(self, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        self.packed = packed
        self.bias_t = bias
        self._dense = None

    def settle(self) -> None:
        """Weights that stay bound for good: keep them in the scheme's run-time form, when it has one
        (q4k's 6-bit grid expanded once to float16 scales instead of on every call)."""
        form = getattr(self.scheme, "resident_form", None)
        if form is not None and self.packed:
            self.packed = form(self.packed, self.meta)

    def weight_dense(self) -> torch.Tensor:
        if self._dense is not None:
            return self._dense
        w = self.scheme.dequantize(self.packed, self.meta, dtype=self.compute_dtype)  # [out, in]
        if self.keep_dense:
            self._dense = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        if not self.packed:
            raise RuntimeError(f"QLinear {self.meta.get('name', '')} used before its weights were bound")
        x = x.to(self.compute_dtype)
        if self.shared is not None and self.fused:
            y = self.shared[0].output(self.shared[1], x)
            if y is not None:
                return y
        gemv = getattr(self.scheme, "gemv", None)
        if gemv is not None and self.fused:
            y = gemv(x, self.packed, self.meta, self.bias_t)  # decode step: no dequantized weight at all
            if y is not None:
                return y
        st = self.stats
        if st is not None and x.is_cuda and self.scheme.quantized:
            done = st.timed("dequant_s")
            w = self.weight_dense()
            done()
        else:
            w = self.weight_dense()
        return F.linear(x, w, self.bias_t)  # [..., out]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.meta['scheme']}, bias={self.has_bias}"
