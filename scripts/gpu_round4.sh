#!/usr/bin/env bash
# Round 4 (issues 12, 13, 16): every GPU test (fused GEMV kernels, graphs, two ranges on one GPU),
# the 8B decode-step GEMV table of scripts/gemv_bench.py, then fresh-process benches of 8B nf4
# all resident with bitsandbytes' GEMV (default) and qstream's Triton nf4 GEMV.
#     bash scripts/gpu_round4.sh OUTDIR
set -u
OUT=${1:?usage: gpu_round4.sh OUTDIR}
source scripts/device_log.sh "$OUT" || exit 1  # log, wheels, GPUs, stamp()
L8=/tmp/qs/l8b-nf4
stamp gpu tests
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gemv_gpu.py 2>&1 | tail -12
stamp gemv table
timeout 240 python3 scripts/gemv_bench.py "$OUT/gemv.json" 2>&1 | tail -40
stamp shards
timeout 120 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out $L8
for k in bnb triton; do
    stamp "bench 8B nf4 unlimited, nf4 gemv $k"
    QSTREAM_NF4_GEMV=$k timeout 120 python3 -m qstream.cli bench $L8 --prompt-tokens 64 --new-tokens 96 --json "$OUT/nf4_unlimited_$k.json" 2>&1 | grep -v "^load:" | sed -n '1,14p'
done
stamp done
