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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .dtypes import DTYPES, KEEP_SCHEME
from .errors import ShardError
from .quant import QuantSpec, get_scheme, quantize
from .recipe import Recipe
from .source import open_source, split_units
from .store.files import atomic_write_bytes, safe_member, sha256_file
from .store.manifest import JOURNAL, MANIFEST, FileEntry, manifest_files, read_owner, write_journal, write_manifest
from .store.tensors import pack_stored, save_bytes

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
    keep = QuantSpec(KEEP_SCHEME[recipe.compute_dtype])
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
    owner, journal = read_owner(out)
    if owner is None and any(p for p in out.iterdir() if not p.name.startswith(".")):
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
        journal = {"fingerprint": fingerprint, "files": manifest_files(out)}
    return journal


def shard(recipe: Recipe, *, output: Path | None = None, force: bool = False, device: str | None = None, progress: bool = True) -> ShardResult:
    """Run the pipeline for ``recipe``. See the module docstring."""
    out = Path(output or recipe.output)
    fingerprint = recipe.fingerprint()
    journal = _check_output(out, fingerprint, force=force)  # before the slow source open: fail fast
    source = open_source(recipe.model)
    prefix, units = split_units(source.names, source.layers_prefix)
    shapes = dict(source.shapes)
    read_as = {n: n for n in source.names}  # stored name -> source tensor it is made from
    tied = bool(getattr(source.config, "tie_word_embeddings", False)) and not any(n.startswith("lm_head") for n in source.names)
    if tied:
        # the runtime keeps the head on the accelerator and the embeddings on the host: store the head on its own
        embed_name = next(n for n in units["embed"] if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))
        units["head"].append("lm_head.weight")
        shapes["lm_head.weight"] = shapes[embed_name]
        read_as["lm_head.weight"] = embed_name
    specs = plan_specs(recipe, source.names, units, shapes)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = DTYPES[recipe.compute_dtype]

    out.mkdir(parents=True, exist_ok=True)
    done = dict(journal.get("files", {}))
    journal = {"fingerprint": fingerprint, "files": done}
    t0 = time.perf_counter()
    written = resumed = moved = 0
    entries: list[FileEntry] = []
    bar = tqdm(total=len(units), desc=f"shard {out.name}", unit="file", disable=not progress)
    for unit, members in units.items():
        fname = f"{unit}.safetensors"
        path = safe_member(out, fname)
        if _intact(path, done.get(fname)):
            entries.append(FileEntry.from_dict(done[fname]))
            resumed += 1
            bar.update(1)
            continue
        tensors, metas = {}, {}
        for n in members:
            w = source.read(read_as[n])
            moved += w.numel() * w.element_size()
            keyed, metas[n] = _store_tensor(n, w, specs[n], dev, compute_dtype)
            tensors.update(keyed)
            del w
        data = save_bytes(tensors, {"qstream": json.dumps(metas, sort_keys=True)})
        del tensors
        atomic_write_bytes(path, data)
        kind, index = ("layer", int(unit.split("_")[1])) if unit.startswith("layer_") else (unit, None)
        entry = FileEntry(fname, kind, index, len(data), hashlib.sha256(data).hexdigest(), metas)
        del data
        entries.append(entry)
        done[fname] = entry.to_dict()
        write_journal(out, journal)
        written += 1
        bar.set_postfix_str(f"{moved / max(time.perf_counter() - t0, 1e-9) / 1e6:.0f} MB/s")
        bar.update(1)
    bar.close()

    tok_files = source.save_tokenizer(out)
    dense = sum(2 * math.prod(shapes[n]) for n in shapes)  # the same weights in 16 bits
    write_manifest(out, version=__version__, fingerprint=fingerprint, source=source.description,
                   config=_config_dict(source.config), recipe=recipe.to_dict(), compute_dtype=recipe.compute_dtype,
                   layers_prefix=prefix, tied_head=tied, source_bytes=source.size_bytes, dense_bytes=dense, files=entries,
                   tokenizer_files=tok_files)
    seconds = time.perf_counter() - t0
    log.info("sharded %s into %s: %d files written, %d resumed", source.description, out, written, resumed)
    return ShardResult(out, source.size_bytes, dense, sum(e.size for e in entries), seconds, written, resumed)


def _intact(path: Path, entry: dict | None) -> bool:
    """A file an earlier run finished (journal or manifest entry) and that still matches it."""
    return bool(entry) and path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]


def _store_tensor(name: str, w: torch.Tensor, spec: QuantSpec, dev: torch.device,
                  compute_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """One source tensor -> the tensors to store under their file keys, and its metadata.
    Quantized schemes run on ``dev`` (fast on CUDA); pass-through keeps floats in the compute dtype."""
    if get_scheme(spec.scheme).quantized:
        packed, meta = quantize(w.to(dev), spec)
    else:
        packed, meta = quantize(w.to(compute_dtype) if w.is_floating_point() else w, spec)
    keyed, meta["stored"] = pack_stored(name, {k: t.contiguous().cpu() for k, t in packed.items()})
    return keyed, meta


def _config_dict(config) -> dict:
    """The source's transformers config as JSON, with its architecture named (GGUF configs lack it)."""
    d = config.to_dict()
    if not d.get("architectures"):
        from transformers import AutoModelForCausalLM

        d["architectures"] = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return d
