//! The VMM's own hardening, applied by `rtv-vmm` before any other thread
//! exists: it runs without an environment ([`reexec_without_environment`]),
//! only the descriptors passed on purpose survive, core dumps are off, it
//! has IPC and UTS namespaces of its own, the capability sets are cut to
//! what the in-process virtio-fs server needs, and `no_new_privs` is set.
//!
//! What a guest that broke the VMM would hold afterwards: the kept
//! capabilities below (no `CAP_SYS_ADMIN`, `CAP_NET_ADMIN`,
//! `CAP_DAC_READ_SEARCH`, `CAP_SYS_PTRACE`, ...), no way to gain others by
//! exec (bounding set cut, `no_new_privs`), and only the files it had open.

use std::collections::HashSet;
use std::os::fd::RawFd;

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the VMM keeps: what virtio-fs needs to act for the
/// guest's users on the share (virtiofsd's set, less `CAP_SETFCAP`: the
/// device offers no extended attributes, so file capabilities cannot be
/// set through it). `CAP_MKNOD` stays because containers with it (Docker
/// gives it by default) make device nodes in their root file systems, which
/// live on the share.
pub const KEPT_CAPS: [Capability; 7] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
];

/// The bit mask of [`KEPT_CAPS`], as `/proc/<pid>/status` shows it.
pub fn kept_mask() -> u64 {
    KEPT_CAPS.iter().fold(0, |m, c| m | c.bitmask())
}

/// A step of [`harden`] that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("closing inherited file descriptors: {0}")]
    CloseFds(#[source] std::io::Error),
    #[error("setting {what}: {source}")]
    Rlimit {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reducing the capabilities ({what}): {source}")]
    Caps {
        what: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("entering new IPC and UTS namespaces: {0}")]
    Namespaces(#[source] std::io::Error),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(#[source] std::io::Error),
}

/// Starts rtv-vmm again with an empty environment when it has one and the
/// jail is not off (`--jail off` among `args`): clearing the variables in
/// place would leave the original block readable in
/// `/proc/<pid>/environ`. `RTV_LOG` becomes `--log-level` unless that is
/// given. Returns only if there is nothing to do, or with the exec's error.
pub fn reexec_without_environment() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if std::env::vars_os().next().is_none() || jail_off(&args) {
        return Ok(());
    }
    // The binary's own path, not /proc/self/exe: the kernel names the
    // process (comm, what ps and pgrep show) after the path's last part.
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    cmd.args(args.iter().skip(1));
    let has_level = args
        .iter()
        .any(|a| a == "--log-level" || a.to_string_lossy().starts_with("--log-level="));
    if let (false, Some(level)) = (has_level, std::env::var_os("RTV_LOG")) {
        cmd.arg("--log-level").arg(level);
    }
    cmd.env_clear();
    Err(cmd.exec())
}

/// Whether `args` turn the jail off (`--jail off` or `--jail=off`).
fn jail_off(args: &[std::ffi::OsString]) -> bool {
    args.windows(2).any(|w| w[0] == "--jail" && w[1] == "off")
        || args.iter().any(|a| a == "--jail=off")
}

/// Applies the hardening to the calling process. Must run while it is
/// single-threaded: namespaces and capabilities are
/// per thread (threads made later inherit them). `keep_fds` are the
/// descriptors (besides 0, 1 and 2) passed on purpose.
pub fn harden(keep_fds: &[RawFd]) -> Result<(), JailError> {
    close_other_fds(keep_fds).map_err(JailError::CloseFds)?;
    // The environment is already empty: reexec_without_environment.
    limits()?;
    own_namespaces()?;
    reduce_caps()?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(JailError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The ranges of descriptors from 3 up that are not in `keep`, inclusive.
fn close_ranges(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd >= 3)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut ranges = Vec::new();
    let mut from = 3u32;
    for fd in keep {
        if fd > from {
            ranges.push((from, fd - 1));
        }
        from = fd + 1;
    }
    ranges.push((from, u32::MAX));
    ranges
}

fn close_other_fds(keep: &[RawFd]) -> std::io::Result<()> {
    for (first, last) in close_ranges(keep) {
        // SAFETY: close_range takes integers; the descriptors it closes are
        // not used by anything in this single-threaded process (std's own
        // handles are 0-2, and every descriptor rtv-vmm opens comes later).
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn limits() -> Result<(), JailError> {
    let set = |what: &'static str, resource, value: Option<u64>| {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `cur`, which we own.
        if unsafe { libc::getrlimit(resource, &mut cur) } != 0 {
            return Err(JailError::Rlimit {
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        // A value, or the soft limit raised to the hard one.
        let new = libc::rlimit {
            rlim_cur: value.unwrap_or(cur.rlim_max),
            rlim_max: value.unwrap_or(cur.rlim_max),
        };
        // SAFETY: setrlimit reads one rlimit from `new`, which we own.
        if unsafe { libc::setrlimit(resource, &new) } != 0 {
            return Err(JailError::Rlimit {
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    set("RLIMIT_CORE to 0", libc::RLIMIT_CORE, Some(0))?;
    // The share's open files are descriptors: as many as the host allows.
    set("RLIMIT_NOFILE to its hard limit", libc::RLIMIT_NOFILE, None)
}

/// New IPC and UTS namespaces: the VMM uses neither System V IPC nor the
/// host name, so it sees and can change none of the host's. Needs
/// CAP_SYS_ADMIN, which a VMM not started as root lacks: then skipped.
fn own_namespaces() -> Result<(), JailError> {
    let admin =
        caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).map_err(|source| {
            JailError::Caps {
                what: "reading",
                source,
            }
        })?;
    if !admin {
        return Ok(());
    }
    // SAFETY: unshare takes flags only; the process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } != 0 {
        return Err(JailError::Namespaces(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn reduce_caps() -> Result<(), JailError> {
    let caps_err = |what| move |source| JailError::Caps { what, source };
    let kept: CapsHashSet = KEPT_CAPS.iter().copied().collect();
    // The bounding set first, while CAP_SETPCAP is still held. Without it
    // (a VMM not started as root) the bounding set cannot shrink; then
    // no_new_privs keeps exec from granting anything.
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err("reading"))?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        let bounding = caps::read(None, CapSet::Bounding).map_err(caps_err("reading"))?;
        for cap in bounding.difference(&kept) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(caps_err("bounding set"))?;
        }
    }
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient set"))?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("inheritable set"))?;
    let keep: HashSet<Capability> = permitted.intersection(&kept).copied().collect();
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("permitted set"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_is_read_in_both_spellings() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(jail_off(&args(&["rtv-vmm", "--jail", "off"])));
        assert!(jail_off(&args(&["rtv-vmm", "--jail=off", "--kernel", "k"])));
        assert!(!jail_off(&args(&["rtv-vmm", "--jail", "on"])));
        assert!(!jail_off(&args(&["rtv-vmm", "--kernel", "off"])));
    }

    #[test]
    fn ranges_skip_the_kept_descriptors() {
        assert_eq!(close_ranges(&[]), vec![(3, u32::MAX)]);
        assert_eq!(close_ranges(&[3]), vec![(4, u32::MAX)]);
        assert_eq!(
            close_ranges(&[9, 5, 5, 2, -1]),
            vec![(3, 4), (6, 8), (10, u32::MAX)]
        );
        assert_eq!(close_ranges(&[4, 5]), vec![(3, 3), (6, u32::MAX)]);
    }

    #[test]
    fn the_kept_set_has_no_administrative_capability() {
        let m = kept_mask();
        for cap in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SETPCAP,
            Capability::CAP_SETFCAP,
        ] {
            assert_eq!(m & cap.bitmask(), 0, "{cap}");
        }
        assert_eq!(m.count_ones(), 7);
    }
}
