#!/usr/bin/env bash
# Perplexity, bytes and bits/weight of the embedded SmolLM2-135M across schemes, with the tied
# embedding/head matrix stored once (qstream >= the tied_head field), and the tied-head choice:
# bf16 vs 8-bit vs 6-bit for the one stored copy under 4-bit linears. Same text, same token ids
# (one tokenizer), context 512. Shards go to $WORK (not the repo); results to eval/results/schemes-smollm2.
#   OMP_NUM_THREADS=1 bash scripts/scheme_table.sh          (CPU, ~25 min on 2 shared cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/qstream-schemes}
OUT=${OUT:-eval/results/schemes-smollm2}
mkdir -p "$WORK/recipes" "$OUT"
q() { python -m qstream.cli "$@"; }

# name | recipe fields (YAML flow mapping, without model/output)
VARIANTS=(
  "bf16|{scheme: bf16}"
  "int8|{scheme: int8, block_size: 64}"
  "q8|{scheme: q8, group_size: 128}"
  "nf4|{scheme: nf4, block_size: 64}"
  "q4|{scheme: q4, group_size: 64}"
  "nf4-headbf16|{scheme: nf4, block_size: 64, tied_head: bf16}"
  "q4-headbf16|{scheme: q4, group_size: 64, tied_head: bf16}"
  "q4-headint8|{scheme: q4, group_size: 64, tied_head: {scheme: int8, block_size: 64}}"
  "q4-headq6|{scheme: q4, group_size: 64, tied_head: {scheme: q6, group_size: 64}}"
)
ONLY=${ONLY:-}
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}; fields=${v#*|}
  [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]] && continue
  recipe="$WORK/recipes/$name.yaml"
  python - "$recipe" "$name" "$fields" "$WORK" <<'PY'
import sys, yaml
path, name, fields, work = sys.argv[1:]
d = {"description": f"scheme table variant {name}", "model": "smollm2-135m", "output": f"{work}/shards/{name}",
     "compute_dtype": "bfloat16", **yaml.safe_load(fields)}
open(path, "w").write(yaml.safe_dump(d, sort_keys=False))
PY
  t0=$(date +%s)
  q shard -q "$recipe" >/dev/null
  t1=$(date +%s)
  q eval ppl "$WORK/shards/$name" --text-file eval/data/sample.txt --context 512 --variant "$name" --json "$OUT/ppl-$name.json"
  t2=$(date +%s)
  echo "$name shard_s=$((t1 - t0)) ppl_s=$((t2 - t1))" | tee -a "$OUT/run-timing.txt"
done
