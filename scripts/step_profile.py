#!/usr/bin/env python3
"""Where does one decode step of the default (CUDA-graph) path spend its time? Loads a shard
directory as a user would (load() with its warm-up), then profiles a few decode steps with
torch.profiler and prints: wall ms per step, GPU busy ms per step (sum of kernel times), the
gap between them (host work the GPU waits for), and the kernels by total time per step.

    python3 scripts/step_profile.py DIR [--gpu-memory 4GiB] [--no-fuse] [--steps 8] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=128, help="KV slots reserved (qstream generate reserves 4096)")
    ap.add_argument("--json")
    a = ap.parse_args()

    import qstream
    from qstream.generate import SamplingConfig, generate_ids

    m = qstream.load(a.dir, gpu_memory=a.gpu_memory, max_seq=a.max_seq, fuse=False if a.no_fuse else None, progress=False)
    m.set_profile(False)
    ids = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(max_new_tokens=a.steps + 1)
    generate_ids(m, ids, torch.ones_like(ids), cfg)  # not timed: the profiled run below is the second
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        r = generate_ids(m, ids, torch.ones_like(ids), cfg)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    steps = r.decode_steps
    kern = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kern[e.name[:90]]
            k[0] += e.time_range.elapsed_us()  # a kernel's own duration on the GPU
            k[1] += 1
    total_us = sum(v[0] for v in kern.values())
    step_ms = sorted(r.step_s)[len(r.step_s) // 2] * 1e3
    n_steps = steps + 1  # the prefill counts as one more pass; its kernels are in the totals
    print(f"decode step (median, profiled) {step_ms:.2f} ms; generation wall {wall * 1e3:.1f} ms for prefill + {steps} steps")
    print(f"GPU kernel time per pass (prefill included, /{n_steps}) {total_us / 1e3 / n_steps:.2f} ms; "
          f"kernels per pass {sum(v[1] for v in kern.values()) / n_steps:.0f}")
    rows = sorted(kern.items(), key=lambda kv: -kv[1][0])[:30]
    print(f"{'ms/pass':>8} {'n/pass':>7}  kernel")
    for name, (us, n) in rows:
        print(f"{us / 1e3 / n_steps:8.3f} {n / n_steps:7.1f}  {name}")
    print(m.describe_decode())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"step_ms_median": step_ms, "gpu_ms_per_pass": total_us / 1e3 / n_steps,
                       "kernels": {k: v for k, v in rows}, "fuse": not a.no_fuse}, f, indent=1)
    m.close()


if __name__ == "__main__":
    main()
