#!/usr/bin/env python3
"""Batch-1 cost of every linear layer of a Llama-3-8B decode step under each 4-bit scheme (issue 13:
the fitted q4 format against bitsandbytes nf4). Random weights of the real shapes, quantized on the
GPU; one step = the 224 QLinear forwards of a single token, eager and replayed as one CUDA graph
(how qstream decodes); each figure is the median of 20 steps after 3 untimed ones.

    python3 scripts/linear_schemes_gpu.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qstream.eval.results import machine  # noqa: E402
from qstream.quant import QuantSpec, quantize  # noqa: E402
from qstream.runtime.qlinear import QLinear  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
LAYERS = 32


def step_times(mods, x, graph: bool) -> list[float]:
    def step():
        for m in mods:
            m(x)

    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
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
    for _ in range(20):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="nf4:64,q4:64,q4:128,q8:128")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    dev = torch.device("cuda")
    x = torch.randn(1, 1, 4096, device=dev, dtype=torch.bfloat16)
    rows = []
    for item in a.schemes.split(","):
        name, bs = item.split(":")
        spec = QuantSpec(name, int(bs))
        mods, nbytes = [], 0
        for out_f, in_f in SHAPES:  # one layer's weights, reused for every layer (same shapes and bytes)
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.02
            packed, meta = quantize(w, spec)
            q = QLinear(in_f, out_f, bias=False, meta={**meta, "name": name}, compute_dtype=torch.bfloat16)
            q.bind(packed)
            mods.append(q)
            nbytes += sum(t.numel() * t.element_size() for t in packed.values())
        layer_mods = mods * a.layers
        xs = {in_f: torch.randn(1, 1, in_f, device=dev, dtype=torch.bfloat16) for _, in_f in SHAPES}

        def per_shape(graph):
            # each module gets an input of its own width
            class Run(torch.nn.Module):
                def forward(self_inner, _):
                    for m in layer_mods:
                        m(xs[m.in_features])
            return step_times([Run()], x, graph)

        eager = per_shape(False)
        try:
            graph = per_shape(True)
        except RuntimeError as e:  # a scheme whose path cannot be captured
            graph, err = None, str(e).splitlines()[0]
        row = {"scheme": name, "block_size": int(bs), "bytes_per_step": nbytes * a.layers,
               "eager_ms": statistics.median(eager) * 1000, "graph_ms": None if graph is None else statistics.median(graph) * 1000,
               "hbm_floor_ms": nbytes * a.layers / 4.8e12 * 1000}
        if graph is None:
            row["graph_error"] = err
        rows.append(row)
        print(json.dumps(row), flush=True)
        del mods, layer_mods
        torch.cuda.empty_cache()
    out = {"machine": machine(), "layers": a.layers, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
