#!/usr/bin/env bash
# End-to-end speculative decoding of the embedded REAL model (SmolLM2-135M) on a GPU against plain
# decoding in the same process (scripts/spec_e2e.py), with imatrix-calibrated in-directory q2k and
# q3k drafts, about 30% of the layers resident and the rest streamed from pinned host RAM.
# The GGUF (98 MB) exceeds what one device call carries: an earlier call left its first half in
# /tmp/keep/part1 (same warm machine), this one carries the second half in .gpu_b/part2.
#     bash scripts/spec_e2e_gpu.sh OUTDIR
set -u
OUT=${1:?usage: spec_e2e_gpu.sh OUTDIR}
source scripts/smollm2_on_device.sh "$OUT" || exit 1  # log, wheels, $G: the GGUF
for d in q2k q3k; do
  printf 'model: %s\noutput: /tmp/smol-%s\nscheme: bf16\ncompute_dtype: bfloat16\ndraft: {scheme: %s, group_size: 32}\ncalibration: {text_file: eval/data/calib.txt, tokens: 4096, method: imatrix}\n' \
    $G $d $d > /tmp/r-$d.yaml
  echo "=== $(date +%T) shard bf16 + $d draft"
  timeout 200 python3 -m qstream.cli shard /tmp/r-$d.yaml 2>&1 | grep -v "it/s\]\|file/s\]" | tail -3
  echo "=== $(date +%T) spec_e2e $d, fresh process"
  timeout 200 python3 scripts/spec_e2e.py /tmp/smol-$d --share 0.3 --new-tokens 64 --json "$OUT/e2e_$d.json" 2>&1 | grep -v Warn | tail -6
done
echo "=== $(date +%T) done"
