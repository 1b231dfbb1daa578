"""Compression quality of qstream's schemes on one model: shard it once per scheme, then
measure perplexity on the SAME token ids for every variant (tokenized once, with the bf16
shards' tokenizer) and write a markdown table and JSON.

    python scripts/quant_quality.py --model smollm2-135m --name smollm2-135m
    python scripts/quant_quality.py --model /work/models/qwen2.5-coder-0.5b-instruct.gguf \\
        --name qwen2.5-coder-0.5b --limit 8 --variants bf16,nf4-g64,q4-g64,q4-g128,q3-g128,q8-g128

Shards go under --work (not the repo); a variant whose shards are complete is not re-sharded
(its sharding time comes from the previous run's record). Bits per weight count every stored
byte of the 2-D linear weights (codes, scales, minimums) over their parameter count, the head
included. Results: eval/results/quant-quality/<name>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qstream.eval.data import tokenize_corpus  # noqa: E402
from qstream.eval.perplexity import perplexity  # noqa: E402
from qstream.generate import load_tokenizer  # noqa: E402
from qstream.recipe import parse_recipe  # noqa: E402
from qstream.shard import shard  # noqa: E402

# name -> (scheme, group size, head scheme or None = same as the body). nf4/int8 keep the head
# in bf16 as the shipped recipes do; the fitted schemes quantize it too (it is a fifth of
# SmolLM2's linear weights, and the bits/weight targets count it).
VARIANTS: dict[str, tuple[str, int, str | None]] = {
    "bf16": ("bf16", 64, None),
    "nf4-g64": ("nf4", 64, "bf16"),
    "int8-g64": ("int8", 64, "bf16"),
    "q8-g128": ("q8", 128, None),
    "q4-g64": ("q4", 64, None),
    "q4-g128": ("q4", 128, None),
    "q4-g64-headbf16": ("q4", 64, "bf16"),
    "q4-g128-headbf16": ("q4", 128, "bf16"),
    "q4-g128-headq5": ("q4", 128, "q5"),
    "q4-g128-headq8": ("q4", 128, "q8"),
    "q3-g128-headbf16": ("q3", 128, "bf16"),
    "q3-g64-headq4": ("q3", 64, "q4"),
    "q3-g64-headbf16": ("q3", 64, "bf16"),
    "q3-g64": ("q3", 64, None),
    "q3-g128": ("q3", 128, None),
    "q3-g128-headq4": ("q3", 128, "q4"),
    "q2-g64": ("q2", 64, None),
}
# calibrated (on --calib-text, a different text from the evaluation text) variants of the same formats:
# name -> (uniform variant whose format it has, calibration method)
CALIBRATED = {"gptq-q4-g64-headbf16": ("q4-g64-headbf16", "gptq"), "gptq-q3-g64-headbf16": ("q3-g64-headbf16", "gptq"),
              "gptq-q4-g64": ("q4-g64", "gptq"), "gptq-q3-g64-headq8": ("q3-g64-headq8", "gptq"),
              "gptq-q4-g64-headq8": ("q4-g64-headq8", "gptq"),
              "imatrix-q4-g64-headbf16": ("q4-g64-headbf16", "imatrix"),
              "imatrix-q3-g64-headbf16": ("q3-g64-headbf16", "imatrix"),
              "imatrix-q8-g64-headbf16": ("q8-g64-headbf16", "imatrix")}
VARIANTS["q3-g64-headq8"] = ("q3", 64, "q8")
VARIANTS["q4-g64-headq8"] = ("q4", 64, "q8")
VARIANTS["q8-g64-headbf16"] = ("q8", 64, "bf16")
VARIANTS["q8-g128-headbf16"] = ("q8", 128, "bf16")
VARIANTS["q8-g64"] = ("q8", 64, None)
VARIANTS["q4-g32-headbf16"] = ("q4", 32, "bf16")
CALIBRATED["imatrix-q4-g32-headbf16"] = ("q4-g32-headbf16", "imatrix")
# the k-quant family (6-bit grids, quant/kquant.py): groups of 32 at the bits of the q-schemes at 64
for _b in (3, 4):
    VARIANTS[f"q{_b}k-g32-headbf16"] = (f"q{_b}k", 32, "bf16")
    VARIANTS[f"q{_b}k-g32-headq8"] = (f"q{_b}k", 32, "q8")
    VARIANTS[f"q{_b}k-g32-headq6k"] = (f"q{_b}k", 32, "q6k")
    for _h in ("bf16", "q8", "q6k"):
        CALIBRATED[f"imatrix-q{_b}k-g32-head{_h}"] = (f"q{_b}k-g32-head{_h}", "imatrix")
# uniform 4-bit at about 4 bits per weight, the size of target_bits_per_weight: 4.0
VARIANTS["q4k-g64-headbf16"] = ("q4k", 64, "bf16")  # 4.25
# k-recipes at groups of 64, which do not align with SmolLM2's Q4_1 source blocks of 32
VARIANTS["q4k-g64-headq6k"] = ("q4k", 64, "q6k")
VARIANTS["q3k-g64-headbf16"] = ("q3k", 64, "bf16")
VARIANTS["q4-g256-headbf16"] = ("q4", 256, "bf16")  # 4.125
VARIANTS["nf4-g4096-headbf16"] = ("nf4", 4096, "bf16")  # 4.008
CALIBRATED["imatrix-q4k-g64-headbf16"] = ("q4k-g64-headbf16", "imatrix")
CALIBRATED["imatrix-q4-g256-headbf16"] = ("q4-g256-headbf16", "imatrix")
# target_bits_per_weight (per-weight scheme among q3..q8, knapsack) at the size of a uniform variant
TARGETED = {"mixed4.5-g64-headbf16": ("q4-g64-headbf16", 4.5), "mixed3.5-g64-headbf16": ("q3-g64-headbf16", 3.5)}
for _m, _base, _t in (("gptq", "q4-g64-headbf16", 4.5), ("imatrix", "q4-g64-headbf16", 4.5),
                      ("imatrix", "q3-g64-headbf16", 3.5), ("imatrix", "q4-g64-headbf16", 4.0),
                      ("imatrix", "q4k-g32-headbf16", 4.5), ("imatrix", "q4k-g32-headq8", 4.5),
                      ("imatrix", "q4k-g32-headq6k", 4.5), ("imatrix", "q3k-g32-headbf16", 3.5),
                      ("imatrix", "q3k-g32-headq8", 3.5), ("imatrix", "q3k-g32-headq6k", 3.5),
                      ("imatrix", "q4k-g32-headbf16", 4.0), ("imatrix", "q4k-g64-headq6k", 4.5),
                      ("imatrix", "q3k-g64-headbf16", 3.5), ("imatrix", "q4k-g64-headbf16", 4.0),
                      ("imatrix", "q4k-g64-headbf16", 4.24), ("imatrix", "q4k-g64-headbf16", 4.5)):
    # both: the knapsack's errors weighted by calibration inputs, then the method on the schemes it picks
    _name = f"{_m}-mixed{_t}-{'k-' if _base.split('-')[0].endswith('k') else ''}{_base.split('-', 1)[1]}"
    CALIBRATED[_name] = (_base, _m)
    TARGETED[_name] = (_base, _t)
# signround (quant/signround.py): the imatrix fit's codes with their rounding tuned on each layer's output
for _base, _t in (("q4k-g64-headbf16", None), ("q3k-g64-headbf16", None), ("q4k-g64-headq6k", 4.5),
                  ("q4k-g64-headbf16", 4.5), ("q3k-g64-headbf16", 3.5), ("q4-g64-headbf16", None),
                  ("q4k-g64-headbf16", 4.24), ("q4k-g64-headbf16", 4.0)):
    _name = f"signround-{_base}" if _t is None else f"signround-mixed{_t}-k-{_base.split('-', 1)[1]}"
    CALIBRATED[_name] = (_base, "signround")
    if _t is not None:
        TARGETED[_name] = (_base, _t)
VARIANTS.update({k: VARIANTS[v] for k, (v, _) in CALIBRATED.items()})
VARIANTS.update({k: VARIANTS[v] for k, (v, _) in TARGETED.items()})
DEFAULT = "bf16,q4-g64,q4-g128-headbf16,q4-g64-headbf16,q4-g128-headq5,q3-g128-headq4,q8-g128,nf4-g64,q2-g64,int8-g64"


def recipe_for(model: str, variant: str, out: Path, calib_text: str | None = None, calib_tokens: int = 4096,
               calib_steps: int | None = None):
    scheme, group, head = VARIANTS[variant]
    data = {"model": model, "output": str(out), "scheme": scheme, "group_size": group, "compute_dtype": "bfloat16",
            "description": f"quant_quality variant {variant}"}
    if head:
        data["overrides"] = [{"pattern": "lm_head", "scheme": head}]
    if variant in TARGETED:
        data["target_bits_per_weight"] = TARGETED[variant][1]
    if variant in CALIBRATED:
        data["calibration"] = {"text_file": calib_text, "tokens": calib_tokens, "method": CALIBRATED[variant][1]}
        if CALIBRATED[variant][1] == "signround" and calib_steps is not None:
            data["calibration"]["steps"] = calib_steps
    return parse_recipe(data, source=f"variant {variant}")


def linear_bits(shard_dir: Path) -> tuple[float, float, int, int]:
    """(bits per weight over 2-D linear weights with the head, the same without it, their stored
    bytes, total shard bytes)."""
    m = json.loads((shard_dir / "manifest.json").read_text())
    stored = params = 0
    body_stored = body_params = 0
    for f in m["files"]:
        if f["kind"] not in ("layer", "head"):
            continue
        with safe_open(shard_dir / f["name"], framework="pt") as st:
            for name, meta in f["tensors"].items():
                if len(meta["shape"]) != 2 or not name.endswith(".weight"):
                    continue
                params += meta["shape"][0] * meta["shape"][1]
                for key in meta["stored"].values():
                    sl = st.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    stored += n * torch.empty(0, dtype=_DT[sl.get_dtype()]).element_size()
        if f["kind"] == "layer":
            body_stored, body_params = stored, params  # layer files come before the head
    total = sum(f["size"] for f in m["files"])
    return 8 * stored / params, 8 * body_stored / body_params, stored, total


_DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8, "I8": torch.int8,
       "I64": torch.int64, "I32": torch.int32}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="recipe model: alias, .gguf file or HF directory")
    p.add_argument("--name", required=True, help="result file stem, e.g. smollm2-135m")
    p.add_argument("--variants", default=DEFAULT, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--text-file", default="eval/data/sample.txt")
    p.add_argument("--calib-text", default="eval/data/calib.txt", help="calibration text of the gptq-* variants")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--calib-steps", type=int, default=None, help="tuning steps per layer of the signround-* variants")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--work", default="/tmp/qstream-quant-quality", help="where shards go")
    p.add_argument("--out", default="eval/results/quant-quality")
    p.add_argument("--reshard", action="store_true", help="re-shard even complete variants (fresh timings)")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if variants[0] != "bf16":
        variants = ["bf16"] + [v for v in variants if v != "bf16"]
    work = Path(a.work) / a.name
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{a.name}.json"
    previous = {r["variant"]: r for r in json.loads(json_path.read_text())["rows"]} if json_path.is_file() else {}

    rows = []
    ids = None
    for v in variants:
        d = work / v
        recipe = recipe_for(a.model, v, d, a.calib_text, a.calib_tokens, a.calib_steps)
        prev = previous.get(v, {})
        done = (d / "manifest.json").is_file() and json.loads((d / "manifest.json").read_text())["fingerprint"] == recipe.fingerprint()
        if a.reshard or not done:
            t0 = time.perf_counter()
            shard(recipe, force=True, progress=False)
            shard_s = time.perf_counter() - t0
        else:
            shard_s = prev.get("shard_seconds")
        if ids is None:  # tokenized once, with the reference's tokenizer: every variant sees the same ids
            text = Path(a.text_file).read_text()
            ids = tokenize_corpus([text], load_tokenizer(d))
        bpw, bpw_body, linear_bytes, total = linear_bits(d)
        t0 = time.perf_counter()
        if done and not a.reshard and prev.get("fingerprint") == recipe.fingerprint() and prev.get("limit") == a.limit:
            r = {k: prev[k] for k in ("perplexity", "tokens_scored", "windows")}  # same shards, same tokens
        else:
            r = perplexity(d, ids, context=a.context, stride=a.context, limit=a.limit, device="cpu", progress=False)
        row = {"variant": v, "scheme": VARIANTS[v][0], "group": VARIANTS[v][1], "head": VARIANTS[v][2] or VARIANTS[v][0],
               "calibration": recipe.calibration and {"text_file": recipe.calibration.text_file,
                                                      "tokens": recipe.calibration.tokens,
                                                      "method": recipe.calibration.method,
                                                      **({"steps": recipe.calibration.steps}
                                                         if recipe.calibration.method == "signround" else {})},
               "fingerprint": recipe.fingerprint(), "limit": a.limit, "bits_per_weight_linear": bpw,
               "bits_per_weight_decoder": bpw_body, "linear_bytes": linear_bytes,
               "shard_bytes": total, "perplexity": r["perplexity"], "tokens_scored": r["tokens_scored"],
               "windows": r["windows"], "shard_seconds": shard_s, "eval_seconds": time.perf_counter() - t0}
        rows.append(row)
        _write(a, _merged(previous, rows), json_path, out_dir)  # after every variant: a long run leaves partial results
        print(f"{v:18s} bpw {bpw:6.3f}  bytes {total:>12,}  ppl {r['perplexity']:.4f}  shard {shard_s or 0:.1f} s",
              flush=True)
    print(markdown(_write(a, _merged(previous, rows), json_path, out_dir)))
    return 0


def _merged(previous: dict[str, dict], rows: list[dict]) -> list[dict]:
    """Earlier rows are kept (in their order) unless this run measured the variant again;
    the reference row (bf16) stays first."""
    new = {r["variant"]: r for r in rows}
    out = [new.get(v, r) for v, r in previous.items()]
    out += [r for r in rows if r["variant"] not in previous]
    return sorted(out, key=lambda r: r["variant"] != "bf16")


def _write(a, rows: list[dict], json_path: Path, out_dir: Path) -> dict:
    ref = rows[0]
    for row in rows:
        row["ratio_to_bf16"] = row["shard_bytes"] / ref["shard_bytes"]
        row["delta_vs_bf16"] = row["perplexity"] / ref["perplexity"] - 1
    result = {"model": a.model, "name": a.name, "text_file": a.text_file, "context": a.context, "stride": a.context,
              "limit_windows": a.limit, "tokens_scored": ref["tokens_scored"],
              "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}",
              "rows": rows}
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{a.name}.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    lim = f", first {r['limit_windows']} windows" if r["limit_windows"] else ""
    lines = [f"# {r['name']}: compression quality", "",
             f"Perplexity on `{r['text_file']}`, context {r['context']}, stride {r['stride']}{lim}: "
             f"{r['tokens_scored']} tokens, the same ids for every variant. Machine: {r['machine']}.", "",
             "| variant | scheme | group | head | calibration | bits/weight (decoder linears) | bits/weight (with head) | shard bytes | ratio to bf16 | perplexity | vs bf16 | shard s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        s = f"{x['shard_seconds']:.0f}" if x["shard_seconds"] is not None else "-"
        c = x.get("calibration")
        cal = f"{c.get('method', 'gptq')} {c['tokens']}" if c else "-"
        lines.append(f"| {x['variant']} | {x['scheme']} | {x['group']} | {x['head']} | {cal} | {x['bits_per_weight_decoder']:.3f} | "
                     f"{x['bits_per_weight_linear']:.3f} | "
                     f"{x['shard_bytes']:,} | {x['ratio_to_bf16']:.3f} | {x['perplexity']:.4f} | "
                     f"{100 * x['delta_vs_bf16']:+.2f}% | {s} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
