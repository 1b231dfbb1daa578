"""Decode paths: the static-KV-cache path (what CUDA graphs replay on a GPU) must give the
same tokens as the eager dynamic-cache path. Runs on CPU; the graph-replay twin of these
checks is in test_gpu.py."""
import pytest
import torch

from conftest import make_tiny, shard_to

from qstream.errors import QstreamError
from qstream.generate import SamplingConfig, generate_ids


@pytest.fixture(scope="module")
def fp32_shards(tmp_path_factory):
    # float32 compute: eager and static attention differ only by float rounding, far below
    # any argmax margin, so the tokens must be identical on any CPU
    tmp = tmp_path_factory.mktemp("decode")
    src = make_tiny(tmp / "m", "llama", num_hidden_layers=4)
    return shard_to(tmp, src, "nf4", compute_dtype="float32")


def _run(path, decode, ids, mask, n=12, **kw):
    import qstream

    m = qstream.load(path, device="cpu", decode=decode, max_batch=ids.shape[0], max_seq=64, **kw)
    try:
        first = generate_ids(m, ids, mask, SamplingConfig(max_new_tokens=n))
        again = generate_ids(m, ids, mask, SamplingConfig(max_new_tokens=n))  # the static cache is reused
        return m.decode_mode, first, again
    finally:
        m.close()


def test_static_cache_decode_gives_the_eager_tokens(fp32_shards):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second sequence
    mode_e, eager, _ = _run(fp32_shards, "eager", ids, mask)
    mode_s, static, static_again = _run(fp32_shards, "static", ids, mask)
    assert (mode_e, mode_s) == ("eager", "static")
    assert static.new_tokens == eager.new_tokens
    assert static_again.new_tokens == eager.new_tokens
    assert len(static.step_s) == static.decode_steps == 11


def test_static_cache_decode_under_a_streaming_budget(fp32_shards):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    _, eager, _ = _run(fp32_shards, "eager", ids, mask)
    import qstream

    probe = qstream.load(fp32_shards, device="cpu", max_seq=64)
    fixed, layer = probe.plan.fixed_bytes, max(probe.layer_bytes)
    probe.close()
    # room for the two staging slots only: every layer streams
    mode, static, _ = _run(fp32_shards, "static", ids, mask, gpu_memory=fixed + 2 * layer)
    assert mode == "static"
    assert static.new_tokens == eager.new_tokens


def test_cpu_auto_keeps_the_dynamic_cache_and_says_why(fp32_shards):
    import qstream

    m = qstream.load(fp32_shards, device="cpu", max_seq=64)
    try:
        assert m.decode_mode == "eager"
        assert "CUDA graphs need a CUDA device" in m.describe_decode()
        from transformers import DynamicCache

        assert isinstance(m.new_cache(1, 16), DynamicCache)
    finally:
        m.close()


def test_generation_longer_than_the_static_cache_falls_back_to_dynamic(fp32_shards):
    import qstream

    m = qstream.load(fp32_shards, device="cpu", decode="static", max_seq=16)
    try:
        from transformers import DynamicCache, StaticCache

        assert isinstance(m.new_cache(1, 16), StaticCache)
        assert isinstance(m.new_cache(1, 17), DynamicCache)
    finally:
        m.close()


def test_unknown_decode_mode_is_a_user_error(fp32_shards):
    import qstream

    with pytest.raises(QstreamError, match="unknown decode mode"):
        qstream.load(fp32_shards, device="cpu", decode="fast")


class _ReplayedBody:
    """Stands in for a CUDA graph on CPU: replay runs the captured function again on the
    same static buffers, as a graph replays its kernels on the addresses it captured."""

    def __init__(self, body):
        self.body = body

    def replay(self):
        self.body()


@pytest.mark.parametrize("streamed", [False, True])
def test_layer_graph_plumbing_gives_the_eager_tokens(fp32_shards, monkeypatch, streamed):
    """The graph wrapper's static buffers (hidden state in and out, mask, rotary, positions
    copied once per step) checked on CPU with a replay that re-runs the captured function:
    an input not copied into its static buffer would change the tokens."""
    import qstream
    from qstream.runtime.graphs import LayerGraphs

    monkeypatch.setattr(LayerGraphs, "_record", lambda self, body: (_ReplayedBody(body), None))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    _, eager, _ = _run(fp32_shards, "eager", ids, mask)
    kw = {}
    if streamed:
        probe = qstream.load(fp32_shards, device="cpu", max_batch=2, max_seq=64)
        kw["gpu_memory"] = probe.plan.fixed_bytes + 2 * max(probe.layer_bytes)
        probe.close()
    m = qstream.load(fp32_shards, device="cpu", decode="static", max_batch=2, max_seq=64, **kw)
    try:
        pipe = m.pipeline
        m.graphs = LayerGraphs(m.layers, streamed=set(m.plan.streamed), device=m.device,
                               slot_of=pipe.slot_of if pipe is not None else None)
        got = generate_ids(m, ids, mask, SamplingConfig(max_new_tokens=12))
        g = m.graphs
        assert g.reason is None
        if streamed:
            assert len(m.plan.streamed) == 4 and pipe.nslots == 2
        # 4 streamed layers cycle through 2 slots (each always lands in the same one): a graph
        # each; all resident: one graph for the run of 4 layers
        assert g.captures == (4 if streamed else 1)
        assert g.covered() == set(range(4))
        assert g.layer_replays == 11 * 4
        assert got.new_tokens == eager.new_tokens
    finally:
        m.close()
