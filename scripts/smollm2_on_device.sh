# shellcheck shell=bash
# Source from a device script with the output directory: scripts/device_log.sh (log, wheels, GPUs,
# stamp()), then the embedded SmolLM2 GGUF at $G. The GGUF (98 MB)
# exceeds what one device call carries: an earlier call on the same warm machine left its first part
# in /tmp/keep/part1, this one carries the rest in .gpu_b/part2; the sha256 is checked.
#     source scripts/smollm2_on_device.sh "$OUT" || exit 1
source scripts/device_log.sh "$1" || return 1
G=/tmp/smollm2.gguf
cat /tmp/keep/part1 .gpu_b/part2 > $G
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c - || return 1
