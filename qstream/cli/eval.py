"""`qstream eval ppl` and `qstream eval lm-eval`."""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from ..errors import EvalError
from ..eval.data import DEFAULT_EVAL_CONTEXT, check_window_args, load_texts
from ..eval.perplexity import perplexity
from ..eval.reference import bnb_nf4_reference
from ..eval.results import check_json_target, result_header, write_result
from ..store.manifest import read_manifest
from .common import COMMON, add_runtime_args, command_line, open_model, open_tokenizer, progress, run_facts


FEW_TOKENS = 1000  # below this a perplexity's standard error is large enough to mislead


def _harness():
    """qstream.eval.harness imports lm-eval, an optional extra that takes seconds to import:
    only `eval lm-eval` pays for it."""
    return importlib.import_module("qstream.eval.harness")


def _cmd_ppl(a: argparse.Namespace) -> int:
    check_json_target(a.json)
    m = read_manifest(a.dir)  # a missing or incomplete directory fails before any data is read
    stride = a.stride if a.stride is not None else a.context
    check_window_args(a.context, stride, m.max_positions, where=f" of {a.dir}")
    if a.batch_size < 1:
        raise EvalError(f"--batch-size {a.batch_size}: must be at least 1")
    if a.limit is not None and a.limit < 1:
        raise EvalError(f"--limit {a.limit}: must be at least 1 window")
    texts, data_desc = load_texts(dataset=a.dataset, text_file=a.text_file, text_column=a.text_column)
    t0 = time.perf_counter()
    if a.bnb_nf4_reference:
        r = bnb_nf4_reference(a.dir, texts, context=a.context, stride=stride, limit=a.limit, device=a.device,
                              progress=progress(a))
        variant, run = "bnb-nf4-reference", {"device": a.device}
        print(f"bnb NF4 reference (blocks of 64, every linear but lm_head): perplexity {r['perplexity']:.4f} "
              f"(unrounded twin {r['baseline_perplexity']:.4f}, delta {r['delta']:+.4f}, {100 * r['delta_rel']:+.2f}%)")
    else:
        lm = None if a.layer_major == "auto" else a.layer_major == "on"
        tok = open_tokenizer(a.dir)  # before the model: a bad tokenizer fails fast
        model = open_model(a, max_batch=a.batch_size, max_seq=a.context)
        try:
            r = perplexity(model, texts, context=a.context, stride=stride, batch_size=a.batch_size, layer_major=lm,
                           limit=a.limit, progress=progress(a), tokenizer=tok)
            run = run_facts(a, model)
        finally:
            model.close()
        variant = a.variant
        se = r["perplexity_stderr"]
        print(f"perplexity {r['perplexity']:.4f}" + ("" if se is None else f" +/- {se:.4f}")
              + f" over {r['tokens_scored']} tokens ({r['windows']} windows of {a.context}, stride {stride}; "
              f"{'layer-major' if r['layer_major'] else 'plain'}, {r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tokens/s)")
        if r["tokens_scored"] < FEW_TOKENS:
            print(f"qstream: warning: only {r['tokens_scored']} tokens scored; perplexity over fewer than {FEW_TOKENS} "
                  "tokens is noisy (see the +/-): use a longer text", file=sys.stderr)
    if a.json:
        out = result_header("ppl", a.dir, variant=variant or a.variant,
                            command=command_line(a, ["qstream", "eval", "ppl", str(a.dir)]),
                            extra={"run": run, "data": data_desc, "seconds_total": time.perf_counter() - t0})
        out["ppl"] = r
        write_result(a.json, out)
        print(f"wrote {a.json}")
    return 0


def _cmd_lm_eval(a: argparse.Namespace) -> int:
    check_json_target(a.json)
    max_pos = read_manifest(a.dir).max_positions or DEFAULT_EVAL_CONTEXT
    if a.max_length is not None and not 2 <= a.max_length <= max_pos:
        raise EvalError(f"--max-length {a.max_length}: must be between 2 and the model's max_position_embeddings ({max_pos})")
    max_length = a.max_length or min(max_pos, DEFAULT_EVAL_CONTEXT)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks needs one or more task names, comma-separated (e.g. hellaswag,arc_easy)")
    if a.batch_size < 1:
        raise EvalError(f"--batch-size {a.batch_size}: must be at least 1")
    if a.limit is not None and a.limit <= 0:
        raise EvalError(f"--limit {a.limit}: must be positive (a count, or a fraction below 1)")
    harness = _harness()
    harness.register_lm_eval()
    harness.task_manager(tasks, a.include_path)  # unknown tasks fail before the model loads
    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
    t0 = time.perf_counter()
    tok = open_tokenizer(a.dir)
    model = open_model(a, max_batch=a.batch_size, max_seq=max_length + 1)
    try:
        res = harness.lm_eval_run(model, tasks, include_path=a.include_path, limit=limit, num_fewshot=a.num_fewshot,
                          batch_size=a.batch_size, tokenizer=tok, max_length=max_length,
                          apply_chat_template=a.apply_chat_template)
        run = run_facts(a, model)
    finally:
        model.close()
    results = res.get("results", {}) if res else {}
    for task, metrics in results.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len")
        print(f"{task}: {shown}")
    if a.json:
        out = result_header("lm-eval", a.dir, variant=a.variant,
                            command=command_line(a, ["qstream", "eval", "lm-eval", str(a.dir)]),
                            extra={"run": run, "seconds_total": time.perf_counter() - t0})
        out["lm_eval"] = {"tasks": tasks, "limit": a.limit, "num_fewshot": a.num_fewshot, "include_path": a.include_path,
                          "results": results, "n-samples": res.get("n-samples", {}), "versions": res.get("versions", {}),
                          "higher_is_better": res.get("higher_is_better", {})}
        write_result(a.json, out)
        print(f"wrote {a.json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", parents=[COMMON], help="perplexity and lm-evaluation-harness accuracy of a shard directory",
                        description="Measure what compression cost: perplexity on a corpus, or accuracy on "
                        "lm-evaluation-harness tasks. --json writes a result file for `qstream report`.")
    esub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    p = esub.add_parser("ppl", parents=[COMMON], help="sliding-window perplexity on a dataset or a text file",
                        description="Sliding-window perplexity (the Hugging Face recipe): windows of --context tokens "
                        "every --stride tokens, each scoring only tokens no earlier window scored. Streamed models run "
                        "layer-major: one pass over the weights for the whole corpus.")
    add_runtime_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", metavar="SPEC", help="NAME[:CONFIG[:SPLIT]] of a hub dataset (needs internet), e.g. "
                     "wikitext:wikitext-2-raw-v1:test; or a local .txt/.json/.jsonl/.parquet file [:SPLIT]")
    src.add_argument("--text-file", metavar="FILE", help="a plain UTF-8 text file")
    p.add_argument("--text-column", default="text", help="dataset column holding the text (default: text)")
    p.add_argument("--context", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: --context)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    p.add_argument("--limit", type=int, help="evaluate only the first N windows")
    p.add_argument("--layer-major", choices=["auto", "on", "off"], default="auto",
                   help="push all windows through each layer before the next (default: when layers stream)")
    p.add_argument("--bnb-nf4-reference", action="store_true",
                   help="instead: the reference NF4 of an uncompressed (bf16/fp32) shard directory: its dense twin with "
                   "every linear but lm_head rounded through bitsandbytes NF4, blocks of 64")
    p.add_argument("--variant", help="name of this variant in reports (default: from the recipe: bf16, int8, nf4, mixed...)")
    p.add_argument("--json", metavar="OUT", help="write the result here (atomically, at the end)")
    p.set_defaults(func=_cmd_ppl)

    p = esub.add_parser("lm-eval", parents=[COMMON], help="accuracy on lm-evaluation-harness tasks",
                        description="Run lm-evaluation-harness tasks on the streamed model (model class `qstream`: "
                        "loglikelihood, loglikelihood_rolling, generate_until). Hub tasks need internet; "
                        "eval/tasks/qstream_tiny_qa.yaml runs offline.")
    add_runtime_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hellaswag,arc_easy")
    p.add_argument("--limit", type=float, help="at most N examples per task (or a fraction below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--include-path", metavar="DIR", help="directory of extra task YAML files, e.g. eval/tasks")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward (default 8)")
    p.add_argument("--max-length", type=int, help="longest context in tokens (default: the model's, at most 2048)")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the tokenizer's chat template")
    p.add_argument("--variant", help="name of this variant in reports (default: from the recipe)")
    p.add_argument("--json", metavar="OUT", help="write the result here (atomically, at the end)")
    p.set_defaults(func=_cmd_lm_eval)
