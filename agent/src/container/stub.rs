//! The init stub: how a container's init waits for its start without a
//! copy of the agent.
//!
//! A container's init is set up by a child the agent spawns with
//! CLONE_VM | CLONE_VFORK (no copy of the agent's memory, see
//! `vfork_in`); such a child cannot wait for the start, the agent's thread
//! waits for it. So once set up (namespaces, root file system, identity,
//! capabilities), it execs the agent's own binary as `rtv-init` from a
//! descriptor opened before `pivot_root`: a small fresh process that reports
//! ready, waits on the start pipe, installs the seccomp filter and execs the
//! container's program, as the forked child used to. What it needs comes
//! in a sealed memfd ([`Handover`]).

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::child::{Report, Step, REPORT_FAILED, REPORT_READY};
use super::seccomp::Filter;
use super::Errno;

/// `argv[0]` of the agent's binary as the init stub.
pub const INIT_ARGV0: &str = "rtv-init";
/// Where the stub finds the report pipe, the start pipe and the handover.
pub const REPORT_FD: RawFd = 3;
/// The start pipe's read end.
pub const START_FD: RawFd = 4;
/// The handover memfd.
pub const HANDOVER_FD: RawFd = 5;

const MAGIC: &[u8; 8] = b"rtvinit1";

/// What the stub needs to become the container's program: its argument
/// vector, environment and the paths it may be at (the child found which,
/// and passes the index as the stub's `argv[1]`), and the seccomp filter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handover {
    /// argv.
    pub argv: Vec<Vec<u8>>,
    /// The environment.
    pub env: Vec<Vec<u8>>,
    /// The program's candidate paths.
    pub candidates: Vec<Vec<u8>>,
    /// The seccomp filter: instructions (code, jt, jf, k) and flags.
    pub seccomp: Option<(Vec<super::seccomp::Insn>, u64)>,
}

fn put_list(out: &mut Vec<u8>, list: &[Vec<u8>]) {
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for item in list {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn list(&mut self) -> Option<Vec<Vec<u8>>> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let len = self.u32()? as usize;
            out.push(self.take(len)?.to_vec());
        }
        Some(out)
    }
}

impl Handover {
    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        put_list(&mut out, &self.argv);
        put_list(&mut out, &self.env);
        put_list(&mut out, &self.candidates);
        match &self.seccomp {
            None => out.push(0),
            Some((program, flags)) => {
                out.push(1);
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&(program.len() as u32).to_le_bytes());
                for (code, jt, jf, k) in program {
                    out.extend_from_slice(&code.to_le_bytes());
                    out.push(*jt);
                    out.push(*jf);
                    out.extend_from_slice(&k.to_le_bytes());
                }
            }
        }
        out
    }

    /// Parses [`Handover::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Option<Handover> {
        let mut c = Cursor(bytes);
        if c.take(MAGIC.len())? != MAGIC {
            return None;
        }
        let argv = c.list()?;
        let env = c.list()?;
        let candidates = c.list()?;
        let seccomp = match c.take(1)?[0] {
            0 => None,
            _ => {
                let flags = u64::from_le_bytes(c.take(8)?.try_into().ok()?);
                let n = c.u32()? as usize;
                let mut program = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    let i = c.take(8)?;
                    program.push((
                        u16::from_le_bytes([i[0], i[1]]),
                        i[2],
                        i[3],
                        u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                    ));
                }
                Some((program, flags))
            }
        };
        (c.0.is_empty()).then_some(Handover {
            argv,
            env,
            candidates,
            seccomp,
        })
    }

    /// A sealed memfd holding it, for the stub.
    pub fn memfd(&self) -> std::io::Result<OwnedFd> {
        // SAFETY: memfd_create with a constant name and flags; checked.
        let fd = unsafe {
            libc::memfd_create(
                c"rtv-init".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.write_all(&self.encode())?;
        f.seek(SeekFrom::Start(0))?;
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: fcntl(F_ADD_SEALS) on our memfd.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from(f))
    }
}

fn report(step: Step, index: u32, errno: Errno) -> ! {
    let r = Report {
        kind: REPORT_FAILED,
        step: step as u32,
        index,
        errno: errno.0,
    };
    // SAFETY: the report pipe the agent gave the stub; a File that is
    // never dropped (the process exits below).
    let mut pipe = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(REPORT_FD) });
    let _ = pipe.write_all(&r.as_bytes());
    std::process::exit(127)
}

/// A failure once the container has been started: as with runc, the start
/// has succeeded, so the container's init says why on its stderr and exits
/// 1 (`exec /bin/x: no such file or directory`, runc's words).
fn fail_started(what: &str, errno: Errno) -> ! {
    let text = std::io::Error::from_raw_os_error(errno.0).to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    let mut chars = text.chars();
    let text: String = chars
        .next()
        .map(|c| c.to_lowercase().chain(chars).collect())
        .unwrap_or_default();
    let line = format!("{what}: {text}\n");
    // SAFETY: write(2) of a buffer we own to the container's stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    std::process::exit(1)
}

/// Runs the stub (the agent's binary started as `rtv-init <candidate>`).
/// Never returns.
pub fn run() -> ! {
    let candidate: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    // SAFETY: the handover memfd the agent placed at HANDOVER_FD.
    let mut blob = unsafe { File::from_raw_fd(HANDOVER_FD) };
    let mut bytes = Vec::new();
    let handover = match blob.read_to_end(&mut bytes) {
        Ok(_) => Handover::decode(&bytes),
        Err(_) => None,
    };
    drop(blob);
    let Some(h) = handover else {
        report(Step::StartWait, 0, Errno(libc::EINVAL));
    };
    // SAFETY: the report and start pipes the agent placed at their fds.
    let (mut report_pipe, mut start) = unsafe {
        (
            std::mem::ManuallyDrop::new(File::from_raw_fd(REPORT_FD)),
            File::from_raw_fd(START_FD),
        )
    };
    let ready = Report {
        kind: REPORT_READY,
        ..Default::default()
    };
    let _ = report_pipe.write_all(&ready.as_bytes());
    let mut byte = [0u8; 1];
    if !matches!(start.read(&mut byte), Ok(1)) {
        // The agent gave up on this container (delete before start).
        std::process::exit(0);
    }
    drop(start);
    // Started: from here the report pipe only closes, at the program's
    // exec or at the stub's exit; a failure is the container's own
    // (`fail_started`), as in runc.
    // SAFETY: F_SETFD on the report pipe.
    unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // Rust's runtime ignores SIGPIPE; the program must not inherit that.
    // SAFETY: restoring a default disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if let Some((program, flags)) = &h.seccomp {
        let filter = Filter::from_parts(program, *flags);
        if let Err(e) = filter.install() {
            fail_started("installing the seccomp filter (linux.seccomp)", e);
        }
    }
    let cstrings = |list: &[Vec<u8>]| -> Option<Vec<CString>> {
        list.iter().map(|b| CString::new(b.clone()).ok()).collect()
    };
    let (Some(argv), Some(env), Some(path)) = (
        cstrings(&h.argv),
        cstrings(&h.env),
        h.candidates
            .get(candidate)
            .and_then(|p| CString::new(p.clone()).ok()),
    ) else {
        fail_started("exec", Errno(libc::EINVAL));
    };
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let (argv_p, env_p) = (ptrs(&argv), ptrs(&env));
    // SAFETY: NUL-terminated strings and null-ended pointer arrays that
    // live across the call.
    unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    fail_started(&format!("exec {}", path.to_string_lossy()), Errno::last())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handovers_round_trip_and_garbage_is_refused() {
        let h = Handover {
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
            env: vec![b"PATH=/bin".to_vec()],
            candidates: vec![b"/usr/bin/sh".to_vec(), b"/bin/sh".to_vec()],
            seccomp: Some((vec![(6, 0, 0, 0x7fff_0000), (0x15, 1, 2, 59)], 4)),
        };
        let bytes = h.encode();
        assert_eq!(Handover::decode(&bytes), Some(h));
        for cut in 0..bytes.len() {
            assert_eq!(Handover::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Handover::decode(&longer), None);
        let none = Handover::default();
        assert_eq!(Handover::decode(&none.encode()), Some(none));
    }
}
