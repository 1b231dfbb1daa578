#!/usr/bin/env python3
"""Runtime benchmark on a GPU (issue 4): a sharded model under a 4 GiB budget from the
pinned host cache and from cold disk, with an unlimited budget, and transformers with
the same (dequantized) weights fully on the GPU as the ceiling. Writes JSON + a table.

    python3 scripts/bench_runtime.py --shards DIR --hf-dir CKPT --out results.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def transformers_ceiling(shards: str, *, prompt_tokens: int, new_tokens: int) -> dict:
    """The same weights, dequantized, as a plain transformers model on the GPU."""
    from qstream.runtime.twin import dense_twin

    t0 = time.perf_counter()
    model = dense_twin(shards, device="cuda")
    load_s = time.perf_counter() - t0
    ids = torch.randint(100, model.config.vocab_size - 1, (1, prompt_tokens), device="cuda")
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    model.generate(ids, **dict(kw, min_new_tokens=3, max_new_tokens=3))
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **dict(kw, min_new_tokens=1, max_new_tokens=1))
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return {"name": "transformers, all on GPU", "load_s": load_s, "prefill_s": prefill,
            "decode_s_per_token": (total - prefill) / (new_tokens - 1), "peak_gpu_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--disk-new-tokens", type=int, default=6)
    ap.add_argument("--budget", default="4GiB")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: host,disk,unlimited,batch8,ceiling")
    a = ap.parse_args()
    from qstream.bench import bench, format_bench

    skip = set(filter(None, a.skip.split(",")))
    rows = []
    runs = [
        ("host", f"qstream {a.budget}, pinned host cache", dict(gpu_memory=a.budget, host_memory="auto")),
        ("batch8", f"qstream {a.budget}, pinned host cache, batch 8", dict(gpu_memory=a.budget, host_memory="auto", batch=8)),
        ("unlimited", "qstream unlimited budget", dict(gpu_memory=None)),
        ("disk", f"qstream {a.budget}, cold disk", dict(gpu_memory=a.budget, host_memory=0, cold_disk=True,
                                                        new_tokens=a.disk_new_tokens)),
    ]
    for key, name, kw in runs:
        if key in skip:
            continue
        kw = dict(dict(prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens), **kw)
        r = bench(a.shards, device="cuda", **kw)
        r["name"] = name
        print(f"== {name}\n{format_bench(r)}", flush=True)
        rows.append(r)
        torch.cuda.empty_cache()
    if "ceiling" not in skip:
        c = transformers_ceiling(a.shards, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens)
        print(f"== {c['name']}: {c['decode_s_per_token']:.4f} s/token, prefill {c['prefill_s']:.3f} s, peak {c['peak_gpu_gib']:.1f} GiB", flush=True)
        rows.append(c)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| run | s/token | tokens/s | prefill s | peak GPU GiB | achieved GB/s | floor s/token | floor ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tps = r.get("decode_tokens_per_s") or 1 / r["decode_s_per_token"]
        fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
        print(f"| {r['name']} | {r['decode_s_per_token']:.4f} | {tps:.2f} | {r['prefill_s']:.3f} | {fmt(r.get('peak_gpu_gib'), '{:.2f}')} | "
              f"{fmt(r.get('achieved_gb_per_s'), '{:.1f}')} | {fmt(r.get('floor_s_per_token'), '{:.4f}')} | {fmt(r.get('floor_ratio'), '{:.2f}')} |")


if __name__ == "__main__":
    main()
