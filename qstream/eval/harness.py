"""lm-evaluation-harness: the model class ``qstream`` (loglikelihood,
loglikelihood_rolling and generate_until on a streamed model; layer-major when
layers stream) and a runner.

lm-eval 0.4.13 discovers models only through its own registry (no plugin entry
points), so the stock ``lm_eval`` command cannot see it; use one of::

    qstream eval lm-eval DIR --tasks hellaswag,arc_easy --limit 100
    python -m qstream.eval --model qstream --model_args path=DIR,gpu_memory=4GiB --tasks hellaswag

This module imports lm_eval (an optional extra, slow to import): import it only to run lm-eval.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import EvalError, QstreamError
from ..generate import SamplingConfig, eos_ids, generate_ids, load_tokenizer
from ..runtime.build import load
from ..store.manifest import read_manifest
from .data import DEFAULT_EVAL_CONTEXT
from .perplexity import DEFAULT_HIDDEN_BUDGET, max_positions

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ImportError:
    raise EvalError("lm-eval is not installed: pip install 'qstream[eval]'") from None

log = logging.getLogger(__name__)


def _int_arg(name: str, v, *, allow_auto: bool = False, default: int | None = None) -> int | None:
    if v is None:
        return default
    if allow_auto and str(v) == "auto":
        return default
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise EvalError(f"lm-eval model_args: {name}={v!r} is not a whole number") from None
    if n < 1:
        raise EvalError(f"lm-eval model_args: {name}={v!r} must be at least 1")
    return n


class QstreamLM(TemplateLM):
    """lm-eval model ``qstream``: model_args path=DIR[,device=cpu|cuda|auto][,gpu_memory=4GiB]
    [,host_memory=auto|0|SIZE][,batch_size=N][,max_length=N][,layer_major=auto|true|false][,max_gen_toks=N]."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, device: str | None = "auto",
                 gpu_memory=None, host_memory="auto", batch_size=1, max_batch_size=None, max_length=None,
                 layer_major="auto", max_gen_toks=256, model=None, tokenizer=None,
                 hidden_budget: int = DEFAULT_HIDDEN_BUDGET, **unused):
        super().__init__()
        for k in unused:
            log.warning("qstream lm-eval model: ignoring model_args %s", k)
        path = path or pretrained
        if model is None and not path:
            raise EvalError("lm-eval model qstream needs model_args path=SHARD_DIR")
        self.batch_size = _int_arg("batch_size", batch_size, allow_auto=True, default=8)
        if max_batch_size is not None and str(batch_size) == "auto":
            self.batch_size = _int_arg("max_batch_size", max_batch_size)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        lm = str(layer_major).lower()
        if lm not in ("auto", "none", "true", "false", "1", "0"):
            raise EvalError(f"lm-eval model_args: layer_major={layer_major!r}: use auto, true or false")
        self.hidden_budget = int(hidden_budget)
        if model is None:
            mp = read_manifest(path).max_positions
            self._max_length = _int_arg("max_length", max_length) or min(mp or DEFAULT_EVAL_CONTEXT, DEFAULT_EVAL_CONTEXT)
            model = load(path, device="auto" if device in (None, "") else str(device), gpu_memory=gpu_memory,
                         host_memory=host_memory, max_batch=self.batch_size, max_seq=self._max_length + 1)
        else:
            mp = max_positions(model.config)
            self._max_length = _int_arg("max_length", max_length) or min(mp or DEFAULT_EVAL_CONTEXT, DEFAULT_EVAL_CONTEXT)
        self.model = model
        self.path = str(path or model.manifest.root)
        if tokenizer is None:
            tokenizer = load_tokenizer(self.path)
        self.tokenizer = tokenizer
        self.layer_major = bool(model.plan.streamed) if lm in ("auto", "none") else lm in ("true", "1")

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # lm-eval's CLI always passes batch_size/device too: model_args win over those defaults
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""), additional_config)

    # -- what TemplateLM needs ----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- scoring --------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """requests: (key, context tokens, continuation tokens) -> (sum logprob, is_greedy)."""
        items = []  # (index, input ids, continuation ids)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, (_key, ctx, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)
                continue
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            n = min(len(cont), len(whole) - 1)
            items.append((i, whole[:-1], whole[len(whole) - n:]))
        items.sort(key=lambda it: -len(it[1]))  # long first: less padding, failures early
        bs = override_bs or self.batch_size
        batches = [items[k:k + bs] for k in range(0, len(items), bs)]
        bar = tqdm(total=len(items), desc="loglikelihood", unit="req", disable=disable_tqdm)

        def score(batch, states, project):
            out = []
            for b, (_, inp, cont) in enumerate(batch):
                L, n = len(inp), len(cont)
                logp = F.log_softmax(project(states[b, L - n:L]).float(), dim=-1)
                t = torch.tensor(cont, device=logp.device)
                out.append((logp.gather(-1, t[:, None]).sum().double().item(), bool((logp.argmax(-1) == t).all())))
            return out

        def collect(batch, scored):
            for (i, _, _), r in zip(batch, scored):
                results[i] = r
                self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
            bar.update(len(batch))

        if self.layer_major and batches:
            hidden = self.model.config.hidden_size
            item = torch.finfo(self.model.dtype).bits // 8
            per_pass = max(1, self.hidden_budget // (2 * bs * len(items[0][1]) * hidden * item))
            for k in range(0, len(batches), per_pass):
                group = batches[k:k + per_pass]
                outs = self.model.layer_major([{"input_ids": self._pad(b)} for b in group],
                                              lambda j, h, group=group: score(group[j], h, self.model.logits))
                for b, s in zip(group, outs):
                    collect(b, s)
        else:
            for b in batches:
                logits = self.model(self._pad(b))
                collect(b, score(b, logits, lambda x: x))
        bar.close()
        return results

    def _pad(self, batch) -> torch.Tensor:
        """Right-padded input ids [B, S]: causal attention keeps padding out of real positions."""
        S = max(len(inp) for _, inp, _ in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        x = torch.full((len(batch), S), pad, dtype=torch.long)
        for b, (_, inp, _) in enumerate(batch):
            x[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        return x

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scored):
            totals[r] += lp
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = eos_ids(self.model, self.tokenizer)
        bar = tqdm(total=len(requests), desc="generate_until", unit="req", disable=disable_tqdm)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1] or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            if eot and eot not in until:
                until.append(eot)
            max_new = _int_arg("max_gen_toks", kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
            top_p = float(kw.pop("top_p", 1.0) or 1.0) if do_sample else 1.0
            seed = kw.pop("seed", None)
            keep = max(self.max_length - max_new, 1)
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                encs = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in chunk]
                T = max(len(e) for e in encs)
                ids = torch.full((len(encs), T), self.eot_token_id, dtype=torch.long)
                mask = torch.zeros((len(encs), T), dtype=torch.long)
                for b, e in enumerate(encs):
                    ids[b, T - len(e):] = torch.tensor(e)
                    mask[b, T - len(e):] = 1
                cfg = SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_p=top_p, stop=tuple(until),
                                     seed=seed, chat=False)
                r = generate_ids(self.model, ids, mask, cfg, eos=eos, tokenizer=self.tokenizer)
                for i, text in zip(chunk, r.texts):
                    for s in until:
                        if s and s in text:
                            text = text[:text.index(s)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def close(self) -> None:
        self.model.close()


def register_lm_eval() -> type:
    """Register the ``qstream`` model with lm-evaluation-harness (idempotent); returns the class."""
    if "qstream" not in model_registry:
        model_registry.register("qstream", target=QstreamLM)
    return QstreamLM


def task_manager(tasks: list[str], include_path: str | None):
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvalError(f"--include-path {include_path}: no such directory of task YAML files")
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm  # skip indexing lm-eval's thousands of built-in tasks
    tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`, or pass "
                        "--include-path DIR holding their YAML (e.g. --include-path eval/tasks for qstream_tiny_qa)")
    return tm


def lm_eval_run(model, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
                num_fewshot: int | None = None, batch_size: int = 1, tokenizer=None, layer_major: bool | None = None,
                max_length: int | None = None, apply_chat_template: bool = False, bootstrap_iters: int = 0,
                seed: int = 1234) -> dict:
    """Run lm-eval tasks on a StreamedModel; returns lm-eval's results dict (results, n-samples,
    configs, versions, ...)."""
    cls = register_lm_eval()
    if not tasks or any(not t for t in tasks):
        raise EvalError("--tasks needs one or more task names, comma-separated (e.g. hellaswag,arc_easy)")
    tm = task_manager(tasks, include_path)
    lm = cls(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
             layer_major="auto" if layer_major is None else str(bool(layer_major)).lower())
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                      log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      apply_chat_template=apply_chat_template)
    except QstreamError:
        raise
    except ConnectionError as e:
        raise EvalError(f"lm-eval could not download a task's dataset ({str(e).splitlines()[0][:160]}); hub datasets "
                        "need internet: use a task with local data (--include-path)") from None
    return res


def lm_eval_main(argv: list[str] | None = None) -> int:
    """``python -m qstream.eval ARGS``: lm-eval's own command line with model ``qstream`` registered."""
    register_lm_eval()
    from lm_eval.__main__ import cli_evaluate  # lm-eval's CLI module, imported only when it runs

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0
