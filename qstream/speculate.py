"""Exact speculative decoding with a draft StreamedModel: many tokens per pass over the
target's weights.

A streamed target pays for every byte of every streamed layer once per forward, whatever
the number of tokens in it, so verifying hundreds of candidate tokens costs about what one
token costs. A cheap draft (a low-bit shard directory of the same model, or a small model
with the same tokenizer) grows a *tree* of candidate continuations best-first by cumulative
draft log-probability (SpecExec, NeurIPS 2024); the target scores the whole tree in ONE
forward with a tree attention mask and keeps the longest path it agrees with plus its own
next token.

Exactness. Every emitted token is drawn from the target: at each tree node the target's
token is picked from the target's logits at that node (argmax, or a sample with the
request's temperature/top-k/top-p/penalty); if the drafted tree has that token as a child
the walk continues there, else the token ends the round. This is SpecExec's acceptance
rule: the output distribution is the target's own (each token is a target sample given
exactly the committed prefix); the draft only decides how many of those samples one pass
yields. Greedy output equals plain greedy decoding up to floating-point differences between
a tree forward and a one-token forward (exact under float32 compute barring near-ties).

Caches. The target's KV cache holds the committed tokens but the last (the next round's
root). After a verify pass it holds prefix + the whole tree; the accepted path's rows are
gathered into place (tree nodes are not contiguous). The draft's cache holds a prefix of
the committed tokens; the rest (``pending``) is fed with the next round's first forward.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import QstreamError
from .generate import GenerationResult, SamplingConfig, eos_ids, format_prompts, prefill, sample

# Architectures whose transformers 5.x attention was checked (tests/test_speculate.py) to
# honour a custom 4D additive mask with explicit position ids, under sdpa and eager. Others
# draft a chain, which needs only the ordinary causal mask.
TREE_MASK_ARCHS = frozenset({"llama", "qwen2", "mistral", "gemma"})
TREE_MASK_ATTN = frozenset({"sdpa", "eager"})  # flash/flex kernels take no additive 4D mask


@dataclass(frozen=True)
class SpecConfig:
    """How the draft grows its tree and when speculation gives way to plain decoding."""
    budget: int = 64  # draft tokens the target verifies per pass (tree nodes, the root not counted)
    max_depth: int = 16  # longest drafted continuation; also the most draft forwards per round
    beam: int = 16  # frontier nodes the draft expands per forward (batched tree growth)
    branch: int = 8  # children considered per expanded node: its top-k tokens
    chain: bool = False  # draft a single path (budget = depth); forced for unverified architectures
    fallback: bool = True  # switch to plain decoding when speculation does not pay
    warmup_rounds: int = 4  # rounds measured before the fallback may decide
    ema: float = 0.3  # weight of the newest round in the rolling acceptance/cost estimates
    plain_step_s: float | None = None  # cost of one plain decode step; None = time one (the first decode step)

    def __post_init__(self) -> None:
        if not 1 <= self.budget <= 4096:
            raise QstreamError(f"tree budget {self.budget}: must be 1 ... 4096 draft tokens per pass")
        if self.max_depth < 1:
            raise QstreamError(f"tree depth {self.max_depth}: must be at least 1")
        if self.beam < 1 or self.branch < 1:
            raise QstreamError("beam and branch must be at least 1")
        if not 0 < self.ema <= 1:
            raise QstreamError(f"ema {self.ema}: must be in (0, 1]")
        if self.warmup_rounds < 1:
            raise QstreamError("warmup_rounds must be at least 1")

    def shape(self, chain: bool) -> tuple[int, int, int, int]:
        """(budget, depth, beam, branch) actually used."""
        if chain or self.chain:
            d = min(self.budget, self.max_depth)
            return d, d, 1, 1
        return self.budget, self.max_depth, self.beam, self.branch


@dataclass
class SpecStats:
    mode: str = "tree"  # tree | chain | plain
    note: str = ""  # why the mode is not what was asked, and the fallback's reason
    accepted: list[int] = field(default_factory=list)  # tokens emitted per target pass (accepted + the target's own)
    tree_nodes: list[int] = field(default_factory=list)
    draft_forwards: list[int] = field(default_factory=list)
    draft_s: list[float] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    plain_steps: int = 0
    plain_s: float = 0.0
    fell_back_after: int | None = None  # rounds before the switch to plain decoding
    draft_prefill_s: float = 0.0

    @property
    def passes(self) -> int:
        return len(self.accepted)

    @property
    def tokens_per_pass(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)

    def as_dict(self) -> dict:
        n = max(len(self.accepted), 1)
        return {"mode": self.mode, "note": self.note, "passes": self.passes, "tokens_per_pass": self.tokens_per_pass,
                "accepted": self.accepted, "tree_nodes": self.tree_nodes, "draft_forwards": self.draft_forwards,
                "draft_s_per_pass": sum(self.draft_s) / n, "verify_s_per_pass": sum(self.verify_s) / n,
                "plain_steps": self.plain_steps, "plain_s_per_step": self.plain_s / max(self.plain_steps, 1),
                "fell_back_after": self.fell_back_after, "draft_prefill_s": self.draft_prefill_s}

    def merge(self, o: "SpecStats") -> None:
        for k in ("accepted", "tree_nodes", "draft_forwards", "draft_s", "verify_s"):
            getattr(self, k).extend(getattr(o, k))
        self.plain_steps += o.plain_steps
        self.plain_s += o.plain_s
        self.draft_prefill_s += o.draft_prefill_s
        if o.mode != "tree" or o.note:
            self.mode, self.note = o.mode, "; ".join(x for x in (self.note, o.note) if x)
        if o.fell_back_after is not None:
            self.fell_back_after = o.fell_back_after


@dataclass
class SpecResult(GenerationResult):
    """GenerationResult of prompts decoded one after the other, with speculation stats."""
    spec: SpecStats = field(default_factory=SpecStats)

    @property
    def tokens_per_s(self) -> float:  # sequences ran one at a time, not as a batch
        return self.decode_steps / max(self.decode_s, 1e-9)


# -- the tree ------------------------------------------------------------------------------
@dataclass
class Tree:
    """Node 0 is the root (the last committed token). ``path[i]`` lists the nodes from the
    root to i inclusive; a child is always created after its parent (ids grow downwards)."""
    tokens: list[int]
    parent: list[int]
    depth: list[int]
    score: list[float]  # cumulative draft log-probability
    path: list[tuple[int, ...]]

    @classmethod
    def rooted(cls, token: int) -> "Tree":
        return cls([token], [-1], [0], [0.0], [(0,)])

    def add(self, parent: int, token: int, logp: float) -> int:
        i = len(self.tokens)
        self.tokens.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.score.append(self.score[parent] + logp)
        self.path.append(self.path[parent] + (i,))
        return i

    def rank(self, nodes) -> list[int]:
        """Best first by score; ties go to the older node, so a parent always ranks before its
        children and every top-k set is closed under ancestors (a valid tree)."""
        return sorted(nodes, key=lambda i: (-self.score[i], i))


def tree_mask(rows: list[tuple[int, ...]], cols: dict[int, int], prefix: int, width: int, dtype) -> torch.Tensor:
    """Additive attention mask [1, 1, len(rows), width]: every row sees the first ``prefix``
    cache slots and the slots (``cols``: node -> slot) of the nodes on its path."""
    allow = torch.zeros(len(rows), width, dtype=torch.bool)
    allow[:, :prefix] = True
    for r, path in enumerate(rows):
        allow[r, [cols[n] for n in path]] = True
    m = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
    return m.view(1, 1, *allow.shape)


# -- KV caches -----------------------------------------------------------------------------
def ones(width: int) -> torch.Tensor:
    """A 2D all-visible mask: the model builds the causal mask itself (chains need no more)."""
    return torch.ones(1, width, dtype=torch.long)


def cache_len(cache) -> int:
    return cache.get_seq_length()


def gatherable(cache) -> bool:
    """Rows of a cache can be re-indexed when every layer is a plain growing DynamicLayer
    (sliding-window layers drop rows and would need the window in the tree mask too)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def keep_rows(cache, keep: list[int]) -> None:
    """Keep cache rows ``keep`` (sorted) of every layer, in that order: a view when they are
    a prefix (the common chain case), a gather otherwise."""
    n = cache_len(cache)
    if keep == list(range(len(keep))):
        if len(keep) < n:
            cache.crop(-(n - len(keep)))
        return
    idx = torch.tensor(keep)
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            i = idx.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, i)
            layer.values = layer.values.index_select(-2, i)


def tree_mode(model) -> tuple[bool, str]:
    """(chain forced, why) for a model."""
    cfg = model.config
    attn = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if cfg.model_type not in TREE_MASK_ARCHS:
        return True, f"tree attention not verified for {cfg.model_type}: chain drafting"
    if attn not in TREE_MASK_ATTN:
        return True, f"attention {attn} takes no custom 4D mask: chain drafting"
    return False, ""


# -- one round -----------------------------------------------------------------------------
def _fwd(model, cache, ids: list[int], pos: list[int], mask, keep: int = 0) -> torch.Tensor:
    """Logits [S, V] (the last ``keep`` when > 0) of tokens ``ids`` at positions ``pos``."""
    n = cache_len(cache)
    return model(torch.tensor([ids]), attention_mask=mask, position_ids=torch.tensor([pos]), past_key_values=cache,
                 cache_position=torch.arange(n, n + len(ids)), logits_to_keep=keep)[0].float()


def grow_tree(draft, cache, pending: list[int], root_pos: int, shape, *, chain: bool, temperature: float,
              vocab: int) -> tuple[Tree, dict[int, int], int, list[int]]:
    """Feed ``pending`` (committed tokens missing from the draft's cache; the last is the
    root) and grow a tree best-first: each further forward expands the ``beam`` best
    unexpanded nodes that can still make the top ``budget``. Returns the tree, the cache slot
    of every expanded node, the forwards run, and the kept nodes: the top ``budget`` by
    cumulative log-probability, sorted by id (parents first)."""
    budget, depth, beam, branch = shape
    n0 = cache_len(cache)
    tree = Tree.rooted(pending[-1])
    slots = {0: n0 + len(pending) - 1}
    committed = n0 + len(pending) - 1  # cache slots every node sees
    # the pending tokens are a plain causal chain: a 2D mask lets the model build it
    ids, pos, mask = pending, list(range(root_pos - len(pending) + 1, root_pos + 1)), ones(n0 + len(pending))
    expand, alive, forwards = [0], set(), 0
    # a draft temperature equal to the target's concentrates the tree where the target samples
    t = temperature if temperature > 0 else 1.0
    while True:
        logits = _fwd(draft, cache, ids, pos, mask, keep=len(expand))[:, :vocab]
        forwards += 1
        lp = torch.log_softmax(logits / t, dim=-1)
        k = min(branch, vocab)
        vals, toks = lp.topk(k, dim=-1)
        for node, vrow, trow in zip(expand, vals.tolist(), toks.tolist()):
            if tree.depth[node] >= depth:
                continue
            for v, tok in zip(vrow, trow):
                if v > -math.inf:
                    alive.add(tree.add(node, tok, v))
        top = tree.rank(alive | (set(slots) - {0}))[:budget]
        alive &= set(top)  # an unexpanded node outside the top can only have worse descendants
        if forwards >= depth:
            break
        expand = [i for i in top if i not in slots and tree.depth[i] < depth][:beam]
        if not expand:
            break
        n = cache_len(cache)
        for j, i in enumerate(expand):
            slots[i] = n + j
        ids = [tree.tokens[i] for i in expand]
        pos = [root_pos + tree.depth[i] for i in expand]
        width = n + len(expand)
        mask = ones(width) if chain else tree_mask([tree.path[i] for i in expand], slots, committed, width, draft.dtype)
    keep = sorted(tree.rank((alive | set(slots)) - {0})[:budget])
    return tree, slots, forwards, keep


def verify(target, cache, tree: Tree, nodes: list[int], root_pos: int, *, chain: bool) -> torch.Tensor:
    """One target forward over the root and ``nodes`` (sorted: parents first). Logits [N+1, V]."""
    order = [0] + nodes
    n = cache_len(cache)
    cols = {node: n + j for j, node in enumerate(order)}
    width = n + len(order)
    mask = ones(width) if chain else tree_mask([tree.path[i] for i in order], cols, n, width, target.dtype)
    return _fwd(target, cache, [tree.tokens[i] for i in order], [root_pos + tree.depth[i] for i in order], mask)


def walk(tree: Tree, nodes: list[int], pick: Callable[[int], int], *, stop: Callable[[int], bool],
         room: int) -> tuple[list[int], list[int]]:
    """Follow the target down the tree: ``pick(row)`` is the target's token at logits row
    ``row`` (the root is row 0, ``nodes[j]`` row j+1); a token that is a drafted child moves
    there, any other ends the round. Returns the tokens (every one the target's) and the
    path of nodes whose rows are now valid cache (the root and the accepted nodes)."""
    row = {node: j for j, node in enumerate([0] + nodes)}
    children: dict[int, dict[int, int]] = {}
    for i in nodes:
        children.setdefault(tree.parent[i], {})[tree.tokens[i]] = i
    node, path, out = 0, [0], []
    while True:
        tok = pick(row[node])
        out.append(tok)
        child = children.get(node, {}).get(tok)
        if child is None or stop(tok) or len(out) >= room:
            return out, path
        node = child
        path.append(child)


# -- the loop ------------------------------------------------------------------------------
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


def _picker(logits: torch.Tensor, cfg: SamplingConfig, gen, seen, vocab: int) -> Callable[[int], int]:
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
    tcache, dcache = target.new_cache(), draft.new_cache()
    if not (gatherable(tcache) and gatherable(dcache)):
        st.mode, st.note = "plain", "sliding-window KV cache: plain decoding"
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
    root = _picker(prefill(target, ids, mask, tcache, cfg.prefill_chunk).float(), cfg, gen, seen, vocab)(0)
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
            logits = _fwd(target, tcache, [root], [L], ones(L + 1), keep=1)
            root = _picker(logits, cfg, gen, seen, vocab)(0)
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
        tree, slots, forwards, nodes = grow_tree(draft, dcache, pending, L, shape, chain=chain,
                                                 temperature=cfg.temperature, vocab=vocab)
        td = time.perf_counter() - ts
        logits = verify(target, tcache, tree, nodes, L, chain=chain)
        toks, path = walk(tree, nodes, _picker(logits, cfg, gen, seen, vocab), stop=out.eos.__contains__,
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
        # speculation pays while a pass yields more tokens than plain steps in the same time
        if spec.fallback and st.passes >= spec.warmup_rounds and ema_tok * plain_cost < ema_cost:
            st.mode, st.fell_back_after = "plain", st.passes
            st.note = "; ".join(x for x in (st.note, (
                f"fell back to plain decoding after {st.passes} passes: {ema_tok:.2f} tokens/pass < "
                f"{ema_cost / plain_cost:.2f} needed (draft+verify {ema_cost:.4f} s, plain step {plain_cost:.4f} s)")) if x)
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
