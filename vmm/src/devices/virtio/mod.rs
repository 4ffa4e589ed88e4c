//! virtio devices (virtio 1.x) on the virtio-mmio transport.
//!
//! [`mmio::MmioTransport`] is the register window a vCPU reaches through the
//! MMIO bus; the device behind it implements [`VirtioDevice`] and does its
//! work on the VMM's event loop once the driver has activated it. The
//! [`crate::device_manager`] gives each device its slot, interrupt and
//! command-line entry, and saves and restores it; a new device is a module
//! here plus one registration there.

pub mod activation;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device complies with virtio 1.0 and later.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Device status: the driver is set up and ready to drive the device.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;

/// Interrupt status bit: a queue has new used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// virtio device ID of a network card (virtio-net) device.
pub const DEVICE_ID_NET: u32 = 1;
/// virtio device ID of a socket (vsock) device.
pub const DEVICE_ID_VSOCK: u32 = 19;
/// virtio device ID of a file system (virtio-fs) device.
pub const DEVICE_ID_FS: u32 = 26;

/// A device's interrupt line: the InterruptStatus bits shared with the
/// transport, and the irqfd that raises the GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.trigger(INTERRUPT_USED_BUFFER);
    }

    /// Tells the driver the configuration space changed (or the device
    /// needs a reset).
    pub fn signal_config_change(&self) {
        self.trigger(INTERRUPT_CONFIG_CHANGE);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every pending bit (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The irqfd, to register with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
#[error("activating the virtio device: {0}")]
pub struct ActivateError(pub String);

/// What every virtio device offers its transport.
///
/// The transport calls these from a vCPU thread with the device locked;
/// the device's own work (queues, host sockets) runs on the event loop.
pub trait VirtioDevice: Send {
    /// The virtio device ID (19 for vsock).
    fn device_type(&self) -> u32;
    /// The largest size of each of the device's queues, in queue order.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated `features`, the guest's
    /// memory, its configured queues, its interrupt and the eventfds the
    /// guest's queue notifications arrive on (one per queue).
    fn activate(
        &mut self,
        features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and returns it to its initial state (the driver
    /// wrote 0 to Status). Queues and eventfds given at activation are
    /// given up.
    fn reset(&mut self);
    /// The queues the device runs since its activation (with their ring
    /// positions), for a snapshot; empty when not activated.
    fn active_queue_states(&self) -> Vec<QueueState> {
        Vec::new()
    }
    /// Called once the device has been re-activated from a snapshot, before
    /// the guest runs again.
    fn restored(&mut self) {}
    /// Whether the device can be saved in a snapshot now: `Err(why not)`
    /// when it holds state a snapshot cannot keep (by default it can: its
    /// transport, queues and configuration are all there is). Asked on the
    /// event loop thread, which serves the device's queues, before the
    /// vCPUs are paused; a refusal fails the snapshot and the VM goes on.
    fn can_snapshot(&self) -> Result<(), String> {
        Ok(())
    }
}
