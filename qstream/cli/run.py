"""`qstream generate`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import QstreamError
from ..generate import SamplingConfig, generate, load_tokenizer
from .common import COMMON, add_runtime_args, open_model


def _cmd_generate(a: argparse.Namespace) -> int:
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


def register(sub: argparse._SubParsersAction) -> None:
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
