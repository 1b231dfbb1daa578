"""Speed harness: prefill and decode speed of a shard directory under a budget, the
runtime's breakdown, and the ratio to the floor of the memory tier in use, with
the tier's bandwidth measured in the same run."""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

from ..errors import QstreamError
from ..generate import SamplingConfig, generate_ids
from ..runtime.build import load
from .results import machine


def h2d_bandwidth(*, pinned: bool, nbytes: int = 512 << 20, reps: int = 8, device: str | torch.device = "cuda") -> float:
    """Host -> GPU copy bandwidth in bytes/s (one large copy at a time, like a layer)."""
    with torch.cuda.device(torch.device(device)):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        src.fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=pinned)
        b.record()
        torch.cuda.synchronize()
        return nbytes * reps / (a.elapsed_time(b) / 1000)


def h2d_bandwidth_together(devices: list[str], *, nbytes: int = 512 << 20, reps: int = 8) -> float:
    """Pinned host -> GPU bandwidth per device, in bytes/s, while every device copies at once (the
    links may share a PCIe switch or host memory bandwidth): the slowest device's figure."""
    bufs = []
    for d in devices:
        with torch.cuda.device(torch.device(d)):
            src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
            bufs.append((d, src, torch.empty(nbytes, dtype=torch.uint8, device=d)))
    for d, _, _ in bufs:
        torch.cuda.synchronize(d)
    events = []
    for d, src, dst in bufs:  # queued on every device before any finishes: the copies overlap
        with torch.cuda.device(torch.device(d)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                dst.copy_(src, non_blocking=True)
            b.record()
            events.append((a, b))
    for d, _, _ in bufs:
        torch.cuda.synchronize(d)
    return min(nbytes * reps / (a.elapsed_time(b) / 1000) for a, b in events)


def read_bandwidth(paths: list[Path], *, cold: bool, limit: int = 4 << 30) -> float:
    """File read bandwidth in bytes/s: cold drops each file from the page cache first."""
    buf = bytearray(64 << 20)
    total, t = 0, 0.0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.readinto(buf):  # warm it
                    pass
                f.seek(0)
            t0 = time.perf_counter()
            while n := f.readinto(buf):
                total += n
            t += time.perf_counter() - t0
        if total >= limit:
            break
    return total / max(t, 1e-9)


def measure_floor(model, *, cold_disk: bool) -> tuple[dict[str, float], float, int]:
    """The bandwidth of every tier the model streams from, measured now, and the floor: the
    seconds per pass that moving the streamed bytes at those bandwidths takes.
    Returns (bandwidths in bytes/s, floor seconds, streamed bytes per pass)."""
    tiers = model.tier_bytes()
    bw: dict[str, float] = {}
    floor_s = 0.0
    shares = model.tier_bytes_by_device()
    if model.device.type == "cuda" and len(shares) > 1:
        # several devices stream their host-tier shares in parallel, each over its own link: the
        # floor is the busiest link's bytes over that link's bandwidth, each measured now
        link_s = []
        for d, share in shares.items():
            bw[f"pinned_h2d_{d}"] = h2d_bandwidth(pinned=True, device=d)
            link_s.append(share["host"] / bw[f"pinned_h2d_{d}"])
        floor_s += max(link_s)
        bw["pinned_h2d_all_at_once"] = h2d_bandwidth_together(list(shares))  # a diagnostic, not in the floor
    elif model.device.type == "cuda":
        bw["pinned_h2d"] = h2d_bandwidth(pinned=True, device=model.device)
        bw["pageable_h2d"] = h2d_bandwidth(pinned=False, device=model.device)
        if tiers["host"]:
            floor_s += tiers["host"] / bw["pinned_h2d"]
    if tiers["disk"]:
        paths = model.layer_paths(model.plan.disk)
        bw["disk_cold_read"] = read_bandwidth(paths, cold=True)
        bw["page_cache_read"] = read_bandwidth(paths, cold=False)
        floor_s += tiers["disk"] / bw["disk_cold_read" if cold_disk else "page_cache_read"]
    return bw, floor_s, tiers["host"] + tiers["disk"]


FIRST_STEPS = 16  # "first steps" figure: what a user of a freshly started process sees


def step_figures(step_s: list[float]) -> dict:
    """Per-step decode times -> the first 16 steps, the first 32 and the steady state
    (median of the steps after the first 32, or of the second half when there are fewer)."""
    import statistics

    n = len(step_s)
    steady = step_s[32:] if n >= 48 else step_s[n // 2:]
    return {
        "first_16_s_per_token": statistics.fmean(step_s[:FIRST_STEPS]) if n else None,
        "first_32_s_per_token": statistics.fmean(step_s[:32]) if n else None,
        "steady_s_per_token": statistics.median(steady) if steady else None,
        "max_step_s": max(step_s) if n else None,
        "step_ms": [round(x * 1000, 2) for x in step_s],
    }


# one function on purpose: one fresh-process measurement whose parts must run in this order
def bench(path: str | Path, *, prompt_tokens: int = 64, new_tokens: int = 32, batch: int = 1, device: str = "auto",
          gpu_memory=None, host_memory="auto", cold_disk: bool = False, seed: int = 0, decode: str = "auto",
          warmup: bool = True, fuse: bool | None = None, devices: str | list | None = None) -> dict:
    """Fresh-process figures, with no hidden warm-up: load time (which includes qstream's own
    warm-up, see StreamedModel.warm_up), time to first token, the first decode steps and the
    steady state of the first generation after load; then a profiled pass for the breakdown
    and the floor, measured in the same run. Run it in a new process for every figure."""
    if prompt_tokens < 1 or new_tokens < 2 or batch < 1:
        raise QstreamError("need --prompt-tokens >= 1, --new-tokens >= 2 and --batch >= 1")
    t0 = time.perf_counter()
    model = load(path, device=device, gpu_memory=gpu_memory, host_memory=host_memory, max_batch=batch,
                 max_seq=prompt_tokens + new_tokens + 8, cold_disk=cold_disk, decode=decode,
                 warmup=warmup, fuse=fuse, devices=devices)
    load_s = time.perf_counter() - t0
    try:
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, vocab - 1, (batch, prompt_tokens), generator=g)
        mask = torch.ones_like(ids)
        # the headline: the first generation after load, without timing events
        model.set_profile(False)
        r = generate_ids(model, ids, mask, SamplingConfig(max_new_tokens=new_tokens))
        steps = step_figures(r.step_s)
        model.set_profile(True)
        rp = generate_ids(model, ids, mask, SamplingConfig(max_new_tokens=min(new_tokens, 16)))
        plan = model.plan
        bw, floor_s, streamed = measure_floor(model, cold_disk=cold_disk)
        s_tok = r.s_per_token
        t = rp.timing
        nprof = max(rp.decode_steps, 1)

        def ratio(x):
            return floor_s / x if streamed and x else None

        out = {
            "command": " ".join(sys.argv),
            "shards": str(path),
            "recipe": model.manifest.recipe,
            "machine": machine(),
            "device": ",".join(str(d) for d in model.all_devices()),
            "streamed_bytes_per_device": {d: t["host"] + t["disk"] for d, t in model.tier_bytes_by_device().items()},
            "gpu_memory": gpu_memory,
            "host_memory": host_memory,
            "cold_disk": cold_disk,
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "decode_mode": model.describe_decode(),
            "plan": {"resident": len(plan.resident), "host": len(plan.host), "disk": len(plan.disk), "slots": plan.slots},
            "load_s": load_s,
            "warmup_s": model.warmup_s,
            "first_token_s": r.first_token_s,
            "prefill_s": r.prefill_s,
            "prefill_tokens_per_s": batch * prompt_tokens / r.prefill_s,
            "decode_s_per_token": s_tok,
            "decode_tokens_per_s": r.tokens_per_s,
            **steps,
            "peak_gpu_gib": None if r.peak_gpu_bytes is None else r.peak_gpu_bytes / 2**30,
            # what each device's budget must cover: the first device since its generation began (generate_ids
            # resets it), the others since the process started (load and warm-up included)
            "peak_gpu_gib_by_device": {str(d): torch.cuda.max_memory_allocated(d) / 2**30
                                       for d in model.all_devices() if d.type == "cuda"},
            "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "streamed_bytes_per_token": streamed,
            "achieved_gb_per_s": streamed / s_tok / 1e9 if streamed else None,
            "bandwidth_gb_per_s": {k: v / 1e9 for k, v in bw.items()},
            "floor_s_per_token": floor_s if streamed else None,
            "floor_ratio": ratio(s_tok),
            "floor_ratio_first_32": ratio(steps["first_32_s_per_token"]),
            "floor_ratio_steady": ratio(steps["steady_s_per_token"]),
            "breakdown_s_per_token": {k: t[k] / nprof for k in ("read_s", "copy_s", "dequant_s", "compute_only_s", "stall_s")},
            "profiled_s_per_token": rp.s_per_token,
            "shard_bytes": sum(f.size for f in model.manifest.files),
        }
        return out
    finally:
        model.close()


def format_bench(r: dict) -> str:
    """The result as a two-column table; rows that do not apply to this run (streaming figures of a
    model that streams nothing, GPU memory on a CPU) are left out rather than printed empty."""
    def ms(x):
        return "-" if x is None else f"{x * 1000:.2f} ms"

    p = r["plan"]
    rows = [
        ("machine", f"{r['machine'].get('gpu', r['machine']['cpu'])} ({r['device']})"),
        ("plan", f"{p['resident']} layers resident, {p['host']} from host RAM, {p['disk']} from disk, {p['slots']} slots"),
        ("load", f"{r['load_s']:.2f} s (warm-up {r['warmup_s']:.2f} s)"),
        ("decode path", r["decode_mode"]),
        ("prefill", f"{r['prompt_tokens']} x {r['batch']} tokens in {r['prefill_s']:.3f} s ({r['prefill_tokens_per_s']:.1f} tokens/s)"),
        ("time to first token", ms(r["first_token_s"])),
        ("decode, first 16 steps", f"{ms(r['first_16_s_per_token'])}/token"),
        ("decode, first 32 steps", f"{ms(r['first_32_s_per_token'])}/token"),
        ("decode, steady state", f"{ms(r['steady_s_per_token'])}/token (slowest step {ms(r['max_step_s'])})"),
        ("decode, all steps", f"{r['decode_s_per_token']:.4f} s/token, {r['decode_tokens_per_s']:.2f} tokens/s (batch {r['batch']})"),
        ("peak host memory", f"{r['peak_host_gib']:.2f} GiB"),
    ]
    if r["peak_gpu_gib"] is not None:
        rows.append(("peak GPU memory", f"{r['peak_gpu_gib']:.2f} GiB"))
    if len(r.get("peak_gpu_gib_by_device") or {}) > 1:
        rows.append(("peak GPU memory per device", ", ".join(f"{d} {v:.2f} GiB" for d, v in r["peak_gpu_gib_by_device"].items())))
        rows.append(("streamed per token per device", ", ".join(f"{d} {b / 2**20:.1f} MiB"
                                                               for d, b in r["streamed_bytes_per_device"].items())))
    if r["streamed_bytes_per_token"]:
        rows += [
            ("streamed per token", f"{r['streamed_bytes_per_token'] / 2**20:.1f} MiB, achieved {r['achieved_gb_per_s']:.1f} GB/s"),
            ("floor (same run)", f"{ms(r['floor_s_per_token'])}/token"),
            ("floor ratio", f"all {r['floor_ratio']:.2f}, first 32 steps {r['floor_ratio_first_32']:.2f}, "
                            f"steady {r['floor_ratio_steady']:.2f}" if r["floor_ratio_first_32"] is not None
             else f"all {r['floor_ratio']:.2f}"),
        ]
    if r["bandwidth_gb_per_s"]:
        rows.append(("bandwidth (same run)", ", ".join(f"{k} {v:.1f} GB/s" for k, v in r["bandwidth_gb_per_s"].items())))
    rows.append((f"breakdown per token ({r['profiled_s_per_token']:.4f} s)",
                 ", ".join(f"{k.removesuffix('_s')} {v * 1000:.1f} ms" for k, v in r["breakdown_s_per_token"].items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
