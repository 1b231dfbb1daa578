"""Generation with a KV cache over a streamed model: a batch of prompts shares one
pass over the weights per step; greedy, temperature, top-k and top-p sampling with a
repetition penalty; EOS and stop strings; chat templates (with a system prompt and
multi-turn conversations); chunked prefill; text streamed as it is decoded."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import QstreamError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0  # 1 = none; >1 discourages tokens already in the prompt or output (CTRL's rule)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prefill_chunk: int = 512
    chat: bool = True  # apply the tokenizer's chat template when it has one
    system: str | None = None  # system prompt for the chat template

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QstreamError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise QstreamError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise QstreamError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise QstreamError("top_k must be >= 0 (0 means no top-k cut)")
        if self.repetition_penalty <= 0:
            raise QstreamError("repetition_penalty must be > 0 (1 means none)")
        if self.prefill_chunk < 1:
            raise QstreamError("prefill_chunk must be at least 1")


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: list[list[int]]
    prompt_tokens: int  # per sequence, after padding
    prefill_s: float
    decode_s: float
    decode_steps: int
    peak_gpu_bytes: int | None
    timing: dict = field(default_factory=dict)  # decode steps only
    prefill_timing: dict = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)  # wall time of each decode step, token on the host

    @property
    def first_token_s(self) -> float:
        """Time to first token: the prefill and the first sample, on the host."""
        return self.prefill_s

    @property
    def s_per_token(self) -> float:
        return self.decode_s / max(self.decode_steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.texts) * self.decode_steps / max(self.decode_s, 1e-9)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def format_prompts(tokenizer, prompts: list, *, chat: bool, system: str | None = None) -> list[str]:
    """Prompts as the model sees them. A prompt is a string (one user turn) or a conversation
    (a list of {"role", "content"} messages); the chat template applies when ``chat`` and the
    tokenizer has one, otherwise the texts are used as they are."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = []
        for p in prompts:
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            if system and not any(m.get("role") == "system" for m in msgs):
                msgs.insert(0, {"role": "system", "content": system})
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        return out
    return [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for v in (getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(v)
    return ids


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (and transformers): logits [B, V] of tokens marked in
    ``seen`` [B, V] are divided by ``penalty`` when positive and multiplied when negative."""
    if penalty == 1.0:
        return logits
    seen = seen.to(logits.device)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]; ``seen`` [B, V] marks tokens the repetition penalty applies to."""
    logits = logits.float()
    if seen is not None:
        logits = penalize(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig = SamplingConfig(), *,
             on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
    """Generate for every prompt at once. ``on_text(i, delta)`` receives new text of sequence i."""
    if not prompts or any(not p for p in prompts):
        raise QstreamError("every prompt must be a non-empty string (or conversation)")
    texts_in = format_prompts(tokenizer, prompts, chat=cfg.chat, system=cfg.system)
    enc = tokenizer(texts_in, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not cfg.chat)
    return generate_ids(model, enc["input_ids"], enc["attention_mask"], cfg, eos=eos_ids(model, tokenizer),
                        tokenizer=tokenizer, on_text=on_text)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Run the prompt [B, T] (left-padded, ``mask`` [B, T]) into ``cache``, ``chunk`` tokens at
    a time; position ids skip the left padding. Returns the last position's logits [B, V]."""
    T = ids.shape[1]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    logits = None
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        logits = model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos[:, s:e], past_key_values=cache,
                       cache_position=torch.arange(s, e), logits_to_keep=1)
    return logits[:, -1]


def decode_one_token(model, tok: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """One step: tokens [B] at positions ``pos`` [B]; ``mask`` [B, L] already covers them.
    Returns logits [B, V]. On a static cache the model prepares the 4-D mask itself (its
    decoder layers then replay as CUDA graphs, see runtime/graphs.py)."""
    B = tok.shape[0]
    prepared = model.decode_mask(mask, cache) if hasattr(model, "decode_mask") else None
    return model(tok.view(B, 1), attention_mask=mask if prepared is None else prepared, position_ids=pos.view(B, 1),
                 past_key_values=cache, cache_position=torch.tensor([mask.shape[1] - 1]), logits_to_keep=1)[:, -1]


def decode_n_tokens(model, next_tok: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, cfg: SamplingConfig,
                    gen: torch.Generator | None, out: "_Outputs",
                    seen: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Decode until every sequence is done (``out.add`` says so). Returns the final mask and
    the wall time of each step (token on the host: ``.cpu()`` waits for the device).
    ``seen`` [B, V] (repetition penalty) is updated with every token."""
    B = next_tok.shape[0]
    step_s = []
    while not out.add(next_tok):
        t = time.perf_counter()
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        pos = pos + 1
        if seen is not None:
            seen.scatter_(1, next_tok.view(B, 1), True)
        next_tok = sample(decode_one_token(model, next_tok, mask, pos, cache), cfg, gen, seen).cpu()
        step_s.append(time.perf_counter() - t)
    return mask, step_s


class _Outputs:
    """Per-sequence bookkeeping of the loop: tokens, EOS, stop strings, streamed text."""

    def __init__(self, B: int, cfg: SamplingConfig, eos: set[int], tokenizer, on_text):
        self.cfg, self.eos, self.tok, self.on_text = cfg, eos, tokenizer, on_text
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.done = [False] * B
        self.shown = [""] * B
        self.finals: list[str | None] = [None] * B

    def add(self, next_tok: torch.Tensor) -> bool:
        """Record one token per sequence; True when every sequence is done."""
        for b, t in enumerate(next_tok.tolist()):
            if self.done[b]:
                continue
            if t in self.eos:
                self.done[b] = True
                continue
            self.tokens[b].append(t)
            if self.tok is not None and (self.cfg.stop or self.on_text is not None):
                self._text(b)
            if len(self.tokens[b]) >= self.cfg.max_new_tokens:
                self.done[b] = True
        return all(self.done)

    def _text(self, b: int) -> None:
        text = self.tok.decode(self.tokens[b], skip_special_tokens=True)
        hit = next((text.index(st) for st in self.cfg.stop if st in text), None)
        if hit is not None:
            text, self.done[b] = text[:hit], True
            self.finals[b] = text
        if self.on_text is not None and len(text) > len(self.shown[b]) and text.startswith(self.shown[b]):
            self.on_text(b, text[len(self.shown[b]):])
            self.shown[b] = text

    def texts(self) -> list[str]:
        if self.tok is None:
            return [""] * len(self.tokens)
        return [f if f is not None else self.tok.decode(t, skip_special_tokens=True) for f, t in zip(self.finals, self.tokens)]


@torch.inference_mode()
def generate_ids(model, ids: torch.Tensor, mask: torch.Tensor, cfg: SamplingConfig, *, eos: set[int] = frozenset(),
                 tokenizer=None, on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
    """The loop on token ids [B, T] (left-padded, ``mask`` [B, T]). Without a tokenizer, stop
    strings and texts are skipped (benchmarks); ``eos`` empty means run max_new_tokens."""
    B, T = ids.shape
    dev = model.device
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    cache = model.new_cache(B, T + cfg.max_new_tokens)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.reset_timing()

    seen = None
    if cfg.repetition_penalty != 1.0:  # tokens of the prompt (not its padding) and of the output
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool)
        for b in range(B):
            seen[b, ids[b][mask[b].bool()]] = True
    t0 = time.perf_counter()
    next_tok = sample(prefill(model, ids, mask, cache, cfg.prefill_chunk), cfg, gen, seen).cpu()  # .cpu() waits for the device
    prefill_s = time.perf_counter() - t0
    prefill_timing = model.timing()
    model.reset_timing()

    out = _Outputs(B, cfg, eos, tokenizer, on_text)
    t1 = time.perf_counter()
    pos = (mask.sum(-1) - 1).clamp(min=0)  # [B]: position of each sequence's last token
    _, step_s = decode_n_tokens(model, next_tok, mask, pos, cache, cfg, gen, out, seen)
    decode_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return GenerationResult(out.texts(), out.tokens, T, prefill_s, decode_s, len(step_s), peak, model.timing(),
                            prefill_timing, step_s)
