#!/usr/bin/env bash
# Second GPU round (issues 13, 14, 15): batch-1 linear cost of each 4-bit scheme, pass cost against
# the number of tokens in the pass, and `qstream serve` throughput against concurrency, on synthetic
# Llama-3-8B-shaped nf4 shards (random codes: speed only). Run from the repository root with the
# bitsandbytes/starlette/uvicorn wheels in $QSTREAM_WHEELS (default .whl):
#
#     bash scripts/gpu_round2.sh OUTDIR [stages: linear pass70 pass8 serve]
set -u
OUT=${1:?usage: gpu_round2.sh OUTDIR [stages]}
shift
STAGES=${*:-linear pass70 pass8 serve}
has() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p /tmp/qs
source scripts/device_log.sh "$OUT" || exit 1  # log, wheels, GPUs, stamp()
L8=/tmp/qs/l8b-nf4
L70=/tmp/qs/l70b6-nf4
stamp shards
[ -d $L8 ] || timeout 200 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out $L8
[ -d $L70 ] || timeout 200 python3 scripts/make_synthetic_shards.py --shape llama3-70b-slice --layers 6 --out $L70
if has linear; then stamp linear schemes
timeout 150 python3 scripts/linear_schemes_gpu.py --json "$OUT/linear_schemes.json"; fi
if has pass70; then stamp "pass cost 70B slice 6GiB: a 1024-token pass needs more than 4 GiB of activations"
timeout 150 python3 scripts/pass_cost.py $L70 --gpu-memory 6GiB --json "$OUT/pass_cost_70b6.json"; fi
if has pass8; then stamp pass cost 8B 4GiB
timeout 150 python3 scripts/pass_cost.py $L8 --gpu-memory 4GiB --json "$OUT/pass_cost_8b.json"; fi
if has serve; then stamp serve 8B 4GiB
timeout 240 python3 scripts/bench_serve.py $L8 --device cuda --gpu-memory 4GiB --concurrency 1,4,16 --requests 1 \
    --max-tokens 32 --out "$OUT/serve"; fi
stamp done
