//! The guest's init: kernel file systems, readiness, reaping, power-off.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::ExitCode;
use std::sync::Arc;

use crate::container::{cgroup, Containers};
use crate::pool::Pool;
use crate::process::Processes;
use crate::server::{self, Listener};
use crate::{alog, log};

/// The line the host waits for: the guest is up and the agent runs.
pub use rtv_protocol::READY_LINE;

/// Kernel command-line flag: power the VM off right after readiness.
const POWEROFF_FLAG: &str = "rtv.poweroff";

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    // Terminals for processes started with a TTY (openpty needs /dev/pts).
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
];

fn cstr(s: &str) -> CString {
    // The strings are our own constants, without NUL bytes.
    CString::new(s).unwrap_or_default()
}

fn mount(m: &Mount) -> std::io::Result<()> {
    if let Err(e) = std::fs::create_dir(m.target) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    let (source, target, fstype, data) =
        (cstr(m.source), cstr(m.target), cstr(m.fstype), cstr(m.data));
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        // The kernel may have mounted devtmpfs already.
        if e.raw_os_error() == Some(libc::EBUSY) {
            Ok(())
        } else {
            Err(e)
        }
    }
}

/// Where PID 1 mounts the cgroup2 hierarchy for containers.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Mounts cgroup2 and enables its controllers for containers' cgroups.
fn container_cgroups() -> Option<std::path::PathBuf> {
    let m = Mount {
        source: "cgroup2",
        target: CGROUP_ROOT,
        fstype: "cgroup2",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    };
    if let Err(e) = mount(&m) {
        alog!(Warn, "no cgroup2 for containers: {e}");
        return None;
    }
    let root = std::path::PathBuf::from(CGROUP_ROOT);
    if let Err(e) = cgroup::enable_controllers(&root) {
        alog!(Warn, "cgroup2 controllers: {e}");
    }
    Some(root)
}

/// Brings the guest's loopback interface up (the kernel then gives it
/// 127.0.0.1/8), as runc's containers find it: containers share the VM's
/// network namespace. Done before the readiness line, so a template has it.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just made and own.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq we
    // pass, on our socket.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes PID 1's root a bind mount of the initramfs, mounted on it, so
/// containers can pivot_root away from it: the kernel refuses pivot_root
/// when the current root is the initial rootfs, which has no parent mount.
fn root_on_a_mount() -> std::io::Result<()> {
    let c = |s: &str| cstr(s);
    let (root, dir, dot) = (c("/"), c("/.rtv-root"), c("."));
    if let Err(e) = std::fs::create_dir("/.rtv-root") {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    // SAFETY: valid NUL-terminated paths; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            root.as_ptr(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::env::set_current_dir("/.rtv-root")?;
    // SAFETY: as above; moves the bind mount (our cwd) onto "/".
    let rc = unsafe {
        libc::mount(
            dot.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: chroot(2) to our cwd, the moved mount.
    if unsafe { libc::chroot(dot.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// Makes sure fds 0, 1 and 2 are open on the console (the kernel opens
/// them only if /dev/console existed in the initramfs).
fn ensure_stdio() {
    // SAFETY: fcntl(F_GETFD) on a descriptor number only queries it.
    let missing = (0..3).any(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0);
    if !missing {
        return;
    }
    let console = cstr("/dev/console");
    // SAFETY: a valid path string; the result is checked.
    let fd = unsafe { libc::open(console.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        // SAFETY: both descriptors are valid; dup2 replaces `target`.
        unsafe { libc::dup2(fd, target) };
    }
    if fd > 2 {
        // SAFETY: `fd` is ours and no longer needed.
        unsafe { libc::close(fd) };
    }
}

/// Whether `flag` appears as a word (alone or as `flag=...`) in `cmdline`.
pub fn has_flag(cmdline: &str, flag: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w == flag || w.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Ends the VM.
pub fn power_off() -> ! {
    println!("rtv-agent: powering off");
    let _ = std::io::stdout().flush();
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    // rtv's VMs end on a reset request (`reboot=k`): the VMM exits cleanly.
    // SAFETY: reboot(2) with a valid command; it does not return on success.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    let e = std::io::Error::last_os_error();
    eprintln!("rtv-agent: reboot failed: {e}");
    // As PID 1 we must not exit; wait for the host to end the VM.
    loop {
        // SAFETY: pause(2) only sleeps until a signal.
        unsafe { libc::pause() };
    }
}

/// Reaps children forever: PID 1 inherits every orphan.
fn reap_forever() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer for the call's duration.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            // No children: sleep until a signal (SIGCHLD) arrives.
            // SAFETY: pause(2) only sleeps until a signal.
            unsafe { libc::pause() };
        }
    }
}

/// The value of `key=value` on the kernel command line.
fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Runs the init sequence; only returns (with a failure) if it cannot start.
pub fn run() -> ExitCode {
    for m in MOUNTS {
        if let Err(e) = mount(m) {
            ensure_stdio();
            eprintln!("rtv-agent: mounting {} on {}: {e}", m.fstype, m.target);
        }
    }
    ensure_stdio();
    if let Err(e) = root_on_a_mount() {
        eprintln!("rtv-agent: cannot put the root on a mount (containers cannot pivot_root): {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(level) = param(&cmdline, "rtv.log") {
        log::set_level(level);
    }
    if let Err(e) = loopback_up() {
        alog!(Warn, "cannot bring up lo: {e}");
    }
    let listener = Listener::vsock()
        .map_err(|e| alog!(Warn, "no vsock listener (is there a vsock device?): {e}"))
        .ok();
    let procs = Arc::new(Processes::default());
    // Everything the server needs exists before the readiness line: a
    // template is snapshotted at that line, and a VM restored from it
    // starts with the reaper, the containers' cgroup and idle workers.
    let reaping = listener.as_ref().map(|_| {
        let reaper = procs.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper.reap_forever())
            .map_err(|e| alog!(Error, "cannot start the reaper: {e}"))
    });
    let served = match (listener, reaping) {
        (Some(listener), Some(Ok(_))) => {
            let containers = Containers::new(procs.clone(), container_cgroups(), true);
            let pool = Pool::new("worker", server::POOL_KEEP);
            if let Err(e) = pool.prestart(server::POOL_PRESTART) {
                alog!(Warn, "cannot start the agent's workers: {e}");
            }
            Some((
                listener,
                Arc::new(server::Agent {
                    procs,
                    containers,
                    pool,
                }),
            ))
        }
        _ => None,
    };
    println!("{READY_LINE} uptime={}s", uptime());
    let _ = std::io::stdout().flush();
    if has_flag(&cmdline, POWEROFF_FLAG) {
        power_off();
    }
    match served {
        Some((listener, agent)) => server::serve(listener, agent, || power_off()),
        None => reap_forever(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_whole_words() {
        assert!(has_flag("console=ttyS0 rtv.poweroff quiet", "rtv.poweroff"));
        assert!(has_flag("rtv.poweroff=1", "rtv.poweroff"));
        assert!(!has_flag("rtv.poweroffx quiet", "rtv.poweroff"));
        assert!(!has_flag("xrtv.poweroff", "rtv.poweroff"));
        assert!(!has_flag("", "rtv.poweroff"));
    }
}
