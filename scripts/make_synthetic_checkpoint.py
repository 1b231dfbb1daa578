#!/usr/bin/env python3
"""Write a random-weight Hugging Face Llama checkpoint of a real model's shape.

The output directory looks like a downloaded Llama 3 repository: sharded
``model-0000K-of-0000N.safetensors`` files with a ``model.safetensors.index.json``,
``config.json``, ``generation_config.json`` and a fast tokenizer (``tokenizer.json`` +
``tokenizer_config.json``) whose vocabulary size equals the model's. It loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``,
and so with any tool that reads Hugging Face checkpoints (qstream, airllm, ...).

Weights are written one tensor at a time straight into the safetensors files (the header
is computed up front from the shapes), so peak RAM is one tensor, never the whole model,
whatever the shape. Every tensor is seeded from ``--seed`` and its own name, so the first
N layers of a checkpoint are identical whatever ``--layers`` and ``--shard-size-gb`` were.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process on a small
built-in English text and padded with unused filler tokens up to the model vocabulary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# name: (layers, hidden, intermediate, heads, kv_heads, vocab, max_pos, rope_theta, slice_of)
SHAPES = {
    "llama3-8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                      vocab=128256, max_pos=8192, rope_theta=500000.0, slice_of=None),
    "llama3-70b-slice": dict(layers=None, hidden=8192, intermediate=28672, heads=64, kv_heads=8,
                             vocab=128256, max_pos=8192, rope_theta=500000.0, slice_of=80),
    "tiny": dict(layers=2, hidden=64, intermediate=192, heads=4, kv_heads=2,
                 vocab=1024, max_pos=2048, rope_theta=500000.0, slice_of=None),
}

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
DTYPE_NAME = "BF16"  # safetensors dtype tag
DTYPE_BYTES = 2
GB = 10 ** 9

# A small built-in English corpus to train the BPE merges on (any text round-trips anyway:
# the tokenizer is byte-level, these merges only make common English words short).
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Large language models are trained on vast amounts of text, and they predict the next token in a sequence.
When the model does not fit in the memory of the graphics card, its layers can be streamed from disk one at a time.
Each layer is loaded, used for the forward pass, and then released so that the next layer can take its place.
This is slower than keeping everything resident, but it makes it possible to run very large models on small machines.
Quantization stores the weights in fewer bits, for example four bits per weight instead of sixteen, with a small loss of accuracy.
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.
In 1969, two astronauts walked on the Moon while a third orbited above them in the command module.
She opened the window, looked at the garden, and said that the weather would be fine for the rest of the week.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and 2048 appear in many documents.
Please answer the following question: what is the sum of two and three? The answer is five.
Once upon a time there was a little village at the edge of a great forest, where the people lived simply and happily.
Researchers measure throughput in tokens per second and latency in milliseconds for the first token.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
The committee will meet on Monday, Tuesday and Friday; the report is due at the end of the month.
Good morning! How are you today? I am fine, thank you, and I hope that you are well too.
Science, history, mathematics, music, art, language, and sport are all taught at the school.
The function returns a list of integers, and the caller sums them before printing the result.
"""


# ----------------------------------------------------------------------------------------------
# Plan: every tensor, its shape, the file it goes to
# ----------------------------------------------------------------------------------------------

@dataclass
class TensorSpec:
    name: str
    shape: tuple
    init: str  # "normal" or "ones"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES


@dataclass
class ShardPlan:
    filename: str = ""
    tensors: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def model_units(dims: dict) -> list[list[TensorSpec]]:
    """Tensors grouped by module (the units airllm-style splitters stream): embed, layers, norm, head."""
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    hd = h // dims["heads"]
    q_out, kv_out = dims["heads"] * hd, dims["kv_heads"] * hd
    units = [[TensorSpec("model.embed_tokens.weight", (v, h), "normal")]]
    for n in range(dims["layers"]):
        p = f"model.layers.{n}."
        units.append([
            TensorSpec(p + "self_attn.q_proj.weight", (q_out, h), "normal"),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_out, h), "normal"),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_out, h), "normal"),
            TensorSpec(p + "self_attn.o_proj.weight", (h, q_out), "normal"),
            TensorSpec(p + "mlp.gate_proj.weight", (i, h), "normal"),
            TensorSpec(p + "mlp.up_proj.weight", (i, h), "normal"),
            TensorSpec(p + "mlp.down_proj.weight", (h, i), "normal"),
            TensorSpec(p + "input_layernorm.weight", (h,), "ones"),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), "ones"),
        ])
    units.append([TensorSpec("model.norm.weight", (h,), "ones")])
    units.append([TensorSpec("lm_head.weight", (v, h), "normal")])
    return units


def plan_shards(units: list[list[TensorSpec]], shard_bytes: float) -> list[ShardPlan]:
    """Pack whole modules greedily into files of at most shard_bytes (a bigger module gets its own)."""
    shards: list[ShardPlan] = [ShardPlan()]
    for unit in units:
        size = sum(t.nbytes for t in unit)
        cur = shards[-1]
        if cur.tensors and cur.nbytes + size > shard_bytes:
            cur = ShardPlan()
            shards.append(cur)
        cur.tensors.extend(unit)
    n = len(shards)
    for k, s in enumerate(shards, 1):
        s.filename = f"model-{k:05d}-of-{n:05d}.safetensors"
    return shards


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def tensor_seed(seed: int, name: str, chunk: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{name}#{chunk}".encode())) % (2 ** 63)


CHUNK_ELEMS = 1 << 22  # rows are drawn in chunks of ~4M values, each from its own seeded generator
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    return _POOL


def make_tensor(spec: TensorSpec, seed: int, std: float):
    """bf16 tensor ~ N(0, std^2) (or ones for norms); same bytes for the same (seed, name).

    torch's CPU normal_ is single-threaded, so a matrix is filled in fixed row chunks on a
    thread pool (torch releases the GIL): the chunking depends on the shape only, never on the
    number of cores, so the output is identical on every machine.
    """
    import torch

    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    t = torch.empty(spec.shape, dtype=torch.bfloat16)
    rows = t.view(spec.shape[0], -1)
    step = max(1, CHUNK_ELEMS // rows.shape[1])

    def fill(k: int) -> None:
        g = torch.Generator().manual_seed(tensor_seed(seed, spec.name, k))
        # normal_ straight into the bf16 buffer: no fp32 copy, faster than randn(...).mul_(std)
        rows[k * step:(k + 1) * step].normal_(0.0, std, generator=g)

    list(_pool().map(fill, range(math.ceil(rows.shape[0] / step))))
    return t


def safetensors_header(shard: ShardPlan) -> bytes:
    header = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": DTYPE_NAME, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, shard: ShardPlan, seed: int, std: float, bar) -> None:
    import torch

    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(safetensors_header(shard))
        for spec in shard.tensors:
            t = make_tensor(spec, seed, std)
            # raw little-endian bf16 bytes, written from the tensor's own buffer (no copy)
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t
            bar.update(spec.nbytes)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Config, generation config, tokenizer
# ----------------------------------------------------------------------------------------------

def special_tokens(vocab: int) -> list[str]:
    n = 256 if vocab >= 32768 else 8  # Llama 3 reserves the last 256 ids (bos=128000, eos=128001)
    return [BOS, EOS] + [f"<|reserved_special_token_{k}|>" for k in range(n - 2)]


def write_config(out: Path, dims: dict, shape: str, seed: int, std: float) -> None:
    from transformers import GenerationConfig, LlamaConfig

    specials = special_tokens(dims["vocab"])
    bos_id = dims["vocab"] - len(specials)
    eos_id = bos_id + 1
    extra = {"qstream_synthetic": {"shape": shape, "seed": seed, "std": std}}
    if dims["slice_of"] is not None:
        extra["qstream_slice_of_layers"] = dims["slice_of"]
    cfg = LlamaConfig(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        head_dim=dims["hidden"] // dims["heads"],
        max_position_embeddings=dims["max_pos"],
        rope_theta=dims["rope_theta"],
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
        **extra,
    )
    cfg.to_json_file(str(out / "config.json"))
    # Older readers (transformers 4.x, plain-JSON tools) want the flat keys too; transformers 5
    # reads rope_parameters and ignores/merges the legacy ones.
    data = json.loads((out / "config.json").read_text())
    data.setdefault("rope_theta", dims["rope_theta"])
    data.setdefault("torch_dtype", "bfloat16")
    data.setdefault("dtype", "bfloat16")
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, do_sample=False).save_pretrained(str(out))


def build_tokenizer(vocab_size: int, max_pos: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(vocab_size)
    n_regular = vocab_size - len(specials)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_regular < len(alphabet):
        raise SystemExit(f"vocab {vocab_size} is too small: need at least {len(alphabet) + len(specials)}")

    # 1) learn merges on the built-in text (deterministic), capped so fillers keep ids stable
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=min(n_regular, 2048), min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    trainer_tok.train_from_iterator(CORPUS.splitlines(), trainer)
    model_json = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(model_json["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model_json["merges"]]

    # 2) pad with never-produced filler tokens up to the regular vocab, then specials on top
    for k in range(len(vocab), n_regular):
        vocab[f"<|filler_{k}|>"] = k
    assert len(vocab) == n_regular and max(vocab.values()) == n_regular - 1

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size, tok.get_vocab_size()
    assert bos_id == n_regular and tok.token_to_id(EOS) == n_regular + 1

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   model_max_length=max_pos, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------

def verify(out: Path, dims: dict, full_load_limit: int) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(out))
    assert cfg.num_hidden_layers == dims["layers"] and cfg.vocab_size == dims["vocab"], cfg
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = {t.name: t.shape for u in model_units(dims) for t in u}
    assert set(index["weight_map"]) == set(expected), "index weight_map does not match the model"
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / fname), framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == fname, k
                assert tuple(f.get_slice(k).get_shape()) == expected[k], k

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == dims["vocab"], (len(tok), dims["vocab"])
    text = "The quick brown fox jumps over the lazy dog, and 42 zebras say: héllo wörld!"
    ids = tok(text)["input_ids"]
    back = tok.decode(ids, skip_special_tokens=True)
    assert ids[0] == cfg.bos_token_id and back == text, (ids, back)
    print(f"verify: config, index ({len(index['weight_map'])} tensors), shard headers, tokenizer "
          f"round-trip ok ({len(text)} chars -> {len(ids)} tokens)")

    total = index["metadata"]["total_size"]
    if total <= full_load_limit:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), dims["vocab"]) and torch.isfinite(logits).all()
        print(f"verify: AutoModelForCausalLM loaded ({model.num_parameters():,} params), "
              f"forward logits {tuple(logits.shape)} finite")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 2**20:.1f} MiB"


def shape_table() -> str:
    rows = []
    for name, d in SHAPES.items():
        per_layer = model_units({**d, "layers": 1})[1]
        lb = sum(t.nbytes for t in per_layer)
        eb = 2 * d["vocab"] * d["hidden"] * DTYPE_BYTES
        nl = d["layers"] if d["layers"] is not None else "N (required)"
        rows.append(f"  {name:17s} layers={nl}, hidden={d['hidden']}, intermediate={d['intermediate']}, "
                    f"heads={d['heads']}/{d['kv_heads']} kv, vocab={d['vocab']}: "
                    f"{human(lb)} per layer + {human(eb)} embed+lm_head")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="make_synthetic_checkpoint.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + "\nShapes (all bf16, untied embeddings, rope_theta 500000, SiLU MLP):\n"
        + shape_table()
        + "\n\n  llama3-70b-slice is N of Llama-3-70B's 80 layers; config.json records"
        "\n  \"qstream_slice_of_layers\": 80 so tools can scale timings to the full model.",
        epilog="""examples:
  %(prog)s --shape tiny --out /tmp/tiny-llama
  %(prog)s --shape llama3-8b --out /data/llama3-8b-random              # 16.1 GB, 32 layers
  %(prog)s --shape llama3-8b --layers 2 --out /tmp/l8b-2               #  2.97 GB
  %(prog)s --shape llama3-70b-slice --layers 4 --out /data/l70b-4of80  # 11.05 GB
  %(prog)s --shape llama3-8b --shard-size-gb 0 --out DIR   # one file per module (airllm can hard-link)

Weights: every matrix ~ N(0, std^2) (default std 0.02), RMSNorm weights = 1, drawn per tensor
from a generator seeded by (--seed, tensor name). Special tokens: the last 256 ids of a 128256
vocab (bos 128000 <|begin_of_text|>, eos 128001 <|end_of_text|>, as in Llama 3); the tokenizer
prepends bos. Random weights can emit eos at any step: benchmarks should set min_new_tokens.""",
    )
    p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="model shape to imitate")
    p.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of decoder layers (overrides the shape's; required for llama3-70b-slice)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed -> same bytes")
    p.add_argument("--std", type=float, default=0.02, help="std of the normal weights (default 0.02)")
    p.add_argument("--shard-size-gb", type=float, default=2.0,
                   help="max size of one safetensors file in GB (10^9 bytes; default 2). Whole modules "
                        "(embed, each layer, norm, lm_head) are never split; a module bigger than this "
                        "gets a file of its own, and 0 means one file per module")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out: removes its old model-*.safetensors, index, "
                        "and splitted_model* folders (airllm's splits of a previous checkpoint)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the final check (reload config/index/headers/tokenizer; a full "
                        "AutoModelForCausalLM load + forward when the checkpoint is under 1 GB)")
    p.add_argument("--skip-space-check", action="store_true", help="do not check free disk space first")
    args = p.parse_args(argv)

    dims = dict(SHAPES[args.shape])
    if args.layers is not None:
        dims["layers"] = args.layers
    if dims["layers"] is None:
        p.error(f"--shape {args.shape} needs --layers N (how many of its {dims['slice_of']} layers to write)")
    if dims["layers"] < 1:
        p.error("--layers must be >= 1")
    if dims["slice_of"] is not None and dims["layers"] > dims["slice_of"]:
        p.error(f"--layers {dims['layers']} is more than the {dims['slice_of']} layers of the full model")
    if args.shard_size_gb < 0 or args.std <= 0:
        p.error("--shard-size-gb must be >= 0 and --std > 0")
    return args, dims


def prepare_out(out: Path, force: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = [q for q in out.iterdir()]
    if not existing:
        return
    if not force:
        raise SystemExit(f"{out} is not empty ({len(existing)} entries); pass --force to overwrite the checkpoint in it")
    for q in existing:
        if q.is_file() and ((q.name.startswith("model-") and ".safetensors" in q.name)
                            or q.name in ("model.safetensors", "model.safetensors.index.json")):
            q.unlink()
        elif q.is_dir() and (q.name == "splitted_model" or q.name.startswith("splitted_model.")):
            shutil.rmtree(q)


def main(argv=None) -> int:
    args, dims = parse_args(argv)
    out: Path = args.out
    from tqdm import tqdm

    units = model_units(dims)
    shards = plan_shards(units, args.shard_size_gb * GB)
    total = sum(s.nbytes for s in shards)
    n_params = total // DTYPE_BYTES
    print(f"{args.shape}: {dims['layers']} layers, {n_params:,} params, {human(total)} in "
          f"{len(shards)} file(s) -> {out}", flush=True)

    if not args.skip_space_check:
        probe = out.resolve()
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if out.exists():  # an overwritten checkpoint gives its space back
            free += sum(q.stat().st_size for q in out.glob("model-*.safetensors"))
        if free < total + 64 * 2**20:
            raise SystemExit(f"not enough disk space under {probe}: need {human(total)}, "
                             f"{human(free)} free (--skip-space-check to try anyway)")
    prepare_out(out, args.force)

    t0 = time.time()
    write_config(out, dims, args.shape, args.seed, args.std)
    build_tokenizer(dims["vocab"], dims["max_pos"]).save_pretrained(str(out))
    # transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x does not know; the
    # PreTrainedTokenizerFast name loads the same tokenizer.json on both.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")

    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="weights",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for s in shards:
            bar.set_postfix_str(s.filename, refresh=False)
            write_shard(out / s.filename, s, args.seed, args.std, bar)

    # written last: a half-written checkpoint has no index and fails to load loudly
    index = {"metadata": {"total_size": total, "total_parameters": n_params},
             "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}
    tmp = out / "model.safetensors.index.json.partial"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / "model.safetensors.index.json")
    dt = time.time() - t0
    print(f"wrote {human(total)} in {dt:.1f}s ({total / max(dt, 1e-9) / GB:.2f} GB/s)", flush=True)

    if not args.no_verify:
        verify(out, dims, full_load_limit=1 * GB)
    return 0


if __name__ == "__main__":
    sys.exit(main())
