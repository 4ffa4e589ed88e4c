//! The hardening `rtv-vmm` applies to itself before any thread starts
//! (`rtv_vmm::jail`), seen from outside on a running VMM that booted the
//! real guest kernel with every device: every thread's capabilities and
//! `NoNewPrivs` and seccomp filter, the descriptors, the environment and
//! the rlimits. And `--jail off --seccomp off` leaves them as they were
//! (the switches work both ways).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{artifact, TempDir};

/// A file opened without close-on-exec, as a careless parent leaks one.
fn leaked_fd(path: &Path) -> OwnedFd {
    let f = std::fs::File::create(path).unwrap();
    let fd = OwnedFd::from(f);
    // SAFETY: F_GETFD/F_SETFD on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        assert!(flags >= 0);
        assert_eq!(
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC),
            0
        );
    }
    fd
}

struct Running {
    child: Child,
    tmp: TempDir,
    leaked: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the real kernel with a console file, vsock and a shared
/// directory, with a leaked descriptor and a secret in the environment,
/// and returns once the agent is ready (every VMM thread exists).
fn boot(jail: &str, seccomp: &str) -> Running {
    let kernel = artifact("RTV_KERNEL", "guest-kernel/build.sh");
    let initrd = artifact("RTV_INITRAMFS", "rootfs-builder/build.sh");
    // One directory per boot: the tests boot at once in one process.
    static BOOTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BOOTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tmp = TempDir::new(&format!("vmm-jail-{jail}-{n}"));
    let share = tmp.0.join("share");
    std::fs::create_dir(&share).unwrap();
    let console = tmp.0.join("console");
    let leaked = tmp.0.join("leaked-marker");
    let fd = leaked_fd(&leaked);
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtv-vmm"));
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--console")
        .arg(&console)
        .args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(tmp.0.join("vsock.sock"))
        .arg("--shared-dir")
        .arg(&share)
        .args(["--jail", jail, "--seccomp", seccomp])
        .env("RTV_JAIL_TEST_SECRET", "s3cret")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.0.join("log")).unwrap());
    // SAFETY: fcntl is async-signal-safe; it keeps the leaked descriptor
    // open across exec in the child (std sets close-on-exec on dup'd fds).
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(raw, libc::F_GETFD);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(fd);
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(rtv_vmm::READY_MARKER) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "rtv-vmm --jail {jail} exited ({status}) before readiness: {}",
                std::fs::read_to_string(tmp.0.join("log")).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            panic!("no readiness line within 180 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Running { child, tmp, leaked }
}

/// `Field:\tvalue` of a `/proc/.../status` text.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn hex(v: &str) -> u64 {
    u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("{v:?} is not hex"))
}

/// Every thread's status text.
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let t = t.unwrap().path();
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            (field(&status, "Name").to_owned(), status)
        })
        .collect()
}

/// Where each of the process's descriptors points.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            Some(std::fs::read_link(e.path()).ok()?.display().to_string())
        })
        .collect()
}

/// The keeper's only child: the VMM, in its own pid namespace.
fn vmm_of(keeper: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap();
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "the keeper's children: {children:?}");
    pids[0]
}

#[test]
fn a_running_vmm_is_hardened_in_every_thread() {
    let vm = boot("on", "on");
    let kept = rtv_vmm::jail::kept_mask();

    // The process started stays outside the VMM's pid namespace as its
    // keeper: no capability at all, its own filter, no descriptor but
    // standard input, output and error (and the pipe the VMM checks it
    // by), no environment.
    let keeper = vm.child.id();
    let comm = std::fs::read_to_string(format!("/proc/{keeper}/comm")).unwrap();
    assert_eq!(comm.trim(), rtv_vmm::jail::KEEPER_NAME);
    let keeper_threads = threads(keeper);
    assert_eq!(keeper_threads.len(), 1, "{keeper_threads:?}");
    let status = &keeper_threads[0].1;
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(hex(field(status, set)), 0, "the keeper's {set}");
    }
    assert_eq!(field(status, "NoNewPrivs"), "1");
    assert_eq!(field(status, "Seccomp"), "2");
    let fds: Vec<String> = fd_targets(keeper)
        .into_iter()
        .filter(|t| !t.starts_with("pipe:"))
        .collect();
    assert_eq!(fds.len(), 3, "the keeper's descriptors: {fds:?}");
    assert!(std::fs::read(format!("/proc/{keeper}/environ"))
        .unwrap()
        .is_empty());
    let ours = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{keeper}/ns/pid")).unwrap(),
        ours
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{keeper}/ns/pid_for_children")).unwrap(),
        ours
    );

    let pid = vmm_of(keeper);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid: Vec<&str> = field(&status, "NSpid").split_whitespace().collect();
    assert_eq!(
        nspid.last(),
        Some(&"1"),
        "pid 1 of its namespace: {nspid:?}"
    );

    // Started again without its environment, under its own name.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "rtv-vmm");
    let threads = threads(pid);
    assert!(threads.len() >= 3, "vCPU, event loop and main: {threads:?}");
    for (name, status) in &threads {
        assert_eq!(field(status, "NoNewPrivs"), "1", "thread {name}");
        assert_eq!(hex(field(status, "CapInh")), 0, "thread {name}");
        assert_eq!(hex(field(status, "CapAmb")), 0, "thread {name}");
        assert_eq!(hex(field(status, "CapPrm")), kept, "thread {name}");
        assert_eq!(hex(field(status, "CapBnd")), kept, "thread {name}");
        // The FUSE server raises and drops CAP_FSETID and CAP_DAC_OVERRIDE
        // in its effective set per request; never beyond the kept ones.
        assert_eq!(hex(field(status, "CapEff")) & !kept, 0, "thread {name}");
        // Its own seccomp filter, one per thread.
        assert_eq!(field(status, "Seccomp"), "2", "thread {name}");
        assert_eq!(field(status, "Seccomp_filters"), "1", "thread {name}");
    }

    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "environment: {:?}",
        String::from_utf8_lossy(&environ)
    );

    let targets = fd_targets(pid);
    let leaked = vm.leaked.display().to_string();
    assert!(
        !targets.contains(&leaked),
        "the leaked descriptor survived: {targets:?}"
    );
    // What the VMM opened itself: KVM, the console, its event fds and
    // sockets, the share's directories, guest memory, /dev/null (stdio),
    // and the FUSE server's /proc/self/fd (to reopen its O_PATH inodes) and
    // /proc/self/mountinfo (mount ids).
    // (Its own procfs's paths: pid 1.)
    let proc_fd = "/1/fd".to_owned();
    let proc_mountinfo = "/1/mountinfo".to_owned();
    let share = vm.tmp.0.join("share").display().to_string();
    let console = vm.tmp.0.join("console").display().to_string();
    let log = vm.tmp.0.join("log").display().to_string();
    for t in &targets {
        let expected = t.starts_with("anon_inode:")
            || t.starts_with("socket:")
            || t.starts_with("pipe:")
            || t.starts_with("/memfd:")
            || t.starts_with(&share)
            || [
                // /dev/kvm, opened in the VMM's namespace's /dev, a mount
                // detached with the old root.
                "/kvm",
                "/dev/null",
                console.as_str(),
                log.as_str(),
                proc_fd.as_str(),
                proc_mountinfo.as_str(),
            ]
            .contains(&t.as_str());
        assert!(expected, "unexpected descriptor {t:?} among {targets:?}");
    }

    for ns in ["ipc", "uts", "mnt", "pid", "net"] {
        let own = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(own, ours, "the VMM's {ns} namespace is its parent's");
    }
    // The procfs the virtio-fs server holds open is its namespace's, with
    // the process directories only: its own process, no other, none of
    // the host's kernel files (sysrq-trigger, sys).
    let proc_dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|fd| std::fs::read_link(fd).is_ok_and(|t| t.ends_with("1/fd")))
        .unwrap_or_else(|| panic!("no procfs descriptor among {targets:?}"));
    let mut top: Vec<String> = std::fs::read_dir(proc_dir.join("../.."))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["1", "self", "thread-self"], "the VMM's procfs");

    // Its root holds only the directory of what it still opens by name
    // (the vsock socket's, here the test's directory), read-only; the
    // host's files are not there.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let first = vm
        .tmp
        .0
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    assert_eq!(top, vec![first], "the VMM's root");
    for gone in ["etc/passwd", "dev/kvm", "usr", "proc/self"] {
        assert!(!root.join(gone).exists(), "{gone} in the VMM's root");
    }
    let inside = root.join(vm.tmp.0.strip_prefix("/").unwrap());
    assert!(inside.join("vsock.sock").exists(), "the vsock socket");
    assert!(inside.join("share").is_dir());
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let root_line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .unwrap_or_else(|| panic!("no / in {mounts}"));
    assert!(
        root_line.starts_with("rtv-vmm-root / tmpfs ro,"),
        "{root_line}"
    );

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let v: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&v[4..6], ["0", "0"], "{core}");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<&str> = nofile.split_whitespace().collect();
    assert_eq!(v[3], v[4], "soft NOFILE raised to the hard limit: {nofile}");
}

#[test]
fn jail_off_leaves_the_process_as_it_was_started() {
    let vm = boot("off", "off");
    let pid = vm.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(field(&status, "NoNewPrivs"), "0");
    for (name, status) in threads(pid) {
        assert_eq!(field(&status, "Seccomp"), "0", "thread {name}");
    }
    assert_ne!(hex(field(&status, "CapBnd")), rtv_vmm::jail::kept_mask());
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_owned();
    assert!(environ.contains("RTV_JAIL_TEST_SECRET=s3cret"), "{environ}");
    for ns in ["ipc", "uts", "mnt", "pid", "net"] {
        let own = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_eq!(own, ours, "{ns}");
    }
    let leaked = vm.leaked.display().to_string();
    assert!(fd_targets(pid).contains(&leaked));
    let log = std::fs::read_to_string(vm.tmp.0.join("log")).unwrap();
    assert!(log.contains("--jail off"), "the warning: {log}");
    assert!(log.contains("--seccomp off"), "the warning: {log}");
}

/// The keeper stands for the VMM to whoever started rtv-vmm: SIGTERM to it
/// reaches the VMM, which stops the VM cleanly, and the keeper exits with
/// the VMM's status (143); SIGKILL of the keeper kills the VMM too.
#[test]
fn the_keeper_relays_signals_and_ends_as_the_vmm_ends() {
    let mut vm = boot("on", "on");
    let vmm = vmm_of(vm.child.id());
    let keeper = vm.child.id() as i32;
    // SAFETY: a signal to the process this test started.
    let sent = unsafe { libc::kill(keeper, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "the keeper ended {status}");
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "the VMM outlived its keeper"
    );
    drop(vm);

    let mut vm = boot("on", "on");
    let vmm = vmm_of(vm.child.id());
    vm.child.kill().unwrap();
    let status = vm.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // The VMM, killed by the kernel with its keeper (PR_SET_PDEATHSIG), is
    // reaped by init.
    let start = Instant::now();
    while Path::new(&format!("/proc/{vmm}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the VMM {vmm} outlived its killed keeper"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bad input to a jailed VMM: a missing KVM device, a device that is not
/// KVM, a missing or non-directory share. Each fails with exit status 1
/// and one line naming what was wrong (each cause once), and nothing is
/// left: no process (keeper or VMM), no vsock socket, no file in the
/// directory but the log.
#[test]
fn bad_input_fails_naming_the_step_and_leaves_nothing() {
    let kernel = artifact("RTV_KERNEL", "guest-kernel/build.sh");
    let initrd = artifact("RTV_INITRAMFS", "rootfs-builder/build.sh");
    let tmp = TempDir::new("vmm-jail-bad");
    let share = tmp.0.join("share");
    std::fs::create_dir(&share).unwrap();
    let not_a_dir = tmp.0.join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let missing = tmp.0.join("missing");
    let cases: [(&str, PathBuf, PathBuf, &str); 4] = [
        (
            "missing KVM device",
            missing.clone(),
            share.clone(),
            "cannot open the KVM device",
        ),
        (
            "not KVM",
            PathBuf::from("/dev/null"),
            share.clone(),
            "reports API version",
        ),
        (
            "missing share",
            PathBuf::from("/dev/kvm"),
            missing.clone(),
            "virtio-fs shared directory",
        ),
        (
            "share not a directory",
            PathBuf::from("/dev/kvm"),
            not_a_dir.clone(),
            "virtio-fs shared directory",
        ),
    ];
    for (what, kvm, shared, expected) in cases {
        let sock = tmp.0.join("vsock.sock");
        let out = Command::new(env!("CARGO_BIN_EXE_rtv-vmm"))
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--console")
            .arg(tmp.0.join("console"))
            .arg("--kvm-device")
            .arg(&kvm)
            .args(["--vsock-cid", "3", "--vsock-uds"])
            .arg(&sock)
            .arg("--shared-dir")
            .arg(&shared)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("rtv-vmm: error: "))
            .unwrap_or_else(|| panic!("{what}: no error line in {stderr}"));
        assert!(line.contains(expected), "{what}: {line}");
        let path = if what.contains("share") {
            &shared
        } else {
            &kvm
        };
        assert!(line.contains(&path.display().to_string()), "{what}: {line}");
        let cause_parts: Vec<&str> = line.split(": ").collect();
        let mut unique = cause_parts.clone();
        unique.dedup();
        assert_eq!(unique, cause_parts, "{what}: a cause repeated in {line}");
        assert!(!sock.exists(), "{what}: the vsock socket was left");
        let mut left: Vec<String> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !["share", "file", "console"].contains(&n.as_str()))
            .collect();
        left.sort();
        assert!(left.is_empty(), "{what}: left {left:?}");
        let _ = std::fs::remove_file(tmp.0.join("console"));
        let dir = tmp.0.display().to_string();
        let procs: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                e.file_name().to_str()?.parse::<u32>().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                cmd.contains(&dir).then_some(cmd)
            })
            .collect();
        assert!(procs.is_empty(), "{what}: processes left: {procs:?}");
    }
}
