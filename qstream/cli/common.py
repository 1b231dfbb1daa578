"""What every command shares: -v/-q, the runtime options, and the one place that
turns them into ``load()`` arguments."""
from __future__ import annotations

import argparse
import shlex
import sys

from ..resolve import DEFAULT_SCHEME, resolve_source
from ..errors import QstreamError, ShardError
from ..generate import load_tokenizer
from ..runtime.build import load
from ..store.check import check_tokenizer_files
from ..store.inspect import require_verified
from ..store.manifest import read_manifest

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
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="several GPUs of one host, e.g. cuda:0,cuda:1: each holds and streams a contiguous share of the "
                   "layers over its own link (--gpu-memory is then per device, or a list such as 4GiB,8GiB)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="device memory budget, e.g. 4GiB (default: unlimited; layers that do not fit are streamed)")
    p.add_argument("--host-memory", default="auto", metavar="SIZE",
                   help="host RAM for caching streamed layers (default: half the free RAM; 0 = stream from disk)")
    p.add_argument("--verify", action="store_true",
                   help="recompute every checksum (sha256) before loading; without it each file is still checked "
                   "with a fast hash as it is read")


def progress(a: argparse.Namespace) -> bool:
    return not getattr(a, "quiet", False)


def resolve_dir(a: argparse.Namespace) -> None:
    """Replace the SOURCE argument by its shard directory, sharding it first when needed."""
    a.dir = resolve_source(a.dir, scheme=a.scheme, block_size=a.block_size, progress=progress(a),
                           say=lambda line: print(f"qstream: {line}", file=sys.stderr))


def open_model(a: argparse.Namespace, *, max_batch: int = 1, max_seq: int | None = None, **kw):
    """``load()`` with the command's runtime options."""
    model = load(a.dir, device=a.device, gpu_memory=a.gpu_memory, host_memory=a.host_memory, max_batch=max_batch,
                 max_seq=max_seq, progress=progress(a), verify=getattr(a, "verify", False), devices=devices_arg(a), **kw)
    note_host_memory(a, model)
    return model


def devices_arg(a: argparse.Namespace) -> str | None:
    """--devices for load(); refused next to an explicit --device (which one would win is a guess)."""
    devices = getattr(a, "devices", None)
    if devices is not None and getattr(a, "device", "auto") not in ("auto", None):
        raise QstreamError(f"give either --device {a.device} or --devices {devices}, not both")
    return devices


def note_host_memory(a: argparse.Namespace, model) -> None:
    """On CPU without --gpu-memory every layer is resident, so --host-memory has nothing to bound: say so
    rather than ignore it silently."""
    if model.device.type == "cpu" and a.gpu_memory is None and str(a.host_memory) not in ("auto", "None"):
        print(f"qstream: note: --host-memory {a.host_memory} has no effect on CPU without --gpu-memory (every layer "
              "is resident in RAM); give --gpu-memory SIZE to bound RAM and stream the rest from disk", file=sys.stderr)


def verify_first(a: argparse.Namespace) -> None:
    """--verify for commands that load the model through a library call (bench)."""
    if getattr(a, "verify", False):
        require_verified(a.dir)


def open_tokenizer(path):
    """The shard directory's tokenizer, its files checked against the manifest first; a missing or
    unreadable tokenizer is one line."""
    m = read_manifest(path)
    check_tokenizer_files(m)
    if not m.tokenizer_files:
        raise ShardError(f"{path} holds no tokenizer files (the source model had none); "
                         "copy its tokenizer into the source and re-shard")
    try:
        return load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception for bad JSON; reported, not swallowed
        raise ShardError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "re-shard the model") from None


def check_text(value: str, what: str) -> str:
    """Command-line text arrives as str with undecodable bytes escaped as surrogates: refuse them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QstreamError(f"{what} is not valid UTF-8 (undecodable byte at position {e.start}); "
                           "pass UTF-8 text") from None
    return value


def run_facts(a: argparse.Namespace, model) -> dict:
    """How a model was run, for result files."""
    return {"device": ",".join(str(d) for d in model.all_devices()), "gpu_memory": a.gpu_memory, "host_memory": a.host_memory,
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
