#!/usr/bin/env bash
# For a newcomer: installs what is needed, builds everything, and runs the
# demo: a micro-VM boots rtv's kernel into rtv's agent, which reports
# readiness and powers the VM off.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
eval "$(bash "$root/scripts/build.sh")"
echo "[demo] rtv-vmm --kernel $RTV_KERNEL --initrd $RTV_INITRAMFS --append rtv.poweroff" >&2
start=$(date +%s.%N)
"$RTV_VMM" --kernel "$RTV_KERNEL" --initrd "$RTV_INITRAMFS" --append rtv.poweroff --log-level info
echo "[demo] the VM booted, reported ready and powered off in $(echo "$(date +%s.%N) - $start" | bc | cut -c1-5) s" >&2
