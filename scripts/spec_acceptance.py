"""Measure speculative decoding with REAL models: accepted tokens per target pass for tree
budgets, the draft's and the verifier's cost per pass, and whether greedy output stayed
identical to plain greedy decoding.

The target is a model's bf16 shards; each draft is a low-bit shard directory of the same
source (nf4, int8, fp4; later q2/q3: any scheme name the recipe accepts). Shards are made
once under --work (outside the repository).

    python scripts/spec_acceptance.py --model smollm2-135m --drafts nf4,int8,fp4 \
        --budgets 16,64,256 --new-tokens 64 --out eval/results/spec-cpu/smollm2-135m.json
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

import qstream  # noqa: E402
from qstream.generate import SamplingConfig, generate, load_tokenizer  # noqa: E402
from qstream.recipe import parse_recipe  # noqa: E402
from qstream.shard import shard  # noqa: E402
from qstream.speculate import SpecConfig, speculative_generate  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the ocean.",
    "Explain what a GPU is in two sentences.",
    "Give me three tips for learning to cook.",
]
CODE_PROMPTS = [
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that counts the rows of a table named users.",
]


def shards(model: str, scheme: str, work: Path, compute: str) -> Path:
    """``model`` sharded with ``scheme`` (the head kept in bf16 for low-bit schemes, as the
    shipped recipes do), made once."""
    out = work / f"{Path(model).stem}-{scheme}-{compute}"
    if (out / "manifest.json").exists():
        return out
    fields = {"model": model, "output": str(out), "scheme": scheme, "compute_dtype": compute}
    if scheme not in ("bf16", "fp16", "fp32"):
        fields["overrides"] = [{"pattern": "lm_head", "scheme": "bf16"}]
    t = time.perf_counter()
    shard(parse_recipe(fields), progress=False)
    print(f"sharded {model} {scheme} in {time.perf_counter() - t:.0f} s -> {out}", file=sys.stderr)
    return out


def plain_run(model, tok, prompts, cfg) -> tuple[list[list[int]], float]:
    """Plain greedy tokens per prompt and decode seconds per token over all of them."""
    toks, s, n = [], 0.0, 0
    for p in prompts:
        r = generate(model, tok, [p], cfg)
        toks.append(r.new_tokens[0])
        s, n = s + r.decode_s, n + r.decode_steps
    return toks, s / max(n, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="alias, .gguf, HF dir: the source of target and drafts")
    ap.add_argument("--drafts", default="nf4,int8,fp4", help="draft schemes, comma separated")
    ap.add_argument("--budgets", default="16,64,256", help="tree budgets (draft tokens per pass)")
    ap.add_argument("--max-depth", type=int, default=16)
    ap.add_argument("--beam", type=int, default=16)
    ap.add_argument("--branch", type=int, default=8)
    ap.add_argument("--chain-depth", type=int, default=8, help="also measure chain drafting of this depth (0 = skip)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="how many of the built-in prompts")
    ap.add_argument("--code", action="store_true", help="use the code prompts (for a code model)")
    ap.add_argument("--compute", default="bfloat16", help="compute dtype of target and drafts")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the 2-core box is shared; more threads spin against other jobs)")
    ap.add_argument("--work", default="/tmp/qstream-spec", help="where shards are made")
    ap.add_argument("--out", required=True, help="JSON result file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = (CODE_PROMPTS if a.code else PROMPTS)[: a.prompts]
    cfg = SamplingConfig(max_new_tokens=a.new_tokens)

    t_dir = shards(a.model, "bf16", work, a.compute)
    tok = load_tokenizer(t_dir)
    target = qstream.load(t_dir, device="cpu", progress=False)
    plain_toks, plain_s = plain_run(target, tok, prompts, cfg)
    print(f"target plain greedy: {plain_s * 1000:.1f} ms/token", file=sys.stderr)
    result = {
        "model": a.model, "target": "bf16 shards", "compute_dtype": a.compute, "new_tokens": a.new_tokens,
        "prompts": prompts, "sampling": "greedy", "threads": a.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_at_start": os.getloadavg()[0]},
        "target_plain_s_per_token": plain_s, "drafts": {}, "runs": [],
    }
    for scheme in [s for s in a.drafts.split(",") if s]:
        d_dir = shards(a.model, scheme, work, a.compute)
        draft = qstream.load(d_dir, device="cpu", progress=False)
        _, d_plain = plain_run(draft, tok, prompts[:1], cfg)
        result["drafts"][scheme] = {"plain_s_per_token": d_plain}
        specs = [("tree", b, SpecConfig(budget=b, max_depth=a.max_depth, beam=a.beam, branch=a.branch, fallback=False))
                 for b in (int(x) for x in a.budgets.split(","))]
        if a.chain_depth:
            specs.append(("chain", a.chain_depth, SpecConfig(budget=a.chain_depth, max_depth=a.chain_depth, chain=True,
                                                             fallback=False)))
        for kind, budget, spec in specs:
            t = time.perf_counter()
            r = speculative_generate(target, draft, tok, prompts, cfg, spec)
            st = r.spec.as_dict()
            same = sum(x == y for x, y in zip(r.new_tokens, plain_toks))
            row = {"draft": scheme, "mode": kind, "budget": budget, "max_depth": spec.shape(kind == "chain")[1],
                   "tokens_per_pass": st["tokens_per_pass"], "passes": st["passes"],
                   "median_tokens_per_pass": statistics.median(r.spec.accepted) if r.spec.accepted else 0,
                   "max_tokens_per_pass": max(r.spec.accepted, default=0),
                   "mean_tree_nodes": sum(r.spec.tree_nodes) / max(len(r.spec.tree_nodes), 1),
                   "draft_forwards_per_pass": sum(r.spec.draft_forwards) / max(len(r.spec.draft_forwards), 1),
                   "draft_s_per_pass": st["draft_s_per_pass"], "verify_s_per_pass": st["verify_s_per_pass"],
                   "s_per_token": r.s_per_token, "plain_s_per_token": plain_s,
                   "identical_to_plain_greedy": f"{same}/{len(prompts)}", "wall_s": time.perf_counter() - t}
            result["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")  # after every run: partial results survive
        draft.close()
    target.close()
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
