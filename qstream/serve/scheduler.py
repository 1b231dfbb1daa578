"""Continuous batching: one thread owns the model; sequences join the running batch at step
boundaries and leave when done, so every decode pass over the weights serves every active
sequence. For a streamed model a pass costs nearly the same for 1 or 8 sequences, so the
batch multiplies throughput.

Joining sequences are prefilled between two decode steps of the running batch, so running
streams stall for one prefill pass at most: all joiners whose prompts fit one chunk share one
left-padded pass (a burst of requests costs one pass over the weights), a longer prompt is
prefilled alone, one chunk per step. Prefill follows ``generate_ids``'s conventions (position
ids from the mask), and the new rows are merged into the batch by left padding (see
``batch.py``). A single request therefore computes what ``generate()`` computes, and under
concurrency only the padding of the batch differs.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import QstreamError
from ..generate import SamplingConfig, sample
from . import batch as kv

log = logging.getLogger(__name__)


class QueueFull(QstreamError):
    """More requests than --max-batch running plus --max-queue waiting."""


@dataclass(frozen=True)
class Event:
    """What the scheduler tells a request's handler: new text, the end, or a failure."""
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" when kind == "done"
    completion_tokens: int = 0


@dataclass
class Sequence:
    prompt_ids: list[int]
    cfg: SamplingConfig  # max_new_tokens, temperature, top_p, stop, seed
    sink: Callable[[Event], None]  # called from the scheduler thread; must not block
    cancelled: bool = False  # set by the handler when its client goes away
    finished: bool = False  # its final event was sent (or it was cancelled): set once, by _finish
    out: list[int] = field(default_factory=list)
    shown: str = ""  # text sent so far
    gen: torch.Generator | None = None
    next_tok: int = -1  # sampled, not yet fed to the model
    prefilled: int = 0  # prompt tokens already in the sequence's own cache
    cache: object = None  # the sequence's own cache while it is prefilled alone
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None


@dataclass
class Stats:
    """Counters the tests and the benchmark read (GET /stats)."""
    passes: int = 0  # forward passes over the weights
    prefill_passes: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    max_batch_seen: int = 0
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0

    def as_dict(self, **extra) -> dict:
        d = dict(self.__dict__)
        d["mean_batch"] = self.decode_rows / self.decode_steps if self.decode_steps else 0.0
        d.update(extra)
        return d


class Scheduler:
    """Owns ``model`` on one thread. ``submit`` is thread-safe and returns at once; the
    sequence's ``sink`` then receives text events and exactly one final event."""

    def __init__(self, model, tokenizer, *, eos: set[int], max_batch: int, max_queue: int, prefill_chunk: int = 256,
                 tokenizer_lock: threading.Lock | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise QstreamError("need --max-batch >= 1, --max-queue >= 0 and a prefill chunk >= 1")
        kv.check_cache(model.new_cache())
        self.model, self.tok, self.eos = model, tokenizer, frozenset(eos)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.tok_lock = tokenizer_lock or threading.Lock()
        self.stats = Stats()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._in_system = 0  # submitted and not yet finished: waiting + prefilling + running
        self._prefilling: list[Sequence] = []
        self._rows: list[Sequence] = []  # the running batch, in cache row order
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, L] of the running batch
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qstream-scheduler", daemon=True)
        self._thread.start()

    # -- called from any thread ----------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._stop:
                raise QstreamError("the server is shutting down")
            if self._in_system >= self.max_batch + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{self._in_system} requests running or queued (--max-batch {self.max_batch}, "
                                f"--max-queue {self.max_queue}); retry later")
            self._in_system += 1
            self.stats.submitted += 1
            self._waiting.append(seq)
            self._cv.notify()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the sequence leaves at the next step boundary."""
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def snapshot(self) -> dict:
        with self._cv:
            return self.stats.as_dict(running=len(self._rows), prefilling=len(self._prefilling), waiting=len(self._waiting),
                                      in_system=self._in_system, cache_len=0 if self._mask is None else self._mask.shape[1],
                                      alive=self.alive)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the scheduler thread ------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not (self._waiting or self._prefilling or self._rows):
                        self._cv.wait()
                    if self._stop:
                        break
                    while self._waiting and len(self._rows) + len(self._prefilling) < self.max_batch:
                        self._prefilling.append(self._waiting.popleft())
                    for s in [s for s in self._waiting if s.cancelled]:  # never started: nothing to free but the slot
                        self._waiting.remove(s)
                        self._finish(s, None)
                try:
                    self._step()
                except (RuntimeError, ValueError, IndexError, QstreamError) as e:
                    # a failed pass leaves the batch's cache in an unknown state: fail what it served, keep serving
                    log.exception("scheduler step failed")
                    for s in self._rows + self._prefilling:
                        self._finish(s, Event("error", text=f"internal error: {e}"))
                    self._rows, self._prefilling, self._cache, self._mask = [], [], None, None
        finally:
            with self._cv:
                left = list(self._waiting) + self._prefilling + self._rows
                self._waiting.clear()
                self._rows, self._prefilling = [], []
            for s in left:
                self._finish(s, Event("error", text="the server is shutting down"))

    @torch.inference_mode()
    def _step(self) -> None:
        self._drop([i for i, s in enumerate(self._rows) if s.cancelled])
        for s in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(s)
            self._finish(s, None)
        if self._prefilling:
            head = self._prefilling[0]
            if head.prefilled or len(head.prompt_ids) > self.prefill_chunk:
                self._prefill_chunk(head)
            else:  # every joiner whose prompt fits one chunk: one shared, left-padded pass
                self._prefill_group([s for s in self._prefilling if not s.prefilled
                                     and len(s.prompt_ids) <= self.prefill_chunk])
        if self._rows:
            self._decode()

    def _start(self, s: Sequence) -> None:
        s.gen = torch.Generator().manual_seed(s.cfg.seed) if s.cfg.seed is not None else None

    def _prefill_chunk(self, s: Sequence) -> None:
        """One chunk of a long prompt, alone, with the conventions of ``generate_ids``."""
        if s.cache is None:
            s.cache = self.model.new_cache()
            self._start(s)
        ids = torch.tensor([s.prompt_ids])
        a, e, T = s.prefilled, min(s.prefilled + self.prefill_chunk, len(s.prompt_ids)), len(s.prompt_ids)
        logits = self.model(ids[:, a:e], attention_mask=torch.ones(1, e, dtype=torch.long),
                            position_ids=torch.arange(a, e).view(1, -1), past_key_values=s.cache,
                            cache_position=torch.arange(a, e), logits_to_keep=1)
        self.stats.passes += 1
        self.stats.prefill_passes += 1
        s.prefilled = e
        if e < T:
            return
        cache, s.cache = s.cache, None  # the batch holds its tensors from now on
        self._join([s], cache, torch.ones(1, T, dtype=torch.long), logits[:, -1])

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Prompts of at most one chunk, left-padded into one pass (like ``generate()``'s batch
        prefill): for a streamed model a burst of joiners then costs one pass over the weights."""
        T = max(len(s.prompt_ids) for s in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros(len(group), T, dtype=torch.long)
        for i, s in enumerate(group):
            self._start(s)
            n = len(s.prompt_ids)
            ids[i, T - n:] = torch.tensor(s.prompt_ids)
            mask[i, T - n:] = 1
        cache = self.model.new_cache()
        logits = self.model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            past_key_values=cache, cache_position=torch.arange(T), logits_to_keep=1)
        self.stats.passes += 1
        self.stats.prefill_passes += 1
        for s in group:
            s.prefilled = len(s.prompt_ids)
        self._join(group, cache, mask, logits[:, -1])

    def _join(self, group: list[Sequence], cache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Sample each joiner's first token and merge the rows still running into the batch."""
        for s in group:
            self._prefilling.remove(s)
        keep = [i for i, s in enumerate(group) if self._accept(s, int(sample(logits[i:i + 1], s.cfg, s.gen).cpu()[0]))]
        if not keep:
            return
        cache, mask = kv.select(cache, mask, keep)
        with self._cv:
            self._cache, self._mask = kv.merge(self._cache, self._mask, cache, mask)
            self._rows += [group[i] for i in keep]

    def _decode(self) -> None:
        B = len(self._rows)
        toks = torch.tensor([[s.next_tok] for s in self._rows])
        pos = self._mask.sum(1, keepdim=True)  # tokens each row holds = position of its next token
        mask = torch.cat([self._mask, torch.ones(B, 1, dtype=self._mask.dtype)], 1)
        logits = self.model(toks, attention_mask=mask, position_ids=pos, past_key_values=self._cache,
                            cache_position=torch.tensor([mask.shape[1] - 1]), logits_to_keep=1)[:, -1]
        self._mask = mask
        st = self.stats
        st.passes += 1
        st.decode_steps += 1
        st.decode_rows += B
        st.max_batch_seen = max(st.max_batch_seen, B)
        greedy = logits.float().argmax(-1).cpu()  # one transfer for every greedy row
        done = []
        for i, s in enumerate(self._rows):
            tok = int(greedy[i]) if s.cfg.temperature == 0 else int(sample(logits[i:i + 1], s.cfg, s.gen).cpu()[0])
            if not self._accept(s, tok):
                done.append(i)
        with self._cv:
            self._drop(done)

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        for i in rows:
            if self._rows[i].cancelled:
                self._finish(self._rows[i], None)
        keep = [i for i in range(len(self._rows)) if i not in set(rows)]
        self._cache, self._mask = kv.select(self._cache, self._mask, keep)
        self._rows = [self._rows[i] for i in keep]

    # -- tokens -> text ------------------------------------------------------------
    def _accept(self, s: Sequence, tok: int) -> bool:
        """Take the sampled token; send the text that is final; False when ``s`` is done
        (it then has received its final event)."""
        if s.cancelled:
            self._finish(s, None)
            return False
        if s.t_first is None:
            s.t_first = time.perf_counter()
        finish = None
        if tok in self.eos:
            finish = "stop"
        else:
            s.out.append(tok)
            s.next_tok = tok
        with self.tok_lock:
            text = self.tok.decode(s.out, skip_special_tokens=True)
        hit = min((text.index(x) for x in s.cfg.stop if x in text), default=None)
        if hit is not None:
            text, finish = text[:hit], "stop"
        elif finish is None and len(s.out) >= s.cfg.max_new_tokens:
            finish = "length"
        if finish is None:
            # hold back what could still become a stop string, and a partly decoded character
            hold = max((len(x) - 1 for x in s.cfg.stop), default=0)
            upto = len(text) - hold
            while upto > 0 and text[upto - 1] == "\ufffd":
                upto -= 1
            self._send(s, text[:max(upto, 0)])
            return True
        self._send(s, text)
        self._finish(s, Event("done", finish_reason=finish, completion_tokens=len(s.out)))
        return False

    def _send(self, s: Sequence, text: str) -> None:
        # decoding the whole output again can change earlier characters (merged bytes); send
        # only what extends what was sent
        if len(text) > len(s.shown) and text.startswith(s.shown):
            delta, s.shown = text[len(s.shown):], text
            s.sink(Event("text", text=delta))

    def _finish(self, s: Sequence, ev: Event | None) -> None:
        """The one exit of every sequence: frees its slot, counts it, tells its handler
        (``ev`` None: it was cancelled, nobody is listening)."""
        with self._cv:
            if s.finished:
                return
            s.finished = True
            self._in_system -= 1
            if ev is None:
                self.stats.cancelled += 1
            elif ev.kind == "error":
                self.stats.failed += 1
            else:
                self.stats.completed += 1
        if ev is not None:
            s.sink(ev)
