"""The sharding pipeline: recipe -> one compressed safetensors file per layer.

Reads the source tensor by tensor and handles one unit (embeddings, one decoder
layer, or the head) at a time, so peak RAM stays near two layers whatever the
model's size. Every file is written atomically; a journal records finished files
with their checksums so that a killed run resumes where it stopped; the manifest
is written last, and only its presence marks the directory complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from . import __version__
from .errors import ShardError
from .manifest import FORMAT, JOURNAL, MANIFEST, VERSION, FileEntry, atomic_write_bytes, atomic_write_json, safe_member, sha256_file
from .quant import DTYPES, QuantSpec, get_scheme, quantize
from .recipe import Recipe
from .source import Source, open_source, split_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardResult:
    output: Path
    source_bytes: int
    dense_bytes: int  # the same weights in 16-bit
    shard_bytes: int
    seconds: float
    files_written: int
    files_resumed: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.shard_bytes, 1)


def is_quantizable(name: str, shape: torch.Size, unit: str) -> bool:
    """Only 2-D linear weights; embeddings, norms and biases keep the compute dtype."""
    return unit != "embed" and name.endswith(".weight") and len(shape) == 2


def plan_specs(recipe: Recipe, names: list[str], units: dict[str, list[str]], shapes: dict[str, torch.Size]) -> dict[str, QuantSpec]:
    """The storage spec of every tensor; warns about override patterns that match nothing."""
    keep = QuantSpec({"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[recipe.compute_dtype])
    specs: dict[str, QuantSpec] = {}
    used: set[str] = set()
    for unit, members in units.items():
        for n in members:
            if is_quantizable(n, shapes[n], unit):
                spec, pattern = recipe.spec_for(n.removesuffix(".weight"))
                if pattern:
                    used.add(pattern)
                specs[n] = spec
            else:
                specs[n] = keep
    for o in recipe.overrides:
        if o.pattern not in used:
            log.warning("override pattern %r matches no quantizable module", o.pattern)
    return specs


def _check_output(out: Path, fingerprint: str, *, force: bool) -> dict:
    """Refuse to write over another model; return the journal of a resumable run."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"output {out} exists and is not a directory")
    if not out.exists():
        return {}
    journal: dict = {}
    owner = None
    if (out / MANIFEST).is_file():
        try:
            owner = json.loads((out / MANIFEST).read_text()).get("fingerprint")
        except json.JSONDecodeError:
            owner = "unreadable"
    elif (out / JOURNAL).is_file():
        try:
            journal = json.loads((out / JOURNAL).read_text())
            owner = journal.get("fingerprint")
        except json.JSONDecodeError:
            journal, owner = {}, None
    elif any(p for p in out.iterdir() if not p.name.startswith(".")):
        if not force:
            raise ShardError(f"output {out} is not empty and holds no qstream shards; choose another output or pass --force")
    if owner is not None and owner != fingerprint:
        if not force:
            raise ShardError(f"output {out} holds shards of another model or recipe; choose another output or pass --force to replace them")
        journal = {}
    if force:
        for p in out.iterdir():
            if p.is_file() and (p.suffix == ".safetensors" or p.name in (MANIFEST, JOURNAL) or p.name.startswith(".")):
                p.unlink()
        return {}
    if owner == fingerprint and (out / MANIFEST).is_file():
        # complete already: rebuild the journal from the manifest so every file is checked and skipped
        m = json.loads((out / MANIFEST).read_text())
        journal = {"fingerprint": fingerprint, "files": {f["name"]: f for f in m["files"]}}
    return journal


def shard(recipe: Recipe, *, output: Path | None = None, force: bool = False, device: str | None = None, progress: bool = True) -> ShardResult:
    """Run the pipeline for ``recipe``. See the module docstring."""
    out = Path(output or recipe.output)
    fingerprint = recipe.fingerprint()
    journal = _check_output(out, fingerprint, force=force)  # before the slow source open: fail fast
    source = open_source(recipe.model)
    prefix, units = split_units(source.names, source.layers_prefix)
    shapes = dict(source.shapes)
    tied = bool(getattr(source.config, "tie_word_embeddings", False)) and not any(n.startswith("lm_head") for n in source.names)
    if tied:
        # the runtime keeps the head on the accelerator and the embeddings on the host: store the head on its own
        embed_name = next(n for n in units["embed"] if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))
        units["head"].append("lm_head.weight")
        shapes["lm_head.weight"] = shapes[embed_name]
    specs = plan_specs(recipe, source.names, units, shapes)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    out.mkdir(parents=True, exist_ok=True)
    done = dict(journal.get("files", {}))
    journal = {"fingerprint": fingerprint, "files": done}
    t0 = time.perf_counter()
    written = resumed = 0
    entries: list[FileEntry] = []
    compute_dtype = DTYPES[recipe.compute_dtype]
    bar = tqdm(total=len(units), desc=f"shard {out.name}", unit="file", disable=not progress)
    moved = 0
    for unit, members in units.items():
        fname = f"{unit}.safetensors"
        path = safe_member(out, fname)
        prev = done.get(fname)
        if prev and path.is_file() and path.stat().st_size == prev["size"] and sha256_file(path) == prev["sha256"]:
            entries.append(FileEntry.from_dict(prev))
            resumed += 1
            bar.update(1)
            continue
        tensors: dict[str, torch.Tensor] = {}
        metas: dict[str, dict] = {}
        for n in members:
            w = source.read(embed_name if (tied and n == "lm_head.weight") else n)
            moved += w.numel() * w.element_size()
            spec = specs[n]
            if get_scheme(spec.scheme).quantized:
                packed, meta = quantize(w.to(dev), spec)
            else:
                packed, meta = quantize(w.to(compute_dtype) if w.is_floating_point() else w, spec)
            stored = {}
            for suffix, t in packed.items():
                key = n if not suffix else f"{n}.{suffix}"
                tensors[key] = t.contiguous().cpu()
                stored[suffix or "data"] = key
            meta["stored"] = stored
            metas[n] = meta
            del w, packed
        data = st_save(tensors, metadata={"qstream": json.dumps(metas, sort_keys=True)})
        del tensors
        atomic_write_bytes(path, data)
        kind, index = ("layer", int(unit.split("_")[1])) if unit.startswith("layer_") else (unit, None)
        entry = FileEntry(fname, kind, index, len(data), hashlib.sha256(data).hexdigest(), metas)
        del data
        entries.append(entry)
        done[fname] = entry.to_dict()
        atomic_write_json(out / JOURNAL, journal)
        written += 1
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{moved / max(elapsed, 1e-9) / 1e6:.0f} MB/s")
        bar.update(1)
    bar.close()

    tok_files = source.save_tokenizer(out)
    for t in tok_files:
        safe_member(out, t)
    config = source.config.to_dict()
    if not config.get("architectures"):
        from transformers import AutoModelForCausalLM

        config["architectures"] = [AutoModelForCausalLM._model_mapping[type(source.config)].__name__]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "qstream_version": __version__,
        "fingerprint": fingerprint,
        "model": {"source": source.description, "architecture": (config.get("architectures") or [None])[0],
                  "model_type": config.get("model_type"), "config": config},
        "recipe": recipe.to_dict(),
        "compute_dtype": recipe.compute_dtype,
        "layers_prefix": prefix,
        "num_layers": sum(1 for e in entries if e.kind == "layer"),
        "tied_head": tied,
        "source_bytes": source.size_bytes,
        "dense_bytes": sum(_dense_bytes(shapes[n]) for n in shapes),
        "files": [e.to_dict() for e in entries],
        "tokenizer_files": tok_files,
    }
    atomic_write_json(out / MANIFEST, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    result = ShardResult(out, source.size_bytes, manifest["dense_bytes"], sum(e.size for e in entries), seconds, written, resumed)
    log.info("sharded %s into %s: %d files written, %d resumed", source.description, out, written, resumed)
    return result


def _dense_bytes(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return 2 * n
