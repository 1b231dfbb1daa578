"""Recipe schema: a YAML file naming a model and how to compress it.

    model: smollm2-135m            # alias, local HF dir, local .gguf file, or hub id
    output: shards/smollm2-nf4     # relative paths resolve against the current directory
    scheme: nf4                    # default for every quantizable weight
    block_size: 64                 # default block size of block formats (alias: group_size)
    compute_dtype: bfloat16        # dtype the runtime computes in
    overrides:                     # first matching pattern wins (fnmatch on module names)
      - {pattern: lm_head, scheme: bf16}
      - {pattern: "model.layers.0.*", scheme: int8}
    target_bits_per_weight: 4.0    # optional: per-weight schemes chosen to this size (see quant/mixed.py)
    calibration:                   # optional: GPTQ or imatrix for the q2 ... q8 weights of decoder layers
      text_file: eval/data/calib.txt
      tokens: 4096
      method: gptq                 # or imatrix (importance-weighted grids, no error feedback), or
                                   # signround (imatrix, then rounding tuned on each layer's output;
                                   # the draft's copies too)
      steps: 24                    # signround only: tuning steps per layer (default: 3 per sequence)
    draft: {scheme: q3, group_size: 64}  # optional: a low-bit copy of the decoder layers in the same
                                   # directory, the draft of self-speculative decoding (see shard_draft.py)
    tied_head: {scheme: q8, group_size: 64}   # optional (alias: head): the output head's scheme, kept out
                                   # of target_bits_per_weight's choice; for tied embeddings the one stored
                                   # copy of the embedding/head matrix (or just `tied_head: q8`)


Only 2-D weights of linear layers are quantized; norms, biases and embeddings are
stored in ``compute_dtype`` whatever the recipe says (``keep_dtype`` overrides).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .dtypes import COMPUTE_DTYPES
from .errors import RecipeError
from .quant import SCHEMES, QuantSpec, check_spec, get_scheme
from .quant.kquant import KAffine

_TOP_KEYS = {"model": str, "output": str, "scheme": str, "block_size": int, "group_size": int, "compute_dtype": str,
             "overrides": list, "description": str, "calibration": dict,
             "target_bits_per_weight": (int, float), "draft": dict, "tied_head": (str, dict),
             "head": (str, dict)}
_CALIBRATION_KEYS = {"text_file": str, "tokens": int, "method": str, "steps": int}
# gptq: error feedback through the input Hessian; imatrix: each group's grid fitted to the error
# weighted by its columns' mean squared input (llama.cpp's importance matrix), no feedback;
# signround: the imatrix fit, then each weight's rounding tuned on its layer's output (quant/signround.py)
CALIBRATION_METHODS = ("gptq", "imatrix", "signround")
MAX_SIGNROUND_STEPS = 10000
DEFAULT_CALIBRATION_TOKENS = 4096  # 8 sequences of 512: GPTQ's usual 128 x 2048 is ~60x more, but the
# Hessians of a 135M-0.5B model's linears (in_features <= 4864) are well conditioned with 4k tokens after damping
# the candidate schemes of target_bits_per_weight, at the recipe's group size
TARGET_CANDIDATES = ("q3", "q4", "q5", "q6", "q8")
# ... and these also at twice the recipe's group size (when supported): a wide-input weight (down_proj)
# at q4 g128 costs 4.25 bits instead of 4.5, bits the knapsack can spend on a sensitive weight
TARGET_WIDE_GROUP = ("q3", "q4", "q5")
# recipes of the k-quant family (scheme q3k, q4k, ...: 6-bit grids, quant/kquant.py) choose among their own
# family at the recipe's group, the two smallest at twice it, and q8 at 64 for the most sensitive weights
K_TARGET_CANDIDATES = ("q2k", "q3k", "q4k", "q5k", "q6k")
K_TARGET_WIDE_GROUP = ("q3k", "q4k")
K_TARGET_FINE_GROUP = ("q3k",)  # ... and at half of it: 3-bit codes on groups of 16 cost ~4 bits, less than q4k
K_TARGET_TOP = ("q8", 64)
K_DEFAULT_GROUP = 32
MIN_TARGET_BITS, MAX_TARGET_BITS = 3.25, 8.5  # q3 and q8 at groups of 128 (their float16 scale+min cost 0.25)
_DRAFT_KEYS = {"scheme": str, "block_size": int, "group_size": int}
# a draft must be much cheaper than the target to pay: 2 to 4 bits (fitted affine groups, or nf4)
DRAFT_SCHEMES = ("q2", "q3", "q4", "q2k", "q3k", "q4k", "nf4")
_OVERRIDE_KEYS = {"pattern": str, "scheme": str, "block_size": int, "group_size": int}
_TIED_HEAD_KEYS = {"scheme": str, "block_size": int, "group_size": int}
# Tied models store the embedding/head matrix once (the embedding is looked up from the head's codes).
# Recipes whose scheme has fewer bits than this get DEFAULT_TIED_HEAD for it instead of their own
# scheme: on SmolLM2-135M the matrix is 21% of the weights and every token's logits and input go
# through it, and 8 bits keep the perplexity within +0.5% of a bf16 head at ~half of 16-bit's bytes
# (eval/results/tied-head). Groups of 64 divide the usual hidden sizes (576, 896, 4096), so no padding.
TIED_HEAD_MIN_BITS = 8
DEFAULT_TIED_HEAD = ("q8", 64)
# `group_size` is the usual name for the block of group-quantization schemes (q2 ... q8); it is
# stored as block_size, so recipes that spell it either way shard identically
_ALIASES = {"group_size": "block_size", "head": "tied_head"}


@dataclass(frozen=True)
class Override:
    pattern: str
    scheme: str
    block_size: int | None = None


@dataclass(frozen=True)
class Calibration:
    """Text whose activations weight the quantization error (GPTQ); ``tokens`` of it are used."""

    text_file: str
    tokens: int = DEFAULT_CALIBRATION_TOKENS
    method: str = "gptq"
    steps: int | None = None  # signround's tuning steps per layer (None: 3 passes over the text's sequences)


@dataclass(frozen=True)
class DraftSpec:
    """The scheme of the draft's copy of every decoder-layer linear (norms and biases are copied as stored)."""

    scheme: str
    block_size: int = 64


@dataclass(frozen=True)
class Recipe:
    model: str
    output: Path
    scheme: str = "nf4"
    block_size: int = 64
    compute_dtype: str = "bfloat16"
    overrides: tuple[Override, ...] = field(default_factory=tuple)
    description: str = ""
    calibration: Calibration | None = None
    # mixed precision: weights no override names get the scheme among TARGET_CANDIDATES that
    # minimizes the total predicted error at this many bits per weight on average
    target_bits_per_weight: float | None = None
    draft: DraftSpec | None = None  # a low-bit copy of the decoder layers for self-speculation
    # (scheme, block size or None) of the output head (tied models: of the one stored embedding/head
    # matrix); None = tied_head_spec()'s default for tied models, the recipe's choice for untied heads.
    # An override matching lm_head wins over it.
    tied_head: tuple[str, int | None] | None = None

    def spec_for(self, module: str) -> tuple[QuantSpec, str | None]:
        """The spec of a quantizable weight of ``module``, and the pattern that chose it."""
        for o in self.overrides:
            if fnmatch.fnmatchcase(module, o.pattern):
                return _spec(o.scheme, o.block_size or self.block_size), o.pattern
        return _spec(self.scheme, self.block_size), None

    def target_candidates(self) -> list[QuantSpec]:
        """The schemes target_bits_per_weight chooses among: the recipe's family (q-schemes or k-schemes)."""
        if isinstance(get_scheme(self.scheme), KAffine):
            out = [QuantSpec(s, self.block_size) for s in K_TARGET_CANDIDATES]
            out += [QuantSpec(s, 2 * self.block_size) for s in K_TARGET_WIDE_GROUP
                    if 2 * self.block_size in get_scheme(s).block_sizes]
            out += [QuantSpec(s, self.block_size // 2) for s in K_TARGET_FINE_GROUP
                    if self.block_size // 2 in get_scheme(s).block_sizes]
            return out + [QuantSpec(*K_TARGET_TOP)]
        out = [QuantSpec(s, self.block_size) for s in TARGET_CANDIDATES]
        wide = 2 * self.block_size
        return out + [QuantSpec(s, wide) for s in TARGET_WIDE_GROUP if wide in get_scheme(s).block_sizes]

    def tied_head_spec(self) -> tuple[QuantSpec, str]:
        """The spec of the one stored copy of a tied model's embedding/head matrix, and why: an
        override matching lm_head, else the recipe's ``tied_head``, else the recipe's scheme when it
        has at least TIED_HEAD_MIN_BITS bits (or is a pass-through), else DEFAULT_TIED_HEAD."""
        spec, pattern = self.spec_for("lm_head")
        if pattern is not None:
            return spec, f"override {pattern!r}"
        if self.tied_head is not None:
            scheme, block = self.tied_head
            return _spec(scheme, block or self.block_size), "field 'tied_head'"
        bits = scheme_bits(self.scheme)
        if bits is None or bits >= TIED_HEAD_MIN_BITS:
            return spec, f"the recipe's scheme {self.scheme}"
        return _spec(*DEFAULT_TIED_HEAD), f"default for {bits}-bit recipes"

    def fingerprint(self) -> str:
        """Identity of what the shards will contain (not where they go)."""
        d = asdict(self)
        d.pop("output")
        d.pop("description")
        for k in ("calibration", "target_bits_per_weight", "draft", "tied_head"):
            if d[k] is None:
                d.pop(k)  # recipes without them keep the fingerprint they had before the fields existed
        _drop_unused_steps(d)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["overrides"] = [{k: v for k, v in asdict(o).items() if v is not None} for o in self.overrides]
        for k in ("calibration", "target_bits_per_weight", "draft", "tied_head"):
            if d[k] is None:
                d.pop(k)
        _drop_unused_steps(d)
        if self.tied_head is not None:
            d["tied_head"] = {"scheme": self.tied_head[0], **({"block_size": self.tied_head[1]} if self.tied_head[1] else {})}
        return d


def _drop_unused_steps(d: dict) -> None:
    """Only signround has tuning steps: other methods keep the recipe dict (and fingerprint) they had."""
    c = d.get("calibration")
    if c is not None and c["steps"] is None:
        c.pop("steps")


def _spec(scheme: str, block_size: int) -> QuantSpec:
    return QuantSpec(scheme, block_size if get_scheme(scheme).block_sizes else None)


def scheme_bits(scheme: str) -> int | None:
    """Code bits of a quantized scheme (nf4 4, int8 8, q3 3); None for pass-through casts."""
    s = get_scheme(scheme)
    if not s.quantized:
        return None
    return _BNB_BITS[scheme] if scheme in _BNB_BITS else s.bits  # the affine q-schemes carry their bits


_BNB_BITS = {"nf4": 4, "fp4": 4, "int8": 8}


def _check_type(where: str, value: Any, typ: type | tuple) -> None:
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        name = " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__
        raise RecipeError(f"{where}: expected {name}, got {type(value).__name__} ({value!r})")


def _check_fields(where: str, data: dict, allowed: dict[str, type], required: tuple[str, ...]) -> None:
    """Unknown, missing and mistyped fields of one mapping, named in the error."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RecipeError(f"{where}: unknown field {unknown[0]!r}; allowed fields: {', '.join(allowed)}")
    for key in required:
        if key not in data:
            raise RecipeError(f"{where}: missing required field {key!r}")
    for key, typ in allowed.items():
        if key in data:
            _check_type(f"{where}: field {key!r}", data[key], typ)


def _resolve_aliases(where: str, data: dict) -> dict:
    """Map alias fields onto their canonical name; both spellings at once is an error."""
    out = dict(data)
    for alias, name in _ALIASES.items():
        if alias in out:
            if name in out:
                raise RecipeError(f"{where}: field {alias!r} is an alias of {name!r}; give only one of them")
            out[name] = out.pop(alias)
    return out


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping. Every problem is a RecipeError naming the field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of recipe fields, got {type(data).__name__}")
    _check_fields(source, data, _TOP_KEYS, ("model", "output"))
    data = _resolve_aliases(source, data)
    scheme = data.get("scheme", "nf4")
    if scheme not in SCHEMES:
        raise RecipeError(f"{source}: field 'scheme': unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    # the k-schemes are made for groups of 32 (bits + 0.5 per weight, as q-schemes at 64)
    block_size = data.get("block_size", K_DEFAULT_GROUP if isinstance(get_scheme(scheme), KAffine) else 64)
    check_spec(scheme, block_size if get_scheme(scheme).block_sizes else None, where=f"{source}: field 'block_size'")
    compute_dtype = data.get("compute_dtype", "bfloat16")
    if compute_dtype not in COMPUTE_DTYPES:
        raise RecipeError(f"{source}: field 'compute_dtype': {compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    overrides = []
    for i, o in enumerate(data.get("overrides", [])):
        where = f"{source}: overrides[{i}]"
        if not isinstance(o, dict):
            raise RecipeError(f"{where}: expected a mapping with 'pattern' and 'scheme'")
        _check_fields(where, o, _OVERRIDE_KEYS, ("pattern", "scheme"))
        o = _resolve_aliases(where, o)
        if o["scheme"] not in SCHEMES:
            raise RecipeError(f"{where}.scheme: unknown scheme {o['scheme']!r}; choose one of {', '.join(SCHEMES)}")
        bs = o.get("block_size", block_size)
        check_spec(o["scheme"], bs if get_scheme(o["scheme"]).block_sizes else None, where=f"{where}.block_size")
        overrides.append(Override(o["pattern"], o["scheme"], o.get("block_size")))
    if not data["output"].strip():
        raise RecipeError(f"{source}: field 'output' is empty; name a directory for the shards")
    if "\0" in data["output"] or "\0" in data["model"]:
        raise RecipeError(f"{source}: fields 'model' and 'output' must not contain NUL characters")
    output = Path(data["output"]).expanduser()
    # the k-schemes' grids come from the importance-weighted fit: imatrix is their default method
    default_method = "imatrix" if isinstance(get_scheme(scheme), KAffine) else "gptq"
    calibration = _calibration(source, data["calibration"], default_method) if "calibration" in data else None
    target = data.get("target_bits_per_weight")
    if target is not None and not MIN_TARGET_BITS <= target <= MAX_TARGET_BITS:
        raise RecipeError(f"{source}: field 'target_bits_per_weight': {target} is outside "
                          f"{MIN_TARGET_BITS}..{MAX_TARGET_BITS} (the candidate schemes' range)")
    tied_head = _tied_head(source, data["tied_head"], block_size) if "tied_head" in data else None
    if calibration is not None and calibration.method == "gptq":
        # GPTQ writes float16 grids; the k-schemes' 6-bit grids are fitted by the importance-weighted fit
        k = [s for s in (scheme, *(o.scheme for o in overrides), *(tied_head or ())[:1])
             if isinstance(get_scheme(s), KAffine)]
        if k:
            raise RecipeError(f"{source}: field 'calibration.method': gptq does not support {k[0]}; "
                              "use method: imatrix or signround (or a q2 ... q8 scheme)")
    return Recipe(
        model=data["model"],
        output=output,
        scheme=scheme,
        block_size=block_size,
        compute_dtype=compute_dtype,
        overrides=tuple(overrides),
        description=data.get("description", ""),
        calibration=calibration,
        target_bits_per_weight=None if target is None else float(target),
        draft=parse_draft(source, data["draft"]) if "draft" in data else None,
        tied_head=tied_head,
    )


def parse_draft(source: str, d: dict) -> DraftSpec:
    where = f"{source}: field 'draft'"
    _check_fields(where, d, _DRAFT_KEYS, ("scheme",))
    d = _resolve_aliases(where, d)
    if d["scheme"] not in DRAFT_SCHEMES:
        raise RecipeError(f"{where}.scheme: {d['scheme']!r} is not a draft scheme; choose one of {', '.join(DRAFT_SCHEMES)}")
    block_size = d.get("block_size", 64)
    check_spec(d["scheme"], block_size if get_scheme(d["scheme"]).block_sizes else None, where=f"{where}.block_size")
    return DraftSpec(d["scheme"], block_size)


def _tied_head(source: str, value: str | dict, block_size: int) -> tuple[str, int | None]:
    """``tied_head: q8`` or ``tied_head: {scheme: q8, group_size: 128}`` -> (scheme, block size or None)."""
    where = f"{source}: field 'tied_head'"
    if isinstance(value, str):
        value = {"scheme": value}
    _check_fields(where, value, _TIED_HEAD_KEYS, ("scheme",))
    value = _resolve_aliases(where, value)
    if value["scheme"] not in SCHEMES:
        raise RecipeError(f"{where}: unknown scheme {value['scheme']!r}; choose one of {', '.join(SCHEMES)}")
    bs = value.get("block_size")
    check_spec(value["scheme"], (bs or block_size) if get_scheme(value["scheme"]).block_sizes else None,
               where=f"{where}.block_size")
    return value["scheme"], bs


def _calibration(source: str, c: dict, default_method: str = "gptq") -> Calibration:
    where = f"{source}: field 'calibration'"
    _check_fields(where, c, _CALIBRATION_KEYS, ("text_file",))
    tokens = c.get("tokens", DEFAULT_CALIBRATION_TOKENS)
    if tokens < 1:
        raise RecipeError(f"{where}.tokens: must be a positive number of tokens, got {tokens}")
    path = Path(c["text_file"]).expanduser()
    if not path.is_file():
        raise RecipeError(f"{where}.text_file: file not found: {path}")
    # a cheap bound before tokenizing: every token covers at least one byte
    if path.stat().st_size < tokens:
        raise RecipeError(f"{where}.text_file: {path} has {path.stat().st_size} bytes, fewer than the "
                          f"{tokens} tokens asked for; use a longer text or fewer tokens")
    method = c.get("method", default_method)
    if method not in CALIBRATION_METHODS:
        raise RecipeError(f"{where}.method: {method!r} is not supported; use one of {', '.join(CALIBRATION_METHODS)}")
    steps = c.get("steps")
    if steps is not None and method != "signround":
        raise RecipeError(f"{where}.steps: only method signround tunes in steps (method is {method})")
    if steps is not None and not 1 <= steps <= MAX_SIGNROUND_STEPS:
        raise RecipeError(f"{where}.steps: must be 1..{MAX_SIGNROUND_STEPS}, got {steps}")
    return Calibration(str(path), tokens, method, steps)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last one silently)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue  # unhashable keys are refused by the schema check later
        if key in seen:
            raise RecipeError(f"{loader.name}: field {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# magic bytes of model files people pass where a recipe belongs
_MODEL_MAGIC = {b"GGUF": "a GGUF model file", b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)"}


def _recipe_text(path: Path) -> str:
    """The recipe's text; binary or non-UTF-8 files are one-line errors."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
    for magic, what in _MODEL_MAGIC.items():
        if raw.startswith(magic):
            raise RecipeError(f"{path} is {what}, not a recipe; write a recipe YAML with `model: {path}` and pass that")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "a recipe is a UTF-8 YAML file") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = _recipe_text(path)
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse_recipe(data, source=str(path))
