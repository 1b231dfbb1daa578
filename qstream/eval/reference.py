"""The bitsandbytes NF4 reference: every linear weight of an uncompressed shard
directory (except lm_head) rounded through bitsandbytes' NF4 at block size 64, and
that model's perplexity: the quality bar qstream's own NF4 is held to."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from ..errors import EvalError
from ..generate import load_tokenizer
from ..runtime.build import resolve_device
from ..runtime.twin import dense_twin
from ..store.manifest import read_manifest
from .data import check_window_args, is_ids, tokenize_corpus
from .perplexity import perplexity_reference

UNCOMPRESSED_SCHEMES = ("bf16", "fp16", "fp32")


def _linear_schemes(manifest) -> set[str]:
    out = set()
    for f in manifest.files:
        for name, meta in f.tensors.items():
            if len(meta["shape"]) == 2 and f.kind in ("layer", "head") and name.endswith(".weight"):
                out.add(meta["scheme"])
    return out


def bnb_nf4_round_trip(w: torch.Tensor, *, blocksize: int = 64) -> torch.Tensor:
    """w through bitsandbytes' NF4 (quantize_4bit, blocks of ``blocksize``) and back, in w's dtype.
    Dequantized flat: bitsandbytes 0.50's CPU kernel garbles 2-D shapes whose last dimension is
    not a multiple of 128; blockwise quantization runs on the flattened tensor either way."""
    import bitsandbytes.functional as bnbF

    q, state = bnbF.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type="nf4")
    state.shape = torch.Size([w.numel()])
    return bnbF.dequantize_4bit(q, state).view(w.shape).to(w.dtype)


@torch.no_grad()
def bnb_nf4_quantize_(model: torch.nn.Module, *, blocksize: int = 64, skip: Iterable[str] = ("lm_head",)) -> int:
    """Round every nn.Linear weight of ``model`` (except modules named in ``skip``) through
    bitsandbytes NF4, in place. Returns how many weights it rounded."""
    skip = set(skip)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip:
            mod.weight = torch.nn.Parameter(bnb_nf4_round_trip(mod.weight.data, blocksize=blocksize), requires_grad=False)
            n += 1
    return n


def bnb_nf4_reference(path: str | Path, data, *, context: int, stride: int | None = None, limit: int | None = None,
                      device: str = "auto", progress: bool = True, blocksize: int = 64) -> dict:
    """Perplexity of an uncompressed shard directory's dense twin with every linear weight except
    lm_head rounded through bitsandbytes NF4 (blocks of 64), and of the unrounded twin (the
    baseline the reference delta is taken against), in the directory's compute dtype."""
    m = read_manifest(path)
    schemes = _linear_schemes(m)
    if not schemes <= set(UNCOMPRESSED_SCHEMES):
        raise EvalError(f"--bnb-nf4-reference needs an uncompressed shard directory (bf16/fp16/fp32 weights); {path} holds "
                        f"{', '.join(sorted(schemes - set(UNCOMPRESSED_SCHEMES)))} weights: pass the bf16 or fp32 shards")
    stride = context if stride is None else stride
    check_window_args(context, stride, m.max_positions, where=f" of {path}")
    tok = None if isinstance(data, torch.Tensor) or is_ids(data) else load_tokenizer(path)
    ids = tokenize_corpus(data, tok)
    twin = dense_twin(path, device=str(resolve_device(device)))
    base = perplexity_reference(twin, ids, context=context, stride=stride, limit=limit, progress=progress)
    n = bnb_nf4_quantize_(twin, blocksize=blocksize)
    ref = perplexity_reference(twin, ids, context=context, stride=stride, limit=limit, progress=progress)
    ref["baseline_perplexity"] = base["perplexity"]
    ref["baseline_nll_per_token"] = base["nll_per_token"]
    ref["delta"] = ref["perplexity"] - base["perplexity"]
    ref["delta_rel"] = ref["delta"] / base["perplexity"]
    ref["quantized_linears"] = n
    ref["blocksize"] = blocksize
    ref["method"] = ("dense twin (transformers) of the uncompressed shards; every nn.Linear except lm_head rounded through "
                     f"bitsandbytes.functional.quantize_4bit(w, blocksize={blocksize}, quant_type='nf4') and dequantize_4bit")
    return ref

