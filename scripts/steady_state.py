#!/usr/bin/env python3
"""Per-step decode times of one loaded shard directory, alternating the timing breakdown
off and on, to tell warm-up effects, outlier steps and profiling overhead apart.

    python3 scripts/steady_state.py DIR --gpu-memory 4GiB
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--gpu-memory")
    ap.add_argument("--steps", type=int, default=24)
    a = ap.parse_args()
    from qstream.runtime.build import load

    m = load(a.dir, device="cuda", gpu_memory=a.gpu_memory, max_seq=160)
    print(m.plan.describe(), flush=True)
    ids = torch.randint(100, 1000, (1, 64))
    for rnd, prof in enumerate([False, True, False, True, False, False]):
        m.set_profile(prof)
        cache = m.new_cache()
        mask = torch.ones_like(ids)
        logits = m(ids, attention_mask=mask, past_key_values=cache, cache_position=torch.arange(64), logits_to_keep=1)
        tok = logits[:, -1].argmax(-1).cpu()
        times = []
        for s in range(a.steps):
            t = time.perf_counter()
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            logits = m(tok.view(1, 1), attention_mask=mask, position_ids=torch.tensor([[64 + s]]), past_key_values=cache,
                       cache_position=torch.tensor([64 + s]), logits_to_keep=1)
            tok = logits[:, -1].argmax(-1).cpu()
            times.append(time.perf_counter() - t)
        ms = [round(x * 1000, 1) for x in times]
        print(f"round {rnd} profile={prof}: median {statistics.median(times) * 1000:.1f} ms, mean {statistics.mean(times) * 1000:.1f} ms, "
              f"max {max(times) * 1000:.1f} ms; steps {ms}", flush=True)
        if prof:
            t = m.timing()
            print("  per step:", {k: round(v / a.steps * 1000, 1) for k, v in t.items() if k.endswith("_s")}, flush=True)
            m.reset_timing()
    m.close()


if __name__ == "__main__":
    main()
