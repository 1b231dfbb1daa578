"""The fused GEMVs on CUDA at Llama-3-8B sizes, through QLinear and inside a CUDA graph; skipped without
a GPU and Triton (CI has neither). tests/test_gemv_triton.py checks every width and layout on CUDA too."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("triton")

from qstream.quant import QuantSpec, dequantize, gemv_triton, get_scheme, quantize  # noqa: E402
from qstream.runtime.qlinear import QLinear  # noqa: E402


def _linear(scheme: str, block: int, n: int, k: int) -> tuple[QLinear, dict, dict]:
    w = torch.randn(n, k, device="cuda", generator=torch.Generator("cuda").manual_seed(n + k)) * 0.02
    packed, meta = quantize(w, QuantSpec(scheme, block))
    q = QLinear(k, n, bias=False, meta=meta, compute_dtype=torch.bfloat16)
    q.bind(packed)
    return q, packed, meta


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("scheme,block", [("q4", 64), ("q3", 64), ("q8", 128), ("q2", 32), ("nf4", 64), ("q4k", 32),
                                          ("q3k", 32)])
@pytest.mark.parametrize("n,k", [(4096, 14336), (1024, 4096)])
def test_fused_qlinear_matches_dequantize_matmul_at_8b_sizes(monkeypatch, scheme, block, n, k):
    monkeypatch.setattr(gemv_triton, "NF4_KERNEL", "triton")
    q, packed, meta = _linear(scheme, block, n, k)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    y = q(x)
    want = x.float() @ dequantize(packed, meta, dtype=torch.float32).T
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, n)
    assert _rel(y, want) < 1e-2
    q.settle()  # resident form (k-schemes: the 6-bit grid expanded once): the same result
    assert _rel(q(x), want) < 1e-2


def test_triton_nf4_agrees_with_bitsandbytes(monkeypatch):
    q, packed, meta = _linear("nf4", 64, 4096, 4096)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(gemv_triton, "NF4_KERNEL", "bnb")
    ref = get_scheme("nf4").gemv(x, packed, meta, None)
    monkeypatch.setattr(gemv_triton, "NF4_KERNEL", "triton")
    got = get_scheme("nf4").gemv(x, packed, meta, None)
    assert _rel(got, ref) < 1e-2


@pytest.mark.parametrize("scheme,block", [("q4", 64), ("nf4", 64), ("q4k", 32)])
def test_fused_gemv_replays_in_a_cuda_graph(monkeypatch, scheme, block):
    """Captured once (after an eager warm-up that compiles the kernel), replayed on new input in place
    (q4k unsettled: the grid expansion is captured too, as for a streamed layer)."""
    monkeypatch.setattr(gemv_triton, "NF4_KERNEL", "triton")
    q, _, _ = _linear(scheme, block, 1024, 4096)
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = q(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, q(x))
