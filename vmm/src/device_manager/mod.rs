//! The device manager: every virtio device of a VM, on virtio-mmio.
//!
//! # Where a new device goes
//!
//! A virtio device (virtio-net, virtio-blk, ...) is
//!
//! 1. one module under `devices/virtio/`: the device, which implements
//!    [`VirtioDevice`] (for its transport) and [`MutEventSubscriber`] (its
//!    work on the event loop), and its configuration type (serde, with the
//!    host-side resources a restore gives anew marked `#[serde(skip)]`);
//! 2. one registration: a variant of [`DeviceConfig`] in `registry.rs`, with
//!    its arm in that file's matches (name, validate, build, and what a
//!    restore gives it) and its errors' variant in [`DeviceError`]; a
//!    host-side resource for restores (a tap, a disk) is a field of
//!    [`RestoreConfig`] plus a line in `registry::refuse_unused`.
//!
//! Nothing else changes. The VM's devices are [`MachineConfig::devices`], in
//! order; the manager gives each one its slot ([`MmioSlot`]: a 4 KiB register
//! window and its own GSI, raised through an irqfd), its
//! `virtio_mmio.device=4K@base:irq` kernel command-line entry, ioeventfds for
//! its queue notifications, and its place on the event loop. Before a
//! snapshot it asks every device whether it can be saved
//! ([`VirtioDevice::can_snapshot`]); it saves each device's slot,
//! configuration (without host-side resources) and transport (registers and
//! queues), and a restore rebuilds each device from its configuration and
//! the restore's host-side resources, in the same slot, with its saved
//! transport.
//!
//! Devices added from outside ([`crate::Vm::add_virtio_device`]) get a slot
//! too, but cannot be rebuilt: a VM with one refuses snapshots.
//!
//! [`MachineConfig::devices`]: crate::MachineConfig::devices
//! [`RestoreConfig`]: crate::RestoreConfig

mod registry;

pub use registry::{DeviceConfig, DeviceError};

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{layout, mptable};
use crate::devices::bus::{self, Bus};
use crate::devices::virtio::mmio::{reg, MmioState, MmioTransport, MMIO_WINDOW_SIZE};
use crate::devices::virtio::VirtioDevice;

/// First GSI given to virtio-mmio devices (after COM1's 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Most virtio-mmio devices a VM can have: one GSI each, from
/// [`VIRTIO_IRQ_BASE`] to the IOAPIC's last pin, and one window each below
/// the IOAPIC.
pub const MAX_DEVICES: usize = {
    let by_irq = mptable::IOAPIC_PINS as usize - VIRTIO_IRQ_BASE as usize;
    let by_window =
        ((layout::IOAPIC_START - layout::VIRTIO_MMIO_START) / MMIO_WINDOW_SIZE) as usize;
    if by_irq < by_window {
        by_irq
    } else {
        by_window
    }
};

/// Errors placing, building or restoring a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No room left for another virtio device.
    #[error("too many virtio devices (at most {0})")]
    TooManyDevices(usize),
    /// A device's configuration is refused, or the device cannot be
    /// created.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be had.
    #[error("{what}: {source}")]
    Io {
        /// What was being created.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The device's window could not be placed on the MMIO bus.
    #[error("device setup: {0}")]
    Bus(#[from] bus::Error),
    /// A saved transport does not fit the rebuilt device.
    #[error("restoring the {device} device's virtio-mmio transport: {problem}")]
    Transport {
        /// The device.
        device: &'static str,
        /// What does not fit.
        problem: String,
    },
}

/// Where a virtio-mmio device sits: its register window and its interrupt
/// (Firecracker's `MMIODeviceInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSlot {
    /// Base of the 4 KiB register window.
    pub base: u64,
    /// The GSI (IOAPIC pin) of its interrupt.
    pub irq: u32,
}

impl MmioSlot {
    /// The slot of the `index`th virtio device: windows one after the
    /// other from [`layout::VIRTIO_MMIO_START`], GSIs from
    /// [`VIRTIO_IRQ_BASE`].
    pub fn nth(index: usize) -> Result<Self, Error> {
        if index >= MAX_DEVICES {
            return Err(Error::TooManyDevices(MAX_DEVICES));
        }
        // Both fit: index < MAX_DEVICES, a small number.
        Ok(Self {
            base: layout::VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE,
            irq: VIRTIO_IRQ_BASE + index as u32,
        })
    }

    /// The kernel command-line entry that tells the guest about the device
    /// (`virtio_mmio.device=4K@0xd0000000:5`).
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_WINDOW_SIZE / 1024,
            self.base,
            self.irq
        )
    }
}

/// The kernel command-line entries for `devices`, in the slots a VM built
/// with them gives them (devices past [`MAX_DEVICES`], which the VM
/// refuses, have none).
pub fn cmdline_entries(devices: &[DeviceConfig]) -> Vec<String> {
    (0..devices.len())
        .map_while(|index| MmioSlot::nth(index).ok())
        .map(|slot| slot.cmdline_entry())
        .collect()
}

/// A virtio device as the VM holds it: the transport's view of it and the
/// event loop's, usually one object.
pub struct VirtioHandle {
    /// What the transport drives.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// What joins the event loop when the VM runs.
    pub subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
}

impl VirtioHandle {
    /// Both views of one device.
    pub fn new<D: VirtioDevice + MutEventSubscriber + 'static>(device: D) -> Self {
        let device = Arc::new(Mutex::new(device));
        Self {
            device: device.clone(),
            subscriber: device,
        }
    }
}

/// A virtio device in a snapshot (`devices.json`): the slot it had, what it
/// is, and its transport's registers and queues (Firecracker's
/// `ConnectedDeviceState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    /// Its window and GSI.
    pub slot: MmioSlot,
    /// The device, without its host-side resources.
    pub device: DeviceConfig,
    /// The virtio-mmio registers and queues.
    pub transport: MmioState,
}

/// What a restore will build from a snapshot's devices (`saved`, in slot
/// order): each saved device with the host-side resources `restore` gives.
/// Checked before anything is created: every device must be given what it
/// needs, and nothing may be given for a device the snapshot lacks; every
/// device must have been saved in the slot this VMM gives it.
pub(crate) fn restore_plan(
    saved: &[VirtioSnapshot],
    restore: &crate::RestoreConfig,
) -> Result<Vec<DeviceConfig>, String> {
    let mut configs = Vec::with_capacity(saved.len());
    for (index, s) in saved.iter().enumerate() {
        let slot = MmioSlot::nth(index).map_err(|e| e.to_string())?;
        if slot != s.slot {
            return Err(format!(
                "virtio device {index} ({}) was saved at {:#x}, GSI {}; this rtv-vmm places it at {:#x}, GSI {}",
                s.device.name(),
                s.slot.base,
                s.slot.irq,
                slot.base,
                slot.irq
            ));
        }
        configs.push(s.device.restored(restore)?);
    }
    let devices: Vec<DeviceConfig> = saved.iter().map(|s| s.device.clone()).collect();
    registry::refuse_unused(restore, &devices)?;
    Ok(configs)
}

/// What the manager needs of the VM to place a device.
pub(crate) struct VmResources<'a> {
    /// For the irqfd and the ioeventfds.
    pub fd: &'a VmFd,
    /// Guest memory, for the transport.
    pub memory: &'a GuestMemoryMmap,
    /// The bus the vCPUs' MMIO exits go to.
    pub mmio: &'a mut Bus,
}

/// One placed device.
struct MmioDevice {
    slot: MmioSlot,
    /// How it was built; `None` for a device added from outside, which
    /// cannot be rebuilt from a snapshot.
    config: Option<DeviceConfig>,
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    transport: Arc<Mutex<MmioTransport>>,
}

/// The virtio devices of one VM, in slot order.
#[derive(Default)]
pub struct DeviceManager {
    devices: Vec<MmioDevice>,
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the device `config` describes and places it in the next slot.
    pub(crate) fn attach(
        &mut self,
        vm: &mut VmResources<'_>,
        config: &DeviceConfig,
    ) -> Result<MmioSlot, Error> {
        let handle = config.build()?;
        self.place(vm, Some(config.clone()), handle, None)
    }

    /// Places a device built outside the manager in the next slot; the VM
    /// then refuses snapshots.
    pub(crate) fn attach_foreign(
        &mut self,
        vm: &mut VmResources<'_>,
        handle: VirtioHandle,
    ) -> Result<MmioSlot, Error> {
        self.place(vm, None, handle, None)
    }

    /// Rebuilds a snapshot's devices in their slots, with their saved
    /// transports: `configs` are the saved devices given the restore's
    /// host-side resources ([`restore_plan`], which also checked the slots).
    pub(crate) fn restore(
        &mut self,
        vm: &mut VmResources<'_>,
        saved: &[VirtioSnapshot],
        configs: &[DeviceConfig],
    ) -> Result<(), Error> {
        for (saved, config) in saved.iter().zip(configs) {
            let handle = config.build()?;
            self.place(vm, Some(config.clone()), handle, Some(&saved.transport))?;
        }
        Ok(())
    }

    /// Gives a device the next slot: an irqfd for its GSI, its transport
    /// (new, or with the saved registers and queues), an ioeventfd per
    /// queue at QueueNotify, its window on the MMIO bus.
    fn place(
        &mut self,
        vm: &mut VmResources<'_>,
        config: Option<DeviceConfig>,
        handle: VirtioHandle,
        state: Option<&MmioState>,
    ) -> Result<MmioSlot, Error> {
        let slot = MmioSlot::nth(self.devices.len())?;
        let name = config.as_ref().map_or("added", DeviceConfig::name);
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| Error::Io {
                what: "virtio irq eventfd",
                source,
            })?;
        vm.fd
            .register_irqfd(&irqfd, slot.irq)
            .map_err(|source| Error::Kvm {
                what: "virtio irqfd",
                source,
            })?;
        let device = handle.device.clone();
        let transport = match state {
            None => MmioTransport::new(vm.memory.clone(), device, irqfd).map_err(|source| {
                Error::Io {
                    what: "virtio-mmio transport",
                    source,
                }
            })?,
            Some(state) => MmioTransport::restore(vm.memory.clone(), device, irqfd, state)
                .map_err(|problem| Error::Transport {
                    device: name,
                    problem,
                })?,
        };
        let notify = IoEventAddress::Mmio(slot.base + reg::QUEUE_NOTIFY);
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd
                .register_ioevent(evt, &notify, queue as u32)
                .map_err(|source| Error::Kvm {
                    what: "virtio ioeventfd",
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        vm.mmio
            .insert(transport.clone(), slot.base, MMIO_WINDOW_SIZE)?;
        tracing::debug!(
            base = format_args!("{:#x}", slot.base),
            irq = slot.irq,
            "virtio-mmio {name} device"
        );
        self.devices.push(MmioDevice {
            slot,
            config,
            device: handle.device,
            subscriber: handle.subscriber,
            transport,
        });
        Ok(slot)
    }

    /// The slots given so far, in order.
    pub fn slots(&self) -> Vec<MmioSlot> {
        self.devices.iter().map(|d| d.slot).collect()
    }

    /// The `virtio_mmio.device=` entries the guest kernel needs for the
    /// devices placed so far.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| d.slot.cmdline_entry())
            .collect()
    }

    /// The devices' event loop subscribers.
    pub(crate) fn subscribers(
        &self,
    ) -> impl Iterator<Item = Arc<Mutex<dyn MutEventSubscriber + Send>>> + '_ {
        self.devices.iter().map(|d| d.subscriber.clone())
    }

    /// Whether every device can be saved now: the first refusal, named. A
    /// device added from outside always refuses (it cannot be rebuilt).
    pub(crate) fn can_snapshot(&self) -> Result<(), String> {
        for d in &self.devices {
            if d.config.is_none() {
                return Err("added with add_virtio_device cannot be snapshotted".into());
            }
            bus::lock(&d.device).can_snapshot()?;
        }
        Ok(())
    }

    /// Every device, for a snapshot (ask [`Self::can_snapshot`] first; a
    /// device added from outside is left out).
    pub(crate) fn save(&self) -> Vec<VirtioSnapshot> {
        self.devices
            .iter()
            .filter_map(|d| {
                Some(VirtioSnapshot {
                    slot: d.slot,
                    device: d.config.clone()?,
                    transport: bus::lock(&d.transport).state(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
