#!/usr/bin/env python3
"""A draft's tree step through all linears of a Llama-3-8B shape at 8-128 input rows: the fused small-matmul
kernels (qstream/quant/gemm_triton.py) against dequantize + matmul (what ran before) and bf16 (issue 14).

    python scripts/gemm_bench.py OUT.json            # correctness check, then the table (~2-3 min on an H200)
    python scripts/gemm_bench.py OUT.json --sweep    # also time a grid of tile shapes (a few minutes more)

One step = the 7 linears of each of 32 layers (224 calls, each its own weights, as scripts/gemv_bench.py),
replayed as one CUDA graph (how the draft's tree steps run), median of 10 after 3 untimed. Random packed
bytes (a kernel's cost does not depend on the values); the correctness check quantizes real weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_bench import DT, HBM_BYTES_PER_S, SHAPES, check_cases, make_specs, step_times, time_configs  # noqa: E402
from qstream.eval.results import machine, versions  # noqa: E402
from qstream.quant import affine_triton, gemm_triton, gemv_triton  # noqa: E402
from qstream.quant.bnb4 import _code  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
FORMATS = ("q2:128", "q2k:32", "q4:64", "nf4:64", "bf16")
# the second table of eval/results/spec-gpu/gemm: --rows 1,2,4,8,16,64 --formats q2:128,q2k:32,nf4:64
KINDS = {"gemv": lambda m: m <= gemv_triton.MAX_ROWS, "mm": lambda m: m >= gemm_triton.MIN_ROWS,
         "dequant": lambda m: m >= 2, "dense": lambda m: True}


def call(kind: str, name: str, packed: dict, meta: dict, config=None):
    """One linear: "gemv" (gemv_triton; nf4: bitsandbytes' at one row), "mm" (gemm_triton, q-formats), "dequant" (a dense
    weight, then the BLAS: what runs when no fused kernel applies), "dense" (bf16)."""
    n, k = meta["shape"]
    if kind == "dense":
        return lambda x: F.linear(x, packed[""])
    bs = meta["block_size"]
    if name in ("nf4", "fp4"):
        code = _code(name, packed[""].device)
        if kind == "gemv":
            return lambda x: (torch.ops.bitsandbytes.gemv_4bit.default(x, packed[""], meta["shape"], packed["absmax"],
                                                                       code, bs) if x.shape[0] == 1 else
                              gemv_triton.nf4_gemv(x, packed[""], packed["absmax"], code, block=bs, shape=(n, k)))
        import bitsandbytes.functional as BF
        st = BF.QuantState(absmax=packed["absmax"], shape=torch.Size((n, k)), code=code, blocksize=bs,
                           quant_type=name, dtype=DT)
        return lambda x: F.linear(x, BF.dequantize_4bit(packed[""], st))
    bits = int(name[1])
    if kind == "mm":
        return lambda x: gemm_triton.affine_mm(x, packed[""], packed["scale"], packed["min"], bits=bits, group=bs,
                                               shape=(n, k), config=config)
    if kind == "gemv":
        return lambda x: gemv_triton.affine_gemv(x, packed[""], packed["scale"], packed["min"], bits=bits, group=bs,
                                                 shape=(n, k))
    return lambda x: F.linear(x, affine_triton.dequantize(packed[""], packed["scale"], packed["min"], bits=bits, group=bs,
                                                          shape=torch.Size((n, k)), dtype=DT))


def specs_for(fmt: str, layers: int, dev, shapes=SHAPES):
    """q2k runs in its resident form (float16 scale and min per group): the same kernel as q2 at group 32."""
    name, _, bs = fmt.partition(":")
    return make_specs("x", fmt if name in ("bf16", "nf4") else f"{name[:2]}:{bs}", layers, dev, shapes)


def bench(layers: int, steps: int, dev, row_counts=ROWS, formats=FORMATS) -> list[dict]:
    rows = []
    for fmt in formats:
        name = fmt.split(":")[0]
        specs, nbytes = specs_for(fmt, layers, dev)
        kinds = ("dense",) if name == "bf16" else ("gemv", "dequant") if name == "nf4" else ("gemv", "mm", "dequant")
        for kind in kinds:
            calls = [(k, call(kind, name, p, m)) for k, _, _, p, m in specs]
            for m in (m for m in row_counts if KINDS[kind](m)):
                xs = {k: torch.randn(m, k, device=dev, dtype=DT) for _, k in SHAPES}
                ms = statistics.median(step_times(calls, xs, True, steps)) * 1e3
                row = {"format": fmt, "kind": kind, "rows": m, "graph_ms": ms, "bytes_per_step": nbytes,
                       "hbm_floor_ms": nbytes / HBM_BYTES_PER_S * 1e3}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del specs
        torch.cuda.empty_cache()
    return rows


def check(dev) -> list[dict]:
    """Fitted weights through the scheme's hook, as QLinear calls it (2-8 rows: the small matmul), against
    x @ dequantize(W).T + b in float64 (gemv_bench.check_cases)."""
    cases = [(f"q{b}:{g}", n, k, r) for b in (2, 3, 4, 5, 6, 8) for g, n, k, r in ((32, 1024, 4000, 8), (128, 4096, 4096, 5))]
    cases += [("q2k:32", 1024, 4096, 8), ("q4k:32", 4096, 14336, 2)]
    return check_cases(cases, dev, torch.Generator(device=dev).manual_seed(0))


SWEEP = [gemm_triton.Config(bm=0, bn=bn, bk=bk, split_k=sk) for bn in (16, 32, 64) for bk in (128, 256, 512)
         for sk in (1, 2, 4, 8)]
SWEEP += [gemm_triton.Config(bm=0, bn=32, bk=256, split_k=sk, num_warps=w, num_stages=st) for sk in (2, 4)
          for w, st in ((8, 3), (4, 1))]


def sweep(layers: int, dev) -> list[dict]:
    """q2/128 (the 8B draft's copies) at 16 and 64 rows: graph time of `layers` calls per weight shape and tile."""
    out = []
    for fmt in ("q2:128",):
        name = fmt.split(":")[0]
        for n, k in sorted(set(SHAPES)):
            specs, nbytes = specs_for(fmt, layers, dev, [(n, k)])
            for m in (16, 64):
                xs = {k: torch.randn(m, k, device=dev, dtype=DT)}
                bm = min(64, max(16, 1 << (m - 1).bit_length()))
                configs = [gemm_triton.Config(bm=bm, bn=c.bn, bk=c.bk, split_k=c.split_k, num_warps=c.num_warps,
                                              num_stages=c.num_stages) for c in SWEEP]

                def calls_for(cfg, specs=specs):
                    return [(kk, call("mm", name, p, mm, cfg)) for kk, _, _, p, mm in specs]

                res = [(ms, vars(cfg)) for ms, cfg in time_configs(configs, calls_for, xs, 5, f"{fmt} {n}x{k} {m} rows")]
                default = vars(gemm_triton.default_config(m, n, k, int(fmt.split(':')[1])))
                dms = next((t for t, c in res if c == default), None)
                row = {"format": fmt, "shape": [n, k], "rows": m, "best": res[0], "default": default,
                       "default_ms": dms, "top5": res[:5], "GBps_best": nbytes / res[0][0] / 1e6}
                print(json.dumps(row), flush=True)
                out.append(row)
            del specs
            torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="input row counts of the table")
    ap.add_argument("--formats", default=",".join(FORMATS), help="weight formats of the table")
    a = ap.parse_args()
    rows, formats = tuple(int(r) for r in a.rows.split(",")), tuple(a.formats.split(","))
    if not torch.cuda.is_available() or gemm_triton.triton is None:
        print("gemm_bench: needs CUDA and triton", file=sys.stderr)
        return 2
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    dev = torch.device("cuda")
    t0 = time.perf_counter()
    result = {"machine": machine(), "versions": versions(), "layers": a.layers, "shapes": SHAPES}
    result["check"] = check(dev)
    a.json.write_text(json.dumps(result, indent=1))
    result["rows"] = bench(a.layers, a.steps, dev, rows, formats)
    a.json.write_text(json.dumps(result, indent=1))
    if a.sweep:
        result["sweep"] = sweep(8, dev)
    result["wall_s"] = time.perf_counter() - t0
    a.json.write_text(json.dumps(result, indent=1))
    print(f"\n{'format':8s} {'kind':8s} " + " ".join(f"{m:>8d}" for m in rows) + "   (ms per 8B step, graph)")
    for fmt in formats:
        for kind in KINDS:
            r = {x["rows"]: x["graph_ms"] for x in result["rows"] if x["format"] == fmt and x["kind"] == kind}
            if r:
                print(f"{fmt:8s} {kind:8s} " + " ".join(f"{r[m]:8.2f}" if m in r else f"{'':8s}" for m in rows))
    print(f"wrote {a.json} ({result['wall_s']:.0f} s)")
    return 0 if all(r["ok"] for r in result["check"]) else 1


if __name__ == "__main__":
    sys.exit(main())
