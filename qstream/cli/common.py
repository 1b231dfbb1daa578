"""What every command shares: -v/-q, the runtime options, and the one place that
turns them into ``load()`` arguments."""
from __future__ import annotations

import argparse
import shlex
import sys

from ..resolve import DEFAULT_SCHEME, resolve_source
from ..runtime.build import load

# -v/-q work before or after the subcommand; SUPPRESS keeps the top-level value when absent
COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="log what qstream does and print timing breakdowns")
COMMON.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

RUNTIME_HELP = "where to compute: cuda, cuda:N or cpu (default: cuda when available)"


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="SOURCE",
                   help="a shard directory, a recipe (.yaml), or a model to shard on first use: a .gguf file, a "
                   "Hugging Face directory, a hub id or an alias such as smollm2-135m")
    p.add_argument("--scheme", default=DEFAULT_SCHEME,
                   help=f"scheme for a model SOURCE sharded on first use (default {DEFAULT_SCHEME}); cached in "
                   "$QSTREAM_CACHE or ~/.cache/qstream and reused")
    p.add_argument("--block-size", type=int, help="block (group) size for --scheme (default: the scheme's)")
    p.set_defaults(needs_shards=True)  # main() resolves SOURCE to a shard directory before the command runs
    p.add_argument("--device", default="auto", help=RUNTIME_HELP)
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="device memory budget, e.g. 4GiB (default: unlimited; layers that do not fit are streamed)")
    p.add_argument("--host-memory", default="auto", metavar="SIZE",
                   help="host RAM for caching streamed layers (default: half the free RAM; 0 = stream from disk)")


def progress(a: argparse.Namespace) -> bool:
    return not getattr(a, "quiet", False)


def resolve_dir(a: argparse.Namespace) -> None:
    """Replace the SOURCE argument by its shard directory, sharding it first when needed."""
    a.dir = resolve_source(a.dir, scheme=a.scheme, block_size=a.block_size, progress=progress(a),
                           say=lambda line: print(f"qstream: {line}", file=sys.stderr))


def open_model(a: argparse.Namespace, *, max_batch: int = 1, max_seq: int | None = None, **kw):
    """``load()`` with the command's runtime options."""
    return load(a.dir, device=a.device, gpu_memory=a.gpu_memory, host_memory=a.host_memory, max_batch=max_batch,
                max_seq=max_seq, progress=progress(a), **kw)


def run_facts(a: argparse.Namespace, model) -> dict:
    """How a model was run, for result files."""
    return {"device": str(model.device), "gpu_memory": a.gpu_memory, "host_memory": a.host_memory,
            "plan": model.plan.describe()}


def command_line(a: argparse.Namespace, words: list[str]) -> str:
    """The command that reproduces a run: ``words`` then every option the parser filled in."""
    out = list(words)
    for k, v in vars(a).items():
        if k in ("func", "command", "eval_command", "dir", "verbose", "quiet", "scheme", "block_size", "needs_shards") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return shlex.join(out)
