//! How a VM ends, and how its threads tell each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (Linux `reboot`, `reboot=k`).
    Reset,
    /// The guest shut down (triple fault, or a KVM shutdown system event).
    Shutdown,
    /// A vCPU halted with no interrupt controller to wake it.
    Halted,
    /// The guest kernel panicked (seen on the console before it reset).
    Panicked,
    /// The VM could not go on: an unexpected KVM exit or a VMM failure.
    Error(String),
    /// The VMM was asked to stop by a signal (SIGTERM, SIGINT).
    Signal(i32),
    /// The VM was snapshotted and then stopped, as asked.
    Snapshotted,
    /// The VMM stopped the VM on its own request (`VmController::stop`).
    Stopped,
}

impl VmExit {
    /// Whether the guest ended itself in an orderly way.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::Shutdown | VmExit::Halted)
    }

    /// The VMM process exit code for this exit: 0 for an orderly guest stop,
    /// 2 for a guest kernel panic, 1 for an error, 128 + the signal number
    /// when stopped by a signal; 0 when stopped after a snapshot or on
    /// request.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Shutdown | VmExit::Halted => 0,
            VmExit::Snapshotted | VmExit::Stopped => 0,
            VmExit::Panicked => 2,
            VmExit::Error(_) => 1,
            VmExit::Signal(sig) => 128 + sig,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset the machine"),
            VmExit::Shutdown => write!(f, "guest shut down"),
            VmExit::Halted => write!(f, "guest halted"),
            VmExit::Panicked => write!(f, "guest kernel panicked"),
            VmExit::Error(e) => write!(f, "VM failed: {e}"),
            VmExit::Signal(sig) => write!(f, "stopped by signal {sig} ({})", signal_name(*sig)),
            VmExit::Snapshotted => write!(f, "VM snapshotted and stopped"),
            VmExit::Stopped => write!(f, "VM stopped on request"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        _ => "signal",
    }
}

/// Shared by the vCPU threads, the devices and the event loop: the first
/// reason to stop wins, and wakes the event loop.
pub struct ExitNotifier {
    evt: EventFd,
    stop: AtomicBool,
    reason: Mutex<Option<VmExit>>,
}

impl ExitNotifier {
    /// A notifier with nothing to report yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` (unless one is already recorded) and asks every
    /// thread to stop.
    pub fn notify(&self, reason: VmExit) {
        {
            let mut slot = lock(&self.reason);
            if slot.is_none() {
                *slot = Some(reason);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the event loop: {e}");
        }
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        lock(&self.reason).clone()
    }

    /// The event the loop waits on.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let n = ExitNotifier::new().unwrap();
        assert!(!n.stopping());
        assert_eq!(n.reason(), None);
        n.notify(VmExit::Reset);
        n.notify(VmExit::Error("later".into()));
        assert!(n.stopping());
        assert_eq!(n.reason(), Some(VmExit::Reset));
        assert_eq!(n.event().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::Shutdown.exit_code(), 0);
        assert_eq!(VmExit::Panicked.exit_code(), 2);
        assert_eq!(VmExit::Error("x".into()).exit_code(), 1);
        assert!(VmExit::Halted.is_clean());
        assert!(!VmExit::Panicked.is_clean());
        assert_eq!(VmExit::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(VmExit::Signal(libc::SIGINT).exit_code(), 130);
        assert!(VmExit::Signal(15).to_string().contains("SIGTERM"));
        assert_eq!(VmExit::Snapshotted.exit_code(), 0);
        assert!(!VmExit::Snapshotted.is_clean());
    }
}
