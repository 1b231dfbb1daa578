#!/usr/bin/env bash
# Round 6 (issue 13): end-to-end batch-1 decode of the Llama-3-8B shape in the fitted 4-bit formats
# against nf4, all resident and under a 4 GiB budget, a fresh process per figure; then the fused-GEMV
# GPU tests (k-schemes included).
#     bash scripts/gpu_round6.sh OUTDIR
set -u
OUT=${1:?usage: gpu_round6.sh OUTDIR}
source scripts/device_log.sh "$OUT" || exit 1  # log, wheels, GPUs, stamp()
for s in "nf4 64" "q4k 32" "q4 64"; do
  set -- $s
  stamp "shards 8B $1 g$2"
  timeout 150 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out /tmp/qs/l8b-$1 --scheme $1 --block-size $2
done
for s in nf4 q4k q4; do
  for b in unlimited 4GiB; do
    stamp "bench 8B $s $b, fresh process"
    opt=""; [ $b = unlimited ] || opt="--gpu-memory $b"
    timeout 150 python3 -m qstream.cli bench /tmp/qs/l8b-$s $opt --prompt-tokens 64 --new-tokens 96 \
      --json "$OUT/${s}_$b.json" 2>&1 | grep -v "^load:" | sed -n '1,18p'
  done
done
stamp "gpu tests (fused GEMVs)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gemv_gpu.py 2>&1 | tail -4
stamp done
