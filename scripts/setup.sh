#!/usr/bin/env bash
# For a newcomer: installs what is needed, builds everything, and runs the
# demo: `rtv run` of a busybox bundle. The first run makes the VM template
# (a cold boot and a snapshot); later containers start from it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
eval "$(bash "$root/scripts/build.sh")"
rtv=$root/target/release/rtv
# The configuration file: the repo's commented defaults, unless the host
# has one already.
if [ ! -e /etc/rtv/config.toml ]; then
  install -D -m 0644 "$root/config/config.toml" /etc/rtv/config.toml
  echo "[setup] installed /etc/rtv/config.toml (every key commented out: the defaults)" >&2
fi
# The small pod size of the README's second RuntimeClass (rtv-tiny).
if [ ! -e /etc/rtv/tiny.toml ]; then
  install -D -m 0644 "$root/config/tiny.toml" /etc/rtv/tiny.toml
  echo "[setup] installed /etc/rtv/tiny.toml (128 MiB, 1 vCPU: the rtv-tiny RuntimeClass)" >&2
fi
bundle=$root/target/demo-bundle
bash "$root/scripts/demo-bundle.sh" "$bundle" "$rtv" \
  sh -c 'echo "hello from a container in an rtv micro-VM: $(uname -r), $(hostname)"; id; exit 7'
cd "$bundle"
for attempt in first second; do
  echo "[demo] rtv run ($attempt start)" >&2
  start=$(date +%s.%N)
  set +e
  "$rtv" --root /run/rtv run "demo-$$"
  code=$?
  set -e
  echo "[demo] exit code $code (the container's), $(echo "$(date +%s.%N) - $start" | bc | cut -c1-5) s" >&2
  [ "$code" = 7 ] || { echo "[demo] expected exit code 7" >&2; exit 1; }
done
