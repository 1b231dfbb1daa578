#!/usr/bin/env bash
# Round 3 of the fast-decode figures (issue 12): sibling fusion (runtime/fuse.py) on/off for
# the 8B nf4 shape, all resident and at 4 GiB, each figure a fresh process; a profile of one
# graph-decoded step each way. Run from the repository root with .whl carried:
#     bash scripts/gpu_round3.sh OUTDIR
set -u
OUT=${1:?usage: gpu_round3.sh OUTDIR}
mkdir -p /tmp/qs/json
source scripts/device_log.sh "$OUT" name,memory.total,driver_version,clocks.sm || exit 1  # log, wheels, GPUs, stamp()
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__)"
L8=/tmp/qs/l8b-nf4
bench() { local name=$1; shift; stamp "bench $name: $*"
    timeout 150 python3 -m qstream.cli bench "$@" --prompt-tokens 64 --json "$OUT/$name.json"; echo "rc=$?"; }
stamp tests
timeout 200 python3 -m pytest -x -q -p no:cacheprovider tests/test_gpu.py -k "fused or graph_replay" 2>&1 | tail -5
stamp shards
timeout 200 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out $L8
bench nf4_unlimited_fused $L8 --new-tokens 96
bench nf4_unlimited_nofuse $L8 --new-tokens 96 --no-fuse
bench nf4_4GiB_fused $L8 --gpu-memory 4GiB --new-tokens 96
stamp profile fused
timeout 120 python3 scripts/step_profile.py $L8 --json "$OUT/profile_fused.json"
stamp profile nofuse
timeout 120 python3 scripts/step_profile.py $L8 --no-fuse --json "$OUT/profile_nofuse.json"
stamp done
