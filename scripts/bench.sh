#!/usr/bin/env bash
# rtv's benchmarks; e.g. `scripts/bench.sh boot -n 5`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
eval "$(bash "$root/scripts/build.sh")"
export RTV_KERNEL RTV_INITRAMFS RTV_TEST_INITRAMFS RTV_VMM
cd "$root"
exec cargo run --quiet --release -p rtv-tests --bin rtv-bench -- "${@:-boot}"
