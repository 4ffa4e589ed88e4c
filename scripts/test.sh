#!/usr/bin/env bash
# Runs the whole test suite: builds everything (the kernel from its cache
# when its inputs are unchanged), checks formatting and lints, then runs
# every test, the end-to-end boots on the real /dev/kvm included.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
eval "$(bash scripts/build.sh)"
export RTV_KERNEL RTV_KERNEL_UP RTV_INITRAMFS RTV_TEST_INITRAMFS RTV_VMM
echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "[test] cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
