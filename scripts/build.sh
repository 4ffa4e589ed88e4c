#!/usr/bin/env bash
# Builds everything: the guest kernel (cached outside the repo), the
# initramfs, and the workspace's release binaries. Prints `export` lines
# for RTV_KERNEL, RTV_KERNEL_UP, RTV_INITRAMFS, RTV_TEST_INITRAMFS and
# RTV_VMM on stdout, and links the kernels and the initramfs next to
# target/release/rtv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
kernel=$(bash guest-kernel/build.sh)
echo "[build] guest kernel: $kernel" >&2
kernel_up=$(bash guest-kernel/build.sh --up)
echo "[build] guest kernel for 1-vCPU VMs: $kernel_up" >&2
initramfs=$(bash rootfs-builder/build.sh)
echo "[build] initramfs: $initramfs" >&2
test_initramfs=$(bash rootfs-builder/build.sh --test)
echo "[build] test initramfs (with busybox): $test_initramfs" >&2
echo "[build] release binaries" >&2
cargo build --release --workspace --quiet >&2
# rtv finds the guest kernel, the initramfs and the VMM next to itself.
ln -sf "$kernel" target/release/rtv-vmlinux
ln -sf "$kernel_up" target/release/rtv-vmlinux-up
ln -sf "$initramfs" target/release/rtv-initramfs.cpio
echo "export RTV_KERNEL=$kernel RTV_KERNEL_UP=$kernel_up RTV_INITRAMFS=$initramfs RTV_TEST_INITRAMFS=$test_initramfs RTV_VMM=$root/target/release/rtv-vmm"
