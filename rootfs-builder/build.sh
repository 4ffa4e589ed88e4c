#!/usr/bin/env bash
# Builds the statically linked guest agent and packs it into the initramfs.
# Progress goes to stderr; the only line on stdout is the initramfs path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="${RTV_INITRAMFS_OUT:-$root/target/rtv/initramfs.cpio}"
mkdir -p "$(dirname "$out")"
cd "$root"
echo "[initramfs] building the static agent" >&2
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet --profile agent --target x86_64-unknown-linux-gnu -p rtv-agent >&2
agent="$root/target/x86_64-unknown-linux-gnu/agent/rtv-agent"
echo "[initramfs] packing $(stat -c %s "$agent") bytes of agent" >&2
cargo run --quiet --release -p rtv-rootfs-builder -- --agent "$agent" --output "$out" >&2
echo "$out"
