"""Evaluation data: texts from a file or a dataset, one tokenization of the corpus,
and the sliding windows of Hugging Face's "Perplexity of fixed-length models"
recipe: the corpus ("\\n\\n".join of its texts) is tokenized once and cut into
windows of ``context`` tokens that start ``stride`` tokens apart; each window scores
only the tokens no earlier window scored (the first window scores all but its
first token, which has no context)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EvalError

# longest default context of evaluation requests (lm-eval): tasks rarely need more, and memory grows with it
DEFAULT_EVAL_CONTEXT = 2048
LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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


def corpus_windows(n_tokens: int, context: int, stride: int, limit: int | None) -> list[Window]:
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



def is_ids(data) -> bool:
    """A list of token ids rather than texts."""
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(x, int) for x in data)
