# shellcheck shell=bash
# Source from a device script: OUTDIR made, everything after this logged to OUTDIR/log.txt (and shown),
# Python unbuffered, the carried wheels installed (scripts/device_setup.sh), the GPUs named, and
# stamp() defined for section headers.
#     source scripts/device_log.sh "$OUT" [nvidia-smi --query-gpu fields] || exit 1
mkdir -p "$1"
exec > >(tee -a "$1/log.txt") 2>&1
export PYTHONUNBUFFERED=1
source scripts/device_setup.sh || return 1
nvidia-smi --query-gpu="${2:-name,memory.total,driver_version}" --format=csv,noheader
stamp() { echo "=== $(date +%T) $*"; }
