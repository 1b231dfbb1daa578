#!/usr/bin/env python3
"""COSTS of self-speculative decoding rounds with the in-directory draft (issue 14), one figure
per process: load DIR with its draft resident under a budget, prefill a prompt into the target's
and the draft's caches, then per tree budget N time, with the real code (qstream.spec):

* one draft round (grow_tree: depth steps, each a forward of up to ``beam`` tree nodes), every
  forward timed on its own (synchronized) with its token count,
* the verify pass of the N-node tree (one target forward with the tree mask),
* the output head alone on N rows and on ``beam`` rows (to split per-layer costs from it),
* one plain one-token target step (eager, dynamic cache: the path the loop's plain steps take).

Random-weight shards accept nothing: this measures what rounds COST, never how many tokens they
yield; scripts/spec_extrapolate.py combines these costs with acceptance measured on real models.

    python3 scripts/spec_cost.py DIR --budget 4GiB --trees 16,64,256 --json out.json
    python3 scripts/spec_cost.py DIR --budget stream        # every layer streamed, all drafted
    python3 scripts/spec_cost.py DIR --budget resident      # unlimited: every layer resident
    python3 scripts/spec_cost.py DIR --budget scaled:24GiB:80   # the slice's share of a full model at 24 GiB

``scaled:SIZE:LAYERS``: DIR holds a slice of a LAYERS-layer model (same per-layer shapes). The
full model's plan under SIZE is computed (runtime/draft.py's plan_with_draft on LAYERS copies
of the slice's per-layer bytes; fixed costs that do not grow with depth, head and activations,
counted once; KV cache scaled by LAYERS), and the slice gets the budget that keeps the same
share of its layers resident (rounded), so its per-layer costs are those of the full model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qstream.eval.results import machine  # noqa: E402
from qstream.runtime import build  # noqa: E402
from qstream.runtime.draft import draft_data_bytes, plan_with_draft  # noqa: E402
from qstream.runtime.plan import parse_bytes  # noqa: E402
from qstream.spec.kv import keep_rows, ones  # noqa: E402
from qstream.spec.tree import grow_tree, verify  # noqa: E402
from qstream.store.check import checked_header  # noqa: E402
from qstream.store.manifest import read_manifest  # noqa: E402

PROMPT = 128  # committed tokens before the measured rounds
MARGIN = 16 << 20  # slack added to computed budgets (at most a quarter layer): the plan compares with <=


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def costs(d: str, max_seq: int, chunk: int, draft_seq: int) -> dict:
    """Per-layer and fixed bytes of DIR as load() counts them (meta skeleton, no weights read)."""
    m = read_manifest(d)
    dtype = build.DTYPES[m.compute_dtype]
    hf = build.skeleton(m, dtype)
    build.swap_linears(hf, [e for e in m.files if e.kind != "draft"], dtype)
    head = m.file("head")
    fixed, kv = build.fixed_bytes(hf, m, head, dtype, 1, max_seq, chunk)
    draft_kv = build.fixed_bytes(hf, m, head, dtype, 1, draft_seq, 1)[1]
    layers = [checked_header(m, e).data_size for e in m.layer_files()]
    return {"fixed": fixed, "kv": kv, "draft_kv": draft_kv, "layers": layers, "drafts": draft_data_bytes(m)}


def budget_for(spec: str, c: dict) -> tuple[int | None, dict]:
    """The device budget a --budget value stands for, and notes on how it was derived."""
    n = len(c["layers"])
    big, fixed = max(c["layers"]), c["fixed"] + c["kv"] + c["draft_kv"]
    margin = min(MARGIN, big // 4)
    if spec == "resident":
        return None, {"mode": "resident"}
    if spec == "stream":  # two staging slots and every draft copy: nothing else fits
        return fixed + 2 * big + sum(c["drafts"]) + margin, {"mode": "stream"}
    if spec.startswith("scaled:"):
        _, size, total = spec.split(":")
        full_budget, total = parse_bytes(size), int(total)
        per = total / n
        # the full model: head/activations/workspace once, KV caches and layers LAYERS deep
        full = plan_with_draft([c["layers"][i % n] for i in range(total)], [c["drafts"][i % n] for i in range(total)],
                               fixed_bytes=c["fixed"] + round(c["kv"] * per), draft_kv_bytes=round(c["draft_kv"] * per),
                               budget=full_budget, host_budget=None, max_slots=3)
        k = len(full.resident)
        r = round(n * k / total)
        slots = full.slots
        budget = fixed + slots * big + sum(sorted(c["layers"])[:r]) + sum(c["drafts"]) + margin
        return budget, {"mode": "scaled", "full_budget": full_budget, "full_layers": total, "full_resident": k,
                        "full_plain_resident": full.plain_resident, "full_plan": full.describe(),
                        "slice_resident_target": r}
    return parse_bytes(spec), {"mode": "given"}


class Timed:
    """The draft with every forward synchronized and timed: (tokens, seconds) per call."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.config, self.dtype, self.device = model.config, model.dtype, model.device

    def __call__(self, ids, **kw):
        sync(self.device)
        t = time.perf_counter()
        out = self.model(ids, **kw)
        sync(self.device)
        self.calls.append((ids.shape[1], time.perf_counter() - t))
        return out


def cut(cache, n: int) -> None:
    """Back to the first n rows (the committed prompt)."""
    keep_rows(cache, list(range(n)))


def timed(dev, fn) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--budget", default="resident", help="SIZE, stream, resident or scaled:SIZE:LAYERS")
    ap.add_argument("--trees", default="16,64,256", help="tree budgets N (draft tokens verified per pass)")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--beam", type=int, default=16)
    ap.add_argument("--branch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    trees = [int(x) for x in a.trees.split(",")]
    max_seq = PROMPT + max(trees) + 2 * a.depth + 8
    draft_seq = PROMPT + a.depth * a.beam + 2 * a.depth + 8
    chunk = max(max(trees) + 1, PROMPT)
    c = costs(a.dir, max_seq, chunk, draft_seq)
    budget, notes = budget_for(a.budget, c)
    t0 = time.perf_counter()
    m = build.load(a.dir, device=a.device, gpu_memory=budget, max_seq=max_seq, prefill_chunk=chunk, draft=True,
                   draft_max_seq=draft_seq, max_slots=3, decode="eager", warmup=False, progress=False)
    load_s = time.perf_counter() - t0
    m.set_profile(False)
    dev, plan = m.device, m.plan
    print(plan.describe(), flush=True)
    draft = Timed(m.draft)
    g = torch.Generator().manual_seed(0)
    vocab = m.config.vocab_size
    ids = torch.randint(100, vocab - 1, (1, PROMPT + 1), generator=g)
    tc, dc = m.new_cache(), m.draft.tree_cache(draft_seq)  # static + CUDA-graph tree steps on a GPU
    m(ids[:, :PROMPT], past_key_values=tc, cache_position=torch.arange(PROMPT), logits_to_keep=1)
    m.draft(ids[:, :PROMPT], past_key_values=dc, cache_position=torch.arange(PROMPT), logits_to_keep=1)
    root = int(ids[0, PROMPT])
    head = m.hf.get_output_embeddings()
    hidden = m.config.hidden_size

    def head_s(rows: int) -> float:
        x = torch.randn(1, rows, hidden, generator=g).to(dev, m.dtype)
        timed(dev, lambda: head(x))
        return statistics.median(timed(dev, lambda: head(x)) for _ in range(a.reps))

    def plain_step() -> float:
        s = timed(dev, lambda: m(torch.tensor([[root]]), attention_mask=ones(PROMPT + 1), past_key_values=tc,
                                 position_ids=torch.tensor([[PROMPT]]), cache_position=torch.tensor([PROMPT]),
                                 logits_to_keep=1))
        cut(tc, PROMPT)
        return s

    plain_step()
    plain = statistics.median(plain_step() for _ in range(a.reps))
    rows = []
    for n in trees:
        shape = (n, a.depth, a.beam, a.branch)
        reps = []
        for rep in range(a.reps + 1):  # the first round of each size warms kernels up: reported, not used
            draft.calls.clear()
            s = time.perf_counter()
            tree, _, forwards, nodes = grow_tree(draft, dc, [root], PROMPT, shape, chain=False, temperature=0.0,
                                                 vocab=vocab)
            sync(dev)
            d_s = time.perf_counter() - s
            v_s = timed(dev, lambda: verify(m, tc, tree, nodes, PROMPT, chain=False))
            cut(tc, PROMPT)
            cut(dc, PROMPT)
            reps.append({"draft_s": d_s, "verify_s": v_s, "forwards": forwards, "nodes": len(nodes),
                         "forward_calls": list(draft.calls)})
        used = reps[1:]
        steps = [t for r in used for k, t in r["forward_calls"][1:]]  # the first forward feeds the root only
        step_tokens = [k for r in used for k, _ in r["forward_calls"][1:]]
        row = {"tree": n, "depth": a.depth, "beam": a.beam, "draft_round_s": statistics.median(r["draft_s"] for r in used),
               "draft_forwards": statistics.median(r["forwards"] for r in used),
               "draft_step_s": statistics.median(steps) if steps else None,
               "draft_step_tokens": statistics.median(step_tokens) if step_tokens else None,
               "draft_first_forward_s": statistics.median(r["forward_calls"][0][1] for r in used),
               "verify_s": statistics.median(r["verify_s"] for r in used), "nodes": used[0]["nodes"],
               "head_s": head_s(n + 1), "warm_up_round": {k: v for k, v in reps[0].items() if k != "forward_calls"}}
        rows.append(row)
        print(f"N={n:4d}: draft round {row['draft_round_s'] * 1e3:7.1f} ms ({row['draft_forwards']} forwards, step "
              f"{(row['draft_step_s'] or 0) * 1e3:.2f} ms at {row['draft_step_tokens']} tokens) | verify "
              f"{row['verify_s'] * 1e3:7.1f} ms ({row['nodes']} nodes) | head {row['head_s'] * 1e3:.2f} ms", flush=True)
    out = {"dir": a.dir, "budget_arg": a.budget, "budget": budget, **notes, "plan": plan.describe(),
           "layers": len(m.layer_bytes), "resident": len(plan.resident), "streamed": len(plan.streamed),
           "drafted": len(m.draft.drafted), "layer_bytes": max(m.layer_bytes), "draft_layer_bytes": max(c["drafts"]),
           "load_s": load_s, "plain_step_s": plain, "head_beam_s": head_s(a.beam), "head_1_s": head_s(1), "prompt_tokens": PROMPT,
           "rows": rows, "machine": machine(), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "note": "COSTS only: random weights, nothing accepted; see scripts/spec_extrapolate.py"}
    print(f"plain step {plain * 1e3:.1f} ms; load {load_s:.1f} s", flush=True)
    m.close()
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
