"""The `qstream` command line. Each subcommand is a thin layer over the library."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import QstreamError

EPILOG = """\
examples:
  qstream shard recipes/smollm2-135m-nf4.yaml      # compress a model into per-layer shards
  qstream inspect shards/smollm2-135m-nf4          # schemes, bytes and bits per weight per layer
  qstream verify shards/smollm2-135m-nf4           # recompute every checksum
  qstream generate shards/smollm2-135m-nf4 --prompt "What is a GPU?" --gpu-memory 4GiB
  qstream eval ppl shards/smollm2-135m-nf4 --text-file eval/data/sample.txt
  qstream bench shards/smollm2-135m-nf4 --new-tokens 32
  qstream report eval/results/*.json --out eval/results/smollm2-cpu
"""


def _cmd_shard(a: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .shard import shard
    from .shardinfo import human

    recipe = load_recipe(a.recipe)
    r = shard(recipe, output=a.output, force=a.force, device=a.device, progress=not a.quiet)
    rows = [
        ("source", recipe.model, human(r.source_bytes)),
        ("16-bit equivalent", "", human(r.dense_bytes)),
        ("shards", str(r.output), human(r.shard_bytes)),
        ("ratio vs 16-bit", "", f"{r.ratio:.2f}x"),
        ("time", f"{r.files_written} written, {r.files_resumed} resumed", f"{r.seconds:.1f} s"),
    ]
    w0, w1 = max(len(x[0]) for x in rows), max(len(x[1]) for x in rows)
    for k, v, n in rows:
        print(f"{k:<{w0}}  {v:<{w1}}  {n:>10}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .manifest import read_manifest
    from .shardinfo import inspect_table

    print(inspect_table(read_manifest(a.dir)))
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from .shardinfo import verify

    rep = verify(a.dir, progress=not a.quiet)
    for name in rep.missing:
        print(f"MISSING  {name}")
    for name in rep.corrupt:
        print(f"CORRUPT  {name}")
    if rep.passed:
        print(f"OK: {len(rep.ok)} files match their checksums")
        return 0
    print(f"FAILED: {len(rep.missing)} missing, {len(rep.corrupt)} corrupt of {len(rep.ok) + len(rep.missing) + len(rep.corrupt)}; re-run `qstream shard` on the recipe to rewrite them", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qstream",
        description="Run language models larger than your GPU: compress them into per-layer shards, "
        "stream the shards under a memory budget, and measure quality and speed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what qstream does (and print timing breakdowns)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from .cli_run import COMMON

    s = sub.add_parser("shard", parents=[COMMON], help="compress a model into per-layer shards as a recipe says",
                       description="Read the model a recipe names, quantize each layer as the recipe says, and write one "
                       "safetensors file per layer plus a checksummed manifest. Rerunning after an interruption resumes.")
    s.add_argument("recipe", help="recipe YAML (see recipes/ and the README's recipe reference)")
    s.add_argument("--output", type=Path, help="write here instead of the recipe's `output`")
    s.add_argument("--force", action="store_true", help="replace shards of another model or recipe in the output directory")
    s.add_argument("--device", choices=["cpu", "cuda"], help="where to quantize (default: cuda when available)")
    s.set_defaults(func=_cmd_shard)

    s = sub.add_parser("inspect", parents=[COMMON], help="per-layer table of schemes, bytes and bits per weight")
    s.add_argument("dir", help="shard directory")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("verify", parents=[COMMON], help="recompute checksums; exit 1 naming every missing or corrupt file")
    s.add_argument("dir", help="shard directory")
    s.set_defaults(func=_cmd_verify)

    from . import cli_run

    cli_run.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes announces at import that an optional CPU matmul kernel is absent; qstream never uses it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return a.func(a)
    except QstreamError as e:
        print(f"qstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
