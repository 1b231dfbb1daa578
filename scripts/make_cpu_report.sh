#!/usr/bin/env bash
# Reproduce eval/results/smollm2-135m-cpu: shard the embedded SmolLM2-135M-Instruct in five recipes
# (bf16, int8, nf4, fp4, mixed), then for each: perplexity on eval/data/sample.txt, `qstream bench`
# on CPU and the offline lm-eval task qstream_tiny_qa; plus the bitsandbytes NF4 reference on the
# bf16 shards; then `qstream report`. CPU only and offline. About 10 minutes on 2 CPU cores.
#
#   scripts/make_cpu_report.sh                 # writes eval/results/smollm2-135m-cpu
#   OUT=/tmp/r CONTEXT=256 scripts/make_cpu_report.sh
#   REPORT_ONLY=1 scripts/make_cpu_report.sh   # only rewrite README.md and the plots from the JSON files
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-eval/results/smollm2-135m-cpu}
TEXT=${TEXT:-eval/data/sample.txt}
CONTEXT=${CONTEXT:-512}
STRIDE=${STRIDE:-256}
VARIANTS=${VARIANTS:-"bf16 int8 nf4 fp4 mixed"}
# the qstream command; `python3 -m qstream.cli` works from the repository without an install
QSTREAM=${QSTREAM:-python3 -m qstream.cli}

mkdir -p "$OUT"
start=$(date +%s)
step() { echo "[$(( $(date +%s) - start )) s] $*" >&2; }

if [ -z "${REPORT_ONLY:-}" ]; then
rm -f "$OUT"/ppl-*.json "$OUT"/bench-*.json "$OUT"/lm-eval-*.json "$OUT"/*.png
written="" present=""
for v in $VARIANTS; do
    if [ -f "shards/smollm2-135m-$v/manifest.json" ]; then present="$present $v"; else written="$written $v"; fi
    step "shard $v"
    $QSTREAM -q shard "recipes/smollm2-135m-$v.yaml"
done
for v in $VARIANTS; do
    step "perplexity $v"
    $QSTREAM -q eval ppl "shards/smollm2-135m-$v" --device cpu --text-file "$TEXT" --context "$CONTEXT" \
        --stride "$STRIDE" --batch-size 4 --json "$OUT/ppl-$v.json"
done
step "bitsandbytes NF4 reference"
$QSTREAM -q eval ppl shards/smollm2-135m-bf16 --device cpu --text-file "$TEXT" --context "$CONTEXT" \
    --stride "$STRIDE" --bnb-nf4-reference --json "$OUT/ppl-bnb-nf4-reference.json"
for v in $VARIANTS; do
    step "lm-eval $v"
    $QSTREAM -q eval lm-eval "shards/smollm2-135m-$v" --device cpu --tasks qstream_tiny_qa --include-path eval/tasks \
        --batch-size 8 --json "$OUT/lm-eval-$v.json"
done
for v in $VARIANTS; do
    step "bench $v"
    $QSTREAM -q bench "shards/smollm2-135m-$v" --device cpu --new-tokens 16 --json "$OUT/bench-$v.json"
done
elapsed=$(( $(date +%s) - start ))
printf 'elapsed_s=%s\nshards_written="%s"\nshards_present="%s"\n' "$elapsed" "${written# }" "${present# }" \
    > "$OUT/run-timing.txt"
fi
# shellcheck disable=SC1091
. "$OUT/run-timing.txt"
step "report"

notes=$(mktemp)
trap 'rm -f "$notes"' EXIT
cat > "$notes" <<EOF
## How these numbers were made

\`scripts/make_cpu_report.sh\` ran every step above on this machine's CPU (2 cores), offline, in
${elapsed_s} s, sharding included (shard sets written in that run: ${shards_written:-none}; already
present and only checked: ${shards_present:-none}; writing one SmolLM2-135M shard set takes 10-25 s
here). The JSON files next to this README are the raw results (each holds its command, versions,
machine, recipe, size and bits per weight); \`run-timing.txt\` holds the run's duration.

- **Perplexity**: \`qstream eval ppl shards/smollm2-135m-VARIANT --text-file $TEXT --context $CONTEXT --stride $STRIDE\`,
  the Hugging Face sliding-window recipe (windows of $CONTEXT tokens every $STRIDE tokens; each token scored
  once, with at least $(( CONTEXT - STRIDE )) tokens of context after the first window). The text is
  [eval/data/sample.txt](../../data/README.md), about 41 KB of English written for this project (so it is
  not in the model's training data); it is small, so the numbers compare the variants with each other and
  say nothing about other corpora.
- **WikiText-2** numbers, the ones comparable with published results, come from
  \`qstream eval ppl shards/smollm2-135m-VARIANT --dataset wikitext:wikitext-2-raw-v1:test --context 2048 --json OUT.json\`
  (and \`--bnb-nf4-reference\` on the bf16 shards). They were **not run here**: this machine has no access to
  the Hugging Face hub, which the dataset is downloaded from.
- **Reference NF4**: the dense transformers twin of the bf16 shards with every linear weight except lm_head
  rounded through \`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")\` and back; its
  Δ is against the same twin unrounded. qstream's nf4 recipe uses the same bitsandbytes quantizer on the
  source weights (head kept in bf16), so the two should agree closely.
- **Accuracy**: \`qstream eval lm-eval ... --tasks qstream_tiny_qa --include-path eval/tasks\`: 20
  self-written general-knowledge multiple-choice questions, zero-shot, accuracy by log-likelihood. One
  question is 5 points: a smoke test that the harness runs on every variant, not a benchmark. Hub tasks
  (\`--tasks hellaswag,arc_easy\`) need internet.
- **Speed**: \`qstream bench shards/smollm2-135m-VARIANT --device cpu --new-tokens 16\` (64-token random
  prompt, batch 1, greedy, after an 8 s warm-up), everything resident (no budget given), on a 2-core CPU
  shared with other work: it shows the cost of dequantizing on CPU, not of streaming. One 16-token run
  per variant is noisy on a shared machine: repeating the bench here gave 0.049-0.078 s/token for bf16,
  0.106-0.180 for nf4 and 0.119-0.287 for fp4, so only differences of 2x or more mean anything. GPU and
  streaming numbers are in [eval/results/gpu-h200](../gpu-h200/README.md).
EOF
$QSTREAM report "$OUT"/ppl-*.json "$OUT"/lm-eval-*.json "$OUT"/bench-*.json --out "$OUT" \
    --title "SmolLM2-135M-Instruct on CPU: what each recipe costs" --notes "$notes"
step "done: $OUT/README.md"
