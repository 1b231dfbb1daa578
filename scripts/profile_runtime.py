#!/usr/bin/env python3
"""Where does a streamed decode step spend its time? Runs a few decode steps of a shard
directory under a budget with torch.profiler and prints the top ops by CPU and CUDA time,
plus s/token with profiling events on/off and the fused 4-bit kernel on/off. Uses the eager
decode path (layers launched op by op), which is what these op-level numbers are about.

    python3 scripts/profile_runtime.py DIR --gpu-memory 2GiB [--trace out.json]
"""
from __future__ import annotations

import argparse
import time

import torch


def decode_time(model, steps: int = 12) -> float:
    from qstream.generate import SamplingConfig, generate_ids

    ids = torch.randint(100, 1000, (1, 64))
    r = generate_ids(model, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=steps))
    return r.s_per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--trace")
    a = ap.parse_args()
    from qstream.runtime.build import load
    from qstream.runtime.qlinear import QLinear

    for profile in (True, False):
        m = load(a.dir, device="cuda", gpu_memory=a.gpu_memory, max_seq=128, profile=profile, decode="eager")
        decode_time(m, 4)
        for fused in (True, False):
            for q in m.hf.modules():
                if isinstance(q, QLinear):
                    q.fused = fused
            t = decode_time(m)
            print(f"profile events={profile} fused gemv={fused}: {t:.4f} s/token; {m.plan.describe()}", flush=True)
            if profile:
                tm = m.timing()
                print("  breakdown:", {k: round(v, 4) for k, v in tm.items() if k.endswith('_s')})
        if not profile:
            from torch.profiler import ProfilerActivity, profile as prof

            for q in m.hf.modules():
                if isinstance(q, QLinear):
                    q.fused = True
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                decode_time(m, 4)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
            print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
            if a.trace:
                p.export_chrome_trace(a.trace)
        m.close()


if __name__ == "__main__":
    main()
