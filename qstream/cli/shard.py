"""`qstream shard`, `qstream inspect`, `qstream verify`."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..errors import QstreamError
from ..recipe import DRAFT_SCHEMES, load_recipe, parse_draft
from ..resolve import DEFAULT_SCHEME, recipe_for
from ..shard import shard
from ..store.inspect import human, inspect_table, verify
from ..store.manifest import read_manifest
from .common import COMMON, progress


def _recipe(a: argparse.Namespace):
    """The recipe file, or one made from --model/--scheme/--block-size/--output."""
    if (a.recipe is None) == (a.model is None):
        raise QstreamError("give a recipe file, or --model SOURCE (with --scheme and --output), not both")
    if a.recipe is not None:
        if a.scheme is not None or a.block_size is not None:
            raise QstreamError("--scheme and --block-size go with --model; a recipe file sets its own")
        return load_recipe(a.recipe)
    return recipe_for(a.model, scheme=a.scheme or DEFAULT_SCHEME, block_size=a.block_size, output=a.output)


def _with_draft(recipe, a: argparse.Namespace):
    """--draft-scheme adds (or replaces) the recipe's in-directory speculative draft."""
    if a.draft_scheme is None:
        if a.draft_block_size is not None:
            raise QstreamError("--draft-block-size goes with --draft-scheme")
        return recipe
    d = {"scheme": a.draft_scheme} | ({} if a.draft_block_size is None else {"block_size": a.draft_block_size})
    return replace(recipe, draft=parse_draft("--draft-scheme", d))


def _cmd_shard(a: argparse.Namespace) -> int:
    recipe = _with_draft(_recipe(a), a)
    r = shard(recipe, output=a.output, force=a.force, device=a.device, progress=progress(a))
    rows = [
        ("source", recipe.model, human(r.source_bytes)),
        ("16-bit equivalent", "", human(r.dense_bytes)),
        ("shards", str(r.output), human(r.shard_bytes)),
        ("ratio vs 16-bit", "", f"{r.ratio:.2f}x"),
        ("time", f"{r.files_written} written, {r.files_resumed} resumed", f"{r.seconds:.1f} s"),
    ]
    w0, w1 = max(len(x[0]) for x in rows), max(len(x[1]) for x in rows)
    for k, v, n in rows:
        print(f"{k:<{w0}}  {v:<{w1}}  {n:>10}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    m = read_manifest(a.dir)
    print(inspect_table(m))
    if a.gpu_memory is not None:
        if m.draft_files() is None:
            raise QstreamError("--gpu-memory shows the plan with the directory's speculative draft, and it has none")
        from ..runtime.draft import plan_for  # the runtime only when asked: inspect stays a manifest reader

        print(f"plan with the draft (batch 1, default KV room): {plan_for(a.dir, a.gpu_memory).describe()}")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    rep = verify(a.dir, progress=progress(a))
    for name in rep.missing:
        print(f"MISSING  {name}")
    for name in rep.corrupt:
        print(f"CORRUPT  {name}")
    for problem in rep.invalid:
        print(f"INVALID  {problem}")
    if rep.passed:
        print(f"OK: {len(rep.ok)} files match their checksums; the manifest is complete and matches every header")
        return 0
    print(f"FAILED: {len(rep.missing)} missing, {len(rep.corrupt)} corrupt, {len(rep.invalid)} inconsistent; "
          "re-run `qstream shard` on the recipe to rewrite the directory", file=sys.stderr)
    return 1


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("shard", parents=[COMMON], help="compress a model into per-layer shards as a recipe says",
                       description="Read the model a recipe names, quantize each layer as the recipe says, and write one "
                       "safetensors file per layer plus a checksummed manifest. Rerunning after an interruption resumes.",
                       epilog="examples:\n  qstream shard recipes/smollm2-135m-nf4.yaml\n"
                       "  qstream shard --model smollm2-135m --scheme int8 --output shards/smollm2-int8",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/ and the README's recipe reference)")
    s.add_argument("--model", metavar="SOURCE", help="instead of a recipe: a .gguf, Hugging Face directory, hub id or alias")
    s.add_argument("--scheme", help=f"with --model: the scheme of every linear weight (default {DEFAULT_SCHEME})")
    s.add_argument("--block-size", type=int, help="with --model: block (group) size of the scheme")
    s.add_argument("--output", type=Path, help="write here instead of the recipe's `output` (with --model: default "
                   "the shard cache, $QSTREAM_CACHE or ~/.cache/qstream)")
    s.add_argument("--force", action="store_true", help="replace shards of another model or recipe in the output directory "
                   "(removes only the files its manifest or journal lists; anything else stops the run)")
    s.add_argument("--device", choices=["cpu", "cuda"], help="where to quantize (default: cuda when available)")
    s.add_argument("--draft-scheme", choices=DRAFT_SCHEMES, help="also write a low-bit copy of the decoder layers into "
                   "the directory: the draft of `--speculate` (same as the recipe field `draft: {scheme: ...}`)")
    s.add_argument("--draft-block-size", type=int, help="group size of --draft-scheme (default 64)")
    s.set_defaults(func=_cmd_shard)

    s = sub.add_parser("inspect", parents=[COMMON], help="per-layer table of schemes, bytes and bits per weight")
    s.add_argument("dir", help="shard directory")
    s.add_argument("--gpu-memory", metavar="SIZE", help="also print the tier plan of the target and its in-directory "
                   "draft under this budget: what the draft costs and how many resident layers it displaces")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("verify", parents=[COMMON], help="recompute checksums; exit 1 naming every missing or corrupt file")
    s.add_argument("dir", help="shard directory")
    s.set_defaults(func=_cmd_verify)
