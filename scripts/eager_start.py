#!/usr/bin/env python3
"""Why is eager (kernel-by-kernel) decode slow in a fresh process? Loads a shard directory
with the eager decode path and no warm-up, then runs short generations back to back and
prints, per pass: the median step, wall time since load, the main thread's CPU time per
step (is the host doing more work, or waiting?), and the time spent in Python's garbage
collector (gc.callbacks). Variants: --sleep S waits S seconds after load first (is the
slowness tied to time, or to the first passes?); --gc-freeze moves everything load()
made into the permanent generation (is it the collector walking the heap?).

    python3 scripts/eager_start.py DIR [--gpu-memory 4GiB] [--sleep 12] [--gc-freeze]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

T0 = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--gpu-memory")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sleep", type=float, default=0)
    ap.add_argument("--gc-freeze", action="store_true")
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    import torch

    from qstream.generate import SamplingConfig, generate_ids
    from qstream.runtime.build import load

    gc_s = [0.0]
    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - started[0]
    gc.callbacks.append(on_gc)

    m = load(a.dir, device=a.device, gpu_memory=a.gpu_memory, max_seq=64, decode="eager", warmup=False, profile=False,
             progress=False)
    t_load = time.perf_counter()
    print(f"loaded at {t_load - T0:.1f} s after start; gc objects {len(gc.get_objects())}; {m.plan.describe()}", flush=True)
    if a.gc_freeze:
        gc.collect()
        gc.freeze()
    if a.sleep:
        time.sleep(a.sleep)
    ids = torch.arange(100, 108).view(1, 8)
    for p in range(a.passes):
        gc_s[0] = 0.0
        c0 = time.thread_time()
        t = time.perf_counter()
        r = generate_ids(m, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=a.steps + 1))
        wall = time.perf_counter() - t
        cpu = time.thread_time() - c0
        steps = r.decode_steps + 1
        print(f"pass {p}: at {t - t_load:5.1f} s after load: median step {statistics.median(r.step_s) * 1000:6.1f} ms, "
              f"prefill {r.prefill_s * 1000:6.1f} ms, main-thread CPU {cpu / steps * 1000:6.1f} ms/step of "
              f"{wall / steps * 1000:6.1f} ms wall, gc {gc_s[0] * 1000:6.1f} ms in the pass", flush=True)
    m.close()


if __name__ == "__main__":
    main()
