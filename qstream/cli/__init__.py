"""The `qstream` command line: the only place with argparse. Each command group
is a module with ``register(sub)``; commands are thin layers over the library."""
from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import QstreamError
from . import bench, eval, report, run, serve, shard
from .common import resolve_dir

EPILOG = """\
examples:
  qstream shard recipes/smollm2-135m-nf4.yaml      # compress a model into per-layer shards
  qstream inspect shards/smollm2-135m-nf4          # schemes, bytes and bits per weight per layer
  qstream verify shards/smollm2-135m-nf4           # recompute every checksum
  qstream generate shards/smollm2-135m-nf4 --prompt "What is a GPU?" --gpu-memory 4GiB
  qstream eval ppl shards/smollm2-135m-nf4 --text-file eval/data/sample.txt
  qstream bench shards/smollm2-135m-nf4 --new-tokens 32
  qstream report eval/results/*.json --out eval/results/smollm2-cpu
  qstream serve shards/smollm2-135m-nf4 --port 8000         # OpenAI-compatible API on 127.0.0.1
"""
GROUPS = (shard, run, eval, bench, report, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qstream",
        description="Run language models larger than your GPU: compress them into per-layer shards, "
        "stream the shards under a memory budget, and measure quality and speed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # the top level's own -v/-q (not COMMON's: parents share action objects, and a default set here
    # would reach every subcommand's copy and override a -q given before the subcommand)
    p.add_argument("-v", "--verbose", action="store_true", help="log what qstream does and print timing breakdowns")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"qstream {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(a, "needs_shards", False):  # a command that runs a model: SOURCE may still need sharding
            resolve_dir(a)
        return a.func(a)
    except QstreamError as e:
        print(f"qstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
