#!/usr/bin/env bash
# Perplexity, accuracy, speed, bytes and bits/weight of the embedded SmolLM2-135M across schemes, with
# its tied embedding/head matrix stored once, and the tied head's scheme (bf16, int8, q8, q6) under
# 4-bit linears. Same text and token ids (one tokenizer), context 512; then `qstream report`.
# Shards go to $WORK (not the repo); results and the report to $OUT.
#   OMP_NUM_THREADS=1 bash scripts/scheme_table.sh      (CPU: ~35 min on 2 shared cores)
#   ONLY=nf4,q4 STEPS=ppl bash scripts/scheme_table.sh   (some variants / steps: ppl, lm-eval, bench, report)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/qstream-schemes}
OUT=${OUT:-eval/results/schemes-smollm2}
STEPS=${STEPS:-ppl,lm-eval,bench,report}
ONLY=${ONLY:-}
mkdir -p "$WORK/recipes" "$OUT"
q() { python -m qstream.cli "$@"; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }

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
names=()
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}; fields=${v#*|}
  [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]] && continue
  names+=("$name")
  recipe="$WORK/recipes/$name.yaml"
  python - "$recipe" "$name" "$fields" "$WORK" <<'PY'
import sys, yaml
path, name, fields, work = sys.argv[1:]
d = {"description": f"scheme table variant {name}", "model": "smollm2-135m", "output": f"{work}/shards/{name}",
     "compute_dtype": "bfloat16", **yaml.safe_load(fields)}
open(path, "w").write(yaml.safe_dump(d, sort_keys=False))
PY
  t0=$(date +%s)
  what=shard_s; [[ -f "$WORK/shards/$name/manifest.json" ]] && what=recheck_s  # complete: checked and reused
  q shard -q "$recipe" >/dev/null
  echo "$name $what=$(( $(date +%s) - t0 ))" | tee -a "$OUT/run-timing.txt"
done
for name in "${names[@]}"; do
  d="$WORK/shards/$name"
  if has ppl; then
    t0=$(date +%s)
    q -q eval ppl "$d" --device cpu --text-file eval/data/sample.txt --context 512 --variant "$name" --json "$OUT/ppl-$name.json"
    echo "$name ppl_s=$(( $(date +%s) - t0 ))" | tee -a "$OUT/run-timing.txt"
    if [[ $name == bf16 ]]; then  # bitsandbytes' own NF4 on the bf16 shards' dense twin: the nf4 target
      q -q eval ppl "$d" --device cpu --text-file eval/data/sample.txt --context 512 --bnb-nf4-reference \
        --json "$OUT/ppl-bnb-nf4-reference.json"
    fi
  fi
  if has lm-eval; then
    q -q eval lm-eval "$d" --device cpu --tasks qstream_tiny_qa --include-path eval/tasks --batch-size 8 \
      --variant "$name" --json "$OUT/lm-eval-$name.json"
  fi
  if has bench; then
    q -q bench "$d" --device cpu --new-tokens 16 --json "$OUT/bench-$name.json"
  fi
done
if has report; then
  q report "$OUT"/ppl-*.json $(ls "$OUT"/lm-eval-*.json "$OUT"/bench-*.json 2>/dev/null) --out "$OUT" \
    --title "SmolLM2-135M-Instruct: schemes with the tied embedding/head stored once (CPU)" --notes "$OUT/notes.md"
fi
