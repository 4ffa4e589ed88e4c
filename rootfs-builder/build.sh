#!/usr/bin/env bash
# Builds the statically linked guest agent and packs it into the initramfs.
#   build.sh          the production initramfs: the agent as /init
#   build.sh --test   the test initramfs: also /bin/busybox (Debian's busybox-static)
# Progress goes to stderr; the only line on stdout is the initramfs path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
extra=()
name=initramfs.cpio
if [ "${1:-}" = "--test" ]; then
  [ -x /bin/busybox ] || { echo "[initramfs] /bin/busybox missing: apt-get install busybox-static" >&2; exit 1; }
  extra=(--busybox /bin/busybox)
  name=initramfs-test.cpio
fi
out="$root/target/rtv/$name"
mkdir -p "$(dirname "$out")"
echo "[initramfs] building the static agent" >&2
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --quiet --profile agent --target x86_64-unknown-linux-gnu -p rtv-agent >&2
agent="$root/target/x86_64-unknown-linux-gnu/agent/rtv-agent"
echo "[initramfs] packing $(stat -c %s "$agent") bytes of agent${extra:+ and busybox}" >&2
cargo run --quiet --release -p rtv-rootfs-builder -- --agent "$agent" "${extra[@]}" --output "$out" >&2
echo "$out"
