#!/usr/bin/env python3
"""END-TO-END speculative decoding of a REAL model against plain decoding, in one fresh process:
the target's shards with their in-directory draft (``qstream shard --draft-scheme``), loaded under a
budget that keeps a share of the layers resident (the rest streams from pinned host RAM), then the
same prompts decoded plainly (``generate``: CUDA graphs on a GPU) and speculatively
(``speculative_generate``: the draft's tree growth and the verify pass run eagerly). Greedy; each
prompt is decoded once per mode, plain first. No warm-up: the first prompt's rows include kernel
compilation and graph capture and are reported apart; the summary is over the other prompts.

    python3 scripts/spec_e2e.py DIR --share 0.3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qstream  # noqa: E402
from qstream.generate import SamplingConfig, generate, load_tokenizer  # noqa: E402
from qstream.speculate import SpecConfig, speculative_generate  # noqa: E402
from spec_acceptance import PROMPTS  # noqa: E402
from spec_acceptance_indir import budget_for_share  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="shard directory with an in-directory draft")
    ap.add_argument("--share", type=float, default=0.3, help="share of the layers kept resident")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tree-budget", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    budget, wanted = budget_for_share(Path(a.dir), a.share)
    t0 = time.perf_counter()
    model = qstream.load(a.dir, device=a.device, gpu_memory=budget, draft=True, max_seq=1024, draft_max_seq=1024,
                         max_slots=3, progress=False)
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(a.dir)
    cfg = SamplingConfig(max_new_tokens=a.new_tokens)
    spec = SpecConfig(budget=a.tree_budget, fallback=False)
    prompts = PROMPTS[: a.prompts]
    rows = []
    for p in prompts:
        r = generate(model, tok, [p], cfg)
        s = speculative_generate(model, model.draft, tok, [p], cfg, spec)
        st = s.spec
        rows.append({"prompt": p, "plain_tokens": len(r.new_tokens[0]), "plain_decode_s": r.decode_s,
                     "plain_s_per_token": r.decode_s / max(r.decode_steps, 1),
                     "spec_tokens": len(s.new_tokens[0]), "spec_decode_s": s.decode_s,
                     "spec_s_per_token": s.decode_s / max(len(s.new_tokens[0]) - 1, 1),
                     "tokens_per_pass": st.tokens_per_pass, "passes": st.passes,
                     "draft_s_per_pass": sum(st.draft_s) / max(st.passes, 1),
                     "verify_s_per_pass": sum(st.verify_s) / max(st.passes, 1),
                     "identical": r.new_tokens[0] == s.new_tokens[0]})
        print(json.dumps(rows[-1]), flush=True)
    later = rows[1:] or rows  # the first prompt pays for compilation and capture
    plain = sum(r["plain_decode_s"] for r in later) / sum(max(r["plain_tokens"] - 1, 1) for r in later)
    sp = sum(r["spec_decode_s"] for r in later) / sum(max(r["spec_tokens"] - 1, 1) for r in later)
    out = {"dir": str(a.dir), "machine": torch.cuda.get_device_name() if model.device.type == "cuda" else platform.processor(),
           "plan": model.plan.describe(), "resident_share_asked": a.share, "resident_wanted": wanted, "load_s": load_s,
           "decode_path": getattr(model, "decode_path", None), "tree_budget": a.tree_budget, "new_tokens": a.new_tokens,
           "rows": rows, "plain_s_per_token": plain, "spec_s_per_token": sp, "speedup": plain / sp}
    g = getattr(model.draft, "graphs", None)
    if g is not None:  # the draft's tree steps (runtime/tree_cache.py)
        out["draft_graphs"] = {"captures": g.captures, "replays": g.replays, "reason": g.reason}
        print(f"draft step graphs: {out['draft_graphs']}")
    print(f"plan: {out['plan']}\nprompts 2..{len(rows)}: plain {plain * 1e3:.2f} ms/token, speculative {sp * 1e3:.2f} ms/token "
          f"({out['speedup']:.2f}x), tokens/pass {[round(r['tokens_per_pass'], 2) for r in rows]}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
