//! Resource limits of a container process: `process.rlimits` checked by the
//! parent, set by the freshly forked child.

use oci_spec::runtime::{PosixRlimit, PosixRlimitType};

use super::{Errno, SpecError};

/// One resource limit to set with `setrlimit(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// The resource, `libc::RLIMIT_*` as a C int.
    pub resource: i32,
    /// The soft limit (`u64::MAX` is `RLIM_INFINITY`).
    pub soft: u64,
    /// The hard limit (`u64::MAX` is `RLIM_INFINITY`).
    pub hard: u64,
}

/// The `RLIMIT_*` number of a spec rlimit type.
// The RLIMIT_* constants are unsigned in glibc's libc and C ints in musl's.
#[allow(clippy::unnecessary_cast)]
fn resource(typ: PosixRlimitType) -> i32 {
    (match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as i32
}

/// From `process.rlimits` (`None` → no limits). A soft limit above its hard
/// limit is a [`SpecError`] such as `process.rlimits[2]: soft limit 10
/// exceeds hard limit 5`; a type given twice is one too (runc refuses
/// duplicates).
pub fn parse(rlimits: Option<&Vec<PosixRlimit>>) -> Result<Vec<Rlimit>, SpecError> {
    let Some(rlimits) = rlimits else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Rlimit> = Vec::with_capacity(rlimits.len());
    for (i, limit) in rlimits.iter().enumerate() {
        let field = || format!("process.rlimits[{i}]");
        let (soft, hard) = (limit.soft(), limit.hard());
        if soft > hard {
            return Err(SpecError::new(
                field(),
                format!("soft limit {soft} exceeds hard limit {hard}"),
            ));
        }
        let resource = resource(limit.typ());
        if let Some(first) = out.iter().position(|r| r.resource == resource) {
            return Err(SpecError::new(
                field(),
                format!("{} is also set by process.rlimits[{first}]", limit.typ()),
            ));
        }
        out.push(Rlimit {
            resource,
            soft,
            hard,
        });
    }
    Ok(out)
}

/// CHILD: sets each limit on the calling process (`prlimit64(0, ...)`, the
/// system call behind `setrlimit`), in order. On failure, the index of the
/// failing limit and its errno (`EPERM` when raising a hard limit without
/// `CAP_SYS_RESOURCE`). No allocation, no locks.
pub fn apply(limits: &[Rlimit]) -> Result<(), (usize, Errno)> {
    for (i, limit) in limits.iter().enumerate() {
        let new = libc::rlimit64 {
            rlim_cur: limit.soft,
            rlim_max: limit.hard,
        };
        // SAFETY: prlimit64 reads the new limit from a live local and writes
        // nothing (null old-limit pointer); pid 0 is the calling process.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0 as libc::pid_t,
                limit.resource as libc::c_uint,
                &new as *const libc::rlimit64,
                std::ptr::null_mut::<libc::rlimit64>(),
            )
        };
        if rc < 0 {
            return Err((i, Errno::last()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(json: &str) -> Vec<PosixRlimit> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn parse_maps_types_and_values() {
        let spec = limits(
            r#"[
                {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
                {"type": "RLIMIT_CORE", "soft": 0, "hard": 18446744073709551615},
                {"type": "RLIMIT_RTTIME", "soft": 5, "hard": 5}
            ]"#,
        );
        assert_eq!(
            parse(Some(&spec)).unwrap(),
            [
                Rlimit {
                    resource: libc::RLIMIT_NOFILE as i32,
                    soft: 1024,
                    hard: 4096
                },
                Rlimit {
                    resource: libc::RLIMIT_CORE as i32,
                    soft: 0,
                    hard: u64::MAX
                },
                Rlimit {
                    resource: libc::RLIMIT_RTTIME as i32,
                    soft: 5,
                    hard: 5
                },
            ]
        );
        assert_eq!(parse(None).unwrap(), []);
        assert_eq!(parse(Some(&Vec::new())).unwrap(), []);
    }

    #[test]
    fn parse_errors_name_the_field() {
        let spec = limits(
            r#"[
                {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2},
                {"type": "RLIMIT_CPU", "soft": 1, "hard": 2},
                {"type": "RLIMIT_AS", "soft": 10, "hard": 5}
            ]"#,
        );
        let err = parse(Some(&spec)).unwrap_err();
        assert_eq!(err.field, "process.rlimits[2]");
        assert_eq!(
            err.to_string(),
            "process.rlimits[2]: soft limit 10 exceeds hard limit 5"
        );

        let spec = limits(
            r#"[
                {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2},
                {"type": "RLIMIT_CPU", "soft": 1, "hard": 2},
                {"type": "RLIMIT_NOFILE", "soft": 3, "hard": 4}
            ]"#,
        );
        let err = parse(Some(&spec)).unwrap_err();
        assert_eq!(err.field, "process.rlimits[2]");
        assert_eq!(
            err.to_string(),
            "process.rlimits[2]: RLIMIT_NOFILE is also set by process.rlimits[0]"
        );
    }

    /// Forks a child that runs `child` (only async-signal-safe calls: the
    /// test binary is multithreaded) and returns its exit status.
    fn in_child(child: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child calls only async-signal-safe functions and leaves
        // with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = child();
            // SAFETY: _exit ends the child without running destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn getrlimit(resource: i32) -> Option<(u64, u64)> {
        let mut cur = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 writes the current limit into a live local.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0 as libc::pid_t,
                resource as libc::c_uint,
                std::ptr::null::<libc::rlimit64>(),
                &mut cur as *mut libc::rlimit64,
            )
        };
        (rc == 0).then_some((cur.rlim_cur, cur.rlim_max))
    }

    #[test]
    fn apply_sets_the_limits() {
        let nofile = libc::RLIMIT_NOFILE as i32;
        let (_, hard) = getrlimit(nofile).unwrap();
        assert!(hard >= 200, "this test lowers RLIMIT_NOFILE to 100/200");
        let spec = limits(r#"[{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}]"#);
        let limits = parse(Some(&spec)).unwrap();
        let code = in_child(|| {
            if apply(&limits).is_err() {
                return 1;
            }
            let mut got = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the limit into a live local.
            if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut got) } != 0 {
                return 2;
            }
            if (got.rlim_cur, got.rlim_max) != (100, 200) {
                return 3;
            }
            0
        });
        assert_eq!(code, 0, "the child's check {code} failed");
    }

    #[test]
    fn apply_reports_the_failing_limit() {
        let nofile = libc::RLIMIT_NOFILE as i32;
        let (_, hard) = getrlimit(nofile).unwrap();
        assert!(hard >= 200);
        // Raising a hard limit needs CAP_SYS_RESOURCE, which the child loses
        // by becoming an unprivileged user.
        let limits = [
            Rlimit {
                resource: libc::RLIMIT_CORE as i32,
                soft: 0,
                hard: 0,
            },
            Rlimit {
                resource: nofile,
                soft: 100,
                hard: 100,
            },
            Rlimit {
                resource: nofile,
                soft: 100,
                hard: 200,
            },
        ];
        let code = in_child(|| {
            // SAFETY: setresuid takes integers only; leaving uid 0 clears
            // every capability.
            if unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) } != 0 {
                return 3;
            }
            match apply(&limits) {
                Err((2, Errno(libc::EPERM))) => 0,
                Err(_) => 1,
                Ok(()) => 2,
            }
        });
        assert_eq!(code, 0, "the child's check {code} failed");
    }
}
