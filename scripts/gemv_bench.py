#!/usr/bin/env python3
"""Batch-1 cost of all linears of a Llama-3-8B decode step: fused Triton GEMVs (qstream/quant/gemv_triton.py)
against bitsandbytes' nf4 GEMV, dequantize + matmul and bf16 (issues 12 and 13).

    python scripts/gemv_bench.py OUT.json            # correctness check, then the table (~1-2 min on an H200)
    python scripts/gemv_bench.py OUT.json --sweep    # also time a grid of tile shapes per weight shape (slower)

One step = the 7 linears of each of 32 layers (224 calls), each layer with weights of its own (so the
step streams all of them from HBM, as a resident 8B model does; a layer reused 32 times would sit
partly in the 50 MB L2). Speed runs use random packed bytes (every byte pattern is a valid code set:
the kernels' cost does not depend on values) so nothing is fitted; the correctness check quantizes
real weights. Each figure is the median of 20 steps after 3 untimed ones, eager (one launch per
call from Python) and replayed as one CUDA graph (how qstream decodes). HBM floor: bytes / 4.8 TB/s
(H200's peak). Depends only on torch, triton, bitsandbytes and qstream.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qstream.eval.results import machine, versions  # noqa: E402
from qstream.quant import QuantSpec, affine_triton, bitpack, dequantize, gemv_triton, get_scheme, quantize  # noqa: E402
from qstream.quant.bnb4 import _code  # noqa: E402

# (out, in) of q, k, v, o, gate, up, down
SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
HBM_BYTES_PER_S = 4.8e12  # H200 peak
DT = torch.bfloat16
Call = Callable[[torch.Tensor], torch.Tensor]


# ---- weights of one variant: random packed bytes of the real sizes --------------------------------------------

def affine_weight(n: int, k: int, bits: int, group: int, dev) -> tuple[dict, dict]:
    groups = -(-k // group)
    nbytes = bitpack.packed_bytes(n * groups * group, bits)
    scale = torch.rand(n, groups, device=dev, dtype=torch.float16) * 0.002 + 1e-4
    packed = {"": torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev), "scale": scale,
              "min": -scale * 2 ** (bits - 1)}
    return packed, {"scheme": f"q{bits}", "shape": [n, k], "dtype": "bfloat16", "block_size": group}


def nf4_weight(n: int, k: int, block: int, dev) -> tuple[dict, dict]:
    packed = {"": torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, device=dev),
              "absmax": torch.rand(n * k // block, device=dev) * 0.05 + 0.01}
    return packed, {"scheme": "nf4", "shape": [n, k], "dtype": "bfloat16", "block_size": block}


def torch_dequant(packed: dict, meta: dict, bits: int) -> torch.Tensor:
    """The q-formats' pure-torch dequantization (affine.py without its Triton branch)."""
    scale, low = packed["scale"], packed["min"]
    rows, groups = scale.shape
    g = meta["block_size"]
    codes = bitpack.unpack(packed[""], bits, rows * groups * g).view(rows * groups, g)
    w = torch.addcmul(low.reshape(-1, 1).float(), codes.float(), scale.reshape(-1, 1).float())
    return w.view(rows, groups * g)[:, :meta["shape"][1]].to(DT)


Spec = tuple  # (in_features, kind, scheme name, packed, meta): one linear of a step


def make_specs(kind: str, fmt: str, layers: int, dev, shapes=SHAPES) -> tuple[list[Spec], int]:
    """The weights of one step (`layers` x `shapes`, each its own tensors) and the bytes a step reads."""
    specs, nbytes = [], 0
    for _ in range(layers):
        for n, k in shapes:
            if fmt == "bf16":
                packed, meta, name = {"": torch.randn(n, k, device=dev, dtype=DT) * 0.02}, {"shape": [n, k]}, "bf16"
            else:
                name, bs = fmt.split(":")
                if name in ("nf4", "fp4"):
                    packed, meta = nf4_weight(n, k, int(bs), dev)
                else:
                    packed, meta = affine_weight(n, k, int(name[1:]), int(bs), dev)
            nbytes += sum(t.numel() * t.element_size() for t in packed.values())
            specs.append((k, kind, name, packed, meta))
    return specs, nbytes


def make_calls(specs: list[Spec], config=None, mode: str | None = None) -> list[tuple[int, Call]]:
    """One call per spec; `config` fixes the tile, `mode` only the unpacking (tile from default_config)."""
    out = []
    for k, kind, name, packed, meta in specs:
        cfg = config
        if cfg is None and mode is not None:
            bits = 4 if name in ("nf4", "fp4") else int(name[1:].rstrip("k"))  # q2k: 2
            cfg = gemv_triton.default_config(*meta["shape"], bits, meta["block_size"], mode)
        out.append((k, _call(kind, name, packed, meta, cfg)))
    return out


def _call(kind: str, name: str, packed: dict, meta: dict, config) -> Call:
    n, k = meta["shape"]
    if kind == "dense":
        return lambda x: F.linear(x, packed[""])
    bs = meta["block_size"]
    if kind == "bnb":
        code = _code(name, packed[""].device)
        return lambda x: torch.ops.bitsandbytes.gemv_4bit.default(x, packed[""], meta["shape"], packed["absmax"],
                                                                  code, bs)
    if kind == "triton-nf4":
        code = _code(name, packed[""].device)
        return lambda x: gemv_triton.nf4_gemv(x, packed[""], packed["absmax"], code, block=bs, shape=(n, k),
                                              config=config)
    bits = int(name[1:])
    if kind == "gemv":
        return lambda x: gemv_triton.affine_gemv(x, packed[""], packed["scale"], packed["min"], bits=bits, group=bs,
                                                 shape=(n, k), config=config)
    if kind == "torch-dequant":
        return lambda x: F.linear(x, torch_dequant(packed, meta, bits))
    if kind == "triton-dequant":
        return lambda x: F.linear(x, affine_triton.dequantize(packed[""], packed["scale"], packed["min"], bits=bits,
                                                              group=bs, shape=torch.Size((n, k)), dtype=DT))
    raise ValueError(f"unknown kind {kind!r}")


VARIANTS = [  # (label, kind, format, unpacking mode of the Triton GEMVs; None: default_config's)
    ("bnb nf4 GEMV (bitsandbytes)", "bnb", "nf4:64", None),
    ("Triton nf4 GEMV (gemv_triton, bcast)", "triton-nf4", "nf4:64", None),
    ("Triton nf4 GEMV (gemv_triton, loop)", "triton-nf4", "nf4:64", "loop"),
    ("q4 g64 torch dequant + matmul", "torch-dequant", "q4:64", None),
    ("q4 g64 Triton dequant + matmul (affine_triton)", "triton-dequant", "q4:64", None),
    ("q4 g64 Triton GEMV (loop)", "gemv", "q4:64", None),
    ("q4 g64 Triton GEMV (bcast)", "gemv", "q4:64", "bcast"),
    ("q4 g128 Triton GEMV", "gemv", "q4:128", None),
    ("q3 g64 Triton GEMV", "gemv", "q3:64", None),
    ("q2 g64 Triton GEMV", "gemv", "q2:64", None),
    ("q5 g64 Triton GEMV", "gemv", "q5:64", None),
    ("q6 g64 Triton GEMV", "gemv", "q6:64", None),
    ("q8 g128 Triton GEMV", "gemv", "q8:128", None),
    ("bf16 matmul", "dense", "bf16", None),
]


# ---- timing --------------------------------------------------------------------------------------------------

def step_times(calls: list[tuple[int, Call]], xs: dict[int, torch.Tensor], graph: bool, steps: int) -> list[float]:
    def step():
        for k, f in calls:
            f(xs[k])

    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up off the capture: Triton compiles, allocator pools fill
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        run = g.replay
    else:
        run = step
        for _ in range(3):
            run()
    out = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def bench(layers: int, steps: int, dev) -> list[dict]:
    xs = {k: torch.randn(1, k, device=dev, dtype=DT) for _, k in SHAPES}
    rows = []
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    for label, kind, fmt, mode in VARIANTS:
        t0 = time.perf_counter()
        specs, nbytes = make_specs(kind, fmt, layers, dev)
        calls = make_calls(specs, mode=mode)
        row = {"variant": label, "kind": kind, "format": fmt, "mode": mode, "bytes_per_step": nbytes,
               "hbm_floor_ms": nbytes / HBM_BYTES_PER_S * 1e3, "eager_ms": None, "graph_ms": None}
        try:
            row["eager_ms"] = statistics.median(step_times(calls, xs, False, steps)) * 1e3
            row["graph_ms"] = statistics.median(step_times(calls, xs, True, steps)) * 1e3
            row["graph_GBps"] = nbytes / row["graph_ms"] / 1e6
        except (RuntimeError, OutOfResources, CompilationError) as e:  # uncapturable or uncompilable: in the table
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        del calls, specs
        torch.cuda.empty_cache()
    return rows


# ---- correctness against dequantize + matmul on the GPU ------------------------------------------------------

def check(dev) -> list[dict]:
    """Real quantized weights (fitted q-formats, bitsandbytes nf4/fp4) of two 8B shapes, padded rows, 1 and 4
    input rows, bias: the fused kernel against x @ dequantize(W).T + b in float64. The error is relative to
    |x| @ |W|.T + |b| (the size of the summed terms); bf16 output rounding alone is up to 2**-8 of |y|."""
    gen = torch.Generator(device=dev).manual_seed(0)
    # every width; groups 32/64/128 with padded rows (4000 columns) and whole ones; nf4/fp4; one 8B down_proj.
    # Few cases on purpose: each (width, group, tile, row count) is a Triton compile (~1 s).
    cases = [(f"q{b}:{g}", n, k, rows) for b in (2, 3, 4, 5, 6, 8)
             for g, n, k, rows in ((32, 1024, 4000, 1), (64, 4096, 4096, 4), (128, 1000, 4000, 1))]
    cases += [(f"{q}:{bs}", 1024, 4096, rows) for q in ("nf4", "fp4") for bs, rows in ((64, 1), (128, 4))]
    cases += [("q4:64", 4096, 14336, 1), ("nf4:64", 4096, 14336, 1)]
    cases += [("q4:64", 4096, 4096, 1, "bcast"), ("q3:32", 1024, 4000, 4, "bcast"), ("nf4:64", 1024, 4096, 1, "loop")]
    return check_cases(cases, dev, gen)


def check_cases(cases, dev, gen) -> list[dict]:
    """cases: (format, out, in, input rows[, unpacking mode; default_config's when absent])."""
    out = []
    for fmt, n, k, rows, *mode in cases:
        name, bs = fmt.split(":")
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        packed, meta = quantize(w, QuantSpec(name, int(bs)))
        w_hat = dequantize(packed, meta, dtype=torch.float32).double()
        bias = torch.randn(n, device=dev, generator=gen).to(DT)
        x = torch.randn(rows, k, device=dev, generator=gen).to(DT)
        bits = 4 if name in ("nf4", "fp4") else int(name[1:].rstrip("k"))  # q2k: 2
        cfg = gemv_triton.default_config(n, k, bits, int(bs), mode[0]) if mode else None
        if name in ("nf4", "fp4"):
            y = gemv_triton.nf4_gemv(x, packed[""], packed["absmax"], _code(name, dev), block=int(bs),
                                     shape=(n, k), bias=bias, config=cfg)
        elif cfg is not None:
            y = gemv_triton.affine_gemv(x, packed[""], packed["scale"], packed["min"], bits=bits, group=int(bs),
                                        shape=(n, k), bias=bias, config=cfg)
        else:  # through the scheme's hook, as QLinear calls it
            y = get_scheme(name).gemv(x, packed, meta, bias)
        row = {"format": fmt, "shape": [n, k], "rows": rows, "mode": mode[0] if mode else "default"}
        if y is None:
            out.append({**row, "ok": False, "error": "kernel declined"})
            continue
        want = x.double() @ w_hat.T + bias.double()
        err = ((y.double() - want).abs() / (x.double().abs() @ w_hat.abs().T + bias.double().abs())).max().item()
        out.append({**row, "rel_err": err, "ok": err < 1e-2})
    bad = [r for r in out if not r["ok"]]
    print(f"correctness: {len(out) - len(bad)}/{len(out)} ok; worst rel_err "
          f"{max(r.get('rel_err', float('inf')) for r in out):.2e}" + (f"; FAILED {bad}" if bad else ""), flush=True)
    return out


# ---- tile-shape sweep (re-tuning default_config) -------------------------------------------------------------

# 48 tiles per format: each is a Triton compile (~1-2 s), shared by every weight shape (their sizes are all
# multiples of 16, so Triton specializes them alike). bk 4096: a whole 4096-wide row per tile, every load of
# a program issued at once (the 8B q/k/v/o matrices are ~60 KB of codes per SM: latency, not bandwidth).
SWEEP = [gemv_triton.Config(bn, bk, w, mode=mode) for mode in ("bcast", "loop") for bn in (2, 4, 8, 16)
         for bk in (512, 1024, 4096) for w in (4, 8)]


def time_configs(configs, calls_for: Callable, xs: dict[int, torch.Tensor], steps: int, label: str) -> list[tuple]:
    """(median graph ms of one step, config) per tile config, fastest first. A config this GPU cannot compile
    (a tile too big) is said and left out."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    res = []
    for cfg in configs:
        try:
            res.append((statistics.median(step_times(calls_for(cfg), xs, True, steps)) * 1e3, cfg))
        except (OutOfResources, CompilationError) as e:
            print(f"  {label} {cfg}: {type(e).__name__}", flush=True)
    return sorted(res, key=lambda r: r[0])


def sweep(layers: int, formats: list[str], dev) -> list[dict]:
    """Per format and unique weight shape: graph time of `layers` calls on distinct weights, per tile config."""
    out = []
    for fmt in formats:
        name, bs = fmt.split(":")
        kind = "triton-nf4" if name in ("nf4", "fp4") else "gemv"
        bits = 4 if kind == "triton-nf4" else int(name[1:])
        for n, k in sorted(set(SHAPES)):
            xs = {k: torch.randn(1, k, device=dev, dtype=DT)}
            specs, nbytes = make_specs(kind, fmt, layers, dev, shapes=[(n, k)])
            default = gemv_triton.default_config(n, k, bits, int(bs), "bcast" if kind == "triton-nf4" else "loop")
            configs = [c for c in SWEEP + ([default] if default not in SWEEP else []) if c.bk >= int(bs)]
            res = time_configs(configs, lambda cfg, specs=specs: make_calls(specs, cfg), xs, 10, f"{fmt} {n}x{k}")
            best_ms, best = res[0]
            row = {"format": fmt, "shape": [n, k], "layers": layers, "best": vars(best), "best_ms": best_ms,
                   "best_GBps": nbytes / best_ms / 1e6, "default": vars(default),
                   "default_ms": next((ms for ms, c in res if c == default), None),
                   "top5": [(ms, vars(c)) for ms, c in res[:5]]}
            print(json.dumps(row), flush=True)
            out.append(row)
            del specs
            torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, help="where to write the results")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile shapes per weight shape")
    ap.add_argument("--sweep-formats", default="q4:64,nf4:64", help="formats the sweep covers (a few minutes each)")
    ap.add_argument("--skip-table", action="store_true", help="only the correctness check (and the sweep)")
    a = ap.parse_args()
    if not torch.cuda.is_available() or gemv_triton.triton is None:
        print("gemv_bench: needs CUDA and triton", file=sys.stderr)
        return 2
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    dev = torch.device("cuda")
    t0 = time.perf_counter()
    result = {"machine": machine(), "versions": versions(), "layers": a.layers, "shapes": SHAPES}
    result["check"] = check(dev)
    result["rows"] = [] if a.skip_table else bench(a.layers, a.steps, dev)
    if a.sweep:
        result["sweep"] = sweep(a.layers, a.sweep_formats.split(","), dev)
    result["wall_s"] = time.perf_counter() - t0
    a.json.write_text(json.dumps(result, indent=1))
    nf4 = next((r["graph_ms"] for r in result["rows"] if r["kind"] == "bnb"), None)
    print(f"\n{'variant':48s} {'GB/step':>8s} {'eager ms':>9s} {'graph ms':>9s} {'floor ms':>9s} {'GB/s':>6s} {'/bnb':>6s}")
    for r in result["rows"]:
        g, e = r["graph_ms"], r["eager_ms"]
        graph = "n/a" if g is None else f"{g:.2f}"
        eager = "n/a" if e is None else f"{e:.2f}"
        gbps = "" if g is None else f"{r['graph_GBps']:.0f}"
        rel = "" if g is None or not nf4 else f"{g / nf4:.2f}"
        print(f"{r['variant']:48s} {r['bytes_per_step'] / 1e9:8.2f} {eager:>9s} {graph:>9s} "
              f"{r['hbm_floor_ms']:9.2f} {gbps:>6s} {rel:>6s} {r.get('error', '')}")
    print(f"wrote {a.json} ({result['wall_s']:.0f} s)")
    return 0 if all(r["ok"] for r in result["check"]) else 1


if __name__ == "__main__":
    sys.exit(main())
