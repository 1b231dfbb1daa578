"""Command-line glue for speculative decoding (``--speculate`` / ``--draft``), for
`qstream generate` and `qstream bench`: options, the draft's shard directory, loading it,
running and reporting. Library code is in qstream/speculate.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import QstreamError
from ..generate import SamplingConfig, generate, load_tokenizer
from ..resolve import resolve_source
from ..runtime.build import load
from ..speculate import SpecConfig, SpecResult, speculative_generate
from ..store.manifest import read_manifest
from .common import devices_arg, open_model, progress

DEFAULT_DRAFT_SCHEME = "nf4"
IN_DIR = "auto"  # --speculate without a scheme: the directory's own draft when it has one (qstream/shard_draft.py)
# a natural prompt for `bench --speculate`: random token ids (what plain bench decodes) are
# text no draft can predict, so they would measure nothing about acceptance
BENCH_PROMPT = "Explain how a CPU executes a program, step by step, in plain words."


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """The speculation options of a command that decodes."""
    g = p.add_argument_group("speculative decoding (many tokens per pass over the weights; batch 1)")
    g.add_argument("--speculate", nargs="?", const=IN_DIR, metavar="SCHEME",
                   help="draft with a low-bit copy of the target; greedy output is unchanged, sampling keeps its "
                   "distribution. Without SCHEME: the shard directory's own draft (`qstream shard --draft-scheme`), "
                   "resident inside --gpu-memory and sharing the target's resident layers, when it has one; else (or "
                   f"with SCHEME) the target's source model sharded with SCHEME (default {DEFAULT_DRAFT_SCHEME}) into a "
                   "separate directory")
    g.add_argument("--draft", metavar="SOURCE",
                   help="draft with this model (shard dir, recipe, .gguf, alias; same tokenizer as the target), "
                   "sharded with --draft-scheme on first use")
    g.add_argument("--draft-scheme", default=DEFAULT_DRAFT_SCHEME, help="scheme for a --draft SOURCE sharded on first use")
    g.add_argument("--draft-gpu-memory", metavar="SIZE",
                   help="device budget of the draft (default: unlimited; the draft should stay resident)")
    g.add_argument("--tree-budget", type=int, default=64, metavar="N",
                   help="draft tokens the target verifies per pass (default 64; 16 ... 1024 is the useful range)")
    g.add_argument("--tree-depth", type=int, default=16, metavar="D", help="longest drafted continuation (default 16)")
    g.add_argument("--tree-beam", type=int, default=16, help="frontier nodes the draft expands per forward (default 16)")
    g.add_argument("--tree-branch", type=int, default=8, help="children considered per expanded node (default 8)")
    g.add_argument("--chain", action="store_true", help="draft one path (--tree-depth tokens) instead of a tree")
    g.add_argument("--no-spec-fallback", action="store_true",
                   help="keep speculating even when measured acceptance says plain decoding is faster")


def wants_spec(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "speculate", None) or getattr(a, "draft", None))


def spec_config(a: argparse.Namespace) -> SpecConfig | None:
    """The SpecConfig the options ask for, or None without --speculate/--draft."""
    if not wants_spec(a):
        return None
    if a.speculate and a.draft:
        raise QstreamError("give either --speculate (a low-bit copy of the target) or --draft SOURCE, not both")
    return SpecConfig(budget=a.tree_budget, max_depth=a.tree_depth, beam=a.tree_beam, branch=a.tree_branch, chain=a.chain,
                      fallback=not a.no_spec_fallback)


def target_load_kwargs(spec: SpecConfig | None) -> dict:
    """Extra ``load()`` arguments for the target: a verify pass runs the whole tree at once, so
    the plan must leave activation room for that many tokens."""
    if spec is None:
        return {}
    return {"prefill_chunk": max(512, spec.budget + 1)}


def kv_rooms(need: int, spec: SpecConfig) -> tuple[int, int]:
    """KV tokens to reserve for (target, draft): the request plus one tree (target) or one
    round of expanded nodes (draft) held until the round's roll-back."""
    budget, depth, beam, _ = spec.shape(False)
    return need + budget + 1, need + depth * beam + depth + 1


def in_dir_draft(a: argparse.Namespace) -> bool:
    """Whether --speculate uses the draft inside the target's shard directory."""
    return a.speculate == IN_DIR and read_manifest(a.dir).draft_files() is not None


def draft_dir(a: argparse.Namespace) -> Path:
    """The draft's shard directory (sharded first when needed). ``a.dir`` is the target's."""
    say = lambda line: print(f"qstream: {line}", file=sys.stderr)  # noqa: E731
    if a.draft:
        return resolve_source(a.draft, scheme=a.draft_scheme, progress=progress(a), say=say)
    source = read_manifest(a.dir).recipe.get("model")
    if not source:
        raise QstreamError(f"{a.dir}: the manifest names no source model to make a --speculate draft from; "
                           "give one with --draft SOURCE")
    try:
        scheme = DEFAULT_DRAFT_SCHEME if a.speculate == IN_DIR else a.speculate
        return resolve_source(source, scheme=scheme, progress=progress(a), say=say)
    except QstreamError as e:
        raise QstreamError(f"--speculate: cannot shard the target's source {source!r} ({e}); give a draft with "
                           "--draft SOURCE") from None


def open_draft(a: argparse.Namespace, max_seq: int | None = None, target=None):
    """The draft: the target's in-directory one when it was loaded with it, else a separate
    directory loaded on the target's device, resident by default (it runs every round)."""
    if target is not None and target.draft is not None:
        return target.draft
    return load(draft_dir(a), device=a.device, gpu_memory=a.draft_gpu_memory, host_memory=a.host_memory,
                max_seq=max_seq, progress=progress(a))


def draft_kwargs(a: argparse.Namespace, room: int) -> dict:
    """``load()`` arguments that make the target hold its in-directory draft, when that is the draft."""
    return {"draft": True, "draft_max_seq": room} if in_dir_draft(a) else {}


def check_batch(prompts: list) -> None:
    if len(prompts) > 1:
        print(f"qstream: speculative decoding runs the {len(prompts)} prompts one after the other (batch 1 each)",
              file=sys.stderr)


def run_speculative(target, draft, tok, prompts: list, cfg: SamplingConfig, spec: SpecConfig,
                    on_text=None) -> SpecResult:
    return speculative_generate(target, draft, tok, prompts, cfg, spec, on_text=on_text)


def speculative_run(a: argparse.Namespace, tok, prompts: list, cfg: SamplingConfig, spec: SpecConfig, need: int,
                    on_text=None):
    """Load the target (room for a tree) and the draft, decode, close both. ``need`` is the KV
    room the request needs without speculation (cli/run.py's kv_room). Returns (result, target)."""
    check_batch(prompts)
    room_t, room_d = kv_rooms(need, spec)
    target = open_model(a, max_batch=1, max_seq=room_t, **target_load_kwargs(spec), **draft_kwargs(a, room_d))
    try:
        draft = open_draft(a, max_seq=room_d, target=target)
        try:
            return run_speculative(target, draft, tok, prompts, cfg, spec, on_text=on_text), target
        finally:
            draft.close()
    finally:
        target.close()


def spec_summary(r: SpecResult) -> str:
    """One stderr line: tokens per pass and where a pass's time went."""
    s = r.spec.as_dict()
    line = (f"[speculation {s['mode']}: {s['tokens_per_pass']:.2f} tokens/pass over {s['passes']} passes | "
            f"draft {s['draft_s_per_pass']:.3f} s + verify {s['verify_s_per_pass']:.3f} s per pass")
    if s["plain_steps"]:
        line += f" | {s['plain_steps']} plain steps at {s['plain_s_per_step']:.3f} s"
    if s["note"]:
        line += f" | {s['note']}"
    return line + "]"


def spec_bench(a: argparse.Namespace, spec: SpecConfig, *, new_tokens: int, prompt: str = BENCH_PROMPT) -> dict:
    """`bench --speculate`: plain and speculative greedy decoding of one natural prompt with the
    same target, s/token of both, the speedup, and the speculation stats."""
    tok = load_tokenizer(a.dir)
    cfg = SamplingConfig(max_new_tokens=new_tokens)
    n = len(tok(prompt)["input_ids"]) + new_tokens + 64  # + the chat template's tokens
    room_t, room_d = kv_rooms(n, spec)
    target = load(a.dir, device=a.device, gpu_memory=a.gpu_memory, host_memory=a.host_memory, max_seq=room_t,
                  progress=progress(a), devices=devices_arg(a), **target_load_kwargs(spec), **draft_kwargs(a, room_d))
    try:
        draft = open_draft(a, max_seq=room_d, target=target)
        try:
            generate(target, tok, [prompt], SamplingConfig(max_new_tokens=4))  # warm-up (first steps are slow)
            plain = generate(target, tok, [prompt], cfg)
            r = run_speculative(target, draft, tok, [prompt], cfg, spec)
        finally:
            draft.close()
    finally:
        target.close()
    in_dir = draft is target.draft
    return {"prompt": prompt, "new_tokens": len(r.new_tokens[0]), "plain_s_per_token": plain.s_per_token,
            "spec_s_per_token": r.s_per_token, "speedup": plain.s_per_token / max(r.s_per_token, 1e-12),
            "identical_to_plain": r.new_tokens[0] == plain.new_tokens[0], "plan": target.plan.describe(),
            "draft": "in-directory (shared resident layers)" if in_dir else "separate directory",
            "draft_plan": None if in_dir else draft.plan.describe(), "spec": r.spec.as_dict()}


def format_spec_bench(d: dict) -> str:
    s = d["spec"]
    draft = d["draft_plan"] or f"{d['draft']}, counted in the target's plan"
    return (f"plain {d['plain_s_per_token']:.4f} s/token | speculative {d['spec_s_per_token']:.4f} s/token "
            f"(x{d['speedup']:.2f}) | {s['tokens_per_pass']:.2f} tokens/pass ({s['accepted_per_pass']:.2f} drafted "
            f"tokens accepted + the target's own; {s['mode']}) | draft {s['draft_s_per_pass']:.4f} s per pass "
            f"({s['draft_forwards_per_pass']:.1f} forwards of {s['draft_s_per_forward']:.4f} s) + verify "
            f"{s['verify_s_per_pass']:.4f} s per pass of {s['tree_nodes_per_pass']:.1f} nodes | greedy output "
            f"{'identical' if d['identical_to_plain'] else 'DIFFERENT (bf16 near-ties)'}\n"
            f"target: {d['plan']}\ndraft: {draft}" + (f"\nnote: {s['note']}" if s["note"] else ""))
