"""Sliding-window perplexity of a streamed model (windows: see data.py).

Two paths give the same numbers: window batches through the model's forward
(plain), or layer-major through ``StreamedModel.layer_major`` (every window batch
goes through layer i before layer i+1 is loaded: one pass over the weights per
group of windows, the default when layers stream). The NLL is computed in float32
from the final hidden states position chunk by position chunk, so logits for the
whole corpus are never held. ``perplexity_reference`` runs the same windows
through a plain transformers model with ``labels`` (transformers' own loss): the
cross-check for ``dense_twin``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import EvalError
from ..generate import load_tokenizer
from ..runtime.build import load
from ..runtime.model import StreamedModel
from ..store.manifest import read_manifest
from .data import Window, check_window_args, corpus_windows, is_ids, tokenize_corpus

LOGIT_CHUNK = 1024  # positions per float32 logits block when scoring
DEFAULT_HIDDEN_BUDGET = 1 << 30  # bytes of hidden states one layer-major pass may hold


def batches_of(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most batch_size each."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0].length == w.length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def stack(ids: torch.Tensor, batch: Sequence[Window]) -> torch.Tensor:
    return torch.stack([ids[w.begin:w.end] for w in batch])


@dataclass
class NLL:
    """Summed negative log-likelihood of scored tokens (float64), with the sum of squares for the
    standard error (None when only a mean loss is known, as from transformers' own loss)."""

    total: float = 0.0
    squares: float | None = 0.0
    count: int = 0

    def __add__(self, o: "NLL") -> "NLL":
        sq = None if self.squares is None or o.squares is None else self.squares + o.squares
        return NLL(self.total + o.total, sq, self.count + o.count)

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def stderr(self) -> float | None:
        """Standard error of the mean NLL per token (tokens treated as independent, as llama.cpp does)."""
        if self.squares is None or self.count < 2:
            return None
        var = max(self.squares / self.count - self.mean ** 2, 0.0) * self.count / (self.count - 1)
        return math.sqrt(var / self.count)


def nll_rows(project: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, ids: torch.Tensor,
             batch: Sequence[Window]) -> NLL:
    """NLL of the scored tokens of a batch. ``states`` [B, S, *] are logits or hidden states;
    ``project`` maps a slice of them to logits. Float32, chunked."""
    out = NLL()
    for b, w in enumerate(batch):
        tgt = ids[w.begin + w.score_from:w.end]
        for s in range(w.score_from, w.length, LOGIT_CHUNK):
            e = min(s + LOGIT_CHUNK, w.length)
            logits = project(states[b, s - 1:e - 1]).float()
            t = tgt[s - w.score_from:e - w.score_from].to(logits.device)
            per_token = F.cross_entropy(logits, t, reduction="none").double()
            out = out + NLL(per_token.sum().item(), per_token.square().sum().item(), 0)
        out.count += w.scored
    return out


def _result(nll: NLL, n_tokens: int, windows: list[Window], context: int, stride: int, seconds: float,
            **extra) -> dict:
    mean, se = nll.mean, nll.stderr
    ppl = math.exp(mean)
    return {"perplexity": ppl, "perplexity_stderr": None if se is None else ppl * se, "nll_per_token": mean,
            "nll_stderr": se, "tokens_scored": nll.count, "corpus_tokens": n_tokens, "windows": len(windows),
            "context": context, "stride": stride, "seconds": seconds,
            "tokens_per_s": sum(w.length for w in windows) / max(seconds, 1e-9), **extra}


def max_positions(config) -> int | None:
    """``max_position_embeddings`` of a transformers config, when it says."""
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
    stride = context if stride is None else stride
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit {limit}: must be at least 1 window")
    own = not isinstance(model_or_dir, StreamedModel)
    if own:
        root, limit_pos, where = Path(model_or_dir), read_manifest(model_or_dir).max_positions, f" of {model_or_dir}"
    else:
        root, limit_pos, where = model_or_dir.manifest.root, max_positions(model_or_dir.config), ""
    check_window_args(context, stride, limit_pos, where=where)
    if tokenizer is None and not isinstance(data, torch.Tensor) and not is_ids(data):
        tokenizer = load_tokenizer(root)
    ids = tokenize_corpus(data, tokenizer)
    windows = corpus_windows(len(ids), context, stride, limit)
    model = load(root, device=device, gpu_memory=gpu_memory, host_memory=host_memory, max_batch=batch_size,
                 max_seq=context, progress=progress) if own else model_or_dir
    try:
        lm = bool(model.plan.streamed) if layer_major is None else layer_major
        run = _ppl_layer_major if lm else _ppl_plain
        t0 = time.perf_counter()
        nll, passes = run(model, ids, windows, batch_size, progress, hidden_budget)
        seconds = time.perf_counter() - t0
    finally:
        if own:
            model.close()
    return _result(nll, len(ids), windows, context, stride, seconds, batch_size=batch_size, layer_major=lm,
                   passes=passes)


def _ppl_plain(model, ids, windows, batch_size, progress, hidden_budget):
    nll = NLL()
    with tqdm(total=len(windows), unit="window", desc="perplexity", disable=not progress) as bar:
        for batch in batches_of(windows, batch_size):
            logits = model(stack(ids, batch))
            nll = nll + nll_rows(lambda x: x, logits, ids, batch)
            del logits
            bar.update(len(batch))
    return nll, len(windows)


def _passes(windows, batch_size, per_window_bytes, hidden_budget) -> list[list[list[Window]]]:
    """Batches grouped into layer-major passes whose hidden states fit the budget."""
    per_pass = max(batch_size, hidden_budget // max(per_window_bytes, 1))
    out: list[list[list[Window]]] = []
    held = 0
    for batch in batches_of(windows, batch_size):
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
    nll = NLL()
    with tqdm(total=len(passes) * n_layers, unit="layer", desc="perplexity (layer-major)", disable=not progress) as bar:
        for batches in passes:
            def head(j, h, batches=batches):
                return nll_rows(model.logits, h, ids, batches[j])

            res = model.layer_major([{"input_ids": stack(ids, b)} for b in batches], head, on_layer=lambda i: bar.update(1))
            for part in res:
                nll = nll + part
    return nll, len(passes)


@torch.inference_mode()
def perplexity_reference(hf_model, data, *, context: int, stride: int | None = None, tokenizer=None,
                         limit: int | None = None, progress: bool = False) -> dict:
    """The plain window loop with a transformers model and its own loss (labels with -100):
    the reference for :func:`perplexity` (use it on ``dense_twin``)."""
    stride = context if stride is None else stride
    check_window_args(context, stride, max_positions(hf_model.config))
    ids = tokenize_corpus(data, tokenizer)
    windows = corpus_windows(len(ids), context, stride, limit)
    dev = next(hf_model.parameters()).device
    nll = NLL(squares=None)
    t0 = time.perf_counter()
    for w in tqdm(windows, unit="window", desc="perplexity (reference)", disable=not progress):
        x = ids[w.begin:w.end].unsqueeze(0).to(dev)
        labels = x.clone()
        labels[:, :w.score_from] = -100
        loss = hf_model(input_ids=x, labels=labels).loss
        nll = nll + NLL(loss.double().item() * w.scored, None, w.scored)
    return _result(nll, len(ids), windows, context, stride, time.perf_counter() - t0, batch_size=1,
                   layer_major=False, passes=len(windows))

