"""The sharding pipeline: recipe -> one compressed safetensors file per layer.
(Over 400 lines: the output-directory safety rules (ownership, lock, --force, resume) live next to
the loop they protect.)

Reads the source tensor by tensor and handles one unit (embeddings, one decoder
layer, or the head) at a time, so peak RAM stays near two layers whatever the
model's size. Every file is written atomically; a journal records finished files
with their checksums so that a killed run resumes where it stopped; the manifest
is written last, and only its presence marks the directory complete.

Ownership: an fcntl lock (``.qstream.lock``) keeps one run per output directory;
the journal names every file a run may create before the first exists; ``--force``
removes only files a manifest or journal lists (and qstream's own temp files) and
stops, naming it, at anything else. Outputs overlapping the source are refused.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import __version__
from .dtypes import DTYPES, KEEP_SCHEME
from .errors import ShardError, SourceError
from .quant import QuantSpec, dequantize, get_scheme, quantize
from .quant.affine import Affine
from .quant.calibrate import Calibrator, calibration_ids, loss_sensitivity
from .quant.gptq import gptq_quantize
from .quant.mixed import allocate, options_for
from .quant.signround import Rounding, RoundConfig, tune_layer, tunable
from .recipe import Recipe
from .source import ALIASES, open_source, smollm2_gguf, split_units
from .store.files import atomic_write_bytes, fsync_dir, safe_member, sha256_file
from .store.integrity import fast_digest
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


LOCK = ".qstream.lock"  # held (fcntl) for the whole run: one writer per output directory
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # atomic_write_bytes' and the tokenizer's temp names


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _source_path(model: str) -> Path | None:
    """The local file or directory a recipe's model names (None for a hub id)."""
    if model in ALIASES:
        try:
            return smollm2_gguf()
        except SourceError:
            return None  # open_source reports it
    p = Path(model).expanduser()
    return p if p.exists() else None


def _check_not_source(out: Path, model: str) -> None:
    """An output inside, equal to or containing the source would mix shards with the weights they come from."""
    src = _source_path(model)
    if src is None:
        return
    o, s = out.resolve(), src.resolve()
    if o == s or s in o.parents or o in s.parents or (s.is_file() and o == s.parent):
        raise ShardError(f"output {out} overlaps the source model {src}; choose an output directory outside it")


def _owned_names(out: Path) -> tuple[str | None, dict, set[str]]:
    """(owner fingerprint, journal of an unfinished run, the names qstream's manifest or journal lists as
    its output). Only these (plus qstream's own temp and lock files) may ever be removed."""
    owner, journal = read_owner(out)
    names: set[str] = set()
    if owner is None or owner == "unreadable":
        return owner, journal, names
    for meta in (MANIFEST, JOURNAL):
        p = out / meta
        if p.is_file():
            names.add(meta)
            try:
                d = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            files = d.get("files", {})
            names.update(f.get("name") for f in files if isinstance(f, dict)) if isinstance(files, list) else names.update(files)
            names.update(n for n in d.get("tokenizer_files", []) + d.get("planned", []) if isinstance(n, str))
    return owner, journal, {n for n in names if isinstance(n, str) and "/" not in n and n not in (".", "..")}


def _ours(name: str, owned: set[str]) -> bool:
    return name in owned or name == LOCK or bool(_TMP_RE.match(name))


def _check_output(out: Path, fingerprint: str, *, force: bool) -> tuple[dict, list[Path]]:
    """Refuse to write over anything that is not qstream's output of this recipe. Returns the journal of a
    resumable run and the files --force will remove (none is removed here: callers hold the lock first)."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"output {out} exists and is not a directory")
    if not out.exists():
        return {}, []
    owner, journal, owned = _owned_names(out)
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name, owned))
    if owner is None:
        if foreign:
            raise ShardError(f"output {out} is not empty and holds no qstream shards (it holds {foreign[0]!r}); "
                             "choose a new or empty output directory")
        return {}, []
    if owner != fingerprint:
        if not force:
            what = "an unreadable manifest or journal" if owner == "unreadable" else "shards of another model or recipe"
            raise ShardError(f"output {out} holds {what}; choose another output, or pass --force to remove the files "
                             "its manifest lists and write new ones")
        if owner == "unreadable":
            raise ShardError(f"output {out}: its manifest or journal is unreadable, so qstream cannot tell which files "
                             "are its own; remove the directory yourself or choose another output")
        if foreign:
            raise ShardError(f"output {out}: --force removes only qstream's own files, and {foreign[0]!r} is not one; "
                             "move it away or choose another output")
        dirs = sorted(n for n in owned if (out / n).is_dir() and not (out / n).is_symlink())
        if dirs:
            raise ShardError(f"output {out}: its manifest lists {dirs[0]!r}, a directory; qstream writes only files: "
                             "remove the directory yourself or choose another output")
        return {}, sorted(p for p in out.iterdir() if p.name != LOCK and _ours(p.name, owned))
    if (out / MANIFEST).is_file():
        # complete already: rebuild the journal from the manifest so every file is checked and skipped
        journal = {"fingerprint": fingerprint, "files": manifest_files(out)}
    return journal, []


class _OutputLock:
    """An advisory fcntl lock on ``DIR/.qstream.lock`` for the whole run; the file holds the holder's PID.
    Removed on release while still locked; a waiter that locked the unlinked inode notices and retries."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ShardError(f"output {self.path.parent} is being written by another `qstream shard` (PID {holder}); "
                                 "wait for it to finish or choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _clean_stale_temps(out: Path) -> None:
    """Temp files (``.NAME.tmp-PID``) of runs that died: their PID is gone. Only called under the lock."""
    for p in out.iterdir():
        m = _TMP_RE.match(p.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _save_tokenizer(source, out: Path, journal: dict, reserved: set[str]) -> tuple[list[str], dict[str, dict]]:
    """Save the tokenizer into a temp directory, list what it wrote, record the names in the journal,
    then rename each file into place: a crash leaves old files or new ones, never half a file."""
    tmp = out / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        source.save_tokenizer(tmp)
        names = sorted(p.name for p in tmp.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.name not in reserved and p.suffix != ".safetensors")
        sums = {}
        for n in names:
            with open(tmp / n, "rb") as f:
                data = f.read()
                os.fsync(f.fileno())
            sums[n] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        journal["planned"] = sorted(set(journal.get("planned", [])) | set(names))
        write_journal(out, journal)
        for n in names:
            os.replace(tmp / n, out / n)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names, sums


def shard(recipe: Recipe, *, output: str | Path | None = None, force: bool = False, device: str | None = None, progress: bool = True) -> ShardResult:
    """Run the pipeline for ``recipe``. See the module docstring."""
    target = output if output is not None else recipe.output
    if not str(target).strip():
        raise ShardError("the output directory is empty; name a directory for the shards")
    out = Path(target)
    fingerprint = recipe.fingerprint()
    _check_not_source(out, recipe.model)
    _check_output(out, fingerprint, force=force)  # before anything is created: fail fast, change nothing
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardError(f"cannot create output directory {out}: {e.strerror}") from None
    lock = _OutputLock(out)
    try:
        try:
            lock.acquire()  # creating the lock file also proves the directory is writable, before the slow source read
        except OSError as e:
            raise ShardError(f"cannot write to output directory {out}: {e.strerror}") from None
        journal, remove = _check_output(out, fingerprint, force=force)  # again, now that no one else writes here
        _clean_stale_temps(out)
        source = _open_source(recipe.model)
        _remove(remove)
        return _write_all(recipe, source, out, fingerprint, journal, device, progress)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise ShardError(f"writing shards to {out} failed{where}: {e.strerror or e}; the directory is not marked "
                         "complete: fix the cause and rerun to resume") from None
    finally:
        lock.release()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no trace


def _open_source(model: str):
    """open_source, with the exceptions of the formats it parses turned into one-line SourceErrors."""
    try:
        return open_source(model)
    except SafetensorError as e:
        raise SourceError(f"model {model}: a weight file is not valid safetensors ({str(e).splitlines()[0]}); "
                          "qstream reads only safetensors or GGUF, never pickles") from None
    except (FileNotFoundError, IsADirectoryError) as e:
        raise SourceError(f"model {model}: {e.strerror}: {e.filename}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as e:
        raise SourceError(f"model {model}: unreadable index or config ({type(e).__name__}: {e})") from None


def _read_source(source, name: str) -> torch.Tensor:
    try:
        return source.read(name)
    except SafetensorError as e:
        raise SourceError(f"{source.description}: cannot read tensor {name} ({str(e).splitlines()[0]})") from None


# one function on purpose: the unit loop and the manifest that records it share the resume state
def _write_all(recipe: Recipe, source, out: Path, fingerprint: str, journal: dict, device: str | None,
               progress: bool) -> ShardResult:
    prefix, units = split_units(source.names, source.layers_prefix)
    shapes = dict(source.shapes)
    read_as = {n: n for n in source.names}  # stored name -> source tensor it is made from
    tied = bool(getattr(source.config, "tie_word_embeddings", False)) and not any(n.startswith("lm_head") for n in source.names)
    embedding = _store_tied_once(units, shapes, read_as) if tied else None
    specs = plan_specs(recipe, source.names, units, shapes)
    if embedding is not None:
        specs[TIED_HEAD], why = recipe.tied_head_spec()
        log.info("tied embeddings: stored once as %s (%s), %s", TIED_HEAD, specs[TIED_HEAD], why)
    elif recipe.tied_head is not None and TIED_HEAD in specs:  # an untied head with the recipe's head field
        specs[TIED_HEAD], why = recipe.tied_head_spec()
        log.info("head %s: %s, %s", TIED_HEAD, specs[TIED_HEAD], why)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if recipe.target_bits_per_weight is not None:
        specs = _allocate_specs(recipe, source, prefix, units, shapes, specs, read_as, dev)
    compute_dtype = DTYPES[recipe.compute_dtype]

    unit_files = [f"{unit}.safetensors" for unit in units]
    # a file an earlier run wrote is reused only if it holds these tensors in these specs (the same
    # recipe can mean other files after a change in qstream, e.g. the tied embedding stored once)
    plan = {f"{unit}.safetensors": {n: specs[n] for n in members} for unit, members in units.items()}
    if recipe.draft is not None:  # the draft's layer copies are planned with the rest (qstream/shard_draft.py)
        from .shard_draft import draft_names, draft_plan  # shard_draft builds on this module's helpers: no cycle
        unit_files += draft_names(units)
        plan.update(draft_plan(recipe, units, shapes))
    done = {n: e for n, e in journal.get("files", {}).items() if n in unit_files and _same_plan(e, plan)}
    stale = sorted(set(journal.get("files", {})) - set(unit_files))  # files of the old layout, removed at the end
    # the journal names every file this run may create before the first of them exists, so a killed
    # run is resumable and its files are known to be qstream's (--force removes only those)
    journal = {"fingerprint": fingerprint, "files": done, "planned": unit_files + stale}
    write_journal(out, journal)
    t0 = time.perf_counter()
    written = resumed = moved = 0
    entries: list[FileEntry] = []
    cal = _calibrator(recipe, source, prefix, dev) if recipe.calibration is not None else None
    # a calibrated recipe's draft is fitted to the same activations (imatrix), collected on the way; with
    # signround its copies are also tuned on each layer's output on the way, and each draft file is written
    # right after its layer (no tuned copy is held longer)
    draft_importance = {} if cal is not None and recipe.draft is not None else None
    draft = None
    drafts_now: dict[int, tuple[FileEntry, bool]] = {}  # layer -> (entry, written) of the draft files made on the way
    if draft_importance is not None and recipe.calibration.method == "signround":
        from .shard_draft import draft_name, draft_spec, write_draft_file  # (as below)
        draft = DraftTuning({n: draft_spec(recipe, n, shapes[n]) for u, m in units.items() if u.startswith("layer_")
                             for n in m}, {})
    tied_start = {}  # calibration: the embedding as the runtime will see it (the stored head, dequantized)
    if cal is not None and embedding is not None:
        tied_start = _tied_embedding_as_stored(source, embedding, specs[TIED_HEAD], dev, compute_dtype)
        if "embed" not in units:
            cal.start(tied_start)
    bar = tqdm(total=len(units), desc=f"shard {out.name}", unit="file", disable=not progress)
    for unit, members in units.items():
        fname = f"{unit}.safetensors"
        if cal is not None and unit != "head":
            # calibration carries activations through every layer: compute even a resumed unit
            # (deterministic), write it only if it is not intact
            layer = int(unit.split("_")[1]) if draft is not None and unit.startswith("layer_") else None
            # an intact draft file from an earlier run is kept: its copy needs no tuning again
            kept_draft = _kept(out, draft_name(layer), done) if layer is not None else None
            tune = draft if layer is not None and kept_draft is None else None
            tensors, metas = _calibrated_unit(cal, unit, members, source, read_as, specs, dev, compute_dtype,
                                              tied_start, recipe.calibration.method, draft_importance,
                                              RoundConfig(steps=recipe.calibration.steps), tune)
            if layer is not None:
                drafts_now[layer] = (kept_draft, False) if kept_draft is not None else \
                    (write_draft_file(recipe, source, out, layer, members, read_as, shapes, journal, dev,
                                      compute_dtype, tuned=draft.tuned), True)
                draft.tuned.clear()
            moved += sum(math.prod(shapes[n]) * 4 for n in members)
        kept = _kept(out, fname, done)
        if kept is not None:
            entries.append(kept)
            resumed += 1
            bar.update(1)
            continue
        if cal is None or unit == "head":
            tensors, metas = {}, {}
            for n in members:
                w = _read_source(source, read_as[n])
                moved += w.numel() * w.element_size()
                keyed, metas[n] = _store_tensor(n, w, specs[n], dev, compute_dtype)
                tensors.update(keyed)
                del w
        kind, index = ("layer", int(unit.split("_")[1])) if unit.startswith("layer_") else (unit, None)
        entries.append(write_file(out, fname, kind, index, tensors, metas, journal))
        written += 1
        bar.set_postfix_str(f"{moved / max(time.perf_counter() - t0, 1e-9) / 1e6:.0f} MB/s")
        bar.update(1)
    bar.close()
    if recipe.draft is not None:
        from .shard_draft import write_drafts  # (as above)
        drafts, w, r = write_drafts(recipe, source, out, units, read_as, shapes, journal, dev, compute_dtype, progress,
                                    draft_importance, drafts_now)
        entries += drafts
        written, resumed = written + w, resumed + r

    tok_files, tok_sums = _save_tokenizer(source, out, journal, reserved={MANIFEST, JOURNAL, LOCK, *unit_files})
    dense = sum(2 * math.prod(shapes[n]) for m in units.values() for n in m)  # the stored weights in 16 bits
    write_manifest(out, version=__version__, fingerprint=fingerprint, source=source.description,
                   config=_config_dict(source.config), recipe=recipe.to_dict(), compute_dtype=recipe.compute_dtype,
                   layers_prefix=prefix, tied_head=tied, source_bytes=source.size_bytes, dense_bytes=dense, files=entries,
                   tokenizer_files=tok_files, tokenizer_checksums=tok_sums, embedding=embedding)
    for name in stale:  # the new manifest no longer lists them: remove them while they are known to be ours
        safe_member(out, name).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    log.info("sharded %s into %s: %d files written, %d resumed", source.description, out, written, resumed)
    return ShardResult(out, source.size_bytes, dense, sum(e.size for e in entries), seconds, written, resumed)


TIED_HEAD = "lm_head.weight"  # the name a tied model's one stored embedding/head matrix is stored under


def _store_tied_once(units: dict[str, list[str]], shapes: dict[str, torch.Size], read_as: dict[str, str]) -> dict:
    """A tied model's embedding matrix is stored once, as the head (``lm_head.weight`` in the head file,
    in the head's scheme); the runtime looks the embedding up from it. Moves the tensor from the embed
    unit to the head unit (dropping an embed unit left empty) and returns the manifest's record of it."""
    embed_name = next(n for n in units["embed"] if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))
    units["embed"].remove(embed_name)
    if not units["embed"]:
        del units["embed"]
    units["head"].append(TIED_HEAD)
    shapes[TIED_HEAD] = shapes[embed_name]
    read_as[TIED_HEAD] = embed_name
    return {"from": "head", "tensor": TIED_HEAD, "name": embed_name}


def _tied_embedding_as_stored(source, embedding: dict, spec: QuantSpec, dev: torch.device,
                              compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{embedding name: the stored head matrix, dequantized}: calibration starts from what the runtime looks up."""
    packed, meta = _quantize_tensor(_read_source(source, embedding["name"]), spec, dev, compute_dtype)
    return {embedding["name"]: dequantize(packed, meta, dtype=torch.float32)}


def _same_plan(entry: dict, plan: dict[str, dict[str, QuantSpec]]) -> bool:
    """A journal/manifest file entry holds exactly the tensors ``plan`` (file name -> tensor -> spec)
    now gives its file, in those specs."""
    want = plan.get(entry.get("name", ""))
    tensors = entry.get("tensors") or {}
    if want is None or sorted(tensors) != sorted(want):
        return False
    return all(meta.get("scheme") == want[n].scheme and meta.get("block_size") == want[n].block_size
               for n, meta in tensors.items())


def _with_fast_hash(path: Path, entry: FileEntry) -> FileEntry:
    """A resumed file from a run (or manifest) that predates the fast hash gets one now."""
    if entry.xxh3 is not None:
        return entry
    return FileEntry(entry.name, entry.kind, entry.index, entry.size, entry.sha256, entry.tensors, fast_digest(path.read_bytes()))


def _kept(out: Path, fname: str, done: dict) -> FileEntry | None:
    """``fname``'s entry when an earlier run finished it (``done``: journal or manifest entries) and the
    file still matches it, else None. Hashes the whole file: call once per file and run."""
    path = safe_member(out, fname)
    if not _intact(path, done.get(fname)):
        return None
    return _with_fast_hash(path, FileEntry.from_dict(done[fname]))


def write_file(out: Path, fname: str, kind: str, index: int | None, tensors: dict[str, torch.Tensor],
               metas: dict[str, dict], journal: dict) -> FileEntry:
    """One shard file written atomically and then journaled (a crash leaves no file the next run trusts).
    ``tensors`` is emptied once serialized, so its tensors are freed before the write."""
    data = save_bytes(tensors, {"qstream": json.dumps(metas, sort_keys=True)})
    tensors.clear()
    atomic_write_bytes(safe_member(out, fname), data)
    entry = FileEntry(fname, kind, index, len(data), hashlib.sha256(data).hexdigest(), metas, fast_digest(data))
    journal["files"][fname] = entry.to_dict()
    write_journal(out, journal)
    return entry


def _intact(path: Path, entry: dict | None) -> bool:
    """A file an earlier run finished (journal or manifest entry) and that still matches it."""
    return bool(entry) and path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]


def _allocate_specs(recipe: Recipe, source, prefix: str, units: dict[str, list[str]], shapes: dict[str, torch.Size],
                    specs: dict[str, QuantSpec], read_as: dict[str, str], dev: torch.device) -> dict[str, QuantSpec]:
    """target_bits_per_weight: every quantizable weight that no override names gets the candidate
    scheme (Recipe.target_candidates) that, over all those weights, minimizes
    the summed squared weight error within target x their parameter count bits (quant/mixed.py's
    exact knapsack). Reads each such weight once more and quantizes it with every candidate."""
    tied = read_as.get(TIED_HEAD, TIED_HEAD) != TIED_HEAD  # the embedding stored once as the head
    # a tied embedding/head matrix keeps Recipe.tied_head_spec's scheme (it is also every token's input),
    # and so does an untied head when the recipe names its scheme
    fixed_head = tied or recipe.tied_head is not None
    free = [n for unit, members in units.items() for n in members
            if is_quantizable(n, shapes[n], unit) and recipe.spec_for(n.removesuffix(".weight"))[1] is None
            and not (fixed_head and n == TIED_HEAD)]
    candidates = recipe.target_candidates()
    scale: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if recipe.calibration is not None:
        # forward and backward passes of the unquantized model over the calibration text: each
        # weight's error is weighted by its inputs' second moments and its outputs' loss gradients
        cal = _calibrator(recipe, source, prefix, dev)
        scale = loss_sensitivity(source.config, lambda n: _read_source(source, read_as.get(n, n)), cal.ids, dev)
        missing = [n for n in free if n not in scale]
        if missing:  # errors weighted and unweighted would not compare
            raise ShardError(f"target_bits_per_weight with calibration: no calibration inputs for {missing[0]}; "
                             "name it in an override")
        del cal
    choices = {}
    for n in tqdm(free, desc="measure schemes", unit="weight", disable=not log.isEnabledFor(logging.INFO)):
        out_scale, in_scale = scale.get(n, (None, None))
        choices[n] = options_for(_read_source(source, read_as[n]).to(dev), candidates, input_scale=in_scale,
                                 output_scale=out_scale)
    budget = int(recipe.target_bits_per_weight * sum(math.prod(shapes[n]) for n in free))
    picked = allocate(choices, budget)
    mix: dict[str, int] = {}
    for o in picked.values():
        mix[o.spec.scheme] = mix.get(o.spec.scheme, 0) + 1
    log.info("target_bits_per_weight %.3g: %.3f bits/weight over %d weights, schemes %s", recipe.target_bits_per_weight,
             sum(o.bits for o in picked.values()) / sum(math.prod(shapes[n]) for n in free), len(free), mix)
    return {**specs, **{n: o.spec for n, o in picked.items()}}


def _quantize_tensor(w: torch.Tensor, spec: QuantSpec, dev: torch.device, compute_dtype: torch.dtype,
                     hessian: torch.Tensor | None = None, method: str = "gptq",
                     importance: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """One source tensor -> (packed, meta). Quantized schemes run on ``dev`` (fast on CUDA); pass-through
    keeps floats in the compute dtype; an affine scheme with a calibration Hessian uses GPTQ
    (``method`` gptq) or the importance-weighted fit with diag(H) as importance (``imatrix``), and
    one given ``importance`` (a draft's, collected on the target's pass) that fit too."""
    scheme = get_scheme(spec.scheme)
    if hessian is not None and isinstance(scheme, Affine):
        if method != "imatrix":
            return gptq_quantize(w.to(dev), hessian.to(dev), scheme.bits, spec.block_size, scheme=spec.scheme)
        importance = torch.diagonal(hessian)
    if scheme.quantized:
        return quantize(w.to(dev), spec, importance=importance)
    return quantize(w.to(compute_dtype) if w.is_floating_point() else w, spec)


def _store_tensor(name: str, w: torch.Tensor, spec: QuantSpec, dev: torch.device, compute_dtype: torch.dtype,
                  importance: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """One source tensor -> the tensors to store under their file keys, and its metadata."""
    packed, meta = _quantize_tensor(w, spec, dev, compute_dtype, importance=importance)
    return _for_file(name, packed, meta), meta


def _for_file(name: str, packed: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """``packed`` under the file keys it is stored as (contiguous, on the CPU); the keys go into meta["stored"]."""
    keyed, meta["stored"] = pack_stored(name, {k: t.contiguous().cpu() for k, t in packed.items()})
    return keyed


def _calibrator(recipe: Recipe, source, prefix: str, dev: torch.device) -> Calibrator:
    """The calibration activations' carrier, with the recipe's text tokenized by the source's tokenizer."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="qstream-calib-") as tmp:
        source.save_tokenizer(Path(tmp))
        tok = AutoTokenizer.from_pretrained(tmp)
    ids = calibration_ids(tok, recipe.calibration.text_file, recipe.calibration.tokens)
    log.info("calibration: %d sequences of %d tokens from %s", ids.shape[0], ids.shape[1], recipe.calibration.text_file)
    return Calibrator(source.config, ids, prefix, dev, reference=recipe.calibration.method == "signround")


# GPTQ's true-sequential option (GPTQ only; the imatrix fit takes every importance from one pass)
TRUE_SEQUENTIAL = True


@dataclass
class DraftTuning:
    """A draft tuned with signround during the calibrated pass: the draft's spec of every stored name, and the
    current layer's tuned (packed, meta) by name, for shard_draft.write_draft_file."""

    specs: dict[str, QuantSpec]
    tuned: dict[str, tuple[dict[str, torch.Tensor], dict]]


def _calibrated_unit(cal: Calibrator, unit: str, members: list[str], source, read_as: dict[str, str],
                     specs: dict[str, QuantSpec], dev: torch.device, compute_dtype: torch.dtype,
                     tied_start: dict[str, torch.Tensor], method: str = "gptq",
                     importance: dict[str, torch.Tensor] | None = None, tune: RoundConfig = RoundConfig(),
                     draft: DraftTuning | None = None):
    """Embeddings: stored as usual, and they start the calibration (with ``tied_start``, a tied embedding
    stored in the head file, added). Layer i: its linears' Hessians on
    the current (already-quantized-upstream) activations, GPTQ for affine schemes, then the layer as
    stored (dequantized) produces layer i+1's inputs. ``importance`` (a dict to fill, when the recipe has
    a draft): every 2-D linear's diag(H), the mean squared input of each column, for the draft's fit.
    ``draft`` (signround with a draft): the draft's copy of the layer is fitted with that importance and
    tuned on the same layer output as the target's weights, into ``draft.tuned``."""
    raw = {n: _read_source(source, read_as[n]) for n in members}
    fitted: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}  # name -> (packed, meta), packed for the file last
    runtime = {}  # name -> what the runtime computes with (dequantized): the next stage's and layer's inputs
    fit_method = "imatrix" if method == "signround" else method  # signround tunes the imatrix fit's codes

    def use(n: str, packed: dict[str, torch.Tensor], meta: dict) -> None:
        fitted[n] = packed, meta
        runtime[n] = dequantize(packed, meta, dtype=torch.float32) if raw[n].is_floating_point() else raw[n]

    def fit(n: str, hessian: torch.Tensor | None) -> None:
        if importance is not None and hessian is not None:
            importance[n] = torch.diagonal(hessian).float().cpu()
        use(n, *_quantize_tensor(raw[n], specs[n], dev, compute_dtype, hessian, fit_method))

    hessians: dict[str, torch.Tensor] = {}
    if unit.startswith("layer_"):
        i = int(unit.split("_")[1])
        # true-sequential (GPTQ's option): the linears of one stage (q/k/v, then o, gate/up, down) get
        # their Hessians from inputs that went through the already-quantized stages of this layer
        todo = [n for n in members if (isinstance(get_scheme(specs[n].scheme), Affine) or importance is not None)
                and raw[n].dim() == 2]
        while todo:
            hessians = cal.collect(i, {**raw, **{n: runtime[n] for n in runtime}})
            stage = next((s for s in cal.stages if any(n in todo for n in s)), None)
            staged = TRUE_SEQUENTIAL and method == "gptq"  # imatrix: one pass, as llama.cpp collects it
            now = [n for n in todo if n in hessians and (not staged or stage is None or n in stage)]
            if not now:
                break  # weights the forward never used: quantized below without a Hessian
            for n in now:
                fit(n, hessians[n])
            todo = [n for n in todo if n not in now]
    for n in members:
        if n not in fitted:
            fit(n, None)
    if unit.startswith("layer_") and method == "signround":
        i = int(unit.split("_")[1])
        y = cal.reference_step(i, raw)  # the unquantized model's output of this layer: both tunings' target
        if draft is not None:  # before the target's tuning: on the same inputs, against the same output
            copies = {n: _quantize_tensor(raw[n], draft.specs[n], dev, compute_dtype,
                                          importance=(importance or {}).get(n)) for n in members}
            tuned = _signround(cal, i, y, raw, runtime, copies, tune, "draft")
            draft.tuned.update({n: (tuned.get(n, copies[n][0]), copies[n][1]) for n in members})
        for n, packed in _signround(cal, i, y, raw, runtime, fitted, tune).items():
            use(n, packed, fitted[n][1])
    tensors, metas = {}, {}
    for n in members:
        packed, metas[n] = fitted[n]
        tensors.update(_for_file(n, packed, metas[n]))
    raw.clear()  # the layer's float weights: at most about two layers are held while sharding
    fitted.clear()
    del hessians
    if unit == "embed":
        cal.start({**runtime, **tied_start})
    else:
        cal.advance(int(unit.split("_")[1]), runtime)
    return tensors, metas


def _signround(cal: Calibrator, i: int, y: torch.Tensor, raw: dict[str, torch.Tensor],
               runtime: dict[str, torch.Tensor], fitted: dict[str, tuple[dict, dict]], cfg: RoundConfig,
               what: str = "target") -> dict[str, dict[str, torch.Tensor]]:
    """Layer i's fitted affine weights with their rounding tuned on the layer's output (quant/signround.py):
    inputs through the quantized layers before it, target ``y`` the unquantized model's output of this layer.
    The tuned weights replace the layer's (``runtime``) ones; its other tensors are the target's."""
    layer = cal._load(i, runtime)
    at = f"{cal.prefix}.{i}."
    roundings = {n[len(at):]: Rounding(raw[n].to(cal.device), *fitted[n]) for n in fitted
                 if n.startswith(at) and raw[n].is_floating_point() and tunable(fitted[n][1])}
    if not roundings:
        return {}
    with torch.enable_grad():
        before, after = tune_layer(layer, roundings, cal.hidden, y, cal.kwargs, cfg)
    log.info("signround %s layer %d: output error %.4g -> %.4g (%d weights, %d steps)", what, i, before, after,
             len(roundings), cfg.steps_for(cal.hidden.shape[0]))
    return {at + k: r.result() for k, r in roundings.items()}


def _config_dict(config) -> dict:
    """The source's transformers config as JSON, with its architecture named (GGUF configs lack it)."""
    d = config.to_dict()
    if not d.get("architectures"):
        from transformers import AutoModelForCausalLM

        d["architectures"] = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return d
