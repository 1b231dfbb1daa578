#!/usr/bin/env bash
# Fast-decode figures on a lent GPU (issue 12), every figure in a fresh process, no hidden
# warm-up. Run from the directory holding qstream/ and scripts/, with the bitsandbytes wheel
# in $QSTREAM_WHEELS (default .whl):
#
#     bash scripts/decode_h200.sh OUTDIR [stages...]
#
# stages: probe tests shards bench eagerbench batch8 generate diag (default: all but diag)
#
# Writes OUTDIR/log.txt (everything), OUTDIR/bench.json (one object per bench figure) and
# OUTDIR/probe.txt. Synthetic nf4 shards (random codes) are written to /tmp/qs.
set -u
OUT=${1:?usage: decode_h200.sh OUTDIR [stages...]}
shift
STAGES=${*:-probe tests shards bench eagerbench batch8 generate}
mkdir -p /tmp/qs /tmp/qs/json
source scripts/device_log.sh "$OUT" name,memory.total,driver_version,clocks.sm,clocks.mem || exit 1  # log, wheels, GPUs, stamp()
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__)"
nproc; uname -r

L8=/tmp/qs/l8b-nf4
L70=/tmp/qs/l70b6-nf4
has() { [[ " $STAGES " == *" $1 "* ]]; }

bench() {  # name, then bench args
    local name=$1; shift
    stamp "bench $name: $*"
    timeout 150 python3 -m qstream.cli bench "$@" --prompt-tokens 64 --json /tmp/qs/json/$name.json
    echo "rc=$?"
}

if has probe; then
    stamp probe
    timeout 60 python3 scripts/startup_probe.py --seconds 3 | tee "$OUT/probe.txt"
fi
if has tests; then
    stamp tests
    timeout 240 python3 -m pytest -x -q -p no:cacheprovider tests/test_gpu.py -k "graph_replay or (nf4 and min and auto)" 2>&1 | tail -15
fi
if has shards; then
    stamp shards
    [ -f $L8/manifest.json ] || timeout 200 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out $L8
    [ -f $L70/manifest.json ] || timeout 200 python3 scripts/make_synthetic_shards.py --shape llama3-70b-slice --layers 6 --out $L70
    sync
fi
if has bench; then
    bench nf4_unlimited_graph $L8 --new-tokens 96
    bench nf4_4GiB_graph $L8 --gpu-memory 4GiB --new-tokens 96
    bench l70b6_4GiB_graph $L70 --gpu-memory 4GiB --new-tokens 64
fi
if has eagerbench; then
    bench nf4_unlimited_eager_nowarmup $L8 --new-tokens 96 --decode eager --no-warmup
    bench nf4_4GiB_eager_nowarmup $L8 --gpu-memory 4GiB --new-tokens 96 --decode eager --no-warmup
    CUDA_MODULE_LOADING=EAGER bench nf4_unlimited_eager_nowarmup_modeager $L8 --new-tokens 96 --decode eager --no-warmup
fi
if has batch8; then
    bench nf4_4GiB_batch8_graph $L8 --gpu-memory 4GiB --new-tokens 32 --batch 8
fi
if has generate; then
    for gm in 4GiB none; do
        stamp "generate --gpu-memory $gm (fresh process)"
        args=(); [ $gm != none ] && args=(--gpu-memory $gm)
        t=$(date +%s.%N)
        timeout 120 python3 -m qstream.cli -v generate $L8 "${args[@]}" --no-chat --max-new-tokens 64 \
            --prompt "What is the capital of France? The answer is Paris." 2>&1 | grep -v "^INFO httpx" | tail -12
        echo "wall $(python3 -c "import time; print(round(time.time() - $t, 2))") s"
    done
fi
if has diag; then
    for v in "" "--sleep 12" "--gc-freeze"; do
        stamp "eager start-up diagnosis, 8B nf4 all resident, fresh process $v"
        timeout 90 python3 scripts/eager_start.py $L8 $v
    done
fi
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path("/tmp/qs/json").glob("*.json")):
    r = json.loads(p.read_text()); r["name"] = p.stem; rows.append(r)
pathlib.Path(sys.argv[1], "bench.json").write_text(json.dumps(rows, indent=1))
print(f"{'figure':42} {'load':>6} {'ttft ms':>8} {'first16':>8} {'first32':>8} {'steady':>8} {'floor':>7} {'r32':>5} {'rst':>5}  decode")
for r in rows:
    ms = lambda k: "-" if r.get(k) is None else f"{r[k] * 1000:.2f}"
    fr = lambda k: "-" if r.get(k) is None else f"{r[k]:.2f}"
    print(f"{r['name']:42} {r['load_s']:6.1f} {r['first_token_s'] * 1000:8.1f} {ms('first_16_s_per_token'):>8} "
          f"{ms('first_32_s_per_token'):>8} {ms('steady_s_per_token'):>8} {ms('floor_s_per_token'):>7} "
          f"{fr('floor_ratio_first_32'):>5} {fr('floor_ratio_steady'):>5}  {r['decode_mode'][:60]}")
EOF
stamp done
