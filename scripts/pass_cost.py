#!/usr/bin/env python3
"""Cost of one pass over the weights against the number of tokens it carries (issue 14: a tree
of draft tokens is verified in one pass). Loads a shard directory under a budget, prefills a
64-token prompt, then times a forward of N new tokens on top of that cache for each N (a fresh
cache each time, the first forward of each N untimed and reported separately). Speed only:
random-weight shards are fine.

    python3 scripts/pass_cost.py DIR --gpu-memory 4GiB --tokens 1,16,64,256,1024 --json out.json
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
from qstream.runtime.build import load  # noqa: E402

PROMPT = 64


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--tokens", default="1,16,64,256,1024")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    sizes = [int(x) for x in a.tokens.split(",")]
    t0 = time.perf_counter()
    m = load(a.dir, gpu_memory=a.gpu_memory, max_seq=PROMPT + max(sizes), max_batch=1, prefill_chunk=max(sizes),
             decode="eager", warmup=False)
    load_s = time.perf_counter() - t0
    m.set_profile(False)
    g = torch.Generator().manual_seed(0)
    vocab = m.config.vocab_size
    rows = []
    for n in sizes:
        times = []
        for rep in range(a.reps + 1):
            cache = m.new_cache()
            ids = torch.randint(100, vocab - 1, (1, PROMPT + n), generator=g)
            m(ids[:, :PROMPT], past_key_values=cache, cache_position=torch.arange(PROMPT), logits_to_keep=1)
            sync()
            s = time.perf_counter()
            m(ids[:, PROMPT:], past_key_values=cache, cache_position=torch.arange(PROMPT, PROMPT + n), logits_to_keep=n)
            sync()
            times.append(time.perf_counter() - s)
        rows.append({"tokens": n, "first_s": times[0], "median_s": statistics.median(times[1:]), "all_s": times})
        print(f"{n:5d} tokens: first {times[0] * 1000:.1f} ms, median of {a.reps} {rows[-1]['median_s'] * 1000:.1f} ms",
              flush=True)
    base = rows[0]["median_s"]
    for r in rows:
        r["ratio_to_1"] = r["median_s"] / base
    out = {"dir": a.dir, "gpu_memory": a.gpu_memory, "plan": m.plan.describe(), "load_s": load_s, "machine": machine(),
           "prompt_tokens": PROMPT, "rows": rows}
    m.close()
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
