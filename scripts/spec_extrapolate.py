#!/usr/bin/env python3
"""PREDICTED seconds per token of self-speculative decoding on a GPU: round COSTS measured with
random-weight shards (scripts/spec_cost.py, run by scripts/spec_gpu.sh) combined with ACCEPTANCE
measured with real models on CPU (eval/results/spec-cpu/*.json). Nothing here is a measured
speculative decode: every s/token it prints is a prediction and is labelled so.

A round with tree budget N costs  first draft forward + (F - 1) draft steps + one verify pass,
where F (draft forwards per round) and T (tokens emitted per round) come from the acceptance
file's run with the same tree budget; predicted s/token = round cost / T.

8B at 4 GiB is measured whole (32 layers, the real budget). The 70B is measured as a 6-layer
slice and extrapolated to 80 layers:
* from the slice run with every layer streamed (``stream``) and the one with every layer
  resident (``resident``), per-layer costs at each token count: (time - head) / 6 for the verify
  pass, a draft step (low-bit copy vs the target's own resident layer) and a plain step;
* the full model's plan at 24 GiB (``scaled`` run: plan_with_draft over 80 copies of the slice's
  per-layer bytes, head/activations once, KV caches 80 layers deep) keeps k of 80 layers resident
  (k0 without the draft); a full pass costs (80 - k) x streamed-layer cost + k x resident-layer
  cost + head, the draft step (80 - k) x copy cost + k x resident cost + head;
* the ``scaled`` slice (its budget keeps the same share resident) is predicted the same way and
  compared with its measurement: the check of this linear model. Streaming overlaps with the
  compute of resident layers in a mixed plan, so the linear sum is an upper bound of the pass.

    python3 scripts/spec_extrapolate.py --l8 l8.json --l70-stream s.json --l70-resident r.json \
        --l70-scaled x.json [--l8-plain bench.json] eval/results/spec-cpu/*.json --json predicted.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"llama3-8b @ 4 GiB": 0.010, "llama3-70b @ 24 GiB": 0.100}  # s/token asked for in issue 14


def acceptance(paths: list[str]) -> list[dict]:
    """Tree runs of the acceptance files: source, draft, tree budget, tokens/pass T, forwards/pass F."""
    out = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        for r in d.get("runs", []):
            if r.get("mode") != "tree":
                continue
            share = f", {r['resident']}/{r['layers']} layers resident" if "resident" in r else ""
            out.append({"source": f"{Path(p).stem}: {r['draft']} draft{share}", "tree": r["budget"],
                        "T": r["tokens_per_pass"], "F": r["draft_forwards_per_pass"], "depth": r.get("max_depth")})
    return out


def by_tree(cost: dict) -> dict[int, dict]:
    return {r["tree"]: r for r in cost["rows"]}


def round_s(first: float, step: float, verify: float, F: float) -> float:
    return first + max(F - 1, 0) * step + verify


def per_layer(cost: dict) -> dict:
    """Per-layer seconds of a slice run (every layer of one kind) at each tree size, head removed."""
    n = cost["layers"]
    rows = by_tree(cost)
    return {"n": n,
            "verify": {t: (r["verify_s"] - r["head_s"]) / n for t, r in rows.items()},
            "step": {t: (r["draft_step_s"] - cost["head_beam_s"]) / n for t, r in rows.items()},
            "first": {t: (r["draft_first_forward_s"] - cost["head_1_s"]) / n for t, r in rows.items()},
            "plain": (cost["plain_step_s"] - cost["head_1_s"]) / n}


def full_model(s: dict, r: dict, x: dict, layers: int, k: int) -> dict:
    """Costs of a ``layers``-deep model with k resident layers from streamed (s) and resident (r)
    per-layer costs; heads from the scaled run x (the same head in every run)."""
    rows = by_tree(x)
    out = {}
    for t in rows:
        out[t] = {"verify": (layers - k) * s["verify"][t] + k * r["verify"][t] + rows[t]["head_s"],
                  "step": (layers - k) * s["step"][t] + k * r["step"][t] + x["head_beam_s"],
                  "first": (layers - k) * s["first"][t] + k * r["first"][t] + x["head_1_s"]}
    return out


def predict(name: str, costs: dict[int, dict], plain_s: float, plain_note: str, acc: list[dict]) -> list[dict]:
    rows = []
    for a in acc:
        c = costs.get(a["tree"])
        if c is None:
            continue
        rs = round_s(c["first"], c["step"], c["verify"], a["F"])
        rows.append({"model": name, "acceptance": a["source"], "tree": a["tree"], "tokens_per_pass": a["T"],
                     "draft_forwards": a["F"], "round_s": rs, "predicted_s_per_token": rs / a["T"],
                     "plain_s_per_token": plain_s, "plain_note": plain_note,
                     "predicted_speedup": plain_s / (rs / a["T"]), "target_s_per_token": TARGETS.get(name)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("acceptance", nargs="+", help="acceptance JSON files (eval/results/spec-cpu/*.json)")
    ap.add_argument("--l8", help="spec_cost.py JSON: 8B at 4 GiB")
    ap.add_argument("--l8-plain", help="`qstream bench --json` of the 8B at 4 GiB without speculation (plain baseline)")
    ap.add_argument("--l70-stream")
    ap.add_argument("--l70-resident")
    ap.add_argument("--l70-scaled")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    for k in ("l8", "l8_plain", "l70_stream", "l70_resident", "l70_scaled"):
        if getattr(a, k) and not Path(getattr(a, k)).is_file():  # a figure that failed: predict what the others allow
            print(f"note: {getattr(a, k)} is missing (that figure failed); left out", file=sys.stderr)
            setattr(a, k, None)
    acc = acceptance(a.acceptance)
    load = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    rows, checks = [], []
    if a.l8:
        c = load(a.l8)
        costs = {t: {"verify": r["verify_s"], "step": r["draft_step_s"], "first": r["draft_first_forward_s"]}
                 for t, r in by_tree(c).items()}
        plain, note = c["plain_step_s"], f"eager step under the draft's plan ({c['resident']} of {c['layers']} resident)"
        if a.l8_plain:
            b = load(a.l8_plain)
            plain, note = b["steady_s_per_token"], f"qstream bench steady state without a draft ({b.get('decode_mode', '')[:40]})"
        rows += predict("llama3-8b @ 4 GiB", costs, plain, note, acc)
        checks.append(f"8B @ 4 GiB: plan {c['plan']}")
    if a.l70_stream and a.l70_resident and a.l70_scaled:
        s_c, r_c, x = load(a.l70_stream), load(a.l70_resident), load(a.l70_scaled)
        if s_c["streamed"] != s_c["layers"] or r_c["resident"] != r_c["layers"]:
            raise SystemExit("the stream run must stream every layer and the resident run hold every layer resident")
        s, r = per_layer(s_c), per_layer(r_c)
        L, k, k0 = x["full_layers"], x["full_resident"], x["full_plain_resident"]
        full = full_model(s, r, x, L, k)
        plain = (L - k0) * s["plain"] + k0 * r["plain"] + x["head_1_s"]
        rows += predict("llama3-70b @ 24 GiB", full, plain,
                        f"extrapolated plain eager step, plain plan {k0} of {L} resident", acc)
        # the check: the scaled slice predicted from the two pure runs vs its measurement
        sl = full_model(s, r, x, x["layers"], x["resident"])
        checks.append(f"scaled slice: {x['resident']} of {x['layers']} resident (the full model's share rounds to "
                      f"{x['slice_resident_target']}); full 70B: {k} of {L} resident with the draft, {k0} without")
        for t, m in by_tree(x).items():
            checks.append(f"70B slice at the scaled budget ({x['resident']}/{x['layers']} resident), tree {t}: verify "
                          f"predicted {sl[t]['verify'] * 1e3:.1f} ms, measured {m['verify_s'] * 1e3:.1f} ms; draft step "
                          f"predicted {sl[t]['step'] * 1e3:.2f} ms, measured {m['draft_step_s'] * 1e3:.2f} ms")
        checks.append(f"full 70B plan at 24 GiB: {x['full_plan']}")
    print("PREDICTED (random-weight costs x real CPU acceptance; not a measured speculative decode)")
    print(f"{'model':22} {'tree':>4} {'T':>5} {'F':>5} {'round ms':>9} {'pred s/tok':>10} {'plain s/tok':>11} "
          f"{'x':>5} {'target':>6}  acceptance from")
    for r in rows:
        print(f"{r['model']:22} {r['tree']:4d} {r['tokens_per_pass']:5.2f} {r['draft_forwards']:5.1f} "
              f"{r['round_s'] * 1e3:9.1f} {r['predicted_s_per_token']:10.4f} {r['plain_s_per_token']:11.4f} "
              f"{r['predicted_speedup']:5.2f} {r['target_s_per_token'] or 0:6.3f}  {r['acceptance']}")
    for line in checks:
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"label": "PREDICTED s/token: GPU round costs of random-weight shards x CPU "
                                      "acceptance of real models", "rows": rows, "checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
