#!/usr/bin/env bash
# Runs the whole test suite: builds everything (the kernel from its cache
# when its inputs are unchanged), checks formatting and lints, then runs
# every test, the end-to-end boots on the real /dev/kvm included.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
eval "$(bash scripts/build.sh)"
export RTV_KERNEL RTV_INITRAMFS RTV_TEST_INITRAMFS RTV_VMM
echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "[test] cargo test" >&2
cargo test --workspace 2>&1
