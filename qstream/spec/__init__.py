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

from .config import SpecConfig, SpecResult, SpecStats
from .kv import TREE_MASK_ARCHS, keep_rows, tree_mode
from .loop import picker, speculative_generate, speculative_generate_ids
from .tree import Tree, grow_tree, tree_mask, verify, walk

__all__ = ["SpecConfig", "SpecResult", "SpecStats", "TREE_MASK_ARCHS", "Tree", "grow_tree", "keep_rows", "picker",
           "speculative_generate", "speculative_generate_ids", "tree_mask", "tree_mode", "verify", "walk"]
