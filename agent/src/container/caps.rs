//! Linux capabilities of a container process: `process.capabilities` as bit
//! masks (parent side), and the step of a freshly forked child that becomes
//! the container's user with exactly those capabilities (child side).

use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

use super::user::Identity;
use super::{Errno, SpecError};

/// The capability the kernel knows with the highest number, when
/// `/proc/sys/kernel/cap_last_cap` cannot be read (Linux 5.9 and later).
const DEFAULT_CAP_LAST_CAP: u32 = 40;

/// `_LINUX_CAPABILITY_VERSION_3` in `<linux/capability.h>`: 64-bit sets as
/// two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Capability names by number, as in `<linux/capability.h>`.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The five capability sets as bit masks (bit n = capability number n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSets {
    /// Capabilities left in the bounding set; all others are dropped.
    pub bounding: u64,
    /// The effective set after the switch.
    pub effective: u64,
    /// The permitted set after the switch.
    pub permitted: u64,
    /// The inheritable set after the switch.
    pub inheritable: u64,
    /// The ambient set after the switch (each must be permitted and
    /// inheritable too).
    pub ambient: u64,
}

/// Capability number of an oci_spec [`Capability`] (all 41 of Linux 6.x:
/// `CAP_CHOWN` = 0 ... `CAP_CHECKPOINT_RESTORE` = 40).
pub fn number(c: Capability) -> u32 {
    match c {
        Capability::Chown => 0,
        Capability::DacOverride => 1,
        Capability::DacReadSearch => 2,
        Capability::Fowner => 3,
        Capability::Fsetid => 4,
        Capability::Kill => 5,
        Capability::Setgid => 6,
        Capability::Setuid => 7,
        Capability::Setpcap => 8,
        Capability::LinuxImmutable => 9,
        Capability::NetBindService => 10,
        Capability::NetBroadcast => 11,
        Capability::NetAdmin => 12,
        Capability::NetRaw => 13,
        Capability::IpcLock => 14,
        Capability::IpcOwner => 15,
        Capability::SysModule => 16,
        Capability::SysRawio => 17,
        Capability::SysChroot => 18,
        Capability::SysPtrace => 19,
        Capability::SysPacct => 20,
        Capability::SysAdmin => 21,
        Capability::SysBoot => 22,
        Capability::SysNice => 23,
        Capability::SysResource => 24,
        Capability::SysTime => 25,
        Capability::SysTtyConfig => 26,
        Capability::Mknod => 27,
        Capability::Lease => 28,
        Capability::AuditWrite => 29,
        Capability::AuditControl => 30,
        Capability::Setfcap => 31,
        Capability::MacOverride => 32,
        Capability::MacAdmin => 33,
        Capability::Syslog => 34,
        Capability::WakeAlarm => 35,
        Capability::BlockSuspend => 36,
        Capability::AuditRead => 37,
        Capability::Perfmon => 38,
        Capability::Bpf => 39,
        Capability::CheckpointRestore => 40,
    }
}

/// The name of capability number `n` (`CAP_...`), or `CAP_<n>` for a number
/// newer than this table.
fn name(n: u32) -> String {
    match NAMES.get(n as usize) {
        Some(name) => (*name).to_owned(),
        None => format!("CAP_{n}"),
    }
}

/// The capability numbers in a mask, as names `CAP_...` in ascending order
/// (for tests and logs).
pub fn names(mask: u64) -> Vec<String> {
    (0..64u32)
        .filter(|n| mask & (1u64 << n) != 0)
        .map(name)
        .collect()
}

/// From `process.capabilities` (`None` → all sets empty, as runc does). A
/// capability the running kernel does not know (number >
/// `/proc/sys/kernel/cap_last_cap`) is a [`SpecError`] naming the set, e.g.
/// `process.capabilities.bounding: CAP_CHECKPOINT_RESTORE is not known to
/// this kernel`.
pub fn parse(caps: Option<&LinuxCapabilities>) -> Result<CapSets, SpecError> {
    parse_for_kernel(caps, cap_last_cap())
}

/// [`parse`] against a kernel whose highest capability is `last`.
fn parse_for_kernel(caps: Option<&LinuxCapabilities>, last: u32) -> Result<CapSets, SpecError> {
    let Some(caps) = caps else {
        return Ok(CapSets::default());
    };
    let set = |field: &str, set: &Option<Capabilities>| -> Result<u64, SpecError> {
        let mask = set
            .iter()
            .flatten()
            .fold(0u64, |mask, &c| mask | (1u64 << number(c)));
        // The lowest unknown capability, so the message does not depend on
        // the set's hash order.
        let unknown = if last >= 63 { 0 } else { mask >> (last + 1) };
        if unknown != 0 {
            let n = last + 1 + unknown.trailing_zeros();
            return Err(SpecError::new(
                format!("process.capabilities.{field}"),
                format!("{} is not known to this kernel", name(n)),
            ));
        }
        Ok(mask)
    };
    Ok(CapSets {
        bounding: set("bounding", caps.bounding())?,
        effective: set("effective", caps.effective())?,
        permitted: set("permitted", caps.permitted())?,
        inheritable: set("inheritable", caps.inheritable())?,
        ambient: set("ambient", caps.ambient())?,
    })
}

/// Parent side: the highest capability number the running kernel knows,
/// from `/proc/sys/kernel/cap_last_cap` (40 if it cannot be read).
pub fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&n| n < 64)
        .unwrap_or(DEFAULT_CAP_LAST_CAP)
}

/// Which step of [`switch_identity`] failed (for the parent's error message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityStep {
    /// `prctl(PR_SET_KEEPCAPS)`, setting or clearing it.
    KeepCaps,
    /// `prctl(PR_CAPBSET_DROP)` of a capability not in the bounding set.
    DropBounding,
    /// `setgroups(2)` with the additional gids.
    SetGroups,
    /// `setresgid(2)`.
    SetGid,
    /// `setresuid(2)`.
    SetUid,
    /// `capset(2)` of the effective, permitted and inheritable sets.
    SetCaps,
    /// `prctl(PR_CAP_AMBIENT)`, clearing the ambient set or raising a
    /// capability in it (`EPERM` when it is not both permitted and
    /// inheritable).
    Ambient,
}

impl std::fmt::Display for IdentityStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KeepCaps => "prctl(PR_SET_KEEPCAPS)",
            Self::DropBounding => "dropping capabilities from the bounding set",
            Self::SetGroups => "setgroups",
            Self::SetGid => "setresgid",
            Self::SetUid => "setresuid",
            Self::SetCaps => "capset",
            Self::Ambient => "setting the ambient capabilities",
        })
    }
}

/// `struct __user_cap_header_struct` of `<linux/capability.h>`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct` of `<linux/capability.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `prctl(2)` with unsigned long arguments; the error is the errno.
fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> Result<libc::c_int, Errno> {
    // SAFETY: the prctl options used here take integer arguments only and
    // touch no memory of ours; unused arguments must be zero.
    let rc = unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

/// The errno of a raw `syscall(2)` result.
fn check(rc: libc::c_long) -> Result<(), Errno> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// CHILD: runs as root (uid 0, all capabilities) in a freshly forked child
/// and leaves the process as `id` with exactly `caps`, in runc's order:
/// `prctl(PR_SET_KEEPCAPS, 1)`; drop every capability not in
/// `caps.bounding` from the bounding set (0..=`cap_last_cap`, read by the
/// parent with [`cap_last_cap`]); `setgroups` (empty when there are no
/// additional gids); `setresgid`; `setresuid`; `capset` of the effective,
/// permitted and inheritable sets; clear the ambient set and raise each
/// ambient capability; `prctl(PR_SET_KEEPCAPS, 0)`; `umask` if set.
///
/// Only system calls on the prepared data: no allocation, no locks. The
/// credentials are changed with raw system calls, which affect the calling
/// thread only: the child of `fork` has no other thread.
pub fn switch_identity(
    id: &Identity,
    caps: &CapSets,
    cap_last_cap: u32,
) -> Result<(), (IdentityStep, Errno)> {
    use IdentityStep as Step;

    prctl(libc::PR_SET_KEEPCAPS, 1).map_err(|e| (Step::KeepCaps, e))?;

    for n in 0..=cap_last_cap.min(63) {
        if caps.bounding & (1u64 << n) == 0 {
            prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(n))
                .map_err(|e| (Step::DropBounding, e))?;
        }
    }

    let groups = id.additional_gids.as_slice();
    let groups_ptr: *const libc::gid_t = if groups.is_empty() {
        std::ptr::null()
    } else {
        groups.as_ptr()
    };
    // SAFETY: setgroups reads `groups.len()` gids from a live slice (or
    // nothing when the count is zero).
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups_ptr) })
        .map_err(|e| (Step::SetGroups, e))?;

    // SAFETY: setresgid takes integers only.
    check(unsafe { libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid) })
        .map_err(|e| (Step::SetGid, e))?;

    // SAFETY: setresuid takes integers only.
    check(unsafe { libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid) })
        .map_err(|e| (Step::SetUid, e))?;

    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Bit n of a set is bit n % 32 of word n / 32: the truncating casts split
    // the 64-bit masks into their two halves.
    let data = [
        CapData {
            effective: caps.effective as u32,
            permitted: caps.permitted as u32,
            inheritable: caps.inheritable as u32,
        },
        CapData {
            effective: (caps.effective >> 32) as u32,
            permitted: (caps.permitted >> 32) as u32,
            inheritable: (caps.inheritable >> 32) as u32,
        },
    ];
    // SAFETY: capset reads a version-3 header and the two data words it
    // calls for, both live on this stack frame.
    check(unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) })
        .map_err(|e| (Step::SetCaps, e))?;

    ambient(libc::PR_CAP_AMBIENT_CLEAR_ALL, 0).map_err(|e| (Step::Ambient, e))?;
    for n in 0..64u32 {
        if caps.ambient & (1u64 << n) != 0 {
            ambient(libc::PR_CAP_AMBIENT_RAISE, n).map_err(|e| (Step::Ambient, e))?;
        }
    }

    prctl(libc::PR_SET_KEEPCAPS, 0).map_err(|e| (Step::KeepCaps, e))?;

    if let Some(mask) = id.umask {
        // SAFETY: umask takes an integer and cannot fail.
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    Ok(())
}

/// `prctl(PR_CAP_AMBIENT, op, cap, 0, 0)`.
fn ambient(op: libc::c_int, cap: u32) -> Result<(), Errno> {
    // SAFETY: PR_CAP_AMBIENT takes integer arguments only; the unused ones
    // must be zero.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            op as libc::c_ulong,
            libc::c_ulong::from(cap),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bit(c: Capability) -> u64 {
        1u64 << number(c)
    }

    #[test]
    fn numbers_match_the_kernel_names() {
        assert_eq!(number(Capability::Chown), 0);
        assert_eq!(number(Capability::SysAdmin), 21);
        assert_eq!(number(Capability::Bpf), 39);
        assert_eq!(number(Capability::CheckpointRestore), 40);
        // Every name deserializes to the capability with that number.
        for (n, name) in NAMES.iter().enumerate() {
            let c: Capability = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(number(c) as usize, n, "{name}");
        }
    }

    #[test]
    fn names_lists_a_mask() {
        assert_eq!(names(0), Vec::<String>::new());
        assert_eq!(
            names(bit(Capability::Kill) | bit(Capability::Chown) | bit(Capability::Bpf)),
            ["CAP_CHOWN", "CAP_KILL", "CAP_BPF"]
        );
        assert_eq!(names(1 << 45), ["CAP_45"]);
    }

    #[test]
    fn parse_builds_masks() {
        let caps: LinuxCapabilities = serde_json::from_str(
            r#"{
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN"],
                "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_BPF"],
                "inheritable": ["CAP_KILL"],
                "ambient": []
            }"#,
        )
        .unwrap();
        let sets = parse(Some(&caps)).unwrap();
        assert_eq!(
            sets,
            CapSets {
                bounding: 1 | 1 << 5 | 1 << 10 | 1 << 21,
                effective: 1 << 5 | 1 << 10,
                permitted: 1 << 5 | 1 << 10 | 1 << 39,
                inheritable: 1 << 5,
                ambient: 0,
            }
        );
        assert_eq!(parse(None).unwrap(), CapSets::default());

        // A missing set is empty.
        let caps: LinuxCapabilities =
            serde_json::from_str(r#"{"effective": ["CAP_SYS_ADMIN"]}"#).unwrap();
        assert_eq!(
            parse(Some(&caps)).unwrap(),
            CapSets {
                effective: 1 << 21,
                ..CapSets::default()
            }
        );
    }

    #[test]
    fn parse_refuses_capabilities_the_kernel_lacks() {
        let caps: LinuxCapabilities = serde_json::from_str(
            r#"{"bounding": ["CAP_CHOWN"], "permitted": ["CAP_CHECKPOINT_RESTORE", "CAP_BPF", "CAP_KILL"]}"#,
        )
        .unwrap();
        // A kernel whose last capability is CAP_PERFMON (38), then one
        // with CAP_BPF (39) but not CAP_CHECKPOINT_RESTORE (Linux 5.8).
        let err = parse_for_kernel(Some(&caps), 38).unwrap_err();
        assert_eq!(err.field, "process.capabilities.permitted");
        assert_eq!(
            err.to_string(),
            "process.capabilities.permitted: CAP_BPF is not known to this kernel"
        );
        let err = parse_for_kernel(Some(&caps), 39).unwrap_err();
        assert_eq!(
            err.to_string(),
            "process.capabilities.permitted: CAP_CHECKPOINT_RESTORE is not known to this kernel"
        );
        assert!(parse_for_kernel(Some(&caps), 40).is_ok());
    }

    #[test]
    fn cap_last_cap_reads_the_kernel() {
        let last = cap_last_cap();
        assert!((36..64).contains(&last), "{last}");
    }

    /// Forks a child that runs `child` (only async-signal-safe calls: the
    /// test binary is multithreaded) and exits with its result; returns
    /// the child's exit status.
    fn in_child(child: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child calls only async-signal-safe functions and leaves
        // with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = child();
            // SAFETY: _exit ends the child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// capget of the calling thread: (effective, permitted, inheritable).
    fn capget() -> Option<(u64, u64, u64)> {
        let mut header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: capget writes the two data words of a version-3 header.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut CapHeader,
                data.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return None;
        }
        let join = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
        Some((
            join(data[0].effective, data[1].effective),
            join(data[0].permitted, data[1].permitted),
            join(data[0].inheritable, data[1].inheritable),
        ))
    }

    fn identity(uid: u32, gid: u32, groups: Vec<u32>) -> Identity {
        Identity {
            uid,
            gid,
            additional_gids: groups,
            umask: Some(0o027),
            home: None,
        }
    }

    #[test]
    fn switch_identity_leaves_exactly_the_requested_credentials() {
        let kill = bit(Capability::Kill);
        let net = bit(Capability::NetBindService);
        let caps = CapSets {
            bounding: kill | net,
            effective: kill | net,
            permitted: kill | net,
            inheritable: kill,
            ambient: kill,
        };
        let id = identity(1000, 1000, vec![1000, 10]);
        let last = cap_last_cap();
        let code = in_child(|| {
            if switch_identity(&id, &caps, last).is_err() {
                return 1;
            }
            // SAFETY: these getters take no pointers and cannot fail.
            let ids = unsafe {
                [
                    libc::getuid(),
                    libc::geteuid(),
                    libc::getgid(),
                    libc::getegid(),
                ]
            };
            if ids != [1000, 1000, 1000, 1000] {
                return 2;
            }
            let mut groups = [0 as libc::gid_t; 8];
            // SAFETY: getgroups writes at most 8 gids into the array.
            let n = unsafe { libc::getgroups(8, groups.as_mut_ptr()) };
            // The kernel keeps the list sorted.
            if n != 2 || groups[..2] != [10, 1000] {
                return 3;
            }
            if capget() != Some((kill | net, kill | net, kill)) {
                return 4;
            }
            for n in 0..=last {
                let want = i32::from(caps.bounding & (1u64 << n) != 0);
                // SAFETY: PR_CAPBSET_READ takes integers only.
                let got = unsafe {
                    libc::prctl(
                        libc::PR_CAPBSET_READ,
                        libc::c_ulong::from(n),
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                    )
                };
                if got != want {
                    return 5;
                }
                let want = i32::from(caps.ambient & (1u64 << n) != 0);
                // SAFETY: PR_CAP_AMBIENT_IS_SET takes integers only.
                let got = unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
                        libc::c_ulong::from(n),
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                    )
                };
                if got != want {
                    return 6;
                }
            }
            // SAFETY: PR_GET_KEEPCAPS takes no arguments.
            if unsafe { libc::prctl(libc::PR_GET_KEEPCAPS) } != 0 {
                return 7;
            }
            // SAFETY: umask cannot fail; set it back to read it.
            if unsafe { libc::umask(0) } != 0o027 {
                return 8;
            }
            0
        });
        assert_eq!(code, 0, "the child's check {code} failed");
    }

    #[test]
    fn switch_identity_without_groups_clears_them() {
        let id = Identity {
            umask: None,
            ..identity(1234, 4321, Vec::new())
        };
        let last = cap_last_cap();
        let code = in_child(|| {
            if switch_identity(&id, &CapSets::default(), last).is_err() {
                return 1;
            }
            // SAFETY: getgroups with a zero size only counts.
            if unsafe { libc::getgroups(0, std::ptr::null_mut()) } != 0 {
                return 2;
            }
            // SAFETY: these getters take no pointers and cannot fail.
            if unsafe { (libc::getuid(), libc::getgid()) } != (1234, 4321) {
                return 3;
            }
            if capget() != Some((0, 0, 0)) {
                return 4;
            }
            0
        });
        assert_eq!(code, 0, "the child's check {code} failed");
    }

    #[test]
    fn ambient_not_inheritable_is_eperm() {
        let kill = bit(Capability::Kill);
        let caps = CapSets {
            bounding: kill,
            effective: kill,
            permitted: kill,
            inheritable: 0,
            ambient: kill,
        };
        let id = identity(1000, 1000, vec![1000]);
        let last = cap_last_cap();
        let code = in_child(|| match switch_identity(&id, &caps, last) {
            Err((IdentityStep::Ambient, Errno(libc::EPERM))) => 0,
            Err(_) => 1,
            Ok(()) => 2,
        });
        assert_eq!(code, 0, "the child's check {code} failed");
    }
}
