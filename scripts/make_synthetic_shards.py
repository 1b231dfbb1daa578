#!/usr/bin/env python3
"""Write a qstream nf4 shard directory of a real model's shape with random codes, directly.

For speed benchmarks only: `make_synthetic_checkpoint.py` + `qstream shard` make the same
layout through a 16 GB bf16 checkpoint and a quantization pass (minutes of a lent GPU);
this writes the shards themselves (random 4-bit codes, random absmax, bf16 embeddings and
head as the benchmark recipe stores them, the same byte-level tokenizer) in seconds.
The directory passes `qstream verify` and loads with `qstream.load`; its tokens are noise.

    python3 scripts/make_synthetic_shards.py --shape llama3-8b --out /tmp/qs/l8b-nf4
    python3 scripts/make_synthetic_shards.py --shape llama3-70b-slice --layers 6 --out /tmp/qs/l70b6-nf4

--scheme q4 --block-size 64 (or q4k --block-size 32, any q-scheme) writes the decoder layers in that
fitted-affine layout instead of nf4 (random codes, a grid spanning about +-2.4 std).

--draft-scheme q2 (q3, q4, nf4) --draft-block-size 128 also writes the in-directory speculative
draft (draft_NNN.safetensors, qstream/shard_draft.py): random codes of that scheme for every
decoder-layer linear, norms as the layer stores them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_synthetic_checkpoint as msc  # noqa: E402  (shapes, config and tokenizer of the checkpoint script)

from qstream import __version__  # noqa: E402
from qstream.recipe import parse_recipe  # noqa: E402
from qstream.store.files import atomic_write_bytes  # noqa: E402
from qstream.store.manifest import FileEntry, write_manifest  # noqa: E402
from qstream.store.tensors import pack_stored, save_bytes  # noqa: E402

BLOCK = 64  # nf4 block size of the benchmark recipe (scripts/llama3-8b-synthetic-nf4.yaml)
STD = 0.02  # weight std of the checkpoint script; nf4 absmax of N(0, std) blocks of 64 is ~2.4 std


def _dev() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gen(seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device=_dev())
    g.manual_seed(msc.tensor_seed(seed, name))
    return g


def nf4_tensor(name: str, shape: tuple, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    numel = math.prod(shape)
    g = _gen(seed, name)
    codes = torch.randint(0, 256, (numel // 2, 1), dtype=torch.uint8, device=_dev(), generator=g).cpu()
    absmax = (torch.rand(numel // BLOCK, device=_dev(), generator=g) * STD + 2 * STD).cpu()
    keyed, stored = pack_stored(name, {"": codes, "absmax": absmax})
    return keyed, {"scheme": "nf4", "shape": list(shape), "dtype": "bfloat16", "block_size": BLOCK, "stored": stored}


def bf16_tensor(name: str, shape: tuple, init: str, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    if init == "ones":
        t = torch.ones(shape, dtype=torch.bfloat16)
    else:
        t = (torch.randn(shape, device=_dev(), generator=_gen(seed, name), dtype=torch.float32) * STD).bfloat16().cpu()
    keyed, stored = pack_stored(name, {"": t})
    return keyed, {"scheme": "bf16", "shape": list(shape), "dtype": "bfloat16", "stored": stored}


def affine_tensor(name: str, shape: tuple, seed: int, bits: int, group: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Random codes of a fitted-affine scheme (quant/affine.py's layout): a grid spanning about +-2.4 std."""
    from qstream.quant import bitpack

    rows, cols = shape
    if cols % group:  # the real quantizer pads such rows; random codes of a padded layout are not worth it here
        raise SystemExit(f"{name}: {cols} columns are not a multiple of the draft group size {group}")
    g = _gen(seed, name + ".draft")
    codes = torch.randint(0, 1 << bits, (rows * cols,), dtype=torch.uint8, device=_dev(), generator=g)
    scale = torch.full((rows, cols // group), 4.8 * STD / ((1 << bits) - 1), dtype=torch.float16)
    low = torch.full((rows, cols // group), -2.4 * STD, dtype=torch.float16)
    keyed, stored = pack_stored(name, {"": bitpack.pack(codes, bits).cpu(), "scale": scale, "min": low})
    return keyed, {"scheme": f"q{bits}", "shape": list(shape), "dtype": "bfloat16", "block_size": group, "stored": stored}


def k_tensor(name: str, shape: tuple, seed: int, bits: int, group: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Random codes of a k-scheme (quant/kquant.py's layout): 6-bit scale codes 63 and min codes 63 under
    super-block d and dmin that make the same +-2.4 std grid as affine_tensor."""
    from qstream.quant import bitpack
    from qstream.quant.kquant import GRID_BITS, super_layout

    rows, cols = shape
    if cols % group or (rows * cols // group) % 8:
        raise SystemExit(f"{name}: {shape} does not split into whole groups of {group} (and bytes of grid codes)")
    g = _gen(seed, name)
    codes = torch.randint(0, 1 << bits, (rows * cols,), dtype=torch.uint8, device=_dev(), generator=g)
    n = rows * cols // group
    grid = torch.full((2 * n,), 63, dtype=torch.uint8, device=_dev())
    nsb = super_layout(cols // group)[0]
    d = torch.full((rows, nsb), 4.8 * STD / ((1 << bits) - 1) / 63, dtype=torch.float16)
    dmin = torch.full((rows, nsb), 2.4 * STD / 63, dtype=torch.float16)
    keyed, stored = pack_stored(name, {"": bitpack.pack(codes, bits).cpu(), "grid": bitpack.pack(grid, GRID_BITS).cpu(),
                                       "d": d, "dmin": dmin})
    return keyed, {"scheme": f"q{bits}k", "shape": list(shape), "dtype": "bfloat16", "block_size": group, "stored": stored}


def draft_tensor(name: str, shape: tuple, seed: int, scheme: str, group: int):
    if scheme == "nf4":
        return nf4_tensor(name, shape, seed + 1)
    if scheme.endswith("k"):
        return k_tensor(name, shape, seed, int(scheme[1:-1]), group)
    return affine_tensor(name, shape, seed, int(scheme[1:]), group)


def layer_tensor(name: str, shape: tuple, seed: int, scheme: str, group: int):
    """A decoder-layer linear in the benchmark's layer scheme (nf4 by default)."""
    if scheme == "nf4":
        return nf4_tensor(name, shape, seed)
    if scheme.endswith("k"):
        return k_tensor(name, shape, seed, int(scheme[1:-1]), group)
    return affine_tensor(name, shape, seed, int(scheme[1:]), group)


def write_unit(out: Path, fname: str, kind: str, index: int | None, specs: list, seed: int,
               draft: tuple[str, int] | None = None, layer: tuple[str, int] = ("nf4", BLOCK)) -> FileEntry:
    tensors, metas = {}, {}
    for s in specs:
        quantize = kind in ("layer", "draft") and len(s.shape) == 2
        if quantize and draft is not None:
            keyed, metas[s.name] = draft_tensor(s.name, s.shape, seed, *draft)
        else:
            keyed, metas[s.name] = (layer_tensor(s.name, s.shape, seed, *layer) if quantize
                                    else bf16_tensor(s.name, s.shape, s.init, seed))
        tensors.update(keyed)
    data = save_bytes(tensors, {"qstream": json.dumps(metas, sort_keys=True)})
    atomic_write_bytes(out / fname, data)
    return FileEntry(fname, kind, index, len(data), hashlib.sha256(data).hexdigest(), metas)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(msc.SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, help="decoder layers (required for llama3-70b-slice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheme", default="nf4", help="decoder layers: nf4 (default) or a q-scheme (q4, q4k, ...)")
    ap.add_argument("--block-size", type=int, default=BLOCK, help="group size of --scheme (default 64)")
    ap.add_argument("--draft-scheme", choices=["q2", "q3", "q4", "nf4"], help="also write an in-directory draft")
    ap.add_argument("--draft-block-size", type=int, default=64, help="group size of the draft (default 64)")
    a = ap.parse_args(argv)
    dims = dict(msc.SHAPES[a.shape])
    if a.layers:
        dims["layers"] = a.layers
    if not dims["layers"]:
        ap.error("--layers is required for this shape")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:  # config + tokenizer exactly as the checkpoint script writes them
        msc.write_config(Path(tmp), dims, a.shape, a.seed, STD)
        config = json.loads((Path(tmp) / "config.json").read_text())
        tok = msc.build_tokenizer(dims["vocab"], dims["max_pos"])
        tok.save_pretrained(str(out))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    tok_files = sorted(p.name for p in out.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))

    units = msc.model_units(dims)
    embed, layers, norm, head = units[0], units[1:-2], units[-2], units[-1]
    entries = [write_unit(out, "embed.safetensors", "embed", None, embed, a.seed)]
    for i, specs in enumerate(layers):
        entries.append(write_unit(out, f"layer_{i:03d}.safetensors", "layer", i, specs, a.seed, layer=(a.scheme, a.block_size)))
    entries.append(write_unit(out, "head.safetensors", "head", None, norm + head, a.seed))
    fields = {}
    if a.draft_scheme:
        draft = (a.draft_scheme, BLOCK if a.draft_scheme == "nf4" else a.draft_block_size)
        for i, specs in enumerate(layers):
            entries.append(write_unit(out, f"draft_{i:03d}.safetensors", "draft", i, specs, a.seed, draft))
        fields["draft"] = {"scheme": a.draft_scheme, "block_size": draft[1]}

    recipe = parse_recipe({"model": f"synthetic:{a.shape}", "output": str(out), "scheme": a.scheme, "block_size": a.block_size,
                           "overrides": [{"pattern": "lm_head", "scheme": "bf16"}], **fields})
    dense = sum(2 * math.prod(s.shape) for u in units for s in u)
    write_manifest(out, version=__version__,
                   fingerprint=f"synthetic-{a.shape}-{dims['layers']}-{a.seed}-{a.scheme}{a.block_size}" + (f"-draft-{a.draft_scheme}" if a.draft_scheme else ""),
                   source=f"random {a.scheme} codes of {a.shape} ({dims['layers']} layers), scripts/make_synthetic_shards.py",
                   config=config, recipe=recipe.to_dict(), compute_dtype="bfloat16", layers_prefix="model.layers",
                   tied_head=False, source_bytes=dense, dense_bytes=dense, files=entries, tokenizer_files=tok_files)
    total = sum(e.size for e in entries)
    print(f"wrote {len(entries)} shard files, {total / 2**30:.2f} GiB, to {out} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
