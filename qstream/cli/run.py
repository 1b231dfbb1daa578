"""`qstream generate` and `qstream chat`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import QstreamError
from ..generate import SamplingConfig, format_prompts, generate
from ..runtime.plan import default_max_seq
from ..store.manifest import read_manifest
from .common import COMMON, add_runtime_args, check_text, open_model, open_tokenizer
from .spec import add_spec_args, spec_config, spec_summary, speculative_run


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

CHAT_COMMANDS = "/exit (or Ctrl-D) quits, /reset starts a new conversation"


def _prompts(a: argparse.Namespace) -> list[str]:
    """--prompt (repeatable), --batch-file (one a line), else standard input when it is not a terminal."""
    prompts = [check_text(p, "--prompt") for p in (a.prompt or [])]
    if a.batch_file:
        prompts += _read_batch_file(a.batch_file)
    if not prompts and not sys.stdin.isatty():
        text = sys.stdin.read().strip()
        if text:
            prompts = [text]
    if not prompts:
        raise QstreamError("give a prompt with -p TEXT, a file of prompts (one a line) with --batch-file, or pipe one to "
                           "standard input")
    return prompts


def _sampling(a: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          repetition_penalty=a.repetition_penalty, stop=tuple(a.stop or ()), seed=a.seed,
                          prefill_chunk=a.prefill_chunk, chat=not a.no_chat, system=a.system)


def kv_room(a: argparse.Namespace, tok, prompts: list, cfg: SamplingConfig) -> int:
    """Tokens of KV cache to reserve: --max-context, or the longest prompt plus --max-new-tokens,
    checked against the model's own limit."""
    limit = read_manifest(a.dir).max_positions
    if a.max_context is not None:
        if a.max_context < 2:
            raise QstreamError(f"--max-context {a.max_context}: must be at least 2 tokens")
        need = a.max_context
    else:
        texts = format_prompts(tok, prompts, chat=cfg.chat, system=cfg.system)
        longest = max(len(tok(t, add_special_tokens=not cfg.chat)["input_ids"]) for t in texts)
        need = longest + cfg.max_new_tokens
        if limit is not None and need > limit:
            raise QstreamError(f"the prompt ({longest} tokens) plus --max-new-tokens {cfg.max_new_tokens} exceeds the "
                               f"model's context of {limit} tokens; shorten the prompt or lower -n")
    if limit is not None and need > limit:
        raise QstreamError(f"--max-context {need} exceeds the model's context of {limit} tokens")
    return need


def _report(r, model, n_prompts: int, verbose: bool) -> None:
    peak = "n/a (cpu)" if r.peak_gpu_bytes is None else f"{r.peak_gpu_bytes / 2**30:.2f} GiB"
    print(f"[{n_prompts} x {r.decode_steps + 1} tokens | prefill {r.prompt_tokens} tokens in {r.prefill_s:.2f} s | "
          f"decode {r.tokens_per_s:.2f} tokens/s, {r.s_per_token:.3f} s/token | peak GPU memory {peak} | "
          f"{model.plan.describe()}]", file=sys.stderr)
    if verbose:
        print(json.dumps(r.timing, indent=1), file=sys.stderr)


def _cmd_generate(a: argparse.Namespace) -> int:
    prompts = _prompts(a)
    cfg = _sampling(a)
    tok = open_tokenizer(a.dir)  # before the model: a bad tokenizer or prompt fails fast
    need = kv_room(a, tok, prompts, cfg)
    spec = spec_config(a)
    stream = len(prompts) == 1

    def on_text(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if spec is not None:
        r, model = speculative_run(a, tok, prompts, cfg, spec, need, on_text=on_text if stream else None)
    else:
        model = open_model(a, max_batch=len(prompts), max_seq=need)
        try:
            r = generate(model, tok, prompts, cfg, on_text=on_text if stream else None)
        finally:
            model.close()
    if stream:
        print()
    else:
        for p, t in zip(prompts, r.texts):
            print(f"### {p}\n{t}\n")
    _report(r, model, len(prompts), a.verbose)
    if spec is not None:
        print(spec_summary(r), file=sys.stderr)
    return 0


def _cmd_chat(a: argparse.Namespace) -> int:
    cfg = _sampling(a)
    tok = open_tokenizer(a.dir)
    if not getattr(tok, "chat_template", None) and not a.no_chat:
        print("qstream: this model's tokenizer has no chat template; turns are joined as plain text", file=sys.stderr)
    room = a.max_context or default_max_seq(read_manifest(a.dir).max_positions)
    model = open_model(a, max_seq=room)
    tty = sys.stdin.isatty()
    if tty:
        print(f"qstream chat: {a.dir} ({CHAT_COMMANDS})", file=sys.stderr)
    history: list[dict] = []
    try:
        while True:
            if tty:
                print("> ", end="", flush=True, file=sys.stderr)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                break
            text = line.strip()
            if text == "/reset":
                history = []
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            used = len(tok(format_prompts(tok, [history], chat=cfg.chat, system=cfg.system)[0])["input_ids"])
            if used + cfg.max_new_tokens > room:
                history.pop()
                print(f"qstream: the conversation ({used} tokens) plus -n {cfg.max_new_tokens} exceeds the reserved "
                      f"context of {room} tokens; /reset or start with a larger --max-context", file=sys.stderr)
                continue
            r = generate(model, tok, [history], cfg, on_text=lambda i, d: (sys.stdout.write(d), sys.stdout.flush()))
            print()
            history.append({"role": "assistant", "content": r.texts[0]})
            if a.verbose:
                _report(r, model, 1, True)
    finally:
        model.close()
    return 0


def _sampling_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this mass")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0 = all)")
    s.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages repeating tokens of the prompt and the output (1 = off)")
    s.add_argument("--stop", action="append", help="stop when this string appears (repeatable)")
    s.add_argument("--seed", type=int, help="seed for sampling")
    s.add_argument("--system", help="system prompt for the chat template")
    s.add_argument("--max-context", type=int, metavar="TOKENS",
                   help="tokens of KV cache to reserve (default: prompt + --max-new-tokens; chat: the model's context, "
                   "at most 4096)")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prefill long prompts this many tokens at a time")
    s.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("generate", help="generate text, streaming layers under a memory budget", parents=[COMMON],
                       description="Generate text with a KV cache. One prompt streams its tokens to stdout; a batch "
                       "(--batch-file, or several -p) shares each pass over the weights. Without -p or --batch-file "
                       "the prompt is read from standard input.",
                       epilog="examples:\n  qstream generate smollm2-135m -p 'What is a GPU?' -n 40\n"
                       "  echo 'Tell me a joke' | qstream generate shards/smollm2-135m-nf4 --temperature 0.7 --top-k 40\n"
                       "  qstream generate model.gguf --scheme int8 --batch-file prompts.txt",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(s)
    s.add_argument("-p", "--prompt", action="append", help="a prompt (repeatable)")
    s.add_argument("--batch-file", help="a UTF-8 text file with one prompt a line")
    _sampling_args(s)
    add_spec_args(s)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("chat", help="talk to a model, turn by turn", parents=[COMMON],
                       description=f"A multi-turn conversation with the chat template: type a message, get the answer "
                       f"streamed. {CHAT_COMMANDS}.",
                       epilog="example:\n  qstream chat smollm2-135m --system 'You are terse.'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(s)
    _sampling_args(s)
    s.set_defaults(func=_cmd_chat)
