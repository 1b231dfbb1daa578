"""Result files: what every `--json` result records (command, versions, machine,
shard facts) and how it is written (atomically, JSON-safe)."""
from __future__ import annotations

import importlib.metadata as md
import math
import os
import platform
from pathlib import Path

import torch

from .. import __version__
from ..errors import EvalError
from ..store.files import atomic_write_json
from ..store.inspect import params_of
from ..store.manifest import read_manifest


def machine() -> dict:
    """The machine a figure was measured on."""
    d = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
         "torch": torch.__version__}
    try:
        d["transformers"] = md.version("transformers")
    except md.PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
        d["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return d


def versions() -> dict:
    out = {"qstream": __version__, "torch": torch.__version__}
    for pkg in ("transformers", "bitsandbytes", "datasets", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def shard_facts(manifest) -> dict:
    """Size on disk and bits per weight (all files, and decoder layers only)."""
    files = manifest.files
    layers = [f for f in files if f.kind == "layer"]
    total_b, total_p = sum(f.size for f in files), sum(params_of(f) for f in files)
    layer_b, layer_p = sum(f.size for f in layers), sum(params_of(f) for f in layers)
    return {"shard_bytes": total_b, "params": total_p, "bits_per_weight": 8 * total_b / max(total_p, 1),
            "layer_bytes": layer_b, "layer_params": layer_p, "bits_per_weight_layers": 8 * layer_b / max(layer_p, 1),
            "head": head_storage(manifest)}


def head_storage(manifest) -> str | None:
    """How the output head is stored: 'q8 g64', 'bf16', ... and ', tied: stored once' when the
    embedding is looked up from it (None when the shards store no head matrix)."""
    head = next((f for f in manifest.files if f.kind == "head"), None)
    name = (manifest.embedding or {}).get("tensor", "lm_head.weight")
    meta = head.tensors.get(name) if head is not None else None
    if meta is None:
        return None
    block = f" g{meta['block_size']}" if meta.get("block_size") else ""
    return f"{meta['scheme']}{block}" + (", tied: stored once" if manifest.embedding is not None else "")


def variant_name(recipe: dict) -> str:
    """bf16, int8, nf4, fp4, ... from the recipe's scheme; 'mixed' when overrides other than
    the output head choose another scheme for some layers."""
    scheme = recipe.get("scheme", "?")
    for o in recipe.get("overrides") or []:
        if "lm_head" not in o.get("pattern", "") and o.get("scheme") != scheme:
            return "mixed"
    return scheme


def result_header(kind: str, path: str | Path, *, command: str, variant: str | None = None,
                  extra: dict | None = None) -> dict:
    m = read_manifest(path)
    recipe = m.recipe
    return {"kind": kind, "variant": variant or variant_name(recipe), "command": command,
            "versions": versions(), "machine": machine(), "shards": str(path), "model": m.source,
            "recipe": recipe, **shard_facts(m), **(extra or {})}


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return None if isinstance(x, float) and not math.isfinite(x) else x
    if hasattr(x, "item"):
        try:
            return jsonable(x.item())
        except (ValueError, RuntimeError):
            pass
    return str(x)


def write_result(path: str | Path, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, jsonable(obj))


def check_json_target(path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise EvalError(f"--json {p} is a directory; give a file name, e.g. {p / 'result.json'}")
    if p.parent != Path("") and p.parent.exists() and not p.parent.is_dir():
        raise EvalError(f"--json {p}: {p.parent} is not a directory")
