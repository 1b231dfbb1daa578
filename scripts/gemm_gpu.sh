#!/usr/bin/env bash
# The small-matmul kernels (qstream/quant/gemm_triton.py, issue 14) on a lent GPU: the kernel tests on CUDA,
# then scripts/gemm_bench.py (correctness, the 8B tree-step table, a tile sweep). About 5 minutes on an H200.
#     bash scripts/gemm_gpu.sh OUTDIR
set -u
OUT=${1:?usage: gemm_gpu.sh OUTDIR}
source scripts/device_log.sh "$OUT" || exit 1
stamp "tests: fused kernels and the in-directory draft on CUDA"
timeout 120 python3 -m pytest -x -q -p no:cacheprovider tests/test_gemm_triton.py \
    tests/test_draft_gpu.py 2>&1 | tail -5
stamp "gemm_bench"
timeout 420 python3 scripts/gemm_bench.py "$OUT/gemm_bench.json" --sweep ${GEMM_BENCH_ARGS:-}
echo "rc=$?"
stamp done
