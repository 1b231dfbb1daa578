#!/usr/bin/env python3
"""GPU benchmark suite: qstream against AirLLM 4.0.0, accelerate offloading and plain
transformers, on one machine, same checkpoint, same prompt (64 tokens), batch 1.

Stages (each fits one 10-minute device call; rows go to OUT/rows-STAGE.json):
  8b      Llama-3-8B-shaped checkpoint: qstream nf4 (4 GiB budget from the pinned host cache,
          batch 8, unlimited budget, cold disk), int8 and bf16 (4 GiB, host cache),
          transformers fully on the GPU, accelerate device_map=auto with 4 GiB GPU memory
  airllm  AirLLM fp16 and compression='4bit' on the same 8B checkpoint
  70b     Llama-3-70B-shaped slices (2 and 6 layers), qstream nf4 at 4 GiB from the host
          cache; the per-layer slope extrapolates to 80 layers (stated as such)
  report  gather rows -> markdown table, JSON and a PNG (run anywhere)

    source scripts/device_setup.sh && python3 scripts/gpu_bench.py 8b --out $OUT
    python3 scripts/gpu_bench.py report --rows DIR... --out eval/results/gpu-h200
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/qs")
PROMPT = 64


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def checkpoint(shape: str, layers: int | None, name: str) -> Path:
    out = WORK / name
    if not (out / "model.safetensors.index.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts/make_synthetic_checkpoint.py"), "--shape", shape, "--out", str(out),
               "--no-verify", "--force"]
        if layers:
            cmd += ["--layers", str(layers)]
        sh(*cmd)
    return out


def shard(src: Path, scheme: str, out: Path, overrides: list[dict]) -> Path:
    from qstream.recipe import parse_recipe
    from qstream.shard import shard as run

    recipe = parse_recipe({"model": str(src), "output": str(out), "scheme": scheme, "overrides": overrides})
    t = time.perf_counter()
    r = run(recipe, progress=False)
    print(f"sharded {scheme}: {r.shard_bytes / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def qstream_row(name: str, shards: Path, **kw) -> dict:
    import torch

    from qstream.eval.bench import bench, format_bench

    r = bench(shards, device="cuda", prompt_tokens=PROMPT, **kw)
    r["name"] = name
    r["system"] = "qstream"
    print(f"== {name}\n{format_bench(r)}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    return r


def hf_generate_row(name: str, system: str, model, new_tokens: int, load_s: float) -> dict:
    """Time HF-style generate: prefill = 1 new token, decode = the rest."""
    import torch

    dev = "cuda"
    ids = torch.randint(100, 128000, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(dev)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    row = {"name": name, "system": system, "load_s": load_s, "prefill_s": prefill, "new_tokens": new_tokens,
           "decode_s_per_token": (total - prefill) / (new_tokens - 1), "batch": 1,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(f"== {name}: {row['decode_s_per_token']:.4f} s/token, prefill {prefill:.2f} s, load {load_s:.1f} s, "
          f"peak {row['peak_gpu_gib']:.2f} GiB", flush=True)
    return row


def guarded(rows: list, fn, *args, **kw) -> None:
    """A failing row is recorded with its error (the others still run), never dropped silently."""
    try:
        rows.append(fn(*args, **kw))
    except Exception as e:  # noqa: BLE001 - benchmark rows report any failure
        traceback.print_exc()
        rows.append({"name": args[0] if args else fn.__name__, "error": f"{type(e).__name__}: {e}"})


def stage_8b(out: Path) -> list:
    import torch

    rows: list = []
    src = checkpoint("llama3-8b", None, "l8b")
    head_bf16 = [{"pattern": "lm_head", "scheme": "bf16"}]
    nf4 = shard(src, "nf4", WORK / "l8b-nf4", head_bf16)
    guarded(rows, qstream_row, "qstream nf4, 4 GiB, pinned host cache", nf4, gpu_memory="4GiB", new_tokens=32)
    guarded(rows, qstream_row, "qstream nf4, 4 GiB, pinned host cache, batch 8", nf4, gpu_memory="4GiB", new_tokens=16, batch=8)
    guarded(rows, qstream_row, "qstream nf4, unlimited budget", nf4, gpu_memory=None, new_tokens=32)
    guarded(rows, qstream_row, "qstream nf4, 4 GiB, cold disk", nf4, gpu_memory="4GiB", host_memory=0, cold_disk=True, new_tokens=6)
    shutil.rmtree(nf4)
    for scheme in ("int8", "bf16"):
        d = shard(src, scheme, WORK / f"l8b-{scheme}", head_bf16)
        guarded(rows, qstream_row, f"qstream {scheme}, 4 GiB, pinned host cache", d, gpu_memory="4GiB", new_tokens=12)
        shutil.rmtree(d)

    def transformers_row():
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cuda")
        r = hf_generate_row("transformers, all on GPU (bf16)", "transformers", m, 32, time.perf_counter() - t)
        del m
        gc.collect()
        torch.cuda.empty_cache()
        return r

    def accelerate_row():
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={0: "4GiB", "cpu": "100GiB"})
        r = hf_generate_row("accelerate device_map=auto, 4 GiB GPU (CPU offload)", "accelerate", m, 6, time.perf_counter() - t)
        del m
        gc.collect()
        torch.cuda.empty_cache()
        return r

    guarded(rows, transformers_row)
    guarded(rows, accelerate_row)
    return rows


def stage_airllm(out: Path) -> list:
    import torch

    rows: list = []
    src = checkpoint("llama3-8b", None, "l8b")
    import airllm
    import airllm.utils

    # AirLLM 4.0.0's free-space check divides the need by 0.2813 for 4-bit (about 12x too much
    # in total against its own layout) and refuses; the split itself fits, so skip the check.
    airllm.utils.check_space = lambda *a, **k: None

    for compression in (None, "4bit"):
        name = f"AirLLM 4.0.0 {'fp16' if compression is None else 'compression=4bit'}"

        def row():
            split = WORK / f"airllm-{compression or 'fp16'}"
            t = time.perf_counter()
            m = airllm.AutoModel.from_pretrained(str(src), compression=compression, layer_shards_saving_path=str(split))
            r = hf_generate_row(name, "airllm", m, 3, time.perf_counter() - t)
            del m
            gc.collect()
            torch.cuda.empty_cache()
            shutil.rmtree(split, ignore_errors=True)
            return r

        guarded(rows, row)
    return rows


def stage_70b(out: Path) -> list:
    """All layers of an N-layer slice stream (the 4 GiB budget leaves no room for resident
    70B layers once the head is in), so per-layer time is t/N and 80 layers take about
    80/N * t: an upper bound, since the head and sampling are counted 80/N times."""
    rows: list = []
    n = 6
    src = checkpoint("llama3-70b-slice", n, f"l70-{n}")
    d = shard(src, "nf4", WORK / f"l70-{n}-nf4", [{"pattern": "lm_head", "scheme": "bf16"}])
    shutil.rmtree(src)
    guarded(rows, qstream_row, f"qstream nf4 70B slice ({n} of 80 layers), 4 GiB, pinned host cache", d,
            gpu_memory="4GiB", new_tokens=12)
    r = rows[-1]
    if "error" not in r:
        rows.append(extrapolate_70b(r, n))
        print(f"== 70B extrapolated: {rows[-1]['decode_s_per_token']:.3f} s/token", flush=True)
    return rows


def extrapolate_70b(r: dict, n: int) -> dict:
    k = 80 / n
    return {"name": "qstream nf4 70B, 80 layers extrapolated from the slice (4 GiB, pinned host cache)", "system": "qstream",
            "extrapolated": True, "batch": 1, "decode_s_per_token": r["decode_s_per_token"] * k,
            "streamed_bytes_per_token": r["streamed_bytes_per_token"] * k, "floor_s_per_token": r["floor_s_per_token"] * k,
            "floor_ratio": r["floor_ratio"], "machine": r.get("machine")}


def sub_model(shards: Path, n: int, out: Path) -> Path:
    """The first n decoder layers of a shard directory, as a shard directory of its own (hard links)."""
    m = json.loads((shards / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    keep = [f for f in m["files"] if f["kind"] != "layer" or f["index"] < n]
    for f in keep + [{"name": t} for t in m["tokenizer_files"]]:
        if not (out / f["name"]).exists():
            (out / f["name"]).hardlink_to(shards / f["name"])
    m["files"], m["num_layers"] = keep, n
    m["model"]["config"]["num_hidden_layers"] = n
    m["fingerprint"] = m["fingerprint"] + f"-first{n}"
    (out / "manifest.json").write_text(json.dumps(m, indent=1))
    return out


def report(row_files: list[Path], out: Path) -> None:
    rows = []
    for f in row_files:
        rows += json.loads(f.read_text())
    out.mkdir(parents=True, exist_ok=True)
    machine = next((r["machine"] for r in rows if "machine" in r), {})
    air4 = next((r["decode_s_per_token"] for r in rows if "compression=4bit" in r.get("name", "") and "error" not in r), None)
    acc = next((r["decode_s_per_token"] for r in rows if r.get("system") == "accelerate" and "error" not in r), None)

    def fmt(x, f="{:.3f}"):
        return "-" if x is None else f.format(x)

    lines = [f"# GPU benchmark: qstream vs AirLLM vs accelerate ({machine.get('gpu', '?')})", "",
             f"Machine: {machine.get('gpu', '?')} ({machine.get('gpu_memory_gib', '?')} GiB), {machine.get('cpus', '?')} CPU cores, "
             f"torch {machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}. Prompt {PROMPT} tokens, greedy. "
             "Synthetic random-weight checkpoints of the real shapes (scripts/make_synthetic_checkpoint.py). "
             "Floor = streamed bytes per token / bandwidth of their tier, measured in the same run.", "",
             "| run | batch | s/token | tokens/s | prefill s | load s | peak GPU GiB | GB/s streamed | floor s/token | floor ratio | vs AirLLM 4-bit | vs accelerate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | failed: {r['error'][:120]} | | | | | | | | | |")
            continue
        s = r["decode_s_per_token"]
        b = r.get("batch", 1)
        lines.append(
            f"| {r['name']}{' (extrapolated)' if r.get('extrapolated') else ''} | {b} | {s:.4f} | {b / s:.2f} | {fmt(r.get('prefill_s'), '{:.2f}')} | "
            f"{fmt(r.get('load_s'), '{:.1f}')} | {fmt(r.get('peak_gpu_gib'), '{:.2f}')} | {fmt(r.get('achieved_gb_per_s'), '{:.1f}')} | "
            f"{fmt(r.get('floor_s_per_token'), '{:.4f}')} | {fmt(r.get('floor_ratio'), '{:.2f}')} | "
            f"{fmt(air4 / s if air4 else None, '{:.0f}x')} | {fmt(acc / s if acc else None, '{:.1f}x')} |")
    breakdown = [r for r in rows if "breakdown_s_per_token" in r]
    if breakdown:
        lines += ["", "Where qstream's time goes (profiled pass, ms per token):", "",
                  "| run | read | copy | dequant | compute | stall |", "|---|---|---|---|---|---|"]
        for r in breakdown:
            bd = r["breakdown_s_per_token"]
            lines.append(f"| {r['name']} | " + " | ".join(f"{bd[k] * 1000:.1f}" for k in ("read_s", "copy_s", "dequant_s", "compute_only_s", "stall_s")) + " |")
        bws = breakdown[0]["bandwidth_gb_per_s"]
        lines += ["", "Bandwidth measured in the run: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bws.items())]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(13, 0.45 * len(ok) + 1.5))
    colors = {"qstream": "tab:green", "airllm": "tab:red", "accelerate": "tab:orange", "transformers": "tab:blue"}
    ax.barh([r["name"] for r in ok], [r["decode_s_per_token"] for r in ok], color=[colors.get(r.get("system"), "grey") for r in ok])
    ax.set_xscale("log")
    ax.set_xlabel("decode s/token, log scale (lower is better)")
    ax.invert_yaxis()
    ax.set_title(f"Llama-3 shapes on {machine.get('gpu', 'GPU')}")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    print((out / "README.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["8b", "airllm", "70b", "report"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=Path, nargs="*", default=[])
    a = ap.parse_args()
    if a.stage == "report":
        report(a.rows, a.out)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = {"8b": stage_8b, "airllm": stage_airllm, "70b": stage_70b}[a.stage](a.out)
    (a.out / f"rows-{a.stage}.json").write_text(json.dumps(rows, indent=1, default=str))
    print(json.dumps([{k: r.get(k) for k in ("name", "decode_s_per_token", "floor_ratio", "error")} for r in rows], indent=1))


if __name__ == "__main__":
    main()
