"""CLI commands that run a sharded model: generate (eval, bench and report are added by their modules)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import QstreamError

# -v/-q work before or after the subcommand; SUPPRESS keeps the top-level value when absent
COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what qstream does and print timing breakdowns")
COMMON.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

RUNTIME_HELP = "where to compute: cuda or cpu (default: cuda when available)"


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="shard directory made by `qstream shard`")
    p.add_argument("--device", default="auto", help=RUNTIME_HELP)
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="device memory budget, e.g. 4GiB (default: unlimited; layers that do not fit are streamed)")
    p.add_argument("--host-memory", default="auto", metavar="SIZE",
                   help="host RAM for caching streamed layers (default: half the free RAM; 0 = stream from disk)")


def open_model(a: argparse.Namespace, *, max_batch: int = 1, max_seq: int | None = None):
    from .runtime.model import load

    return load(a.dir, device=a.device, gpu_memory=a.gpu_memory, host_memory=a.host_memory, max_batch=max_batch,
                max_seq=max_seq)


def _cmd_generate(a: argparse.Namespace) -> int:
    from .generate import SamplingConfig, generate, load_tokenizer

    prompts = list(a.prompt or [])
    if a.batch_file:
        p = Path(a.batch_file)
        if not p.is_file():
            raise QstreamError(f"batch file not found: {p}")
        prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise QstreamError("give a prompt with --prompt TEXT or a file of prompts (one a line) with --batch-file")
    cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, stop=tuple(a.stop or ()),
                         seed=a.seed, prefill_chunk=a.prefill_chunk, chat=not a.no_chat)
    model = open_model(a, max_batch=len(prompts))
    tok = load_tokenizer(a.dir)
    stream = len(prompts) == 1

    def on_text(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    try:
        r = generate(model, tok, prompts, cfg, on_text=on_text if stream else None)
    finally:
        model.close()
    if stream:
        print()
    else:
        for p, t in zip(prompts, r.texts):
            print(f"### {p}\n{t}\n")
    peak = "n/a (cpu)" if r.peak_gpu_bytes is None else f"{r.peak_gpu_bytes / 2**30:.2f} GiB"
    print(f"[{len(prompts)} x {r.decode_steps + 1} tokens | prefill {r.prompt_tokens} tokens in {r.prefill_s:.2f} s | "
          f"decode {r.tokens_per_s:.2f} tokens/s, {r.s_per_token:.3f} s/token | peak GPU memory {peak} | "
          f"{model.plan.describe()}]", file=sys.stderr)
    if a.verbose:
        print(json.dumps(r.timing, indent=1), file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("generate", help="generate text from a shard directory, streaming layers under a memory budget", parents=[COMMON],
                       description="Generate text with a KV cache. One prompt streams its tokens to stdout; a batch "
                       "(--batch-file, or several --prompt) shares each pass over the weights.")
    add_runtime_args(s)
    s.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    s.add_argument("--batch-file", help="a text file with one prompt a line")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--stop", action="append", help="stop when this string appears (repeatable)")
    s.add_argument("--seed", type=int, help="seed for sampling")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prefill long prompts this many tokens at a time")
    s.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    s.set_defaults(func=_cmd_generate)
    for mod in ("evaluate", "bench", "report", "cli_serve"):
        try:
            m = __import__(f"qstream.{mod}", fromlist=["add_commands"])
        except ModuleNotFoundError as e:
            if e.name != f"qstream.{mod}":
                raise
            continue
        m.add_commands(sub)
