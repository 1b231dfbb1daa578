"""What speculation is asked to do (SpecConfig) and what it did (SpecStats, SpecResult)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import QstreamError
from ..generate import GenerationResult


@dataclass(frozen=True)
class SpecConfig:
    """How the draft grows its tree and when speculation gives way to plain decoding."""
    budget: int = 64  # draft tokens the target verifies per pass (tree nodes, the root not counted)
    max_depth: int = 16  # longest drafted continuation; also the most draft forwards per round
    beam: int = 16  # frontier nodes the draft expands per forward (batched tree growth)
    branch: int = 8  # children considered per expanded node: its top-k tokens
    chain: bool = False  # draft a single path (budget = depth); forced for unverified architectures
    fallback: bool = True  # switch to plain decoding when speculation does not pay
    warmup_rounds: int = 4  # rounds measured before the fallback may decide (unless no pass could ever pay)
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
                "accepted_per_pass": self.tokens_per_pass - 1 if self.accepted else 0.0,  # drafted tokens kept
                "draft_forwards_per_pass": sum(self.draft_forwards) / n, "tree_nodes_per_pass": sum(self.tree_nodes) / n,
                "draft_s_per_forward": sum(self.draft_s) / max(sum(self.draft_forwards), 1),
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
