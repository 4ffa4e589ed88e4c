#!/usr/bin/env bash
# Installs what rtv needs from Debian's packages (idempotent: apt runs only
# when something is missing). Rust (cargo) must already be on the machine.
set -euo pipefail
packages=(
  build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils # guest kernel build
  linux-source-6.1                                                  # guest kernel source
  qemu-system-x86                                                   # reference VMM for benchmarks
  busybox-static                                                    # test guests' user space
  containerd runc crun                                              # containerd 1.6 and the reference OCI runtimes for rtv's tests
  python3-grpcio python3-protobuf protobuf-compiler                 # the CRI test client (tests/cri/cri.py, run by /usr/bin/python3)
  docker.io podman                                                  # Docker 20.10 and Podman 4.3 as clients in the tests (started by the harness only)
  containernetworking-plugins iptables                              # CNI plugins (/usr/lib/cni) for the CRI pod-network tests, which run them in namespaces of their own
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # No package may start its service (dockerd would rewire the host's
  # network namespace: bridges, iptables); the tests start their own,
  # inside namespaces they make. policy-rc.d exit 101 = "not allowed".
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
  echo "[deps] all Debian packages present" >&2
fi
command -v cargo >/dev/null || { echo "[deps] cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
[ -r /dev/kvm ] && [ -w /dev/kvm ] || echo "[deps] warning: /dev/kvm is not usable by $(id -un); VMs will not start" >&2
