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
