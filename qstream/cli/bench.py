"""`qstream bench`."""
from __future__ import annotations

import argparse

from ..eval.bench import bench, format_bench
from ..eval.results import check_json_target, write_result
from .common import COMMON, add_runtime_args, devices_arg, verify_first
from .spec import add_spec_args, format_spec_bench, spec_bench, spec_config


def _cmd_bench(a: argparse.Namespace) -> int:
    check_json_target(a.json)  # a bad --json path fails before the model loads
    verify_first(a)
    spec = spec_config(a)
    if spec is not None:  # one natural prompt at batch 1: random ids give a draft nothing to predict
        r = spec_bench(a, spec, new_tokens=a.new_tokens)
        print(format_spec_bench(r))
        if a.json:
            write_result(a.json, r)
            print(f"wrote {a.json}")
        return 0
    r = bench(a.dir, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, batch=a.batch, device=a.device,
              gpu_memory=a.gpu_memory, host_memory=a.host_memory, cold_disk=a.cold_disk, decode=a.decode,
              warmup=not a.no_warmup, fuse=False if a.no_fuse else None, devices=devices_arg(a))
    print(format_bench(r))
    if a.json:
        write_result(a.json, r)
        print(f"wrote {a.json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench", parents=[COMMON], help="measure prefill/decode speed, the breakdown and the ratio to the floor",
                       description="Load, then decode a random prompt with no hidden warm-up (run it in a fresh process: "
                       "what you see is what a freshly started `qstream generate` gets) and report load time, time to first "
                       "token, the first 16 / 32 decode steps and the steady state, s/token, tokens/s, peak memory, bytes streamed per "
                       "token, where the time goes, and the floor: streamed bytes over the bandwidth of their tier, "
                       "measured in the same run.")
    add_runtime_args(s)
    add_spec_args(s)
    s.add_argument("--prompt-tokens", type=int, default=64)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--cold-disk", action="store_true", help="drop disk-tier shards from the page cache after each read")
    s.add_argument("--decode", default="auto", choices=["auto", "graph", "static", "eager"],
                   help="decode path: auto = CUDA graphs per layer over a static KV cache on CUDA, eager on CPU")
    s.add_argument("--no-warmup", action="store_true",
                   help="skip load()'s warm-up (diagnostics: shows what a cold first generation costs)")
    s.add_argument("--no-fuse", action="store_true",
                   help="one kernel per linear layer (diagnostics: by default q/k/v and gate/up of resident layers "
                   "share one fused product at batch 1 on CUDA)")
    s.add_argument("--json", help="also write the result as JSON here")
    s.set_defaults(func=_cmd_bench)
