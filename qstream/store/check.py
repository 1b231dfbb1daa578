"""The one place that decides whether a shard directory can be trusted: the manifest's
structure, its completeness, the fields the runtime relies on, and each file's
safetensors header against the manifest. ``qstream verify`` reports every problem;
``load()`` stops at the first one, before any tensor is used.

The manifest is never trusted over the files: every shard file's header carries the
per-tensor metadata (``__metadata__["qstream"]``) written from the same dict as the
manifest entry, so the two must agree exactly, and every stored name the metadata
promises must be a tensor in the file.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

import torch

from ..dtypes import COMPUTE_DTYPES
from ..errors import ShardError
from ..quant import SCHEMES
from .files import config_digest, safe_member
from .integrity import check_small_file
from .tensors import MAIN, ST_DTYPES, Header, read_header

KINDS = ("embed", "layer", "head", "draft")  # draft: a low-bit copy of one decoder layer (qstream/shard_draft.py)
INDEXED = ("layer", "draft")  # kinds that belong to one decoder layer
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# config fields the runtime reads to size the model and its budget: positive integers
CONFIG_INTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _attribute_map(model_type) -> dict[str, str]:
    """The config class's names for the standard fields (GPT-2 stores hidden_size as n_embd, ...)."""
    from transformers import CONFIG_MAPPING

    try:
        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}))
    except KeyError:
        return {}


def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config it cannot build: it validates piecemeal, and its strict
    dataclass validation (huggingface_hub) raises its own Exception subclass."""
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, AttributeError, IndexError,
                                              ZeroDivisionError, RuntimeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs are not strict dataclasses
        return errors
    return errors + (StrictDataclassError,)


CONFIG_ERRORS = _config_errors()
PASS_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # pass-through scheme -> safetensors dtype


def _bad(root, what: str) -> ShardError:
    return ShardError(f"{root}/manifest.json: {what}; the manifest is damaged: re-shard the model")


def check_structure(root, data: dict) -> None:
    """Fields every reader of the manifest (inspect, verify, load) dereferences, with their types.
    Raises ShardError naming the first bad field."""
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict) or not isinstance(model.get("source"), str):
        raise _bad(root, "field 'model' must hold 'source' and a 'config' mapping")
    for key, typ in (("compute_dtype", str), ("num_layers", int), ("layers_prefix", str), ("files", list)):
        if not isinstance(data.get(key), typ) or isinstance(data.get(key), bool):
            raise _bad(root, f"field {key!r} is missing or not a {typ.__name__}")
    tok = data.get("tokenizer_files", [])
    if not isinstance(tok, list) or not all(isinstance(t, str) for t in tok):
        raise _bad(root, "field 'tokenizer_files' must be a list of file names")
    for t in tok:
        safe_member(root, t)
    sums = data.get("tokenizer_checksums", {})
    if not isinstance(sums, dict) or not all(isinstance(v, dict) and isinstance(v.get("size"), int)
                                             and isinstance(v.get("sha256"), str) for v in sums.values()):
        raise _bad(root, "field 'tokenizer_checksums' must map file names to {size, sha256}")
    emb = data.get("embedding")
    if emb is not None and not (isinstance(emb, dict) and emb.get("from") == "head"
                                and all(isinstance(emb.get(k), str) and emb.get(k) for k in ("tensor", "name"))):
        raise _bad(root, "field 'embedding' must be {\"from\": \"head\", \"tensor\": NAME, \"name\": NAME}")
    for i, f in enumerate(data["files"]):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            raise _bad(root, f"{where} is not a mapping")
        safe_member(root, f.get("name"))
        where = f"{where} ({f['name']})"
        for key, typ in (("kind", str), ("size", int), ("sha256", str), ("tensors", dict)):
            if key not in f:
                raise _bad(root, f"{where} has no {key!r}")
            if not isinstance(f[key], typ) or isinstance(f[key], bool):
                raise _bad(root, f"{where}: {key!r} is not a {typ.__name__}")
        if f["kind"] not in KINDS:
            raise _bad(root, f"{where}: unknown kind {f['kind']!r}")
        if f["kind"] in INDEXED and (not isinstance(f.get("index"), int) or isinstance(f.get("index"), bool)):
            raise _bad(root, f"{where}: a {f['kind']} file needs an integer 'index'")
        if not _HEX64.match(f["sha256"]):
            raise _bad(root, f"{where}: 'sha256' is not 64 hex digits")
        if "xxh3_64" in f and not (isinstance(f["xxh3_64"], str) and re.fullmatch(r"[0-9a-f]{16}", f["xxh3_64"])):
            raise _bad(root, f"{where}: 'xxh3_64' is not 16 hex digits")
        for name, meta in f["tensors"].items():
            if not isinstance(meta, dict) or not isinstance(meta.get("scheme"), str) or not isinstance(meta.get("stored"), dict) \
                    or not isinstance(meta.get("shape"), list) or MAIN not in meta["stored"]:
                raise _bad(root, f"{where}: tensor {name!r} lacks scheme, shape or stored names")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in meta["shape"]):
                raise _bad(root, f"{where}: tensor {name!r} has shape {meta['shape']!r}")


def manifest_problems(m) -> list[str]:
    """Completeness and the fields the runtime relies on, without reading any shard file."""
    out = []
    if m.compute_dtype not in COMPUTE_DTYPES:
        out.append(f"compute_dtype {m.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    cfg = m.config
    if not isinstance(cfg.get("model_type"), str):
        out.append("config has no 'model_type'")
    aliases = _attribute_map(cfg.get("model_type"))
    for k in CONFIG_INTS:
        v = cfg.get(k, cfg.get(aliases.get(k, k)))
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            out.append(f"config field {k!r} is {v!r}, not a positive integer")
    if m.config_sha256 is not None:
        if config_digest(cfg) != m.config_sha256:
            out.append("the model config does not match its checksum (config_sha256): it was edited")
    files = m.files
    if not files:
        out.append("lists no shard files")
    n = m.num_layers
    if n < 1:
        out.append(f"num_layers is {n}")
    if isinstance(cfg.get("num_hidden_layers"), int) and cfg.get("num_hidden_layers") != n:
        out.append(f"num_layers {n} but the config says num_hidden_layers {cfg.get('num_hidden_layers')}")
    seen: dict[tuple, str] = {}
    names: dict[str, str] = {}
    for f in files:
        key = (f.kind, f.index if f.kind in INDEXED else None)
        if key in seen:
            out.append(f"{f.name} and {seen[key]} are both the {f.kind} file{'' if key[1] is None else f' of layer {key[1]}'}")
        seen[key] = f.name
        if f.name in names:
            out.append(f"{f.name} is listed twice")
        names[f.name] = f.name
        if f.kind in INDEXED and not 0 <= f.index < max(n, 0):
            out.append(f"{f.name}: layer index {f.index} is outside 0..{n - 1}")
        for t, meta in f.tensors.items():
            if meta["scheme"] not in SCHEMES:
                out.append(f"{f.name}: tensor {t} has unknown scheme {meta['scheme']!r}")
            if f.kind in INDEXED and not t.startswith(f"{m.layers_prefix}.{f.index}."):
                out.append(f"{f.name}: tensor {t} does not belong to layer {f.index}")
    emb = m.embedding
    for kind in ("embed", "head"):
        if (kind, None) not in seen and not (kind == "embed" and emb is not None):  # a tied embedding may be all it held
            out.append(f"no {kind} file")
    if emb is not None:
        out += _embedding_problems(files, emb)
    missing = [i for i in range(max(n, 0)) if ("layer", i) not in seen]
    if missing:
        out.append(f"no file for layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:5]))}"
                   f"{' ...' if len(missing) > 5 else ''}")
    drafts = [i for i in range(max(n, 0)) if ("draft", i) in seen]
    if drafts and len(drafts) < n:  # the runtime may need the draft of any layer it streams
        gap = next(i for i in range(n) if ("draft", i) not in seen)
        out.append(f"a draft copy of {len(drafts)} of {n} layers: no draft file for layer {gap}")
    out += draft_problems(m)
    for t in m.tokenizer_checksums:
        if t not in m.tokenizer_files:
            out.append(f"tokenizer checksum for {t!r}, which tokenizer_files does not list")
    return out


def draft_problems(m) -> list[str]:
    """A draft file holds exactly its layer's tensors with the same shapes: at run time it stands
    in for that layer's file."""
    out = []
    layers = {f.index: f for f in m.files if f.kind == "layer"}
    for f in m.files:
        if f.kind != "draft" or f.index not in layers:
            continue
        own = layers[f.index].tensors
        if set(f.tensors) != set(own):
            diff = sorted(set(f.tensors) ^ set(own))[0]
            out.append(f"{f.name}: draft of layer {f.index} and its layer file disagree about tensor {diff}")
            continue
        for t, meta in f.tensors.items():
            if meta["shape"] != own[t]["shape"]:
                out.append(f"{f.name}: {t} has shape {meta['shape']}, its layer file {own[t]['shape']}")
    return out


def _embedding_problems(files, emb: dict) -> list[str]:
    """The embedding stored once as the head: its tensor is a 2-D tensor of the head file, and the
    embedding is not stored a second time."""
    head = next((f for f in files if f.kind == "head"), None)
    meta = head.tensors.get(emb["tensor"]) if head is not None else None
    out = []
    if head is not None and (meta is None or len(meta["shape"]) != 2):
        out.append(f"the embedding is stored as {emb['tensor']}, which {head.name} does not hold as a matrix")
    twice = next((f.name for f in files if emb["name"] in f.tensors), None)
    if twice:
        out.append(f"{twice} stores {emb['name']}, which the manifest says is stored once as {emb['tensor']}")
    return out


def header_problems(entry, header: Header) -> list[str]:
    """A shard file's own header against its manifest entry (names, dtypes, shapes, scheme metadata)."""
    raw = header.metadata.get("qstream")
    try:
        metas = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        metas = None
    if not isinstance(metas, dict):
        return [f"{entry.name}: its header has no readable qstream metadata"]
    if metas != entry.tensors:
        diff = sorted(set(metas) ^ set(entry.tensors)) or sorted(k for k in metas if metas[k] != entry.tensors.get(k))
        return [f"{entry.name}: manifest.json disagrees with the file's own header about {diff[0]}"]
    out = []
    promised = set()
    for name, meta in metas.items():
        for key in meta["stored"].values():
            promised.add(key)
            if key not in header.tensors:
                out.append(f"{entry.name}: stored tensor {key} of {name} is not in the file")
        slot = header.tensors.get(meta["stored"][MAIN])
        want = PASS_DTYPES.get(meta["scheme"])
        if slot is not None and want is not None:
            if slot.dtype != want or list(slot.shape) != list(meta["shape"]):
                out.append(f"{entry.name}: {name} is stored as {slot.dtype}{list(slot.shape)}, "
                           f"its metadata says {meta['scheme']}{meta['shape']}")
    extra = sorted(set(header.tensors) - promised)
    if extra:
        out.append(f"{entry.name}: tensor {extra[0]} is in the file but in no metadata")
    for slot in header.tensors.values():
        if slot.dtype not in ST_DTYPES:  # read_header checks this; kept for headers built elsewhere
            out.append(f"{entry.name}: tensor {slot.name} has unsupported dtype {slot.dtype}")
    return out


def model_shapes(m) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model the manifest's config describes (built on the meta device, no
    memory), with the head untied as `qstream shard` stores it. A config transformers cannot build
    is a ShardError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(m.config)
    model_type = cfg.pop("model_type", None)
    for k in ("transformers_version", "_name_or_path", "architectures"):
        cfg.pop(k, None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        config.tie_word_embeddings = False
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config)
    except CONFIG_ERRORS as e:
        raise config_error(m, e) from None
    return {n: tuple(p.shape) for n, p in hf.named_parameters()}


def config_error(m, e: BaseException) -> ShardError:
    """One line for a config transformers refuses; the cause comes last in chained validation errors."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return ShardError(f"{m.root}/manifest.json: the model config does not build a model "
                      f"({lines[-1] if lines else type(e).__name__}); re-shard the model")


def shape_problems(m, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every stored tensor is a parameter of the model with the same shape, and every parameter is stored."""
    out = []
    stored = {}
    files = m.files
    emb = m.embedding
    if emb is not None:  # the embedding is the head's tensor: check it like a stored tensor of that shape
        head = next((f for f in files if f.kind == "head"), None)
        if head is not None and emb["tensor"] in head.tensors:
            files = files + [replace(head, tensors={emb["name"]: head.tensors[emb["tensor"]]})]
    for f in files:
        for name, meta in f.tensors.items():
            stored[name] = f.name
            if name not in shapes:
                out.append(f"{f.name}: tensor {name} is not a parameter of {m.architecture or 'the model'}")
            elif tuple(meta["shape"]) != shapes[name]:
                out.append(f"{f.name}: tensor {name} has shape {meta['shape']}, the model config needs {list(shapes[name])}")
    absent = [n for n in shapes if n not in stored]
    if absent:
        out.append(f"no stored tensor for {absent[0]}" + (f" and {len(absent) - 1} more" if len(absent) > 1 else ""))
    return out


def raise_first(root, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ShardError(f"{root}: {problems[0]}{more}; re-shard the model (`qstream verify {root}` lists every problem)")



def checked_header(m, entry) -> Header:
    """A shard file's header, read and cross-checked against its manifest entry (ShardError otherwise)."""
    path = m.path(entry)
    header = read_header(path, expected_size=entry.size)
    problems = header_problems(entry, header)
    if problems:
        raise ShardError(f"{m.root}: {problems[0]}; run `qstream verify {m.root}` and re-shard")
    return header


def check_tokenizer_files(m) -> None:
    """The manifest's tokenizer files exist and match their checksums (manifests that predate the
    checksums: exist). Small files: read whole, sha256."""
    sums = m.tokenizer_checksums
    for name in m.tokenizer_files:
        p = safe_member(m.root, name)
        if name in sums:
            check_small_file(p, size=sums[name]["size"], sha256=sums[name]["sha256"], what="tokenizer file")
        elif not p.is_file():
            raise ShardError(f"missing tokenizer file {p}; run `qstream verify {m.root}` and re-shard")
