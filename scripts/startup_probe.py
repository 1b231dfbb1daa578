#!/usr/bin/env python3
"""Is a fresh process slow for its first seconds, and what triggers it? Times three
probes every 0.25 s in a new process: a fixed piece of pure-Python work (CPU speed), 300
tiny CUDA launches with a sync (launch latency), and a 256 MiB pinned host-to-GPU copy
(DMA), alongside the guest's MemTotal/MemFree. Phases: idle; after allocating and
touching pageable RAM (what load() does to read shards); after allocating pinned RAM
(the host cache); after a burst of pinned allocations of many sizes.

    python3 scripts/startup_probe.py [--pageable-gib 6 --pinned-gib 3 --seconds 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

T0 = time.perf_counter()


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemFree", "Cached"):
                out[k] = int(v.split()[0]) // 1024  # MiB
    return out


def py_work() -> float:
    t = time.perf_counter()
    x = 0
    for i in range(200_000):
        x += i * i
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pageable-gib", type=float, default=6)
    ap.add_argument("--pinned-gib", type=float, default=3)
    ap.add_argument("--seconds", type=float, default=4)
    a = ap.parse_args()
    import torch

    t_import = time.perf_counter() - T0
    x = torch.ones(16, device="cuda")
    t_ctx = time.perf_counter() - T0
    pin = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    pin.fill_(1)
    dst = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"import torch {t_import:.2f} s, CUDA context at {t_ctx:.2f} s after start", flush=True)

    def sample(phase: str) -> dict:
        py = py_work()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(300):
            x.add_(1)
        torch.cuda.synchronize()
        launch = (time.perf_counter() - t) / 300
        t = time.perf_counter()
        dst.copy_(pin, non_blocking=True)
        torch.cuda.synchronize()
        h2d = (256 << 20) / (time.perf_counter() - t)
        m = meminfo()
        return {"phase": phase, "t": time.perf_counter() - T0, "py_ms": py * 1e3, "launch_us": launch * 1e6,
                "h2d_gbs": h2d / 1e9, **m}

    rows = []

    def run(phase: str) -> None:
        end = time.perf_counter() + a.seconds
        while time.perf_counter() < end:
            rows.append(sample(phase))
            time.sleep(0.2)

    run("idle")
    t = time.perf_counter()
    keep = torch.ones(int(a.pageable_gib * 2**30), dtype=torch.uint8)  # touched: every page faulted in
    print(f"pageable {a.pageable_gib} GiB touched in {time.perf_counter() - t:.2f} s", flush=True)
    run("after pageable")
    t = time.perf_counter()
    pinned = torch.empty(int(a.pinned_gib * 2**30), dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    print(f"pinned {a.pinned_gib} GiB allocated+touched in {time.perf_counter() - t:.2f} s", flush=True)
    run("after pinned")
    del keep, pinned
    print(f"{'phase':15} {'t s':>6} {'py ms':>7} {'launch us':>9} {'h2d GB/s':>8} {'MemTotal':>9} {'MemFree':>9} {'Cached':>8}")
    for r in rows:
        print(f"{r['phase']:15} {r['t']:6.2f} {r['py_ms']:7.2f} {r['launch_us']:9.2f} {r['h2d_gbs']:8.1f} "
              f"{r['MemTotal']:9d} {r['MemFree']:9d} {r['Cached']:8d}")
    for ph in ("idle", "after pageable", "after pinned"):
        rs = [r for r in rows if r["phase"] == ph]
        print(f"median {ph}: py {statistics.median(r['py_ms'] for r in rs):.2f} ms, launch "
              f"{statistics.median(r['launch_us'] for r in rs):.2f} us, h2d {statistics.median(r['h2d_gbs'] for r in rs):.1f} GB/s")


if __name__ == "__main__":
    main()
