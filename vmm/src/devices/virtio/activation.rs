//! The activation plumbing of a virtio device that works on the VMM's event
//! loop: the driver activates or resets the device from a vCPU thread (through
//! the MMIO transport), and the event loop must then start or stop watching
//! the queues' eventfds. A control eventfd wakes the loop for that; the
//! eventfds of a previous activation are unwatched there too.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Interrupt};

/// What the driver activated the device with.
pub struct Active {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, by index.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The queues' notification eventfds, by index.
    pub evts: Vec<EventFd>,
    /// Whether the event loop watches `evts` yet.
    pub registered: bool,
}

/// A device's activation, as the event loop sees it.
pub struct Activation {
    name: &'static str,
    control: EventFd,
    /// The current activation, if the driver has activated the device.
    pub active: Option<Active>,
    /// Eventfds of a previous activation, and whether they are watched.
    stale: Vec<(EventFd, bool)>,
}

impl Activation {
    /// Plumbing for the device called `name` (in log lines).
    pub fn new(name: &'static str) -> std::io::Result<Self> {
        Ok(Self {
            name,
            control: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            active: None,
            stale: Vec::new(),
        })
    }

    /// Watches the control eventfd (from the subscriber's `init`).
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control, EventSet::IN)) {
            tracing::error!("{}: cannot watch the control event: {e}", self.name);
        }
    }

    /// Whether `fd` is the control eventfd.
    pub fn is_control(&self, fd: RawFd) -> bool {
        fd == self.control.as_raw_fd()
    }

    /// Takes the driver's activation with `expected` queues, and wakes the
    /// event loop to watch them.
    pub fn activate(
        &mut self,
        expected: usize,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if queues.len() != expected || evts.len() != expected {
            return Err(ActivateError(format!(
                "{} needs {expected} queues, got {}",
                self.name,
                queues.len()
            )));
        }
        self.retire();
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            evts,
            registered: false,
        });
        self.control
            .write(1)
            .map_err(|e| ActivateError(format!("waking the event loop: {e}")))
    }

    fn retire(&mut self) {
        if let Some(old) = self.active.take() {
            self.stale
                .extend(old.evts.into_iter().map(|e| (e, old.registered)));
        }
    }

    /// Drops the activation (a driver reset) and wakes the event loop.
    pub fn reset(&mut self) {
        self.retire();
        self.wake("a reset");
    }

    /// Wakes the event loop (its next [`Activation::sync`]).
    pub fn wake(&self, why: &str) {
        if let Err(e) = self.control.write(1) {
            tracing::error!("{}: cannot wake the event loop for {why}: {e}", self.name);
        }
    }

    /// On the control event: unwatches a previous activation's queues and
    /// watches the current one's. Returns whether queues were newly watched.
    pub fn sync(&mut self, ops: &mut EventOps) -> bool {
        let _ = self.control.read();
        for (evt, registered) in self.stale.drain(..) {
            if registered {
                if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                    tracing::warn!("{}: cannot stop watching a queue: {e}", self.name);
                }
            }
        }
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if active.registered {
            return false;
        }
        for evt in &active.evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("{}: cannot watch a queue: {e}", self.name);
            }
        }
        active.registered = true;
        true
    }

    /// The index of the queue whose eventfd is `fd`, with the eventfd drained.
    pub fn queue_event(&self, fd: RawFd) -> Option<usize> {
        let active = self.active.as_ref()?;
        let index = active.evts.iter().position(|e| e.as_raw_fd() == fd)?;
        let _ = active.evts[index].read();
        Some(index)
    }

    /// Drains `fd` if it is a previous activation's eventfd; whether it was.
    pub fn drain_stale(&self, fd: RawFd) -> bool {
        match self.stale.iter().find(|(e, _)| e.as_raw_fd() == fd) {
            Some((evt, _)) => {
                let _ = evt.read();
                true
            }
            None => false,
        }
    }

    /// The active queues' states (for snapshots).
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }
}
