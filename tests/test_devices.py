"""Several devices (runtime/devices.py) on CPU: two "cpu" devices run the per-range machinery
(one pipeline per range, the hand-over hooks, per-range plans with resident and streamed layers
mixed) and must give what one device gives."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qstream
from conftest import byte_tokenizer, make_tiny, shard_to
from qstream.cli import main
from qstream.errors import BudgetError, QstreamError
from qstream.generate import SamplingConfig, generate, generate_ids
from qstream.runtime.devices import HandOver, MultiDeviceModel, parse_budgets, parse_devices


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devices")
    src = make_tiny(tmp / "m", "llama", num_hidden_layers=8)
    byte_tokenizer(src)
    return shard_to(tmp, src, "fp32", compute_dtype="float32")


def _sizes(out):
    probe = qstream.load(out, device="cpu", max_seq=64, max_batch=2)
    fixed, layer = probe.plan.fixed_bytes, max(probe.layer_bytes)
    probe.close()
    return fixed, layer


def _budgets(out) -> list[int]:
    """Device 0: its fixed costs + 4 layers (with 8 layers to share, the balanced split gives it 5:
    one resident, four streamed through slots); device 1: its fixed costs + 2 layers (all it holds streams).
    The per-device fixed costs (no head on device 0, a share of the KV cache) come from a probe."""
    fixed, layer = _sizes(out)
    probe = qstream.load(out, devices=["cpu", "cpu"], gpu_memory=[fixed * 2] * 2, max_seq=64, max_batch=2)
    f0, f1 = (p.plan.fixed_bytes for p in probe.plan.parts)
    probe.close()
    return [f0 + 4 * layer, f1 + 2 * layer]


def _multi(out, host_memory="auto", **kw):
    """Two "cpu" devices with resident and streamed layers mixed; host_memory=0 streams from disk
    through each range's reader thread."""
    return qstream.load(out, devices=["cpu", "cpu"], gpu_memory=_budgets(out), host_memory=host_memory, max_seq=64,
                        max_batch=2, **kw)


@pytest.mark.parametrize("host_memory", ["auto", 0])
def test_two_devices_give_the_logits_and_tokens_of_one(tiny, host_memory):
    ref = qstream.load(tiny, device="cpu", max_seq=64, max_batch=2)
    m = _multi(tiny, host_memory=host_memory)
    try:
        assert isinstance(m, MultiDeviceModel) and len(m.devices) == 2
        a, b = m.plan.parts
        assert len(a.layers) and len(b.layers) and a.layers.stop == b.layers.start
        assert a.plan.resident and a.plan.streamed and b.plan.streamed  # resident and streamed ranges mixed
        assert set(m.plan.resident) | set(m.plan.streamed) == set(range(8))
        per = m.tier_bytes_by_device()  # bench's floor: the busiest link's share
        assert len(per) == 2 and sum(t["host"] + t["disk"] for t in per.values()) == sum(m.tier_bytes().values()) > 0
        ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        torch.testing.assert_close(m(ids), ref(ids), rtol=1e-5, atol=1e-5)
        for _ in range(2):  # twice: the pipelines wrap around into the next pass
            got = generate_ids(m, ids, mask, SamplingConfig(max_new_tokens=10)).new_tokens
            assert got == generate_ids(ref, ids, mask, SamplingConfig(max_new_tokens=10)).new_tokens
        assert m.timing()["layer_visits"] > 0
    finally:
        m.close()
        ref.close()


@pytest.mark.parametrize("budgets,sizes", [(None, [4, 4]), ("first-unlimited", [8, 0])])
def test_unlimited_budgets_split_evenly_or_leave_the_last_device_only_the_head(tiny, budgets, sizes):
    fixed, layer = _sizes(tiny)
    gm = None if budgets is None else [None, fixed + 2 * layer]
    ref = qstream.load(tiny, device="cpu", max_seq=64, max_batch=2)
    m = qstream.load(tiny, devices="cpu,cpu", gpu_memory=gm, max_seq=64, max_batch=2)
    try:
        assert [len(p.layers) for p in m.plan.parts] == sizes and not m.plan.streamed
        ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(m(ids), ref(ids), rtol=1e-5, atol=1e-5)
    finally:
        m.close()
        ref.close()


def test_layer_major_over_two_devices_equals_the_plain_forward(tiny):
    m = _multi(tiny, host_memory=0)
    try:
        batches = [{"input_ids": torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(s))} for s in (2, 3)]
        got = m.layer_major(batches, lambda j, h: m.logits(h))
        for b, g in zip(batches, got):
            torch.testing.assert_close(g, m(b["input_ids"]), rtol=1e-5, atol=1e-5)
    finally:
        m.close()


def test_speculative_decoding_on_a_two_device_target(tiny, tmp_path):
    from qstream.speculate import SpecConfig, speculative_generate
    from qstream.generate import load_tokenizer

    tok = load_tokenizer(tiny)
    draft = qstream.load(shard_to(tmp_path, tiny.parent / "m", "nf4", compute_dtype="float32"), device="cpu")
    target = _multi(tiny)
    try:
        cfg = SamplingConfig(max_new_tokens=12, chat=False)
        r = speculative_generate(target, draft, tok, ["hello there"], cfg, SpecConfig(budget=8, fallback=False))
        assert r.texts[0] == generate(target, tok, ["hello there"], cfg).texts[0]
        assert r.spec.passes > 0
    finally:
        target.close()
        draft.close()


def test_hand_over_gives_each_range_its_inputs_on_its_device_once_per_pass():
    """Range 1 on the meta device: its layers get the hidden state and every tensor kwarg there,
    and the layers of a range get the same moved objects (one copy per pass, graph-friendly)."""
    seen = []

    class Probe(nn.Module):
        def forward(self, h, *, mask=None, pe=None, cache=None):
            seen.append((h.device.type, mask, pe, cache))
            return h

    layers = nn.ModuleList(Probe() for _ in range(4))
    head = Probe()
    hand = HandOver(layers[:3], [range(0, 3), range(3, 3)], [torch.device("cpu"), torch.device("meta")], (head,),
                    torch.device("meta"))  # range 1 empty: the head still sits on the last device
    head(torch.zeros(1, 3))
    assert seen.pop()[0] == "meta"
    hand.remove()
    hand = HandOver(layers, [range(0, 2), range(2, 4)], [torch.device("cpu"), torch.device("meta")])
    cache = object()
    mask, pe = torch.ones(1, 3), (torch.zeros(1, 3), torch.ones(1, 3))
    h = torch.zeros(1, 3)
    for layer in layers:
        h = layer(h, mask=mask, pe=pe, cache=cache)
    assert [s[0] for s in seen] == ["cpu", "cpu", "meta", "meta"]
    assert seen[0][1] is mask and seen[1][2] is pe  # range 0 is already where its inputs are
    assert seen[2][1].device.type == "meta" and all(t.device.type == "meta" for t in seen[2][2])
    assert seen[2][1] is seen[3][1] and seen[2][2] is seen[3][2]  # moved once for the range
    assert all(s[3] is cache for s in seen)
    hand.remove()
    seen.clear()
    layers[2](torch.zeros(1, 3), mask=mask)
    assert seen[0][0] == "cpu"  # removed: nothing moves any more


def test_device_lists_and_budgets_are_checked():
    assert parse_devices("cpu,cpu") == [torch.device("cpu")] * 2
    for bad in ("", "cpu,,cpu", "cpu,tpu", "cpu,banana"):
        with pytest.raises(QstreamError):
            parse_devices(bad)
    if not torch.cuda.is_available():
        with pytest.raises(QstreamError, match="CUDA is not available"):
            parse_devices("cuda:0,cuda:1")
    assert parse_budgets("4GiB", 2) == ["4GiB", "4GiB"]
    assert parse_budgets("4GiB, 8GiB", 2) == ["4GiB", "8GiB"]
    with pytest.raises(BudgetError):
        parse_budgets(["1GiB"] * 3, 2)


@pytest.mark.parametrize("args,words", [
    (["--devices", "cpu,,cpu"], "comma-separated"),
    (["--devices", "cpu,tpu"], "unknown device"),
    (["--devices", "cpu,cpu", "--device", "cpu"], "not both"),
    (["--devices", "cpu,cpu", "--gpu-memory", "1GiB,2GiB,3GiB"], "3 budgets for 2 devices"),
])
def test_bad_device_lists_are_one_line_and_exit_2(tiny, capsys, args, words):
    code = main(["generate", str(tiny), "-p", "hi", "-n", "2", "-q", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("qstream: error:") and words in lines[0], err


def test_generate_cli_on_two_devices_prints_what_one_device_prints(tiny, capsys):
    b0, b1 = _budgets(tiny)
    argv = ["generate", str(tiny), "-p", "hello", "-n", "6", "-q", "--no-chat"]
    assert main([*argv, "--device", "cpu"]) == 0
    one = capsys.readouterr().out
    code = main([*argv, "--devices", "cpu,cpu", "--gpu-memory", f"{b0},{b1}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == one


def test_a_last_device_too_small_for_the_head_is_refused_in_one_line(tiny):
    with pytest.raises(BudgetError, match="cannot hold the head"):
        qstream.load(tiny, devices="cpu,cpu", gpu_memory=[None, 1000], max_seq=64, max_batch=2)
