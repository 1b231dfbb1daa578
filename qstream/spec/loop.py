"""The decoding loop: prefill both models, rounds of draft + verify, the fallback to plain
decoding, and the text API."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import DraftCacheFull, QstreamError
from ..generate import SamplingConfig, eos_ids, format_prompts, prefill, sample
from .config import SpecConfig, SpecResult, SpecStats
from .kv import gatherable, keep_rows, ones, tree_mode
from .tree import fwd, grow_tree, verify, walk


class _Out:
    """One sequence's tokens, EOS, stop strings and streamed text (batch 1)."""

    def __init__(self, cfg: SamplingConfig, eos, tokenizer, on_text, index: int):
        self.cfg, self.eos, self.tok, self.on_text, self.index = cfg, eos, tokenizer, on_text, index
        self.tokens: list[int] = []
        self.done = False
        self.shown = ""
        self.final: str | None = None

    def add(self, t: int) -> bool:
        """Record a token; True when the sequence is done."""
        if self.done:
            return True
        if t in self.eos:
            self.done = True
            return True
        self.tokens.append(t)
        if self.tok is not None and (self.cfg.stop or self.on_text is not None):
            self._text()
        if len(self.tokens) >= self.cfg.max_new_tokens:
            self.done = True
        return self.done

    def _text(self) -> None:
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        hit = next((text.index(st) for st in self.cfg.stop if st in text), None)
        if hit is not None:
            text, self.done = text[:hit], True
            self.final = text
        if self.on_text is not None and len(text) > len(self.shown) and text.startswith(self.shown):
            self.on_text(self.index, text[len(self.shown):])
            self.shown = text

    def text(self) -> str:
        if self.tok is None:
            return ""
        return self.final if self.final is not None else self.tok.decode(self.tokens, skip_special_tokens=True)


def picker(logits: torch.Tensor, cfg: SamplingConfig, gen, seen, vocab: int) -> Callable[[int], int]:
    """The target's token at a logits row, exactly as plain decoding picks it."""
    if cfg.temperature == 0 and seen is None:
        choices = logits[:, :vocab].argmax(-1).tolist()  # one sync for the whole tree
        return choices.__getitem__

    def pick(j: int) -> int:
        t = int(sample(logits[j:j + 1, :vocab], cfg, gen, seen))
        if seen is not None:
            seen[0, t] = True
        return t
    return pick


@torch.inference_mode()
# one function on purpose: every step shares the caches, the tree, the stats and the fallback state
def speculative_generate_ids(target, draft, ids: torch.Tensor, cfg: SamplingConfig, spec: SpecConfig = SpecConfig(), *,
                             eos=frozenset(), tokenizer=None, on_text: Callable[[int, str], None] | None = None,
                             index: int = 0) -> SpecResult:
    """Decode one sequence (ids [1, T]) with ``draft`` speculating for ``target``.
    Without a tokenizer, stop strings and texts are skipped; ``eos`` empty means run
    ``max_new_tokens``."""
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise QstreamError("speculative decoding runs one sequence at a time (ids of shape [1, T])")
    T = ids.shape[1]
    vocab = target.config.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    st = SpecStats()
    chain_t, why_t = tree_mode(target)
    chain_d, why_d = tree_mode(draft)
    chain = chain_t or chain_d or spec.chain
    st.mode, st.note = ("chain" if chain else "tree"), why_t or why_d
    shape = spec.shape(chain)
    tcache = target.new_cache()
    # the draft's cache holds the prompt, the new tokens and one round's tree (padded steps included)
    need = T + cfg.max_new_tokens + shape[1] * shape[2] + shape[1] + 2
    dcache = draft.tree_cache(need) if hasattr(draft, "tree_cache") else draft.new_cache()
    if not (gatherable(tcache) and gatherable(dcache)):
        st.mode, st.note = "plain", "a KV cache that cannot be re-indexed (sliding-window or static layers): plain decoding"
    dev = target.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(1, vocab, dtype=torch.bool)
        seen[0, ids[0]] = True
    mask = torch.ones(1, T, dtype=torch.long)
    target.reset_timing()
    t0 = time.perf_counter()
    root = picker(prefill(target, ids, mask, tcache, cfg.prefill_chunk).float(), cfg, gen, seen, vocab)(0)
    prefill_s = time.perf_counter() - t0
    prefill_timing = target.timing()
    target.reset_timing()
    if st.mode != "plain":
        draft.reset_timing()
        t = time.perf_counter()
        prefill(draft, ids, mask, dcache, cfg.prefill_chunk)
        st.draft_prefill_s = time.perf_counter() - t

    out = _Out(cfg, set(eos), tokenizer, on_text, index)
    done = out.add(root)
    L, pending = T, [root]  # root position (= target cache length); tokens the draft's cache lacks
    plain_cost = spec.plain_step_s
    probe = spec.fallback and plain_cost is None  # the first decode step is a plain one, timed
    ema_tok = ema_cost = None
    t1 = time.perf_counter()
    while not done:
        if st.mode == "plain" or probe:
            ts = time.perf_counter()
            logits = fwd(target, tcache, [root], [L], ones(L + 1), keep=1)
            root = picker(logits, cfg, gen, seen, vocab)(0)
            dt = time.perf_counter() - ts
            st.plain_steps += 1
            st.plain_s += dt
            if probe:
                plain_cost, probe = dt, False
            L += 1
            pending.append(root)
            done = out.add(root)
            continue
        ts = time.perf_counter()
        try:
            tree, slots, forwards, nodes = grow_tree(draft, dcache, pending, L, shape, chain=chain,
                                                     temperature=cfg.temperature, vocab=vocab)
        except DraftCacheFull as e:  # (a bound above makes this rare) the rest decodes plainly
            st.mode, st.note = "plain", "; ".join(x for x in (st.note, f"{e}: plain decoding from here") if x)
            continue
        td = time.perf_counter() - ts
        logits = verify(target, tcache, tree, nodes, L, chain=chain)
        toks, path = walk(tree, nodes, picker(logits, cfg, gen, seen, vocab), stop=out.eos.__contains__,
                          room=cfg.max_new_tokens - len(out.tokens))
        tv = time.perf_counter() - ts - td
        row = {node: j for j, node in enumerate([0] + nodes)}
        keep_rows(tcache, list(range(L)) + [L + row[p] for p in path])
        expanded = [p for p in path if p in slots]  # a prefix of the path: parents expand before children
        keep_rows(dcache, list(range(slots[0] + 1)) + [slots[p] for p in expanded[1:]])
        pending = [tree.tokens[p] for p in path[len(expanded):]] + [toks[-1]]
        L += len(path)
        root = toks[-1]
        for t in toks:
            if out.add(t):
                done = True
                break
        st.accepted.append(len(toks))
        st.tree_nodes.append(len(nodes))
        st.draft_forwards.append(forwards)
        st.draft_s.append(td)
        st.verify_s.append(tv)
        a = spec.ema
        ema_tok = len(toks) if ema_tok is None else (1 - a) * ema_tok + a * len(toks)
        ema_cost = td + tv if ema_cost is None else (1 - a) * ema_cost + a * (td + tv)
        # speculation pays while a pass yields more tokens than plain steps in the same time; when
        # even a fully accepted pass (depth + 1 tokens) could not pay, waiting for the warm-up only costs
        need = ema_cost / plain_cost if spec.fallback else 0.0
        if spec.fallback and ema_tok < need and (st.passes >= spec.warmup_rounds or need > shape[1] + 1):
            st.mode, st.fell_back_after = "plain", st.passes
            st.note = "; ".join(x for x in (st.note, (
                f"fell back to plain decoding after {st.passes} passes: {ema_tok:.2f} tokens/pass < "
                f"{need:.2f} needed (draft+verify {ema_cost:.4f} s, plain step {plain_cost:.4f} s)")) if x)
    decode_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    timing = target.timing()
    timing["draft"] = draft.timing()
    return SpecResult([out.text()], [out.tokens], T, prefill_s, decode_s, max(len(out.tokens) - 1, 0), peak, timing,
                      prefill_timing, spec=st)


def speculative_generate(target, draft, tokenizer, prompts: list, cfg: SamplingConfig = SamplingConfig(),
                         spec: SpecConfig = SpecConfig(), *,
                         on_text: Callable[[int, str], None] | None = None) -> SpecResult:
    """``generate()`` with a draft: prompts run one after the other (batch 1 each); the
    result's ``spec`` holds the per-pass stats of all of them."""
    if not prompts or any(not p for p in prompts):
        raise QstreamError("every prompt must be a non-empty string (or conversation)")
    texts = format_prompts(tokenizer, prompts, chat=cfg.chat, system=cfg.system)
    eos = eos_ids(target, tokenizer)
    total = None
    for i, text in enumerate(texts):
        ids = tokenizer([text], return_tensors="pt", add_special_tokens=not cfg.chat)["input_ids"]
        r = speculative_generate_ids(target, draft, ids, cfg, spec, eos=eos, tokenizer=tokenizer, on_text=on_text, index=i)
        if total is None:
            total = r
            continue
        total.texts += r.texts
        total.new_tokens += r.new_tokens
        total.prompt_tokens = max(total.prompt_tokens, r.prompt_tokens)
        total.prefill_s += r.prefill_s
        total.decode_s += r.decode_s
        total.decode_steps += r.decode_steps
        if r.peak_gpu_bytes is not None:
            total.peak_gpu_bytes = max(total.peak_gpu_bytes or 0, r.peak_gpu_bytes)
        total.spec.merge(r.spec)
    return total
