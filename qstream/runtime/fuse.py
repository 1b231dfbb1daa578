"""One matrix-vector product for sibling linear layers that read the same input.

At batch 1 a decode step is a matrix-vector product per linear layer, and the small ones
(k_proj and v_proj of a grouped-query model: 1024 x 4096) are too short to reach the GPU's
memory bandwidth: a kernel's launch and tail cost as much as its bytes. gpt-fast therefore
stores wq/wk/wv as one ``wqkv``. qstream keeps the Hugging Face modules, so it fuses their
storage instead: a resident layer's bytes are laid out on load with q/k/v (and gate/up) back
to back (store/tensors.py ``regroup``), and the first sibling to run computes the product of
the whole span, the others take their slice of it. No weight is copied or stored twice.

Only formats whose rows can be joined by concatenating their packed tensors take part
(a scheme's ``join_rows``), only for the fused single-row kernel (``gemv``), and only for
resident layers (a streamed layer's bytes arrive in the file's own layout). Everything else
runs as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store.tensors import group_key
from .hooks import Binding
from .qlinear import QLinear

# child names of sibling linears that every supported architecture calls with one input
# tensor (Llama, Mistral, Qwen2, Gemma, Phi-3's MLP, OPT...); a lookup table, not if-chains
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class Group:
    members: list[QLinear]
    keys: dict[str, list[str]]  # scheme suffix -> file keys of the members, in order
    bias: list[str] | None  # file keys of the members' biases
    meta: dict  # the joined weight's metadata


def plan_groups(binding: Binding) -> list[Group]:
    """The sibling groups of one layer file whose storage can be joined."""
    by_name = {q.meta.get("name", ""): (q, keys, bias) for q, keys, bias in binding.qlinears}
    groups = []
    for path in by_name:
        parent, _, child = path.rpartition(".")
        for sib in SIBLINGS:
            if child != sib[0]:
                continue
            names = [f"{parent}.{c}" if parent else c for c in sib]
            if not all(n in by_name for n in names):
                continue
            qs = [by_name[n] for n in names]
            join = getattr(qs[0][0].scheme, "join_rows", None)  # None for members of other schemes too
            if join is None:
                continue
            meta = join([q.meta for q, _, _ in qs])
            biases = [b for _, _, b in qs]
            if meta is None or (any(biases) and not all(biases)):
                continue
            suffixes = qs[0][1].keys()
            if any(k.keys() != suffixes for _, k, _ in qs):
                continue
            groups.append(Group([q for q, _, _ in qs], {s: [k[s] for _, k, _ in qs] for s in suffixes},
                                biases if all(biases) else None, meta))
    return groups


def file_groups(groups: list[Group]) -> list[list[str]]:
    """The key lists ``regroup`` lays out back to back."""
    out = []
    for g in groups:
        out.extend(g.keys.values())
        if g.bias:
            out.append(g.bias)
    return out


def attach(groups: list[Group], tensors: dict[str, torch.Tensor]) -> None:
    """Point each group's members at one FusedGemv over the spanning views in ``tensors``
    (made by ``views`` of a ``regroup`` layout)."""
    for g in groups:
        packed = {s: tensors[group_key(keys)] for s, keys in g.keys.items()}
        if any(q.packed.keys() != g.keys.keys() for q in g.members):
            packed = _join_settled(g, packed, tensors)
        bias = tensors[group_key(g.bias)] if g.bias else None
        f = FusedGemv(g.members, packed, g.meta, bias)
        for i, q in enumerate(g.members):
            q.shared = (f, i)


def _join_settled(g: Group, spans: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Members settled into another form than the stored one (QLinear.settle: q4k's 6-bit grid
    expanded to float16 scale and min): the stored tensors they still use as they are (the codes)
    come from the spans; the others are concatenated once, and each member is re-pointed at its
    slice, so the joined weight holds no second copy."""
    out = {}
    members = g.members
    for s in members[0].packed:
        if s in spans and all(q.packed.get(s) is tensors[k] for q, k in zip(members, g.keys[s])):
            out[s] = spans[s]  # unchanged by settling, already back to back
            continue
        parts = [q.packed[s] for q in members]
        joined = torch.cat(parts)
        out[s] = joined
        start = 0
        for q, p in zip(members, parts):
            q.packed = {**q.packed, s: joined[start:start + p.shape[0]]}
            start += p.shape[0]
    return out


def detach(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, QLinear):
            m.shared = None


class FusedGemv:
    """The product of a group's joined weight with one input row, handed out slice by slice.

    The first member called with an input computes all outputs; each other member called
    with that same tensor object takes its slice. Identity (not equality) decides: the
    architectures in SIBLINGS pass one tensor to every sibling and change none in between
    (inference tensors carry no version counter to check that). A member called with another
    tensor, or twice, recomputes, so the result is always the product with its own input."""

    def __init__(self, members: list[QLinear], packed: dict[str, torch.Tensor], meta: dict, bias: torch.Tensor | None):
        self.scheme = members[0].scheme
        self.packed, self.meta, self.bias = packed, meta, bias
        self.sizes = [q.out_features for q in members]
        self._x: torch.Tensor | None = None
        self._ys: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        if x is self._x and index in self._pending:
            y = self._ys[index]
            self._pending.discard(index)
            if not self._pending:
                self._x, self._ys = None, ()  # hold no activations between steps
            return y
        y = self.scheme.gemv(x, self.packed, self.meta, self.bias)
        if y is None:
            return None  # not a single row on a fused-kernel device: members use their own weights
        self._ys = y.split(self.sizes, dim=-1)
        self._x, self._pending = x, set(range(len(self.sizes))) - {index}
        return self._ys[index]
