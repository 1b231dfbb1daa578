"""The draft tree: best-first growth on the draft, one verify pass on the target, and the
walk that picks the target's tokens down the tree (SpecExec's acceptance rule)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .kv import cache_len, ones


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


# -- one round -----------------------------------------------------------------------------
def fwd(model, cache, ids: list[int], pos: list[int], mask, keep: int = 0) -> torch.Tensor:
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
        logits = fwd(draft, cache, ids, pos, mask, keep=len(expand))[:, :vocab]
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
    return fwd(target, cache, [tree.tokens[i] for i in order], [root_pos + tree.depth[i] for i in order], mask)


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
