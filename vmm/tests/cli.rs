//! Bad input to `rtv-vmm`: a clear error naming the thing, a non-zero exit,
//! and nothing left behind.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::TempDir;

/// The first bytes of an x86-64 executable ELF: enough to pass the header checks.
fn elf_header() -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2;
    h[5] = 1;
    h[16] = 2;
    h[18] = 62;
    h
}

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rtv-vmm"))
        .args(args)
        .output()
        .expect("run rtv-vmm")
}

fn assert_fails_naming(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

fn dir_is_empty_but(dir: &Path, keep: &[&Path]) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| keep.contains(&e.unwrap().path().as_path()))
}

#[test]
fn missing_kernel() {
    let out = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_fails_naming(&out, "/nonexistent/vmlinux");
}

#[test]
fn kernel_that_is_not_an_x86_64_elf() {
    let dir = TempDir::new("vmm-cli-notelf");
    let bz = dir.file(
        "bzImage",
        &[
            0x4d, 0x5a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    let out = vmm(&["--kernel", bz.to_str().unwrap()]);
    assert_fails_naming(&out, "not an x86-64 ELF vmlinux");
    assert_fails_naming(&out, bz.to_str().unwrap());
    let mut arm = elf_header();
    arm[18] = 183;
    let arm = dir.file("arm64", &arm);
    let out = vmm(&["--kernel", arm.to_str().unwrap()]);
    assert_fails_naming(&out, "another architecture");
}

#[test]
fn missing_initramfs() {
    let dir = TempDir::new("vmm-cli-noinitrd");
    let k = dir.file("vmlinux", &elf_header());
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initramfs.cpio",
    ]);
    assert_fails_naming(&out, "initramfs /nonexistent/initramfs.cpio");
}

#[test]
fn memory_the_host_cannot_give() {
    let dir = TempDir::new("vmm-cli-mem");
    let k = dir.file("vmlinux", &elf_header());
    let console = dir.0.join("console.log");
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "100000000",
        "--console",
        console.to_str().unwrap(),
    ]);
    assert_fails_naming(&out, "guest memory of 100000000 MiB");
    assert!(!console.exists(), "console file left behind");
    let out = vmm(&["--kernel", k.to_str().unwrap(), "--mem", "1"]);
    assert_fails_naming(&out, "below the minimum");
}

#[test]
fn kvm_device_absent() {
    let dir = TempDir::new("vmm-cli-kvm");
    let k = dir.file("vmlinux", &elf_header());
    let console = dir.0.join("console.log");
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--kvm-device",
        "/nonexistent/kvm",
        "--console",
        console.to_str().unwrap(),
    ]);
    assert_fails_naming(&out, "cannot open the KVM device /nonexistent/kvm");
    assert!(dir_is_empty_but(&dir.0, &[&k]), "files left behind");
}

#[test]
fn kvm_device_that_is_not_kvm() {
    let dir = TempDir::new("vmm-cli-notkvm");
    let k = dir.file("vmlinux", &elf_header());
    let out = vmm(&["--kernel", k.to_str().unwrap(), "--kvm-device", "/dev/null"]);
    assert_fails_naming(&out, "/dev/null");
}

#[test]
fn unknown_flag_and_bad_values() {
    let out = vmm(&["--kernel", "x", "--frobnicate"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
    let out = vmm(&["--kernel", "x", "--boot", "bios"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown boot protocol"));
}

#[test]
fn vsock_flags_are_checked_and_named() {
    let out = vmm(&["--print-cmdline", "--vsock-cid", "3"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vsock-uds"));
    let out = vmm(&["--print-cmdline", "--vsock-uds", "/tmp/x.sock"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vsock-cid"));
    for cid in ["0", "2", "4294967295"] {
        let out = vmm(&[
            "--print-cmdline",
            "--vsock-cid",
            cid,
            "--vsock-uds",
            "/tmp/x.sock",
        ]);
        assert_fails_naming(&out, &format!("--vsock-cid {cid}"));
    }
    let out = vmm(&[
        "--print-cmdline",
        "--vsock-cid",
        "3",
        "--vsock-uds",
        "/nonexistent/dir/v.sock",
    ]);
    assert_fails_naming(&out, "--vsock-uds");
    assert_fails_naming(&out, "/nonexistent/dir");
}

#[test]
fn print_cmdline_includes_the_virtio_device() {
    let out = vmm(&[
        "--print-cmdline",
        "--vsock-cid",
        "3",
        "--vsock-uds",
        "/tmp/x.sock",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.trim_end()
            .ends_with("virtio_mmio.device=4K@0xd0000000:5"),
        "{line}"
    );
    // Given back as --cmdline, the entry is not doubled.
    let full = line.trim().to_string();
    let out = vmm(&[
        "--print-cmdline",
        "--cmdline",
        &full,
        "--vsock-cid",
        "3",
        "--vsock-uds",
        "/tmp/x.sock",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), full);
    let out = vmm(&["--print-cmdline"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("virtio_mmio"));
}

#[test]
fn a_socket_path_in_use_is_refused() {
    let dir = TempDir::new("vmm-cli-vsock-inuse");
    let k = dir.file("vmlinux", &elf_header());
    let sock = dir.0.join("v.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock-cid",
        "3",
        "--vsock-uds",
        sock.to_str().unwrap(),
    ]);
    assert_fails_naming(&out, "--vsock-uds");
    assert_fails_naming(&out, "already in use");
    assert!(sock.exists(), "someone else's socket was removed");
    // A regular file there is refused and kept.
    let file = dir.file("f.sock", b"keep me");
    let out = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock-cid",
        "3",
        "--vsock-uds",
        file.to_str().unwrap(),
    ]);
    assert_fails_naming(&out, "not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

/// A tap (with `IFF_VNET_HDR` if `vnet_hdr`) made in a network namespace of
/// its own by a thread that unshares one: the machine's interfaces are never
/// touched. The fd is close-on-exec.
fn private_tap(vnet_hdr: bool) -> std::fs::File {
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; only this thread moves.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        // SAFETY: ifreq is plain old data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"rtvcli0") {
            *d = *s as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        use std::os::fd::AsRawFd;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq at the pointer,
        // which points to one we own.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tun
    })
    .join()
    .unwrap()
}

/// Runs rtv-vmm with `fd` inherited (its close-on-exec flag cleared in the
/// child).
fn vmm_with_fd(args: &[&str], fd: i32) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtv-vmm"));
    cmd.args(args);
    // SAFETY: the closure only calls fcntl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run rtv-vmm")
}

#[test]
fn net_flags_are_checked_and_named() {
    // A NIC with no backend goes after the other devices.
    let out = vmm(&["--print-cmdline", "--net"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.trim_end()
            .ends_with("virtio_mmio.device=4K@0xd0000000:5"),
        "{line}"
    );
    let out = vmm(&[
        "--print-cmdline",
        "--net",
        "--net-mac",
        "02:00:00:00:00:07",
        "--net-mtu",
        "9000",
        "--vsock-cid",
        "3",
        "--vsock-uds",
        "/tmp/x.sock",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.trim_end()
            .ends_with("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{line}"
    );

    for (mac, needle) in [
        ("zz:00:00:00:00:01", "not a hex byte"),
        ("02:00:00:00:00", "not a MAC address"),
        ("01:00:5e:00:00:01", "multicast"),
        ("00:00:00:00:00:00", "all zeros"),
    ] {
        let out = vmm(&["--print-cmdline", "--net", "--net-mac", mac]);
        assert_fails_naming(&out, "--net-mac");
        assert_fails_naming(&out, needle);
    }
    for mtu in ["0", "67", "65536", "70000"] {
        let out = vmm(&["--print-cmdline", "--net", "--net-mtu", mtu]);
        assert_fails_naming(
            &out,
            &format!("--net-mtu {mtu}: must be between 68 and 65535"),
        );
    }
    let out = vmm(&["--print-cmdline", "--net-mac", "02:00:00:00:00:07"]);
    assert_fails_naming(&out, "--net-mac needs a NIC");
    let out = vmm(&["--print-cmdline", "--net-mtu", "9000"]);
    assert_fails_naming(&out, "--net-mtu needs a NIC");
    // Fds that are not an open tap.
    let out = vmm(&["--print-cmdline", "--net-tap-fd", "999"]);
    assert_fails_naming(
        &out,
        "--net-tap-fd 999: virtio-net: fd 999 is not an open file descriptor",
    );
    let out = vmm(&["--print-cmdline", "--net-tap-fd", "0"]);
    assert_fails_naming(&out, "--net-tap-fd 0");
    assert_fails_naming(&out, "is not a tap device");
    let dir = TempDir::new("vmm-cli-net");
    let out = vmm(&["--restore", dir.0.to_str().unwrap(), "--net-tap-fd", "0"]);
    assert_fails_naming(&out, "--net-tap-fd 0");
    // Boot-only flags with --restore, and --net with a tap.
    let out = vmm(&["--restore", dir.0.to_str().unwrap(), "--net"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--net"));
    let out = vmm(&["--print-cmdline", "--net", "--net-tap-fd", "0"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--net-tap-fd"));

    // A real tap, inherited.
    use std::os::fd::AsRawFd;
    let tap = private_tap(true);
    let fd = tap.as_raw_fd();
    let out = vmm_with_fd(&["--print-cmdline", "--net-tap-fd", &fd.to_string()], fd);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("virtio_mmio.device=4K@0xd0000000:5"));
    let plain = private_tap(false);
    let fd = plain.as_raw_fd();
    let out = vmm_with_fd(&["--print-cmdline", "--net-tap-fd", &fd.to_string()], fd);
    assert_fails_naming(&out, &format!("--net-tap-fd {fd}"));
    assert_fails_naming(&out, "rtvcli0, but it was opened without IFF_VNET_HDR");
}
