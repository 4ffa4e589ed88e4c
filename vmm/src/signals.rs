//! Stopping the VM cleanly on SIGTERM and SIGINT: the signals are blocked
//! and read from a signalfd on the event loop, which ends the VM with
//! [`VmExit::Signal`] so devices can clean up (the vsock socket file).
//! SIGUSR1 asks a profiled VM (`--profile`) for a dump of its profile; it
//! is blocked too, so that it never kills a VMM that is not profiling.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::exit::{ExitNotifier, VmExit};
use crate::profile::DumpHandle;

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// The signal that asks a profiled VM to write its profile so far.
pub const DUMP_SIGNAL: libc::c_int = libc::SIGUSR1;

pub(crate) fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it and
    // sigaddset only writes within it; the signal numbers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

fn stop_set() -> libc::sigset_t {
    signal_set(&STOP_SIGNALS)
}

pub(crate) fn sigmask(how: libc::c_int, set: &libc::sigset_t) -> io::Result<libc::sigset_t> {
    // SAFETY: as in stop_set, a zeroed sigset_t is a valid output buffer.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live sigset_t values.
    let rc = unsafe { libc::pthread_sigmask(how, set, &mut old) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(old)
}

/// Blocks SIGTERM, SIGINT and SIGUSR1 in the calling thread and every
/// thread it starts later. Call it first thing in `main` so that a signal
/// arriving while the VM is being built waits for the event loop instead of
/// killing the process with files left behind (and a SIGUSR1 to a VMM that
/// is not profiling stays pending, harmless).
pub fn block_stop_signals() -> io::Result<()> {
    sigmask(
        libc::SIG_BLOCK,
        &signal_set(&[STOP_SIGNALS[0], STOP_SIGNALS[1], DUMP_SIGNAL]),
    )
    .map(|_| ())
}

/// Reads SIGTERM/SIGINT from a signalfd and stops the VM; with a profiler,
/// reads SIGUSR1 too and asks it for a dump.
pub struct SignalWatcher {
    fd: OwnedFd,
    exit: Arc<ExitNotifier>,
    dump: Option<DumpHandle>,
    old_mask: libc::sigset_t,
}

impl SignalWatcher {
    /// Blocks the stop signals (and SIGUSR1 with `dump`) in this thread and
    /// opens the signalfd; the previous mask comes back when the watcher is
    /// dropped.
    pub fn new(exit: Arc<ExitNotifier>, dump: Option<DumpHandle>) -> io::Result<Self> {
        let set = if dump.is_some() {
            signal_set(&[STOP_SIGNALS[0], STOP_SIGNALS[1], DUMP_SIGNAL])
        } else {
            stop_set()
        };
        let old_mask = sigmask(libc::SIG_BLOCK, &set)?;
        // SAFETY: `set` is a valid sigset_t; the result is checked.
        let raw = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if raw < 0 {
            let err = io::Error::last_os_error();
            let _ = sigmask(libc::SIG_SETMASK, &old_mask);
            return Err(err);
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            fd,
            exit,
            dump,
            old_mask,
        })
    }
}

impl Drop for SignalWatcher {
    fn drop(&mut self) {
        let _ = sigmask(libc::SIG_SETMASK, &self.old_mask);
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        loop {
            // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: `info` is a writable buffer of exactly `size` bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    std::ptr::addr_of_mut!(info).cast(),
                    size,
                )
            };
            if n != size as isize {
                break;
            }
            let sig = info.ssi_signo as i32;
            if sig == DUMP_SIGNAL {
                if let Some(dump) = &self.dump {
                    if !dump.request() {
                        tracing::warn!("SIGUSR1: the profiler is not running");
                    }
                }
                continue;
            }
            tracing::info!(sig, "stop signal received");
            self.exit.notify(VmExit::Signal(sig));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            self.exit
                .notify(VmExit::Error(format!("cannot watch the signalfd: {e}")));
        }
    }
}
