"""CUDA checks of the streamed runtime; skipped without a GPU (CI has none)."""
import pytest
import torch

from conftest import make_tiny, shard_to

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("scheme", ["nf4", "int8", "bf16"])
@pytest.mark.parametrize("budget,host", [(None, "auto"), ("half", "auto"), ("min", 0), ("min", "auto")])
def test_streamed_cuda_matches_dense_twin(tmp_path, scheme, budget, host):
    import qstream
    from qstream.runtime.twin import dense_twin

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    out = shard_to(tmp_path, src, scheme)
    probe = qstream.load(out, device="cuda", max_seq=64, max_batch=2)
    fixed = probe.plan.fixed_bytes
    layer = max(h.data_size for h in _headers(out))
    probe.close()
    gpu_memory = {None: None, "half": fixed + 6 * layer, "min": fixed + 2 * layer}[budget]
    ids = torch.randint(0, 256, (2, 24))
    ref = dense_twin(out, device="cuda")
    with torch.no_grad():
        want = ref(ids.cuda()).logits.float()
    m = qstream.load(out, device="cuda", gpu_memory=gpu_memory, host_memory=host, max_seq=64, max_batch=2)
    for _ in range(3):  # the pipeline runs across forwards: check it stays in step
        got = m(ids).float()
        assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()
    if budget == "min":
        assert len(m.plan.streamed) >= 6
    m.close()


def _headers(out):
    from qstream.store import read_header, read_manifest

    m = read_manifest(out)
    return [read_header(m.path(e)) for e in m.files if e.kind == "layer"]


def _min_budget(out):
    import qstream

    probe = qstream.load(out, device="cuda", max_seq=64, max_batch=2, warmup=False)
    fixed, layer = probe.plan.fixed_bytes, max(probe.layer_bytes)
    probe.close()
    return fixed + 2 * layer


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("budget", [None, "min"])
def test_graph_replay_gives_the_tokens_of_eager_decode(tmp_path, compute_dtype, budget):
    """CUDA-graph decode (per-layer graphs over the static cache) against the same static cache
    launched kernel by kernel (identical kernels: identical tokens) and, in float32, against the
    dynamic-cache eager path. Under the minimum budget every layer streams and each copy is
    delayed on the copy stream: a graph that read its slot before the copy finished would read
    another layer's weights and change the tokens."""
    import qstream
    from qstream.generate import SamplingConfig, generate_ids

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=6, hidden_size=256, intermediate_size=512)
    out = shard_to(tmp_path, src, "nf4", compute_dtype=compute_dtype)
    gpu_memory = _min_budget(out) if budget == "min" else None
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    tokens = {}
    for mode in ("eager", "static", "graph"):
        m = qstream.load(out, device="cuda", decode=mode, gpu_memory=gpu_memory, max_batch=2, max_seq=64)
        try:
            if budget == "min":
                assert len(m.plan.streamed) == 6
                m.pipeline.copy_delay_cycles = 5_000_000  # a few ms per copy: far longer than a layer's compute
            if mode == "graph":
                assert m.graphs is not None and m.graphs.reason is None, m.describe_decode()
                captured = m.graphs.captures
                assert m.graphs.covered() == set(range(6))  # load()'s warm-up captured every layer (and slot)
                assert captured == (6 if budget == "min" else 1)  # resident layers: one graph for the run
            r = generate_ids(m, ids, mask, SamplingConfig(max_new_tokens=12))
            tokens[mode] = r.new_tokens
            if mode == "graph":
                assert m.graphs.captures == captured  # nothing left to capture after load
                assert m.graphs.layer_replays >= 11 * 6
        finally:
            m.close()
    assert tokens["graph"] == tokens["static"]
    if compute_dtype == "float32":
        assert tokens["graph"] == tokens["eager"]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group,cols", [(64, 256), (128, 576), (32, 100)])
def test_triton_dequantization_equals_the_torch_path(bits, group, cols):
    from qstream.quant import QuantSpec, quantize
    from qstream.quant import affine_triton
    from qstream.quant.affine import Affine

    w = torch.randn(48, cols, device="cuda") * 0.02
    packed, meta = quantize(w, QuantSpec(f"q{bits}", group))
    scheme = Affine(bits)
    fast = scheme.dequantize(packed, meta, dtype=torch.float32)
    assert affine_triton.available(packed["scale"])
    # the torch path on the CPU copy is the reference
    ref = scheme.dequantize({k: v.cpu() for k, v in packed.items()}, meta, dtype=torch.float32)
    torch.testing.assert_close(fast.cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch,scheme,group", [("llama", "nf4", 64), ("qwen2", "nf4", 64), ("llama", "q4", 64),
                                               ("qwen2", "q4k", 32)])
def test_fused_sibling_gemv_gives_the_unfused_tokens(tmp_path, arch, scheme, group):
    """q/k/v and gate/up as one gemv per group (runtime/fuse.py; bitsandbytes' for nf4, ours for q4 and
    q4k with its settled grids) against one gemv per linear: each output row is the same reduction over
    the same codes, so the tokens (and, up to reduction order, the logits) are the same."""
    import qstream
    from qstream.generate import SamplingConfig, generate_ids

    src = make_tiny(tmp_path / "m", arch, num_hidden_layers=4, hidden_size=256, intermediate_size=512)
    out = shard_to(tmp_path, src, scheme, compute_dtype="bfloat16", block_size=group)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    tokens, fused_groups = {}, {}
    for fuse in (False, True):
        m = qstream.load(out, device="cuda", fuse=fuse, max_seq=64)
        try:
            fused_groups[fuse] = sum(q.shared is not None for q in m.hf.modules() if hasattr(q, "shared"))
            tokens[fuse] = generate_ids(m, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=12)).new_tokens
        finally:
            m.close()
    assert fused_groups == {False: 0, True: 4 * 5}
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("devices", [
    pytest.param(["cuda:0", "cuda:1"], marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")),
    ["cuda:0", "cuda:0"],  # two ranges on one GPU: the whole multi-device path but the peer copy
])
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_two_gpus_give_the_tokens_of_one(tmp_path, mode, devices):
    """Layers 0-2 on the first device, 3-5 on the second, every layer streamed (each device at
    its minimum budget) with every copy delayed: a range that read a slot before its own
    device's copy finished, or an activation handed over before the other device wrote it,
    changes the tokens."""
    import qstream
    from qstream.generate import SamplingConfig, generate_ids
    from qstream.runtime.devices import load_devices

    def load(**kw):
        return load_devices(out, devices=devices, allow_repeat=True, **kw)

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=6, hidden_size=256, intermediate_size=512)
    out = shard_to(tmp_path, src, "nf4", compute_dtype="float32")
    probe = load(max_seq=64, max_batch=2, warmup=False)
    budgets = [p.plan.fixed_bytes + 2 * max(probe.layer_bytes) for p in probe.plan.parts]  # fixed + 2 slots each
    probe.close()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    one = qstream.load(out, device="cuda:0", decode=mode, gpu_memory=_min_budget(out), max_batch=2, max_seq=64)
    try:
        want = generate_ids(one, ids, mask, SamplingConfig(max_new_tokens=12)).new_tokens
    finally:
        one.close()
    two = load(decode=mode, gpu_memory=budgets, max_batch=2, max_seq=64)
    try:
        assert [tuple(p.layers) for p in two.plan.parts] == [(0, 1, 2), (3, 4, 5)]
        assert all(len(p.plan.streamed) == 3 for p in two.plan.parts)
        two.pipeline.copy_delay_cycles = 5_000_000
        if mode == "graph":
            assert two.graphs is not None and two.graphs.reason is None, two.describe_decode()
            assert two.graphs.covered() == set(range(6))
        for _ in range(2):
            assert generate_ids(two, ids, mask, SamplingConfig(max_new_tokens=12)).new_tokens == want
        assert torch.cuda.current_device() == 0  # the hand-over's device switches do not leak out
    finally:
        two.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,n", [(1, 4096), (37, 576), (3, 896)])
def test_fused_rms_norm_equals_the_module(dtype, rows, n):
    """The one-kernel RMSNorm (runtime/fused_norm.py) against transformers' LlamaRMSNorm: the
    same float32 statistics, the same cast before the weight; only the reduction order differs."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qstream.runtime.fused_norm import fused_norms, restore_norms

    g = torch.Generator(device="cuda").manual_seed(0)
    norm = LlamaRMSNorm(n, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(n, generator=g, device="cuda"))
    x = 3 * torch.randn(rows, 1, n, generator=g, device="cuda").to(dtype)
    want = norm(x)
    assert fused_norms(norm) == 1
    got = norm(x)
    restore_norms(norm)
    assert "forward" not in norm.__dict__
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
