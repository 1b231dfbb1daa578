#!/usr/bin/env bash
# Speculative decoding of the embedded REAL model on the GPU, after the draft's tree steps moved to a
# static cache replayed as CUDA graphs (runtime/tree_cache.py): the draft's GPU tests, then the
# end-to-end figure (scripts/spec_e2e.py, fresh process, plain vs speculative in the same process) and
# where a round's time goes (scripts/spec_profile.py), with an imatrix-calibrated q3k in-directory
# draft and about 30% of the layers resident (the rest streamed from pinned host RAM). The GGUF travels
# in two device calls as in scripts/spec_e2e_gpu.sh (/tmp/keep/part1 from the call before, .gpu_b/part2).
#     bash scripts/spec_profile_gpu.sh OUTDIR
set -u
OUT=${1:?usage: spec_profile_gpu.sh OUTDIR}
source scripts/smollm2_on_device.sh "$OUT" || exit 1  # log, wheels, $G: the GGUF
echo "=== $(date +%T) GPU tests of the draft"
timeout 150 python3 -m pytest -q -x tests/test_draft_gpu.py -p no:cacheprovider 2>&1 | tail -4
printf 'model: %s\noutput: /tmp/smol-q3k\nscheme: bf16\ncompute_dtype: bfloat16\ndraft: {scheme: q3k, group_size: 32}\ncalibration: {text_file: eval/data/calib.txt, tokens: 4096, method: imatrix}\n' \
  $G > /tmp/r-q3k.yaml
echo "=== $(date +%T) shard bf16 + q3k draft"
timeout 200 python3 -m qstream.cli shard /tmp/r-q3k.yaml 2>&1 | grep -v "it/s\]\|file/s\]" | tail -3
echo "=== $(date +%T) spec_e2e q3k, share 0.3, fresh process"
timeout 200 python3 scripts/spec_e2e.py /tmp/smol-q3k --share 0.3 --new-tokens 64 --json "$OUT/e2e_q3k.json" 2>&1 | grep -v Warn | tail -6
echo "=== $(date +%T) spec_profile share 0.3, fresh process"
timeout 200 python3 scripts/spec_profile.py /tmp/smol-q3k --share 0.3 2>&1 | grep -v Warn
echo "=== $(date +%T) done"
