#!/usr/bin/env python3
"""Compile the fused GEMV kernels (qstream/quant/gemv_triton.py) for a GPU that is not there and print
what the code will cost per program: registers and spills (ptxas -v), vector loads, and the layout
conversions Triton inserted (shared-memory round trips, barriers, warp shuffles) for each tile config.

    python scripts/gemv_ptx.py                   # default q4/q3/q8/nf4 tiles for sm_90a (H100/H200)
    python scripts/gemv_ptx.py --arch 80 --all   # A100, every tile of gemv_bench's sweep for q4

Needs Triton (its wheel ships ptxas) but no GPU: triton.compile with a GPUTarget. Integer arguments
are declared divisible by 16, as Triton specializes them for every Llama-sized launch.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from qstream.quant import gemv_triton as G  # noqa: E402
from qstream.quant.bitpack import fields  # noqa: E402

_AFFINE_PTRS = {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp16", "low_ptr": "*fp16", "bias_ptr": "*bf16",
                "out_ptr": "*bf16"}
_AFFINE_INTS = ["M", "N", "K", "groups", "off_b", "stride_xm", "stride_om"]
_NF4_INTS = ["M", "N", "K", "stride_xm", "stride_om"]


def _compile(fn, sig: dict, const: dict, cfg: G.Config, arch: int):
    divisible = [a for a, t in sig.items() if t.startswith("*")] + [a for a in sig if a not in ("M",) and sig[a] == "i32"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    sig = {**sig, **{k: "constexpr" for k in const}}
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def stats(kernel, arch: int) -> dict:
    ptx = kernel.asm["ptx"]
    suffix = "a" if arch >= 90 else ""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(p), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)

    def count(pat: str) -> int:
        return len(re.findall(pat, ptx))

    return {"regs": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None,
            "ld.global": count(r"ld\.global"), "ld.global.v4": count(r"ld\.global[.\w]*\.v4"),
            "ld.shared": count(r"ld\.shared"), "bar.sync": count(r"bar\.sync"), "shfl": count(r"shfl\.")}


def affine(bits: int, group: int, cfg: G.Config, arch: int) -> dict:
    (wa, _), *rest = fields(bits)
    const = dict(WA=wa, WB=rest[0][0] if rest else 0, GROUP=group, BN=cfg.bn, BK=max(cfg.bk, group), HAS_BIAS=False,
                 BCAST=cfg.mode == "bcast")
    sig = {**_AFFINE_PTRS, **{a: "i32" for a in _AFFINE_INTS}}
    return stats(_compile(G._affine_gemv, sig, const, cfg, arch), arch)


def nf4(block: int, cfg: G.Config, arch: int) -> dict:
    bcast = cfg.mode == "bcast"
    sig = {"x_ptr": "*bf16", "w_ptr": "*u8" if bcast else "*i32", "absmax_ptr": "*fp32", "lut_ptr": "*fp32",
           "bias_ptr": "*bf16", "out_ptr": "*bf16", **{a: "i32" for a in _NF4_INTS}}
    const = dict(BS=block, BN=cfg.bn, BK=max(cfg.bk, block), HAS_BIAS=False, BCAST=bcast)
    return stats(_compile(G._nf4_gemv, sig, const, cfg, arch), arch)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--all", action="store_true", help="every tile of scripts/gemv_bench.py's sweep, for q4 g64")
    a = ap.parse_args()
    rows = []
    n, k = 4096, 4096  # an 8B q/o projection
    if a.all:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gemv_bench import SWEEP

        rows = [("q4:64", cfg, lambda cfg=cfg: affine(4, 64, cfg, a.arch)) for cfg in SWEEP]
    else:
        for bits, group in ((4, 64), (4, 128), (3, 64), (2, 64), (8, 128)):
            for mode in ("loop", "bcast"):
                cfg = G.default_config(n, k, bits, group, mode)
                rows.append((f"q{bits}:{group}", cfg, lambda b=bits, g=group, c=cfg: affine(b, g, c, a.arch)))
        for mode in ("bcast", "loop"):
            cfg = G.default_config(n, k, 4, 64, mode)
            rows.append(("nf4:64", cfg, lambda c=cfg: nf4(64, c, a.arch)))
    for fmt, cfg, run in rows:
        print(f"{fmt:8s} bn={cfg.bn:<3d} bk={cfg.bk:<5d} warps={cfg.num_warps} {cfg.mode:6s} {run()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
