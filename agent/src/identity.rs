//! A sandbox's own identity, set by the host after every start: a VM
//! restored from a template wakes up with the template's hostname, the
//! template's RNG state (every clone would draw the same "random" numbers)
//! and a wall clock stopped at the moment the template was taken.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use rtv_protocol::{ErrorKind, Identity, MAX_ENTROPY, MAX_HOSTNAME, MIN_ENTROPY};

use crate::process::Failure;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` in `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` in `<linux/random.h>`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn invalid(message: impl Into<String>) -> Failure {
    Failure {
        kind: ErrorKind::InvalidRequest,
        message: message.into(),
    }
}

fn os_failure(what: &str) -> Failure {
    let e = std::io::Error::last_os_error();
    let kind = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::PermissionDenied,
        _ => ErrorKind::Other,
    };
    Failure {
        kind,
        message: format!("{what}: {e}"),
    }
}

/// Checks a request before anything is changed.
pub fn check(id: &Identity) -> Result<(), Failure> {
    if id.hostname.is_empty() || id.hostname.len() > MAX_HOSTNAME {
        return Err(invalid(format!(
            "hostname {:?}: must be 1 to {MAX_HOSTNAME} bytes",
            id.hostname
        )));
    }
    if id
        .hostname
        .bytes()
        .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(invalid(format!(
            "hostname {:?}: NUL, '/' and white space are not allowed",
            id.hostname
        )));
    }
    if id.entropy.len() < MIN_ENTROPY || id.entropy.len() > MAX_ENTROPY {
        return Err(invalid(format!(
            "entropy: {} bytes, must be {MIN_ENTROPY} to {MAX_ENTROPY}",
            id.entropy.len()
        )));
    }
    if id.unix_time_ns == 0 {
        return Err(invalid("unix_time_ns: 0 is not a time"));
    }
    Ok(())
}

/// Sets the hostname, feeds and reseeds the RNG, and sets the clock; only
/// as PID 1 (an agent on the host must not change the host).
pub fn set(id: &Identity) -> Result<(), Failure> {
    if std::process::id() != 1 {
        return Err(invalid(
            "not PID 1: an agent on the host does not change the host's hostname, RNG or clock",
        ));
    }
    check(id)?;
    set_hostname(&id.hostname)?;
    add_entropy(&id.entropy)?;
    set_clock(id.unix_time_ns)
}

fn set_hostname(name: &str) -> Result<(), Failure> {
    let c = CString::new(name).map_err(|_| invalid("hostname: contains NUL"))?;
    // SAFETY: `c` is a valid buffer of `name.len()` bytes for the call.
    if unsafe { libc::sethostname(c.as_ptr(), name.len()) } != 0 {
        return Err(os_failure("sethostname"));
    }
    Ok(())
}

/// Credits `bytes` to the input pool (RNDADDENTROPY), then has the CRNG
/// reseed from it at once (RNDRESEEDCRNG): otherwise clones of one
/// snapshot would go on producing the same output until the next
/// scheduled reseed.
fn add_entropy(bytes: &[u8]) -> Result<(), Failure> {
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| Failure {
            kind: ErrorKind::Other,
            message: format!("/dev/urandom: {e}"),
        })?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u32> = vec![0; 2 + bytes.len().div_ceil(4)];
    info[0] = (bytes.len() * 8) as u32;
    info[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `info` is a rand_pool_info header followed by `buf_size`
    // bytes, all inside the vector, which outlives the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(os_failure("RNDADDENTROPY on /dev/urandom"));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(os_failure("RNDRESEEDCRNG on /dev/urandom"));
    }
    Ok(())
}

fn set_clock(unix_time_ns: u64) -> Result<(), Failure> {
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(os_failure("clock_settime(CLOCK_REALTIME)"));
    }
    Ok(())
}

/// The wall clock, in nanoseconds since the Unix epoch (0 if before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Identity {
        Identity {
            hostname: "sandbox-1".into(),
            entropy: vec![7; 32],
            unix_time_ns: 1,
        }
    }

    #[test]
    fn checks_name_the_field() {
        assert!(check(&good()).is_ok());
        for (bad, field) in [
            (
                Identity {
                    hostname: String::new(),
                    ..good()
                },
                "hostname",
            ),
            (
                Identity {
                    hostname: "x".repeat(65),
                    ..good()
                },
                "hostname",
            ),
            (
                Identity {
                    hostname: "a b".into(),
                    ..good()
                },
                "hostname",
            ),
            (
                Identity {
                    entropy: vec![1; 31],
                    ..good()
                },
                "entropy",
            ),
            (
                Identity {
                    unix_time_ns: 0,
                    ..good()
                },
                "unix_time_ns",
            ),
        ] {
            let f = check(&bad).unwrap_err();
            assert_eq!(f.kind, ErrorKind::InvalidRequest);
            assert!(f.message.starts_with(field), "{}", f.message);
        }
    }

    #[test]
    fn refused_outside_pid_1() {
        // Unit tests never run as PID 1.
        let f = set(&good()).unwrap_err();
        assert_eq!(f.kind, ErrorKind::InvalidRequest);
        assert!(f.message.contains("not PID 1"), "{}", f.message);
    }
}
