"""What the Triton kernel tests share (test_gemv_triton.py, test_gemm_triton.py): the skip without CUDA or
Triton's interpreter, the interpreter's numpy patch, the device, random weights and the tolerance check.

On CPU the kernels run under the interpreter (``TRITON_INTERPRET=1`` set before Python starts: Triton reads it
when the kernels are defined). Importing this module skips the importing test module otherwise.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

if INTERPRET:
    import triton.runtime.interpreter as _interp

    # Triton 3.5's interpreter turns a scalar kernel argument into a 1-element numpy array and
    # int()s it for range(); numpy >= 2.3 refuses int() on 1-D arrays. Index the element instead.
    _patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor):
        _patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    _interp._patch_lang_tensor = _patch_lang_tensor

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.02).to(DEV)


def check(y: torch.Tensor, x: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None, rel: float) -> None:
    """y against x @ w_hat.T in float64; the tolerance scales with |x| @ |w_hat|.T (the size of the terms summed)."""
    xd, wd = x.reshape(-1, x.shape[-1]).double(), w_hat.double()
    want = xd @ wd.T + (0 if bias is None else bias.double())
    scale = xd.abs() @ wd.abs().T + 1e-6
    err = ((y.reshape(want.shape).double() - want).abs() / scale).max().item()
    assert err < rel, err
