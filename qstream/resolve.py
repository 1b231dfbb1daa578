"""Run without a recipe: turn whatever a user points a command at into a shard
directory.

    shard directory (holds manifest.json)  -> used as it is
    recipe (.yaml / .yml)                  -> sharded as it says (a complete output is reused)
    model source (.gguf, HF dir, hub id, alias such as smollm2-135m)
                                           -> sharded with ``scheme`` into the shard cache on first
                                              use, reused afterwards

The cache is ``$QSTREAM_CACHE`` or ``~/.cache/qstream``; each entry is named after the
source and the recipe's fingerprint, so a different scheme never reuses the wrong shards.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

from .errors import QstreamError
from .recipe import Recipe, load_recipe, parse_recipe
from .shard import shard
from .source import ALIASES
from .store.manifest import MANIFEST, read_owner

log = logging.getLogger(__name__)

DEFAULT_SCHEME = "nf4"
RECIPE_SUFFIXES = (".yaml", ".yml")


def cache_root() -> Path:
    return Path(os.environ.get("QSTREAM_CACHE") or Path.home() / ".cache" / "qstream").expanduser()


def recipe_for(model: str, *, scheme: str = DEFAULT_SCHEME, block_size: int | None = None, output: str | Path | None = None,
               compute_dtype: str | None = None) -> Recipe:
    """A recipe made from command-line options instead of a YAML file."""
    fields: dict = {"model": str(model), "scheme": scheme, "output": str(output or "_")}
    if block_size is not None:
        fields["block_size"] = block_size
    if compute_dtype is not None:
        fields["compute_dtype"] = compute_dtype
    recipe = parse_recipe(fields, source="command line")
    if output is None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model)).name or str(model)).strip("-.") or "model"
        recipe = parse_recipe({**fields, "output": str(cache_root() / "shards" / f"{slug}-{scheme}-{recipe.fingerprint()[:8]}")},
                              source="command line")
    return recipe


def is_shard_dir(p: Path) -> bool:
    return p.is_dir() and (p / MANIFEST).is_file()


def resolve_source(source: str | Path, *, scheme: str = DEFAULT_SCHEME, block_size: int | None = None,
                   progress: bool = True, say: Callable[[str], None] | None = None) -> Path:
    """The shard directory for ``source`` (see the module docstring), sharding it first when needed.
    ``say`` receives one line when shards are made (the CLI prints it to stderr)."""
    p = Path(str(source)).expanduser()
    if is_shard_dir(p):
        return p
    text = str(source)
    hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not p.exists() and not hub_id and text not in ALIASES:
        raise QstreamError(f"shard directory not found: {p} (nor a recipe, model file, model directory, hub id or alias "
                           f"of that name; aliases: {', '.join(ALIASES)})")
    if p.suffix.lower() in RECIPE_SUFFIXES:
        recipe = load_recipe(p)
    elif p.is_dir() and not (p / "config.json").is_file() and not list(p.glob("*.gguf")):
        raise QstreamError(f"{p} is neither a shard directory (no {MANIFEST}) nor a model directory (no config.json or "
                           ".gguf); shard a model with `qstream shard`, or point at a .gguf, a model directory or a hub id")
    else:
        recipe = recipe_for(str(source), scheme=scheme, block_size=block_size)
    out = Path(recipe.output)
    owner, _ = read_owner(out) if out.is_dir() else (None, {})
    if is_shard_dir(out) and owner == recipe.fingerprint():
        return out  # made before from the same model and recipe: reuse (load checks integrity)
    if say is not None:
        say(f"sharding {recipe.model} ({recipe.scheme}) into {out}; later runs reuse it")
    shard(recipe, progress=progress)
    return out
