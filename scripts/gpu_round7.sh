#!/usr/bin/env bash
# Round 7 (issue 13): the 8B shape all resident in nf4, q4k g32 and q4 g64 after sibling fusion was
# extended to the fitted formats (q4 joins its stored tensors, q4k its codes and settled float16
# grids). Two fresh processes per format, interleaved, on one machine.
#     bash scripts/gpu_round7.sh OUTDIR
set -u
OUT=${1:?usage: gpu_round7.sh OUTDIR}
source scripts/device_log.sh "$OUT" || exit 1  # log, wheels, GPUs, stamp()
for s in "nf4 64" "q4k 32" "q4 64"; do
  set -- $s
  stamp "shards 8B $1 g$2"
  timeout 150 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out /tmp/qs/l8b-$1 --scheme $1 --block-size $2
done
for r in 1 2; do
  for s in nf4 q4k q4; do
    stamp "bench 8B $s unlimited, run $r, fresh process"
    timeout 150 python3 -m qstream.cli bench /tmp/qs/l8b-$s --prompt-tokens 64 --new-tokens 96 \
      --json "$OUT/${s}_unlimited_$r.json" 2>&1 | grep -v "^load:" | sed -n '1,12p'
  done
done
stamp "fused vs unfused greedy tokens, 8B q4k and q4"
timeout 200 python3 - <<'PY'
import torch, qstream
from qstream.generate import SamplingConfig, generate_ids
for s in ("q4k", "q4"):
    out = {}
    for fuse in (True, False):
        m = qstream.load(f"/tmp/qs/l8b-{s}", fuse=fuse, progress=False)
        ids = torch.arange(1, 17)[None]
        out[fuse] = generate_ids(m, ids, torch.ones_like(ids), SamplingConfig(max_new_tokens=24)).new_tokens[0]
        m.close()
    print(s, "fused == unfused tokens:", out[True] == out[False], out[True][:8])
PY
stamp done
