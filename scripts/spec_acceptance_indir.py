#!/usr/bin/env python3
"""Acceptance of the IN-DIRECTORY (SubSpec-style) draft with a REAL model: the target's bf16
shards with a low-bit draft in the same directory, loaded under a budget that keeps a given
share of the layers resident; the draft runs the target's own resident layers and the low-bit
copies of the streamed ones. The share imitates what a GPU budget leaves a big model (Llama-3-8B
at 4 GiB with a q2 draft: 8 of 32 layers; 70B at 24 GiB: 6 of 80, see scripts/spec_extrapolate.py).

    python scripts/spec_acceptance_indir.py --drafts q2,q3 --shares 0.25,0.075 --budgets 64 \
        --out eval/results/spec-cpu/smollm2-135m-indir.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qstream  # noqa: E402
from qstream.generate import SamplingConfig, load_tokenizer  # noqa: E402
from qstream.recipe import parse_recipe  # noqa: E402
from qstream.shard import shard  # noqa: E402
from qstream.speculate import SpecConfig, speculative_generate  # noqa: E402
from spec_acceptance import CODE_PROMPTS, PROMPTS, plain_run  # noqa: E402
from spec_cost import MARGIN, costs  # noqa: E402

MAX_SEQ, CHUNK, DRAFT_SEQ = 1024, 512, 1024  # KV rooms of the plan (the loop's caches are dynamic)


def shards(model: str, draft: str, group: int, work: Path, calib_text: str | None = None,
           calib_method: str = "imatrix") -> Path:
    out = work / f"{Path(model).stem}-bf16-draft-{draft}g{group}{'-' + calib_method if calib_text else ''}"
    if not (out / "manifest.json").exists():
        t = time.perf_counter()
        # with a calibration text the draft's groups are fitted to the activation-weighted error (imatrix), and
        # with signround their rounding is also tuned on each layer's output
        cal = {"calibration": {"text_file": calib_text, "tokens": 4096, "method": calib_method}} if calib_text else {}
        shard(parse_recipe({"model": model, "output": str(out), "scheme": "bf16", "compute_dtype": "bfloat16",
                            "draft": {"scheme": draft, "group_size": group}, **cal}), progress=False)
        print(f"sharded {model} + {draft} draft in {time.perf_counter() - t:.0f} s -> {out}", file=sys.stderr)
    return out


def budget_for_share(d: Path, share: float) -> tuple[int, int]:
    """A budget that keeps round(share * layers) layers resident next to the whole draft (3 slots)."""
    c = costs(str(d), MAX_SEQ, CHUNK, DRAFT_SEQ)
    n = len(c["layers"])
    r = round(share * n)
    return c["fixed"] + c["kv"] + c["draft_kv"] + 3 * max(c["layers"]) + sum(sorted(c["layers"])[:r]) + \
        sum(c["drafts"]) + MARGIN // 64, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drafts", default="q2,q3")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--shares", default="0.25,0.075", help="resident shares of the layers")
    ap.add_argument("--budgets", default="64")
    ap.add_argument("--max-depth", type=int, default=16)
    ap.add_argument("--beam", type=int, default=16)
    ap.add_argument("--branch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--calib-text", help="fit the drafts with imatrix calibration on this text (e.g. eval/data/calib.txt)")
    ap.add_argument("--calib-method", default="imatrix", choices=("imatrix", "signround"),
                    help="with --calib-text: how the draft is fitted")
    ap.add_argument("--code", action="store_true", help="use the code prompts (for a code model)")
    ap.add_argument("--work", default="/tmp/qstream-spec")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = (CODE_PROMPTS if a.code else PROMPTS)[: a.prompts]
    cfg = SamplingConfig(max_new_tokens=a.new_tokens)
    result = {"model": a.model, "target": "bf16 shards, in-directory draft (runtime/draft.py)", "compute_dtype": "bfloat16",
              "new_tokens": a.new_tokens, "prompts": prompts, "sampling": "greedy", "threads": 1,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "load_avg_at_start": os.getloadavg()[0]}, "runs": []}
    plain = None
    for scheme in a.drafts.split(","):
        d = shards(a.model, scheme, a.group, work, a.calib_text, a.calib_method)
        for share in (float(x) for x in a.shares.split(",")):
            budget, r = budget_for_share(d, share)
            target = qstream.load(d, device="cpu", gpu_memory=budget, max_seq=MAX_SEQ, prefill_chunk=CHUNK, draft=True,
                                  draft_max_seq=DRAFT_SEQ, max_slots=3, progress=False)
            tok = load_tokenizer(d)
            if plain is None:
                plain = plain_run(target, tok, prompts, cfg)
            print(target.plan.describe(), file=sys.stderr)
            for b in (int(x) for x in a.budgets.split(",")):
                spec = SpecConfig(budget=b, max_depth=a.max_depth, beam=a.beam, branch=a.branch, fallback=False)
                t = time.perf_counter()
                res = speculative_generate(target, target.draft, tok, prompts, cfg, spec)
                st = res.spec
                row = {"draft": f"{scheme} g{a.group} in-dir{' ' + a.calib_method if a.calib_text else ''}", "mode": "tree", "budget": b, "max_depth": a.max_depth,
                       "resident_share": share, "resident": len(target.plan.resident), "layers": len(target.layer_bytes),
                       "resident_wanted": r, "tokens_per_pass": st.tokens_per_pass, "passes": st.passes,
                       "median_tokens_per_pass": statistics.median(st.accepted) if st.accepted else 0,
                       "draft_forwards_per_pass": sum(st.draft_forwards) / max(st.passes, 1),
                       "mean_tree_nodes": sum(st.tree_nodes) / max(st.passes, 1),
                       "identical_to_plain_greedy": f"{sum(x == y for x, y in zip(res.new_tokens, plain[0]))}/{len(prompts)}",
                       "wall_s": time.perf_counter() - t}
                result["runs"].append(row)
                print(json.dumps(row), file=sys.stderr)
                Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
            target.close()
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
