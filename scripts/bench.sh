#!/usr/bin/env bash
# rtv's benchmarks; e.g. `scripts/bench.sh boot -n 5`.
set -euo pipefail
usage() {
    cat <<'USAGE'
usage: scripts/bench.sh [SUBCOMMAND] [OPTIONS]   (default: boot)
  boot      [-n N] [--mem MIB] [--no-qemu]  boot to agent readiness: rtv-vmm against QEMU microvm
  agent     [-n N]                          the agent over vsock in a VM, and on the host
  template  [-n N] [--cold N] [--idle N]    sandboxes from a VM template against cold boots
  oci       [-n N] [--no-containerd]        `<runtime> run` and `ctr run --rm` of busybox `true`
                                            with runc, crun and rtv, and one running container's
                                            host memory (waits up to --max-wait 600 s for load < 1.5)
  cri       [-n N] [--idle S]               pods through containerd's CRI plugin on the runc, crun and
                                            rtv handlers: RunPodSandbox to the first container running,
                                            and a pod's host memory and idle CPU beside its container
  net       [-n N] [--mib M] [--sysctl K=V]  TCP between two pods on a CNI bridge, runc and rtv handlers:
                                            httpd to wget throughput, ping's round trip, frames per MiB,
                                            rtv's VMM CPU per MiB
  soak      [--cycles N] [--every K]        N lifecycles through rtv and N pods through CRI, a census of
            [--rtv-only | --cri-only]       processes, mounts, sockets, links, netns, cgroups, state,
                                            descriptors, templates and memory every K; fails on a leak
  jail      [-n N] [--idle N]               what the VMM's jail and seccomp filters cost: template
                                            starts with both on and both off, idle VMMs' memory
  flamegraph -o OUT.svg [--title T] N.folded...   one flame graph of several parts of a guest profile
                                            (RTV_PROFILE_DIR=DIR or `rtv --debug`: DIR/<pod>/parts.txt)
  fs        [-n N] [--mem MIB]              virtio-fs against the host: a 256 MiB sequential read
                                            and find + stat over 5,000 files, cold and host-warm
                                            (one boot; each VM run takes minutes under PVM)
`scripts/bench.sh SUBCOMMAND --help` lists a subcommand's options (after building).
USAGE
}
case "${1:-}" in
    -h | --help | help)
        usage
        exit 0
        ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
eval "$(bash "$root/scripts/build.sh")"
export RTV_KERNEL RTV_KERNEL_UP RTV_INITRAMFS RTV_TEST_INITRAMFS RTV_VMM
cd "$root"
exec cargo run --quiet --release -p rtv-tests --bin rtv-bench -- "${@:-boot}"
