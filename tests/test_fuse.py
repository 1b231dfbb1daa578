"""Sibling fusion (runtime/fuse.py): q/k/v and gate/up of resident layers as one
matrix-vector product over a regrouped layout. The fused kernel (bitsandbytes' gemv) only
runs on CUDA, so these CPU tests give the 4-bit scheme a reference gemv (dequantize, then
F.linear) and check layouts, groups, call counts and tokens; test_gpu.py runs the real kernel."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny, shard_to

from qstream.generate import SamplingConfig, generate_ids
from qstream.quant.bnb4 import FourBit
from qstream.runtime.fuse import plan_groups
from qstream.store.tensors import group_key, read_header, regroup, relayout, views


def test_regroup_lays_groups_back_to_back_and_keeps_every_tensor(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ts = {"a.k": torch.randn(3, 4, generator=g), "a.o": torch.randn(5, dtype=torch.float64, generator=g),
          "a.q": torch.randn(2, 4, generator=g), "a.v": torch.randn(7, 4, generator=g),
          "b": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g)}
    save_file(ts, tmp_path / "f.safetensors")
    h = read_header(tmp_path / "f.safetensors")
    buf = torch.frombuffer(bytearray((tmp_path / "f.safetensors").read_bytes()[h.data_offset:]), dtype=torch.uint8)
    order = ["a.q", "a.k", "a.v"]
    h2 = regroup(h, [order])
    got = views(relayout(buf, h, h2), h2)
    for k, t in ts.items():
        assert torch.equal(got[k], t), k
    assert torch.equal(got[group_key(order)], torch.cat([ts[k] for k in order]))
    with pytest.raises(ValueError):
        regroup(h, [["a.q", "a.o"]])  # dtypes differ


def _reference_gemv(calls):
    def gemv(self, x, packed, meta, bias):
        if x.numel() != x.shape[-1]:
            return None
        calls.append(tuple(meta["shape"]))
        return F.linear(x, self.dequantize(packed, meta, dtype=x.dtype), bias)
    return gemv


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_fused_siblings_give_the_unfused_tokens(tmp_path, monkeypatch, arch):
    import qstream

    src = make_tiny(tmp_path / "m", arch, num_hidden_layers=3, intermediate_size=96)
    shards = shard_to(tmp_path, src, "nf4", compute_dtype="float32", block_size=32)
    calls = []
    monkeypatch.setattr(FourBit, "gemv", _reference_gemv(calls), raising=False)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    out, counts = {}, {}
    for fuse in (False, True):
        calls.clear()
        m = qstream.load(shards, device="cpu", fuse=fuse, max_seq=64)
        try:
            groups = [plan_groups(b) for b in m.hooks.bindings.values()]
            r = generate_ids(m, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=10))
        finally:
            m.close()
        out[fuse], counts[fuse] = r.new_tokens, sum(c != (256, 64) for c in calls)  # not the head's
    # per layer: q/k/v and gate/up joined -> 4 products instead of 7
    assert [len(g) for g in groups] == [2, 2, 2]
    assert {tuple(g.meta["shape"]) for g in groups[0]} == {(64 + 2 * 32, 64), (2 * 96, 64)}
    steps = 9 * 3  # decode steps x layers (the prefill has 7 rows: no gemv)
    assert counts[False] == 7 * steps and counts[True] == 4 * steps
    assert out[True] == out[False]


def test_formats_without_joinable_rows_are_left_alone(tmp_path):
    import qstream

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=2)
    shards = shard_to(tmp_path, src, "int8", compute_dtype="float32")
    m = qstream.load(shards, device="cpu", fuse=True, max_seq=64)
    try:
        assert all(plan_groups(b) == [] for b in m.hooks.bindings.values())
    finally:
        m.close()


@pytest.mark.parametrize("scheme,group,joined", [("q4", 32, True), ("q4k", 32, True), ("q3", 32, False)])
def test_fitted_schemes_join_their_siblings(tmp_path, monkeypatch, scheme, group, joined):
    """q4 joins by its stored tensors; q4k by its codes plus the members' settled float16 grids (no
    second copy: the members' scale and min become slices of the joined ones); q3 stores each bit field
    for the whole matrix in turn, so it cannot join and is left alone."""
    import qstream
    from qstream.quant.affine import Affine

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=2, intermediate_size=96)
    shards = shard_to(tmp_path, src, scheme, compute_dtype="float32", block_size=group)
    calls = []
    monkeypatch.setattr(Affine, "gemv", _reference_gemv(calls))
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    out = {}
    for fuse in (False, True):
        calls.clear()
        m = qstream.load(shards, device="cpu", fuse=fuse, max_seq=64)
        try:
            groups = [plan_groups(b) for b in m.hooks.bindings.values()]
            out[fuse] = generate_ids(m, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=6)).new_tokens
            if fuse and joined:
                attn = m.hf.model.layers[0].self_attn
                f = attn.q_proj.shared[0]
                assert f.packed["scale"].shape[0] == 64 + 2 * 32
                assert attn.k_proj.packed["scale"].data_ptr() == f.packed["scale"][64:96].data_ptr()  # a slice
                assert "grid" not in f.packed
        finally:
            m.close()
    assert out[True] == out[False]
    assert [len(g) for g in groups] == ([2, 2] if joined else [0, 0])
