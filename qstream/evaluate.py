"""Evaluation harnesses: perplexity, the bitsandbytes NF4 reference, and lm-evaluation-harness.

Perplexity is the sliding-window recipe of Hugging Face's "Perplexity of fixed-length models":
the corpus ("\\n\\n".join of its texts) is tokenized once and cut into windows of ``context``
tokens that start ``stride`` tokens apart; each window scores only the tokens no earlier window
scored (the first window scores all but its first token, which has no context). Two paths give
the same numbers: window batches through the model's forward (plain), or layer-major through
``StreamedModel.layer_major`` (every window batch goes through layer i before layer i+1 is
loaded: one pass over the weights per group of windows, the default when layers stream). The
NLL is computed in float32 from the final hidden states position chunk by position chunk, so
logits for the whole corpus are never held.

``perplexity_reference`` runs the same windows through a plain transformers model with
``labels`` (transformers' own loss): the cross-check for ``dense_twin``. ``bnb_nf4_reference``
rounds every linear weight of an uncompressed shard directory (except lm_head) through
bitsandbytes' NF4 at block size 64 and measures that model: the quality bar for qstream's NF4.

lm-evaluation-harness: ``QstreamLM`` (registered as model ``qstream``) implements loglikelihood,
loglikelihood_rolling and generate_until on a streamed model. lm-eval 0.4.13 discovers models
only through its own registry (no plugin entry points), so the stock ``lm_eval`` command cannot
see it; use one of::

    qstream eval lm-eval DIR --tasks hellaswag,arc_easy --limit 100
    python -m qstream.evaluate --model qstream --model_args path=DIR,gpu_memory=4GiB --tasks hellaswag
    python -c "import qstream.evaluate as e, lm_eval; e.register_lm_eval(); lm_eval.simple_evaluate(model='qstream', ...)"
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import EvalError, QstreamError

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
UNCOMPRESSED_SCHEMES = ("bf16", "fp16", "fp32")
LOGIT_CHUNK = 1024  # positions per float32 logits block when scoring
DEFAULT_HIDDEN_BUDGET = 1 << 30  # bytes of hidden states one layer-major pass may hold


# --------------------------------------------------------------------------- data
def read_text_file(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"text file not found: {p}; pass an existing plain-text file to --text-file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise EvalError(f"{p}: the file holds no text; perplexity needs some")
    return text


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str, bool]:
    """'NAME[:CONFIG[:SPLIT]]' (hub; split defaults to test) or 'FILE[:SPLIT]' for a local
    .txt/.json/.jsonl/.parquet file (split defaults to train, what datasets calls one file).
    Returns (name or path, config, split, is_local)."""
    if not spec or not spec.strip():
        raise EvalError("--dataset is empty; write NAME[:CONFIG[:SPLIT]], e.g. wikitext:wikitext-2-raw-v1:test")
    parts = spec.split(":")
    if Path(parts[0]).suffix.lower() in LOCAL_FORMATS:
        if len(parts) > 2:
            raise EvalError(f"--dataset {spec!r}: a local file takes at most a split (FILE[:SPLIT]), not a config")
        return parts[0], None, (parts[1] if len(parts) == 2 and parts[1] else "train"), True
    if len(parts) > 3 or any(not p for p in parts):
        raise EvalError(f"--dataset {spec!r}: write NAME[:CONFIG[:SPLIT]], e.g. wikitext:wikitext-2-raw-v1:test")
    name = parts[0]
    config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "test"
    return name, config, split, False


def load_dataset_texts(spec: str, text_column: str = "text") -> list[str]:
    """The texts of a dataset column: a hub dataset or a local file (see parse_dataset_spec)."""
    try:
        import datasets
    except ImportError:
        raise EvalError("--dataset needs the datasets package: pip install 'qstream[eval]' (or use --text-file)") from None
    name, config, split, local = parse_dataset_spec(spec)
    try:
        if local:
            p = Path(name)
            if not p.is_file():
                raise EvalError(f"dataset file not found: {p}; pass an existing .txt/.json/.jsonl/.parquet file to --dataset")
            ds = datasets.load_dataset(LOCAL_FORMATS[p.suffix.lower()], data_files=str(p), split=split)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except EvalError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if local:
            raise EvalError(f"cannot read dataset file {name} (split {split!r}): {type(e).__name__}: {first}") from None
        raise EvalError(f"cannot load dataset {spec!r} ({type(e).__name__}: {first}); hub datasets need internet "
                        "and an existing name/config/split: use --text-file FILE for local text") from None
    if text_column not in ds.column_names:
        raise EvalError(f"dataset {spec!r} has no column {text_column!r}; its columns: {', '.join(ds.column_names)}; "
                        "choose one with --text-column")
    texts = [t for t in ds[text_column] if isinstance(t, str)]
    if not any(t.strip() for t in texts):
        raise EvalError(f"dataset {spec!r}: column {text_column!r} holds no text")
    return texts


def load_texts(*, dataset: str | None = None, text_file: str | None = None, text_column: str = "text") -> tuple[list[str], dict]:
    """Texts of --dataset or --text-file, and a description of the data for result files."""
    if (dataset is None) == (text_file is None):
        raise EvalError("give exactly one of --dataset NAME[:CONFIG[:SPLIT]] or --text-file FILE")
    if text_file is not None:
        texts = [read_text_file(text_file)]
        desc = {"source": f"file:{text_file}", "text_file": str(text_file)}
    else:
        texts = load_dataset_texts(dataset, text_column)
        desc = {"source": f"dataset:{dataset}", "dataset": dataset, "text_column": text_column, "rows": len(texts)}
    joined = "\n\n".join(texts)
    desc["chars"] = len(joined)
    desc["sha256"] = hashlib.sha256(joined.encode()).hexdigest()
    return texts, desc


def tokenize_corpus(data, tokenizer) -> torch.Tensor:
    """1-D token ids of a corpus: texts are joined with "\\n\\n" (the HF recipe) and tokenized
    once with the tokenizer's defaults; token ids (tensor or list) pass through."""
    if isinstance(data, torch.Tensor):
        ids = data.reshape(-1) if data.dim() == 2 and data.shape[0] == 1 else data
        if ids.dim() != 1:
            raise EvalError(f"token ids must be 1-D (or [1, N]), got shape {tuple(data.shape)}")
        return ids.long()
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, int) for x in data):
        return torch.tensor(data, dtype=torch.long)
    texts = [data] if isinstance(data, str) else list(data)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise EvalError("perplexity needs a text, a list of texts or a 1-D sequence of token ids")
    text = "\n\n".join(texts)
    if not text.strip():
        raise EvalError("the text to evaluate is empty")
    if tokenizer is None:
        raise EvalError("texts need a tokenizer (pass tokenizer=..., or a shard directory)")
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


# --------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    begin: int  # corpus offset of the window's first token
    end: int  # corpus offset one past its last token
    score_from: int  # first window position whose token is scored (>= 1: position 0 has no context)

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.begin - self.score_from


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The HF recipe's windows; every corpus token after the first is scored exactly once when
    stride < context, and every token but each window's first when stride == context."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        w = Window(begin, end, max(1, prev_end - begin))
        if w.scored > 0:
            out.append(w)
        prev_end = end
        if end == n_tokens:
            break
    return out


def _corpus_windows(n_tokens: int, context: int, stride: int, limit: int | None) -> list[Window]:
    windows = sliding_windows(n_tokens, context, stride)
    if not windows:
        raise EvalError(f"the corpus has {n_tokens} token(s): perplexity needs at least 2")
    return windows if limit is None else windows[:limit]


def check_window_args(context: int, stride: int, max_positions: int | None, *, where: str = "") -> None:
    if context < 2:
        raise EvalError(f"--context {context}: need at least 2 tokens (one to predict from, one to score)")
    if max_positions is not None and context > max_positions:
        raise EvalError(f"--context {context} is longer than the model's max_position_embeddings ({max_positions}){where}; "
                        f"use --context {max_positions} or less")
    if stride < 1 or stride > context:
        raise EvalError(f"--stride {stride}: must be between 1 and --context ({context}); stride == context "
                        "scores disjoint windows, a smaller stride gives every token more context")


def _batches(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most batch_size each."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0].length == w.length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _stack(ids: torch.Tensor, batch: Sequence[Window]) -> torch.Tensor:
    return torch.stack([ids[w.begin:w.end] for w in batch])


def _nll_rows(project: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, ids: torch.Tensor,
              batch: Sequence[Window]) -> tuple[float, int]:
    """Summed NLL (float64) and count of the scored tokens of a batch. ``states`` [B, S, *] are
    logits or hidden states; ``project`` maps a slice of them to logits. Float32, chunked."""
    total, count = 0.0, 0
    for b, w in enumerate(batch):
        tgt = ids[w.begin + w.score_from:w.end]
        for s in range(w.score_from, w.length, LOGIT_CHUNK):
            e = min(s + LOGIT_CHUNK, w.length)
            logits = project(states[b, s - 1:e - 1]).float()
            t = tgt[s - w.score_from:e - w.score_from].to(logits.device)
            total += F.cross_entropy(logits, t, reduction="sum").double().item()
        count += w.scored
    return total, count


def _result(nll: float, count: int, n_tokens: int, windows: list[Window], context: int, stride: int, seconds: float,
            **extra) -> dict:
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens_scored": count, "corpus_tokens": n_tokens,
            "windows": len(windows), "context": context, "stride": stride, "seconds": seconds,
            "tokens_per_s": sum(w.length for w in windows) / max(seconds, 1e-9), **extra}


# --------------------------------------------------------------------------- perplexity
def _max_positions(config) -> int | None:
    v = getattr(config, "max_position_embeddings", None)
    return int(v) if v else None


def perplexity(model_or_dir, data, *, context: int = 2048, stride: int | None = None, batch_size: int = 1,
               layer_major: bool | None = None, limit: int | None = None, progress: bool = True, tokenizer=None,
               device: str = "auto", gpu_memory=None, host_memory="auto",
               hidden_budget: int = DEFAULT_HIDDEN_BUDGET) -> dict:
    """Sliding-window perplexity of a StreamedModel (or a shard directory, opened with
    ``device``/``gpu_memory``/``host_memory`` and closed again).

    data: a text, a list of texts (joined with "\\n\\n") or 1-D token ids.
    stride: tokens between window starts (default: ``context``, disjoint windows).
    layer_major: None = when the model streams any layer. Windows are grouped into passes whose
        hidden states fit ``hidden_budget`` bytes; each pass reads the weights once.
    limit: evaluate only the first ``limit`` windows.
    """
    from .runtime.model import StreamedModel

    stride = context if stride is None else stride
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit {limit}: must be at least 1 window")
    own = not isinstance(model_or_dir, StreamedModel)
    if own:
        from .manifest import read_manifest

        manifest = read_manifest(model_or_dir)
        check_window_args(context, stride, _max_positions(_Cfg(manifest.config)), where=f" of {model_or_dir}")
        if tokenizer is None and not isinstance(data, torch.Tensor) and not _is_ids(data):
            from .generate import load_tokenizer

            tokenizer = load_tokenizer(model_or_dir)
    else:
        check_window_args(context, stride, _max_positions(model_or_dir.config))
        if tokenizer is None and not isinstance(data, torch.Tensor) and not _is_ids(data):
            from .generate import load_tokenizer

            tokenizer = load_tokenizer(model_or_dir.manifest.root)
    ids = tokenize_corpus(data, tokenizer)
    windows = _corpus_windows(len(ids), context, stride, limit)
    if own:
        from .runtime.model import load

        model = load(model_or_dir, device=device, gpu_memory=gpu_memory, host_memory=host_memory, max_batch=batch_size,
                     max_seq=context, progress=progress)
    else:
        model = model_or_dir
    try:
        lm = bool(model.plan.streamed) if layer_major is None else layer_major
        run = _ppl_layer_major if lm else _ppl_plain
        t0 = time.perf_counter()
        nll, count, passes = run(model, ids, windows, batch_size, progress, hidden_budget)
        seconds = time.perf_counter() - t0
    finally:
        if own:
            model.close()
    return _result(nll, count, len(ids), windows, context, stride, seconds, batch_size=batch_size, layer_major=lm,
                   passes=passes)


class _Cfg:
    def __init__(self, d: dict):
        self.max_position_embeddings = d.get("max_position_embeddings")


def _is_ids(data) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(x, int) for x in data)


def _ppl_plain(model, ids, windows, batch_size, progress, hidden_budget):
    nll, count = 0.0, 0
    with tqdm(total=len(windows), unit="window", desc="perplexity", disable=not progress) as bar:
        for batch in _batches(windows, batch_size):
            logits = model(_stack(ids, batch))
            n, c = _nll_rows(lambda x: x, logits, ids, batch)
            nll, count = nll + n, count + c
            del logits
            bar.update(len(batch))
    return nll, count, len(windows)


def _passes(windows, batch_size, per_window_bytes, hidden_budget) -> list[list[list[Window]]]:
    """Batches grouped into layer-major passes whose hidden states fit the budget."""
    per_pass = max(batch_size, hidden_budget // max(per_window_bytes, 1))
    out: list[list[list[Window]]] = []
    held = 0
    for batch in _batches(windows, batch_size):
        if not out or held + len(batch) > per_pass:
            out.append([])
            held = 0
        out[-1].append(batch)
        held += len(batch)
    return out


def _ppl_layer_major(model, ids, windows, batch_size, progress, hidden_budget):
    hidden = model.config.hidden_size
    item = torch.finfo(model.dtype).bits // 8
    # a window's hidden state, plus the layer's input and output while it runs
    passes = _passes(windows, batch_size, 2 * max(w.length for w in windows) * hidden * item, hidden_budget)
    n_layers = len(model.layers)
    nll, count = 0.0, 0
    with tqdm(total=len(passes) * n_layers, unit="layer", desc="perplexity (layer-major)", disable=not progress) as bar:
        for batches in passes:
            hooks = _progress_hooks(model, len(batches), bar)
            try:
                def head(j, h, batches=batches):
                    return _nll_rows(model.logits, h, ids, batches[j])

                res = model.layer_major([{"input_ids": _stack(ids, b)} for b in batches], head)
            finally:
                for h in hooks:
                    h.remove()
            for n, c in res:
                nll, count = nll + n, count + c
    return nll, count, len(passes)


def _progress_hooks(model, n_batches: int, bar) -> list:
    """Advance ``bar`` by one when a layer has run on the last batch of a layer-major pass."""
    seen = [0]

    def hook(*_):
        seen[0] += 1
        if seen[0] % n_batches == 0:
            bar.update(1)

    return [layer.register_forward_hook(hook) for layer in model.layers]


@torch.inference_mode()
def perplexity_reference(hf_model, data, *, context: int, stride: int | None = None, tokenizer=None,
                         limit: int | None = None, progress: bool = False) -> dict:
    """The plain window loop with a transformers model and its own loss (labels with -100):
    the reference for :func:`perplexity` (use it on ``dense_twin``)."""
    stride = context if stride is None else stride
    check_window_args(context, stride, _max_positions(hf_model.config))
    ids = tokenize_corpus(data, tokenizer)
    windows = _corpus_windows(len(ids), context, stride, limit)
    dev = next(hf_model.parameters()).device
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for w in tqdm(windows, unit="window", desc="perplexity (reference)", disable=not progress):
        x = ids[w.begin:w.end].unsqueeze(0).to(dev)
        labels = x.clone()
        labels[:, :w.score_from] = -100
        loss = hf_model(input_ids=x, labels=labels).loss
        nll += loss.double().item() * w.scored
        count += w.scored
    return _result(nll, count, len(ids), windows, context, stride, time.perf_counter() - t0, batch_size=1,
                   layer_major=False, passes=len(windows))


# --------------------------------------------------------------------------- bnb NF4 reference
def _linear_schemes(manifest) -> set[str]:
    out = set()
    for f in manifest.files:
        for name, meta in f.tensors.items():
            if len(meta["shape"]) == 2 and f.kind in ("layer", "head") and name.endswith(".weight"):
                out.add(meta["scheme"])
    return out


def bnb_nf4_round_trip(w: torch.Tensor, *, blocksize: int = 64) -> torch.Tensor:
    """w through bitsandbytes' NF4 (quantize_4bit, blocks of ``blocksize``) and back, in w's dtype.
    Dequantized flat: bitsandbytes 0.50's CPU kernel garbles 2-D shapes whose last dimension is
    not a multiple of 128; blockwise quantization runs on the flattened tensor either way."""
    import bitsandbytes.functional as bnbF

    q, state = bnbF.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type="nf4")
    state.shape = torch.Size([w.numel()])
    return bnbF.dequantize_4bit(q, state).view(w.shape).to(w.dtype)


@torch.no_grad()
def bnb_nf4_quantize_(model: torch.nn.Module, *, blocksize: int = 64, skip: Iterable[str] = ("lm_head",)) -> int:
    """Round every nn.Linear weight of ``model`` (except modules named in ``skip``) through
    bitsandbytes NF4, in place. Returns how many weights it rounded."""
    skip = set(skip)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip:
            mod.weight = torch.nn.Parameter(bnb_nf4_round_trip(mod.weight.data, blocksize=blocksize), requires_grad=False)
            n += 1
    return n


def bnb_nf4_reference(path: str | Path, data, *, context: int, stride: int | None = None, limit: int | None = None,
                      device: str = "auto", progress: bool = True, blocksize: int = 64) -> dict:
    """Perplexity of an uncompressed shard directory's dense twin with every linear weight except
    lm_head rounded through bitsandbytes NF4 (blocks of 64), and of the unrounded twin (the
    baseline the reference delta is taken against), in the directory's compute dtype."""
    from .generate import load_tokenizer
    from .manifest import read_manifest
    from .runtime.model import resolve_device
    from .runtime.twin import dense_twin

    m = read_manifest(path)
    schemes = _linear_schemes(m)
    if not schemes <= set(UNCOMPRESSED_SCHEMES):
        raise EvalError(f"--bnb-nf4-reference needs an uncompressed shard directory (bf16/fp16/fp32 weights); {path} holds "
                        f"{', '.join(sorted(schemes - set(UNCOMPRESSED_SCHEMES)))} weights: pass the bf16 or fp32 shards")
    stride = context if stride is None else stride
    check_window_args(context, stride, m.config.get("max_position_embeddings"), where=f" of {path}")
    tok = None if isinstance(data, torch.Tensor) or _is_ids(data) else load_tokenizer(path)
    ids = tokenize_corpus(data, tok)
    twin = dense_twin(path, device=str(resolve_device(device)))
    base = perplexity_reference(twin, ids, context=context, stride=stride, limit=limit, progress=progress)
    n = bnb_nf4_quantize_(twin, blocksize=blocksize)
    ref = perplexity_reference(twin, ids, context=context, stride=stride, limit=limit, progress=progress)
    ref["baseline_perplexity"] = base["perplexity"]
    ref["baseline_nll_per_token"] = base["nll_per_token"]
    ref["delta"] = ref["perplexity"] - base["perplexity"]
    ref["delta_rel"] = ref["delta"] / base["perplexity"]
    ref["quantized_linears"] = n
    ref["blocksize"] = blocksize
    ref["method"] = ("dense twin (transformers) of the uncompressed shards; every nn.Linear except lm_head rounded through "
                     f"bitsandbytes.functional.quantize_4bit(w, blocksize={blocksize}, quant_type='nf4') and dequantize_4bit")
    return ref


# --------------------------------------------------------------------------- result files
def versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"qstream": __version__, "torch": torch.__version__}
    for pkg in ("transformers", "bitsandbytes", "datasets", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def shard_facts(manifest) -> dict:
    """Size on disk and bits per weight (all files, and decoder layers only)."""
    def params(f):
        return sum(math.prod(t["shape"]) for t in f.tensors.values())

    files = manifest.files
    layers = [f for f in files if f.kind == "layer"]
    total_b, total_p = sum(f.size for f in files), sum(params(f) for f in files)
    layer_b, layer_p = sum(f.size for f in layers), sum(params(f) for f in layers)
    return {"shard_bytes": total_b, "params": total_p, "bits_per_weight": 8 * total_b / max(total_p, 1),
            "layer_bytes": layer_b, "layer_params": layer_p, "bits_per_weight_layers": 8 * layer_b / max(layer_p, 1)}


def variant_name(recipe: dict) -> str:
    """bf16, int8, nf4, fp4, ... from the recipe's scheme; 'mixed' when overrides other than
    the output head choose another scheme for some layers."""
    scheme = recipe.get("scheme", "?")
    for o in recipe.get("overrides") or []:
        if "lm_head" not in o.get("pattern", "") and o.get("scheme") != scheme:
            return "mixed"
    return scheme


def command_line(a: argparse.Namespace, words: list[str]) -> str:
    """The command that reproduces a run: ``words`` then every option the parser filled in."""
    import shlex

    out = list(words)
    for k, v in vars(a).items():
        if k in ("func", "command", "eval_command", "dir", "verbose", "quiet") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return shlex.join(out)


def result_header(kind: str, path: str | Path, *, command: str, variant: str | None = None,
                  extra: dict | None = None) -> dict:
    from .bench import machine
    from .manifest import read_manifest

    m = read_manifest(path)
    recipe = m.data.get("recipe", {})
    return {"kind": kind, "variant": variant or variant_name(recipe), "command": command,
            "versions": versions(), "machine": machine(), "shards": str(path), "model": m.data["model"]["source"],
            "recipe": recipe, **shard_facts(m), **(extra or {})}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return None if isinstance(x, float) and not math.isfinite(x) else x
    if hasattr(x, "item"):
        try:
            return _jsonable(x.item())
        except (ValueError, RuntimeError):
            pass
    return str(x)


def write_result(path: str | Path, obj: dict) -> None:
    from .manifest import atomic_write_json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, _jsonable(obj))


def _check_json_target(path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise EvalError(f"--json {p} is a directory; give a file name, e.g. {p / 'result.json'}")
    if p.parent != Path("") and p.parent.exists() and not p.parent.is_dir():
        raise EvalError(f"--json {p}: {p.parent} is not a directory")


# --------------------------------------------------------------------------- lm-evaluation-harness
_LM_CLASS = None


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


def lm_eval_class():
    """The lm-evaluation-harness model class (built on first use: lm_eval is optional)."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    try:
        from lm_eval.api.instance import Instance  # noqa: F401
        from lm_eval.api.model import TemplateLM
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        raise EvalError("lm-eval is not installed: pip install 'qstream[eval]'") from None

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
                from .manifest import read_manifest
                from .runtime.model import load

                mp = read_manifest(path).config.get("max_position_embeddings")
                self._max_length = _int_arg("max_length", max_length) or min(int(mp or 2048), 2048)
                model = load(path, device="auto" if device in (None, "") else str(device), gpu_memory=gpu_memory,
                             host_memory=host_memory, max_batch=self.batch_size, max_seq=self._max_length + 1)
            else:
                mp = _max_positions(model.config)
                self._max_length = _int_arg("max_length", max_length) or min(int(mp or 2048), 2048)
            self.model = model
            self.path = str(path or model.manifest.root)
            if tokenizer is None:
                from .generate import load_tokenizer

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
            from lm_eval.utils import simple_parse_args_string

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
            from .generate import SamplingConfig, eos_ids, generate_ids

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

    _LM_CLASS = QstreamLM
    return QstreamLM


def register_lm_eval() -> type:
    """Register the ``qstream`` model with lm-evaluation-harness (idempotent); returns the class."""
    cls = lm_eval_class()
    from lm_eval.api.registry import model_registry

    if "qstream" not in model_registry:
        model_registry.register("qstream", target=cls)
    return cls


def _task_manager(tasks: list[str], include_path: str | None):
    from lm_eval.tasks import TaskManager

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
    import lm_eval

    if not tasks or any(not t for t in tasks):
        raise EvalError("--tasks needs one or more task names, comma-separated (e.g. hellaswag,arc_easy)")
    tm = _task_manager(tasks, include_path)
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


# --------------------------------------------------------------------------- CLI
def _cmd_ppl(a: argparse.Namespace) -> int:
    from .manifest import read_manifest

    _check_json_target(a.json)
    m = read_manifest(a.dir)  # a missing or incomplete directory fails before any data is read
    stride = a.stride if a.stride is not None else a.context
    check_window_args(a.context, stride, m.config.get("max_position_embeddings"), where=f" of {a.dir}")
    if a.batch_size < 1:
        raise EvalError(f"--batch-size {a.batch_size}: must be at least 1")
    if a.limit is not None and a.limit < 1:
        raise EvalError(f"--limit {a.limit}: must be at least 1 window")
    texts, data_desc = load_texts(dataset=a.dataset, text_file=a.text_file, text_column=a.text_column)
    progress = not getattr(a, "quiet", False)
    t0 = time.perf_counter()
    if a.bnb_nf4_reference:
        r = bnb_nf4_reference(a.dir, texts, context=a.context, stride=stride, limit=a.limit, device=a.device,
                              progress=progress)
        variant, run = "bnb-nf4-reference", {"device": a.device}
        print(f"bnb NF4 reference (blocks of 64, every linear but lm_head): perplexity {r['perplexity']:.4f} "
              f"(unrounded twin {r['baseline_perplexity']:.4f}, delta {r['delta']:+.4f}, {100 * r['delta_rel']:+.2f}%)")
    else:
        from .runtime.model import load

        lm = None if a.layer_major == "auto" else a.layer_major == "on"
        model = load(a.dir, device=a.device, gpu_memory=a.gpu_memory, host_memory=a.host_memory, max_batch=a.batch_size,
                     max_seq=a.context, progress=progress)
        try:
            r = perplexity(model, texts, context=a.context, stride=stride, batch_size=a.batch_size, layer_major=lm,
                           limit=a.limit, progress=progress)
            run = {"device": str(model.device), "gpu_memory": a.gpu_memory, "host_memory": a.host_memory,
                   "plan": model.plan.describe()}
        finally:
            model.close()
        variant = a.variant
        print(f"perplexity {r['perplexity']:.4f} over {r['tokens_scored']} tokens ({r['windows']} windows of {a.context}, "
              f"stride {stride}; {'layer-major' if r['layer_major'] else 'plain'}, {r['seconds']:.1f} s, "
              f"{r['tokens_per_s']:.0f} tokens/s)")
    if a.json:
        out = result_header("ppl", a.dir, variant=variant or a.variant,
                            command=command_line(a, ["qstream", "eval", "ppl", str(a.dir)]),
                            extra={"run": run, "data": data_desc, "seconds_total": time.perf_counter() - t0})
        out["ppl"] = r
        write_result(a.json, out)
        print(f"wrote {a.json}")
    return 0


def _cmd_lm_eval(a: argparse.Namespace) -> int:
    from .generate import load_tokenizer
    from .manifest import read_manifest
    from .runtime.model import load

    _check_json_target(a.json)
    max_pos = read_manifest(a.dir).config.get("max_position_embeddings") or 2048
    if a.max_length is not None and not 2 <= a.max_length <= max_pos:
        raise EvalError(f"--max-length {a.max_length}: must be between 2 and the model's max_position_embeddings ({max_pos})")
    max_length = a.max_length or min(int(max_pos), 2048)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks needs one or more task names, comma-separated (e.g. hellaswag,arc_easy)")
    if a.batch_size < 1:
        raise EvalError(f"--batch-size {a.batch_size}: must be at least 1")
    if a.limit is not None and a.limit <= 0:
        raise EvalError(f"--limit {a.limit}: must be positive (a count, or a fraction below 1)")
    register_lm_eval()
    _task_manager(tasks, a.include_path)  # unknown tasks fail before the model loads
    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
    progress = not getattr(a, "quiet", False)
    t0 = time.perf_counter()
    model = load(a.dir, device=a.device, gpu_memory=a.gpu_memory, host_memory=a.host_memory, max_batch=a.batch_size,
                 max_seq=max_length + 1, progress=progress)
    try:
        res = lm_eval_run(model, tasks, include_path=a.include_path, limit=limit, num_fewshot=a.num_fewshot,
                          batch_size=a.batch_size, tokenizer=load_tokenizer(a.dir), max_length=max_length,
                          apply_chat_template=a.apply_chat_template)
        run = {"device": str(model.device), "gpu_memory": a.gpu_memory, "host_memory": a.host_memory,
               "plan": model.plan.describe()}
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


def add_commands(sub) -> None:
    from .cli_run import COMMON, add_runtime_args

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


def lm_eval_main(argv: list[str] | None = None) -> int:
    """``python -m qstream.evaluate ARGS``: lm-eval's own command line with model ``qstream`` registered."""
    register_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    from qstream.evaluate import lm_eval_main as _main  # the package module, so the registry sees one class

    sys.exit(_main())
