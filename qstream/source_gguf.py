"""GGUF sources: the weights transformers would load from a GGUF file, one tensor at a time.

llama.cpp stores each architecture with its own conventions (Llama q/k rows permuted,
Gemma RMSNorm weights with +1 folded in, GPT-2 linears transposed, ...). transformers'
GGUF loader undoes them per architecture with its ``TensorProcessor`` classes and maps
names with gguf's ``TensorNameMap``; but ``load_gguf_checkpoint(return_tensors=True)``
dequantizes the whole file into RAM. This module reuses the same config conversion,
name map and processors, and runs them for one tensor when the shard pipeline asks for
it, so a 70B file shards in the memory of about two layers.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arch import meta_skeleton
from .errors import SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Tensor:
    """Where one GGUF tensor lives: absolute byte offset, size, ggml type, shape in torch order."""

    name: str
    offset: int
    nbytes: int
    ggml_type: int
    shape: tuple[int, ...]


def _tensor_table(path: Path) -> tuple[str, dict[str, _Tensor]]:
    """(general.architecture, {gguf name: _Tensor}) without touching tensor data.

    transformers >= 5.2x ships a reader that parses only the header (10 ms for SmolLM2);
    gguf's GGUFReader also parses every tokenizer string (2-3 s), so it is the fallback."""
    try:
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:
        GgufHeader = None
    if GgufHeader is not None:
        try:
            h = GgufHeader.from_file(str(path))
        except ValueError as e:
            # transformers' header reader refuses tensor types its own dequantizer lacks (Q5_0 in 5.24);
            # qstream dequantizes with the gguf package, which has them: read the header with gguf's reader
            if "not supported yet" not in str(e):
                raise
        else:
            return h.architecture, {t.name: _Tensor(t.name, h.data_start + t.offset, t.nbytes, t.ggml_type,
                                                    tuple(t.shape)) for t in h.tensors}
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    return arch, {t.name: _Tensor(t.name, int(t.data_offset), int(t.n_bytes), int(t.tensor_type),
                                  tuple(int(x) for x in reversed(t.shape))) for t in r.tensors}


def _dequantize(path: Path, t: _Tensor) -> np.ndarray:
    """float32 array of shape t.shape, as gguf.dequantize gives transformers.

    The tensor's bytes are mapped for this call only: pages of a map kept open for the whole
    run would count as resident memory until the end (the safetensors reader does the same)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType(t.ggml_type)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    row_bytes = t.shape[-1] // block_elems * block_bytes
    raw = np.memmap(path, mode="r", dtype=np.uint8, offset=t.offset, shape=(t.nbytes,))
    return np.asarray(dequantize(raw.reshape(*t.shape[:-1], row_bytes), qtype), dtype=np.float32).reshape(t.shape)


@contextlib.contextmanager
def _one_name_map():
    """Build gguf's TensorNameMap once per (arch, layers) while transformers maps names.

    ``get_gguf_hf_weights_map`` recurses into every submodule and rebuilds the map each time
    (397 builds, 7 s for SmolLM2's 30 layers; it grows with layers x modules). The map is a
    pure function of its arguments, so caching it keeps transformers' exact mapping logic.
    transformers imports the function from the gguf module at call time, so the cache is
    installed there, for the duration of this call only."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


# one function on purpose: transformers' GGUF reader state (name map, processor) is set up and used here
def gguf_parts(path: Path) -> dict[str, Any]:
    """Everything a GGUF Source needs: config, model skeleton, names, shapes, and read()."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SourceError("reading GGUF files needs the gguf package: pip install gguf") from None
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)

    try:
        arch, table = _tensor_table(path)
    except (ValueError, KeyError, OSError, struct.error) as e:  # bad magic, truncated header, unknown ggml type
        raise SourceError(f"{path}: cannot read as GGUF ({type(e).__name__}: {e})") from None
    end = max((t.offset + t.nbytes for t in table.values()), default=0)
    if end > path.stat().st_size:
        raise SourceError(f"{path}: cannot read as GGUF (truncated: the tensors end at byte {end}, "
                          f"the file has {path.stat().st_size}); download it again")
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:
        GGUF_CONFIG_ARCHS = {}
    if arch in GGUF_CONFIG_ARCHS:
        # these go through transformers' newer WeightConverter loader, not the TensorProcessors
        raise SourceError(f"{path}: GGUF architecture {arch!r} loads through transformers' new GGUF converter, "
                          "which qstream does not read yet; convert it to safetensors (save_pretrained) and shard that")
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:  # "GGUF model with architecture X is not supported yet."
        raise SourceError(f"{path}: transformers cannot load this GGUF ({str(e).splitlines()[0]})") from None
    cfg = dict(parsed["config"])
    try:
        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    except (ValueError, KeyError) as e:
        raise SourceError(f"{path}: transformers cannot build a config for GGUF architecture {arch!r} "
                          f"({str(e).splitlines()[0]})") from None
    skeleton = meta_skeleton(config, str(path))
    # keyed by the file's own general.architecture, exactly as load_gguf_checkpoint does
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg)
    try:
        with _one_name_map():
            gguf_to_hf = get_gguf_hf_weights_map(skeleton, processor)
    except NotImplementedError as e:  # gguf-py has no tensor-name map for this model type
        raise SourceError(f"{path}: transformers cannot load GGUF architecture {config.model_type!r} "
                          f"({str(e).splitlines()[0]})") from None

    # which GGUF tensors make each transformers tensor: usually one; MoE processors fuse
    # ffn_gate_exps + ffn_up_exps into one gate_up_proj, keyed without the '.weight' suffix
    sources: dict[str, list[str]] = {}
    for g in table:
        hf = gguf_to_hf.get(g) or gguf_to_hf.get(g.removesuffix(".weight"))
        if hf is None:
            log.info("%s: GGUF tensor %s has no transformers parameter; skipped (as transformers does)", path.name, g)
            continue
        sources.setdefault(hf, []).append(g)

    def read(name: str) -> torch.Tensor:
        # a fresh parsed_parameters per tensor: processors that assemble a tensor (MoE, GPT-2's
        # output) write into it; nothing else is kept, so RAM stays at one tensor
        state = {"config": cfg, "tensors": {}}
        for g in sources[name]:
            res = processor.process(weights=_dequantize(path, table[g]), name=g, tensor_key_mapping=gguf_to_hf,
                                    parsed_parameters=state)
            if res.name is not None and res.name in gguf_to_hf:
                # a copy: the weights may still be a view of the file's read-only map
                state["tensors"][gguf_to_hf[res.name]] = torch.from_numpy(np.array(res.weights, dtype=np.float32))
        t = state["tensors"].get(name)
        if t is None or tuple(t.shape) != expected[name]:
            got = None if t is None else tuple(t.shape)
            raise SourceError(f"{path}: transformers' {type(processor).__name__} made {name!r} with shape {got}, "
                              f"the model needs {expected[name]}")
        return t.float()

    expected = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    return {"config": config, "skeleton": skeleton, "names": list(sources), "read": read}


def save_gguf_tokenizer(path: Path, out: Path) -> list[str]:
    """The tokenizer transformers builds from the GGUF metadata, saved as HF files."""
    from transformers import AutoTokenizer

    before = {p.name for p in out.iterdir()}
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as e:
        raise SourceError(f"{path}: transformers cannot build a tokenizer from this GGUF ({str(e).splitlines()[0]})") from None
    tok.save_pretrained(out)
    return sorted(p.name for p in out.iterdir() if p.name not in before and not p.name.startswith("."))
