#!/usr/bin/env bash
# Several GPUs of one host (issue 16): s/token of synthetic nf4 shapes on 1 and 2 GPUs, 4 GiB each,
# pinned host cache, every figure a fresh `qstream bench` process, one GPU against two in the
# same run. Run from the directory holding qstream/ and scripts/ on a machine with 2 GPUs, with
# the bitsandbytes wheel in $QSTREAM_WHEELS (default .whl):
#
#     bash scripts/multi_gpu.sh OUTDIR [stages...]
#
# stages: tests shards bench generate l70b6 (default: tests shards bench; about 5 minutes)
#
# Writes OUTDIR/log.txt (everything) and OUTDIR/bench.json (one object per bench figure, with
# the 2-GPU / 1-GPU ratios). Synthetic nf4 shards (random codes) are written to /tmp/qs.
# Expected plans (runtime/plan.py arithmetic): 8B on 2 x 4 GiB holds every layer resident on cuda:0
# with the head on cuda:1 (nothing streams: resident capacity adds up); the 70B slice has 12 layers
# so that both GPUs still stream (cuda:0 layers 0-7, 3 resident + 5 streamed; cuda:1 layers 8-11,
# 4 streamed): the floor is 5/12 of one GPU's. The 6-layer slice of decode_h200.sh fits resident on
# two 4 GiB budgets: stage l70b6 shows that case.
set -u
OUT=${1:?usage: multi_gpu.sh OUTDIR [stages...]}
shift
STAGES=${*:-tests shards bench}
mkdir -p /tmp/qs /tmp/qs/mjson
rm -f /tmp/qs/mjson/*.json
source scripts/device_log.sh "$OUT" index,name,memory.total,pcie.link.gen.current,pcie.link.width.current || exit 1  # log, wheels, GPUs, stamp()
nvidia-smi topo -m 2>/dev/null | head -6
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'gpus', torch.cuda.device_count())"
nproc; uname -r

L8=/tmp/qs/l8b-nf4
L70=/tmp/qs/l70b12-nf4
L70S=/tmp/qs/l70b6-nf4
TWO=cuda:0,cuda:1
has() { [[ " $STAGES " == *" $1 "* ]]; }

bench() {  # name, then bench args (a fresh process per figure)
    local name=$1; shift
    stamp "bench $name: $*"
    timeout 120 python3 -m qstream.cli -v bench "$@" --prompt-tokens 64 --host-memory auto \
        --json /tmp/qs/mjson/$name.json 2>&1 | grep -v "^INFO httpx"
    echo "rc=${PIPESTATUS[0]}"
}

if has tests; then
    stamp tests
    # 2-GPU tokens == 1-GPU tokens (graph and eager), and the single-GPU graph test (unchanged behaviour)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "two_gpus or (graph_replay and min)" 2>&1 | tail -8
fi
if has shards; then
    stamp shards
    [ -f $L8/manifest.json ] || timeout 150 python3 scripts/make_synthetic_shards.py --shape llama3-8b --out $L8
    [ -f $L70/manifest.json ] || timeout 200 python3 scripts/make_synthetic_shards.py --shape llama3-70b-slice --layers 12 --out $L70
    if has l70b6; then
        [ -f $L70S/manifest.json ] || timeout 150 python3 scripts/make_synthetic_shards.py --shape llama3-70b-slice --layers 6 --out $L70S
    fi
    sync
fi
if has bench; then
    stamp "bad device list (expect one line, exit 2)"
    python3 -m qstream.cli generate $L8 --devices cuda:0,cuda:0 -p hi -n 2; echo "rc=$?"
    bench l8b_1gpu_4GiB $L8 --device cuda:0 --gpu-memory 4GiB --new-tokens 64
    bench l8b_2gpu_4GiB $L8 --devices $TWO --gpu-memory 4GiB --new-tokens 64
    bench l70b12_1gpu_4GiB $L70 --device cuda:0 --gpu-memory 4GiB --new-tokens 48
    bench l70b12_2gpu_4GiB $L70 --devices $TWO --gpu-memory 4GiB --new-tokens 48
fi
if has l70b6; then
    bench l70b6_1gpu_4GiB $L70S --device cuda:0 --gpu-memory 4GiB --new-tokens 48
    bench l70b6_2gpu_4GiB $L70S --devices $TWO --gpu-memory 4GiB --new-tokens 48
fi
if has generate; then
    stamp "generate --devices $TWO --gpu-memory 4GiB (fresh process)"
    timeout 90 python3 -m qstream.cli -v generate $L70 --devices $TWO --gpu-memory 4GiB --no-chat --max-new-tokens 16 \
        --prompt "What is the capital of France?" 2>&1 | grep -v "^INFO httpx" | tail -12
fi
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
rows = {}
for p in sorted(pathlib.Path("/tmp/qs/mjson").glob("*.json")):
    r = json.loads(p.read_text()); r["name"] = p.stem; rows[p.stem] = r
for name, r in rows.items():  # 2 GPUs against 1 GPU of the same run
    one = rows.get(name.replace("_2gpu_", "_1gpu_"))
    if "_2gpu_" in name and one:
        for k in ("decode_s_per_token", "first_32_s_per_token", "steady_s_per_token"):
            if r.get(k) and one.get(k):
                r[f"ratio_to_1gpu_{k}"] = r[k] / one[k]
pathlib.Path(sys.argv[1], "bench.json").write_text(json.dumps(list(rows.values()), indent=1))
print(f"{'figure':20} {'plan':>10} {'load':>6} {'ttft ms':>8} {'first16':>8} {'first32':>8} {'steady':>8} {'floor':>7} "
      f"{'r32':>5} {'x1gpu':>6}  MiB/token per device")
for name, r in rows.items():
    ms = lambda k: "-" if r.get(k) is None else f"{r[k] * 1000:.2f}"
    fr = lambda k: "-" if r.get(k) is None else f"{r[k]:.2f}"
    p = r["plan"]
    per = " ".join(f"{d}:{b / 2**20:.0f}" for d, b in r.get("streamed_bytes_per_device", {}).items())
    print(f"{name:20} {p['resident']:>3}r/{p['host']}h/{p['disk']}d {r['load_s']:6.1f} {r['first_token_s'] * 1000:8.1f} "
          f"{ms('first_16_s_per_token'):>8} {ms('first_32_s_per_token'):>8} {ms('steady_s_per_token'):>8} "
          f"{ms('floor_s_per_token'):>7} {fr('floor_ratio_first_32'):>5} {fr('ratio_to_1gpu_decode_s_per_token'):>6}  {per}")
    print(f"{'':20} decode: {r['decode_mode'][:110]}")
EOF
stamp done
