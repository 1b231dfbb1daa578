"""4-bit block formats of bitsandbytes (NF4 and FP4).

Stored: ``""`` uint8 [ceil(numel/2), 1] (two codes a byte) and ``absmax``
float32 [ceil(numel/block)]. bitsandbytes runs these kernels on CPU and CUDA,
so dequantization happens on whichever device holds the packed tensor.
"""
from __future__ import annotations

import functools
import math

import torch

from ..dtypes import DTYPE_NAMES
from . import gemv_triton

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.get_4bit_type(quant_type, device=device)


class FourBit:
    block_sizes = BLOCK_SIZES
    quantized = True

    def __init__(self, quant_type: str):
        self.name = quant_type
        self.quant_type = quant_type

    def quantize(self, w: torch.Tensor, block_size: int | None) -> tuple[dict[str, torch.Tensor], dict]:
        import bitsandbytes.functional as F

        src = w if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else w.float()
        packed, state = F.quantize_4bit(
            src.contiguous(), blocksize=block_size, quant_type=self.quant_type, compress_statistics=False
        )
        meta = {"scheme": self.name, "shape": list(w.shape), "dtype": DTYPE_NAMES[src.dtype], "block_size": block_size}
        return {"": packed, "absmax": state.absmax.float()}, meta

    def dequantize(self, packed: dict[str, torch.Tensor], meta: dict, *, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as F

        q = packed[""]
        shape = torch.Size(meta["shape"])
        # Dequantize flat, then view: bitsandbytes 0.50's CPU kernel garbles 2-D shapes whose
        # last dimension is not a multiple of 128 (relative error 0.25 instead of 0.09).
        state = F.QuantState(
            absmax=packed["absmax"],
            shape=torch.Size([shape.numel()]),
            code=_code(self.quant_type, q.device),
            blocksize=meta["block_size"],
            quant_type=self.quant_type,
            dtype=dtype,
        )
        return F.dequantize_4bit(q, state).view(shape)

    def gemv(self, x: torch.Tensor, packed: dict[str, torch.Tensor], meta: dict, bias: torch.Tensor | None) -> torch.Tensor | None:
        """x [.., in] with a single row on CUDA -> x @ W.T straight from the 4-bit codes
        (bitsandbytes' fused inference kernel; no dequantized weight is written). Several rows
        dequantize: a small-matmul kernel over these codes lost to that on the H200 (gemm_triton.py). None when
        the fused path does not apply, so the caller dequantizes instead. gemv_triton.NF4_KERNEL = "triton"
        (env QSTREAM_NF4_GEMV=triton) runs qstream's Triton kernel instead, falling back to bitsandbytes'."""
        if gemv_triton.NF4_KERNEL == "triton" and gemv_triton.available(x) and len(meta["shape"]) == 2:
            q = packed[""]
            y = gemv_triton.nf4_gemv(x, q, packed["absmax"], _code(self.quant_type, q.device),
                                     block=meta["block_size"], shape=meta["shape"], bias=bias)
            if y is not None:
                return y
        if not x.is_cuda or x.numel() != x.shape[-1] or x.dtype not in (torch.float16, torch.bfloat16):
            return None
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        q = packed[""]
        # the op itself: bnb.matmul_4bit's Python wrapper costs more than the kernel at batch 1
        y = torch.ops.bitsandbytes.gemv_4bit.default(x, q, meta["shape"], packed["absmax"], _code(self.quant_type, q.device),
                                                     meta["block_size"])
        return y if bias is None else y + bias

    def join_rows(self, metas: list[dict]) -> dict | None:
        """The metadata of the weight whose rows are the given weights' rows, one after the
        other, or None when their codes cannot simply be concatenated: codes are packed two a
        byte over the flattened weight with one absmax per block, so concatenating the packed
        tensors joins the rows when every weight fills whole blocks (runtime/fuse.py)."""
        first = metas[0]
        ins = first["shape"][-1]
        for m in metas:
            n = math.prod(m["shape"])
            if (m["scheme"] != first["scheme"] or m["block_size"] != first["block_size"] or len(m["shape"]) != 2
                    or m["shape"][-1] != ins or n % m["block_size"] or n % 2 or m["dtype"] != first["dtype"]):
                return None
        return {**first, "shape": [sum(m["shape"][0] for m in metas), ins]}

    def error_bound(self, block_size: int) -> float:
        # Gaussian weights: NF4 0.088 at block 32 rising to 0.113 at 4096; FP4 0.115 to 0.163
        base = 0.10 if self.quant_type == "nf4" else 0.13
        return base + 0.007 * math.log2(block_size / 32)


