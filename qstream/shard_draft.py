"""The draft of self-speculative decoding, written into the target's own shard directory.

A recipe with ``draft: {scheme: q3, group_size: 64}`` (or ``qstream shard --draft-scheme q3``)
also writes ``draft_000.safetensors`` ... : every decoder layer once more, its linear weights
in a 2-4 bit scheme, its norms and biases as the target stores them (a few KiB per layer).
Each file is a manifest entry of kind ``draft`` with its checksums, planned in the journal
before it exists, so resume, ``--force`` and ``qstream verify`` treat it like any other file.

Only decoder layers get a copy: embeddings, head and final norm are shared with the target
at run time (runtime/draft.py), and so is every layer the tier plan keeps resident; the
low-bit copy stands in only for layers the target streams. The draft is quantized from the
source weights (not from the target's shards); with the recipe's calibration its fitted schemes
(q2 ... q4, q2k ... q4k) fit each group to the activation-weighted error (imatrix) on the inputs the
target's layers saw, which matters most at 2-3 bits. With ``method: signround`` each copy's rounding is
then tuned on its layer's output during the calibrated pass (shard._calibrated_unit), as the target's is.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dtypes import KEEP_SCHEME
from .quant import QuantSpec, get_scheme
from .recipe import Recipe
from .shard import _for_file, _kept, _read_source, _store_tensor, is_quantizable, write_file
from .store.manifest import FileEntry

DRAFT_KIND = "draft"


def draft_name(index: int) -> str:
    return f"draft_{index:03d}.safetensors"


def layer_units(units: dict[str, list[str]]) -> dict[int, list[str]]:
    """Layer index -> tensor names of that decoder layer (units named layer_NNN by source.split_units)."""
    return {int(u.split("_")[1]): m for u, m in units.items() if u.startswith("layer_")}


def draft_names(units: dict[str, list[str]]) -> list[str]:
    return [draft_name(i) for i in sorted(layer_units(units))]


def draft_spec(recipe: Recipe, name: str, shape: torch.Size) -> QuantSpec:
    """Linear weights in the draft's scheme; everything else as the target keeps it."""
    d = recipe.draft
    if is_quantizable(name, shape, "layer"):
        return QuantSpec(d.scheme, d.block_size if get_scheme(d.scheme).block_sizes else None)
    return QuantSpec(KEEP_SCHEME[recipe.compute_dtype])


def draft_plan(recipe: Recipe, units: dict[str, list[str]], shapes: dict) -> dict[str, dict[str, QuantSpec]]:
    """Draft file name -> its tensors' specs (what a resumed draft file must hold)."""
    return {draft_name(i): {n: draft_spec(recipe, n, shapes[n]) for n in names} for i, names in layer_units(units).items()}


def write_drafts(recipe: Recipe, source, out: Path, units: dict[str, list[str]], read_as: dict[str, str],
                 shapes: dict, journal: dict, dev: torch.device, compute_dtype: torch.dtype,
                 progress: bool, importance: dict[str, torch.Tensor] | None = None,
                 already: dict[int, tuple[FileEntry, bool]] | None = None) -> tuple[list[FileEntry], int, int]:
    """Write (or keep, when intact) one draft file per decoder layer. ``journal`` is the run's
    journal (its ``files`` are the finished ones; the draft names are already ``planned``).
    ``importance``: name -> mean squared input per column (calibration), for the imatrix fit.
    ``already``: layer -> (entry, written) of the draft files this run made during the calibrated pass
    (signround). Returns the entries, files written and files resumed."""
    entries, written, resumed = [], 0, 0
    layers = layer_units(units)
    for i in tqdm(sorted(layers), desc=f"draft {recipe.draft.scheme}", unit="file", disable=not progress):
        if already and i in already:
            entry, new = already[i]
        else:
            kept = _kept(out, draft_name(i), journal["files"])
            entry, new = (kept, False) if kept is not None else \
                (write_draft_file(recipe, source, out, i, layers[i], read_as, shapes, journal, dev, compute_dtype,
                                  importance), True)
        entries.append(entry)
        written, resumed = written + new, resumed + (not new)
    return entries, written, resumed


def write_draft_file(recipe: Recipe, source, out: Path, i: int, names: list[str], read_as: dict[str, str],
                     shapes: dict, journal: dict, dev: torch.device, compute_dtype: torch.dtype,
                     importance: dict[str, torch.Tensor] | None = None,
                     tuned: dict[str, tuple[dict[str, torch.Tensor], dict]] | None = None) -> FileEntry:
    """Layer i's draft file, written and journaled (the caller keeps an intact one: shard._kept). ``tuned``:
    name -> (packed, meta) already fitted and tuned (signround, shard._calibrated_unit), stored as they are."""
    tensors, metas = {}, {}
    for n in names:
        if tuned is not None and n in tuned:
            packed, metas[n] = tuned[n]
            keyed = _for_file(n, packed, metas[n])
        else:
            w = _read_source(source, read_as[n])
            keyed, metas[n] = _store_tensor(n, w, draft_spec(recipe, n, shapes[n]), dev, compute_dtype,
                                            importance=(importance or {}).get(n))
            del w
        tensors.update(keyed)
    return write_file(out, draft_name(i), DRAFT_KIND, i, tensors, metas, journal)
