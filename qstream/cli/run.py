"""`qstream generate`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import QstreamError
from ..generate import SamplingConfig, format_prompts, generate
from ..store.manifest import read_manifest
from .common import COMMON, add_runtime_args, check_text, open_model, open_tokenizer


def _read_batch_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise QstreamError(f"batch file not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise QstreamError(f"batch file {p}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_lengths(a: argparse.Namespace, tok, prompts: list[str], chat: bool) -> None:
    """A prompt (plus the tokens to generate) longer than the model's positions is an error, not a silent
    run past what the model was trained on and its KV budget was sized for."""
    max_pos = read_manifest(a.dir).max_positions
    if not max_pos:
        return
    for i, text in enumerate(format_prompts(tok, prompts, chat=chat)):
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n + a.max_new_tokens > max_pos:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            raise QstreamError(f"{which} has {n} tokens; with --max-new-tokens {a.max_new_tokens} that exceeds the model's "
                               f"max_position_embeddings ({max_pos}): shorten it or lower --max-new-tokens")


def _cmd_generate(a: argparse.Namespace) -> int:
    prompts = [check_text(p, "--prompt") for p in (a.prompt or [])]
    if a.batch_file:
        prompts += _read_batch_file(a.batch_file)
    if not prompts:
        raise QstreamError("give a prompt with --prompt TEXT or a file of prompts (one a line) with --batch-file")
    if a.max_new_tokens < 1:
        raise QstreamError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, stop=tuple(a.stop or ()),
                         seed=a.seed, prefill_chunk=a.prefill_chunk, chat=not a.no_chat)
    tok = open_tokenizer(a.dir)  # before the model: a bad tokenizer or prompt fails fast
    _check_lengths(a, tok, prompts, cfg.chat)
    model = open_model(a, max_batch=len(prompts))
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
