"""CUDA check of the in-directory draft: shared resident layers, resident low-bit copies of the
streamed ones (triton dequantization), host-RAM embeddings, streamed target layers, and greedy
speculative output token-identical to plain greedy (float32). Skipped without a GPU."""
import pytest
import torch

from conftest import make_tiny, shard_to

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_in_dir_draft_on_cuda_is_exact(tmp_path):
    import qstream
    from qstream.generate import SamplingConfig, generate_ids
    from qstream.speculate import SpecConfig, speculative_generate_ids
    from qstream.store.manifest import read_manifest

    src = make_tiny(tmp_path / "m", "llama", num_hidden_layers=8)
    d = shard_to(tmp_path, src, "fp32", compute_dtype="float32", draft={"scheme": "q3", "group_size": 32})
    kw = dict(device="cuda", max_seq=160, prefill_chunk=128, max_slots=2, decode="eager", progress=False)
    full = qstream.load(d, draft=True, **kw)
    fixed, big = full.plan.fixed_bytes, max(full.layer_bytes)
    full.close()
    drafts = sum(f.size for f in read_manifest(d).draft_files())
    target = qstream.load(d, draft=True, gpu_memory=fixed + 2 * big + 3 * big + drafts, **kw)
    assert 0 < len(target.plan.resident) < 8 and target.draft.drafted == target.plan.streamed
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(max_new_tokens=32)
    want = generate_ids(target, ids, torch.ones_like(ids), cfg).new_tokens[0]
    r = speculative_generate_ids(target, target.draft, ids, cfg, SpecConfig(budget=32, max_depth=6, fallback=False))
    assert r.new_tokens[0] == want
    assert r.spec.tokens_per_pass > 1.5
    g = target.draft.graphs  # the tree steps ran on the static cache, replayed as CUDA graphs
    assert g.reason is None and g.captures > 0 and g.replays > 0, (g.reason, g.captures, g.replays)
    target.draft.static = False  # the dynamic cache's eager steps: the same output
    assert speculative_generate_ids(target, target.draft, ids, cfg, SpecConfig(budget=32, max_depth=6, fallback=False)
                                    ).new_tokens[0] == want
    target.close()
