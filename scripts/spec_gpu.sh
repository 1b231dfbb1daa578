#!/usr/bin/env bash
# Self-speculative decoding with the in-directory draft on a lent GPU (issue 14): what rounds
# COST, every figure in a fresh process, then a PREDICTED s/token from those costs and the
# acceptance measured with real models on CPU (eval/results/spec-cpu/*.json). Random-weight
# shards accept nothing, so nothing here measures acceptance or a real speculative speed-up.
# Run from the directory holding qstream/ and scripts/, wheels in $QSTREAM_WHEELS (default .whl):
#
#     bash scripts/spec_gpu.sh OUTDIR            # about 3-4 minutes on an H200
#
# Figures (scripts/spec_cost.py; tree budgets 16, 64, 256; depth 16, beam 16):
#   l8_4GiB        Llama-3-8B shape, nf4 + q2 (group 128) draft in the directory, --gpu-memory 4GiB
#   l8_plain       plain `qstream bench` of the same directory at 4 GiB without speculation (baseline)
#   l70_stream     Llama-3-70B shape, 6-layer slice, every layer streamed (all drafted by q2 copies)
#   l70_resident   the same slice with every layer resident (the draft = the target's layers)
#   l70_scaled     the slice at the budget that keeps the share of layers resident that 24 GiB keeps a
#                  full 70B with its draft (scaled:24GiB:80, see spec_cost.py)
#
# The 70B extrapolation (scripts/spec_extrapolate.py): per-layer costs (pass time minus the head,
# over 6) of streamed and of resident layers from l70_stream / l70_resident, times 80 layers split
# as the full model's 24 GiB plan splits them (k resident, 80 - k streamed with q2 copies), plus
# the head once; l70_scaled checks that linear model on the slice. Why q2 at group 128: a q3 copy
# of 80 layers (about 26 GiB) cannot sit inside 24 GiB next to the head, and a q3 copy of 32 8B
# layers (2.7 GiB) not inside 4 GiB; q2/128 is 2.25 bits per weight (18 GiB for 70B, 1.8 GiB for 8B).
#
# The draft's tree steps run on its static tree cache, replayed as CUDA graphs (runtime/tree_cache.py)
# since the fourth session of 2026-11-29; earlier figures were eager.
#
# Writes OUTDIR/log.txt, OUTDIR/*.json (one per figure) and OUTDIR/predicted.json. Shards go to /tmp/qs.
set -u
OUT=${1:?usage: spec_gpu.sh OUTDIR}
mkdir -p /tmp/qs
source scripts/device_log.sh "$OUT" || exit 1  # log, wheels, GPUs, stamp()
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

L8=/tmp/qs/l8b-nf4-draft-q2
L70=/tmp/qs/l70b6-nf4-draft-q2
TREES=16,64,256
cost() {  # name, dir, budget
    stamp "cost $1: $2 --budget $3 (fresh process)"
    timeout 120 python3 scripts/spec_cost.py "$2" --budget "$3" --trees $TREES --json "$OUT/$1.json"
    echo "rc=$?"
}

stamp "tests: the in-directory draft on CUDA is exact"
timeout 150 python3 -m pytest -x -q -p no:cacheprovider tests/test_gemm_triton.py tests/test_draft_gpu.py 2>&1 | tail -5

stamp shards
[ -f $L8/manifest.json ] || timeout 150 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out $L8 \
    --draft-scheme q2 --draft-block-size 128
[ -f $L70/manifest.json ] || timeout 150 python3 scripts/make_synthetic_shards.py --shape llama3-70b-slice --layers 6 \
    --out $L70 --draft-scheme q2 --draft-block-size 128
sync

cost l8_4GiB $L8 4GiB
stamp "bench l8_plain (fresh process, no speculation)"
timeout 120 python3 -m qstream.cli bench $L8 --gpu-memory 4GiB --new-tokens 64 --prompt-tokens 64 --json "$OUT/l8_plain.json"
echo "rc=$?"
cost l70_stream $L70 stream
cost l70_resident $L70 resident
cost l70_scaled $L70 scaled:24GiB:80

stamp extrapolate
python3 scripts/spec_extrapolate.py eval/results/spec-cpu/*.json --l8 "$OUT/l8_4GiB.json" --l8-plain "$OUT/l8_plain.json" \
    --l70-stream "$OUT/l70_stream.json" --l70-resident "$OUT/l70_resident.json" --l70-scaled "$OUT/l70_scaled.json" \
    --json "$OUT/predicted.json"
stamp done
