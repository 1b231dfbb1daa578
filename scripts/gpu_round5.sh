#!/usr/bin/env bash
# Round 5 (issues 12-14): every GPU test after the merges (fused norms, fused GEMVs, devices,
# in-directory draft), then the 8B nf4 all-resident figure with fused RMSNorm, fresh process,
# and a profile of one graph step.
#     bash scripts/gpu_round5.sh OUTDIR
set -u
OUT=${1:?usage: gpu_round5.sh OUTDIR}
source scripts/device_log.sh "$OUT" || exit 1  # log, wheels, GPUs, stamp()
L8=/tmp/qs/l8b-nf4
stamp shards
[ -f $L8/manifest.json ] || timeout 120 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out $L8
stamp "bench 8B nf4 unlimited (fused GEMVs + fused RMSNorm), fresh process"
timeout 120 python3 -m qstream.cli bench $L8 --prompt-tokens 64 --new-tokens 96 --json "$OUT/nf4_unlimited.json" 2>&1 | grep -v "^load:" | sed -n '1,16p'
stamp "bench 8B nf4 4GiB, fresh process"
timeout 120 python3 -m qstream.cli bench $L8 --gpu-memory 4GiB --prompt-tokens 64 --new-tokens 96 --json "$OUT/nf4_4GiB.json" 2>&1 | grep -v "^load:" | sed -n '1,16p'
stamp "generate 20-token prompt, unlimited, fresh process"
timeout 120 python3 -m qstream.cli -v generate $L8 --no-chat --max-new-tokens 64 --prompt "$(python3 -c 'print(" ".join(["word"]*19))')" 2>&1 | grep -v "^load:\|httpx" | tail -8
stamp profile
timeout 100 python3 scripts/step_profile.py $L8 --json "$OUT/profile.json" 2>&1 | grep -v Warn | head -16
stamp gpu tests
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gemv_gpu.py tests/test_draft_gpu.py 2>&1 | tail -6
stamp done
