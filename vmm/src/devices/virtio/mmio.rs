//! The virtio-mmio transport, modern layout (Version 2; virtio 1.2 §4.2.2).
//!
//! Each device has a 4 KiB register window and its own interrupt line.
//! Queue notifications normally reach the device through ioeventfds that
//! KVM signals on writes to QueueNotify (datamatch = queue index); a
//! notification that arrives here on the MMIO bus is passed on the same way.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    Interrupt, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::{lock, BusDevice};

/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) transport version.
pub const VERSION: u32 = 2;
/// Vendor ID reported to the guest.
pub const VENDOR_ID: u32 = 0;

/// Register offsets.
pub mod reg {
    /// MagicValue (R).
    pub const MAGIC: u64 = 0x000;
    /// Version (R).
    pub const VERSION: u64 = 0x004;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status (RW).
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// SHMSel (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// SHMLenLow (R).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// SHMLenHigh (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// SHMBaseLow (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// SHMBaseHigh (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// One queue's registers and ring positions, as saved in a snapshot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Driver (available) ring address.
    pub avail_ring: u64,
    /// Device (used) ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers, as saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmioState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the device was activated.
    pub activated: bool,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Each queue (from the device when activated, with its positions).
    pub queues: Vec<QueueSnapshot>,
}

/// The register window of one virtio device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt through `irqfd`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_evts = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(Queue::new(size).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The registers and queues, for a snapshot (the device's own queues,
    /// with their ring positions, once it is activated).
    pub fn state(&self) -> MmioState {
        let active = if self.activated {
            lock(&self.device).active_queue_states()
        } else {
            Vec::new()
        };
        let queues = if active.len() == self.queues.len() {
            active.into_iter().map(QueueSnapshot::from).collect()
        } else {
            self.queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect()
        };
        MmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// A transport for `device` with the registers of `state`; an activated
    /// device is activated again with the saved queues, then told it was
    /// restored.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irqfd: EventFd,
        state: &MmioState,
    ) -> Result<Self, String> {
        let mut t = Self::new(mem, device, irqfd).map_err(|e| e.to_string())?;
        if state.queues.len() != t.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                t.queues.len()
            ));
        }
        for (index, (q, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(format!(
                    "queue {index}: saved maximum size {}, the device's is {}",
                    saved.max_size,
                    q.max_size()
                ));
            }
            *q = Queue::try_from(QueueState::from(saved))
                .map_err(|e| format!("queue {index}: {e}"))?;
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.config_generation = state.config_generation;
        if state.activated {
            t.try_activate()?;
            t.activated = true;
            lock(&t.device).restored();
        }
        if state.interrupt_status != 0 {
            t.interrupt
                .status
                .fetch_or(state.interrupt_status, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(t)
    }

    /// The eventfds signalled by QueueNotify writes, one per queue: register
    /// them as ioeventfds at [`reg::QUEUE_NOTIFY`] with the queue index as
    /// datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device has been activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn device_features(&self) -> u64 {
        lock(&self.device).device_features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be changed between FEATURES_OK and DRIVER_OK,
    /// on a queue that is not yet ready.
    fn queue_writable(&mut self) -> bool {
        let phase_ok = self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0;
        if !phase_ok {
            tracing::warn!(
                status = self.status,
                "virtio-mmio: queue register written outside queue setup; ignored"
            );
            return false;
        }
        match self.selected_queue() {
            Some(q) if !q.ready() => true,
            Some(_) => {
                tracing::warn!("virtio-mmio: write to a ready queue's registers; ignored");
                false
            }
            None => {
                tracing::warn!("virtio-mmio: write to a queue that does not exist; ignored");
                false
            }
        }
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.queue_writable() {
            if let Some(q) = self.selected_queue() {
                f(q);
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones says "none".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    offset,
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER == 0
                    || self.status & (STATUS_FEATURES_OK | STATUS_FAILED) != 0
                {
                    tracing::warn!(
                        status = self.status,
                        "virtio-mmio: DriverFeatures written outside negotiation; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    sel => tracing::warn!(sel, "virtio-mmio: DriverFeaturesSel out of range"),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                let max = self.selected_queue().map_or(0, |q| q.max_size());
                let ok = value != 0 && value <= u32::from(max) && value.is_power_of_two();
                if !ok {
                    tracing::warn!(value, max, "virtio-mmio: invalid queue size; ignored");
                    return;
                }
                self.update_queue(|q| q.set_size(value as u16));
            }
            reg::QUEUE_READY => {
                if value > 1 {
                    tracing::warn!(value, "virtio-mmio: invalid QueueReady value; ignored");
                    return;
                }
                if value == 0 {
                    // Only allowed before DRIVER_OK (no queue reset feature).
                    if self.status & STATUS_DRIVER_OK == 0 {
                        if let Some(q) = self.selected_queue() {
                            q.set_ready(false);
                        }
                    }
                    return;
                }
                self.update_queue(|q| q.set_ready(true));
            }
            reg::QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.update_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_NOTIFY => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: cannot pass on a queue notification: {e}");
                    }
                }
                None => tracing::warn!(value, "virtio-mmio: notification for no queue"),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => tracing::debug!(
                offset,
                value,
                "virtio-mmio: write to a read-only or unknown register"
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            tracing::warn!(
                old,
                value,
                "virtio-mmio: the driver cleared status bits without a reset; ignored"
            );
            return;
        }
        let added = value & !old;
        if added & STATUS_FAILED != 0 {
            tracing::warn!("virtio-mmio: the driver marked the device FAILED");
            self.status |= STATUS_FAILED;
            return;
        }
        // Each step needs the ones before it.
        let order_ok = (value & STATUS_DRIVER == 0 || value & STATUS_ACKNOWLEDGE != 0)
            && (value & STATUS_FEATURES_OK == 0 || value & STATUS_DRIVER != 0)
            && (value & STATUS_DRIVER_OK == 0 || value & STATUS_FEATURES_OK != 0);
        if !order_ok {
            tracing::warn!(old, value, "virtio-mmio: status bits out of order; ignored");
            return;
        }
        let mut new = old | (added & (STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device_features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 {
                tracing::warn!(
                    unknown = format_args!("{unknown:#x}"),
                    "virtio-mmio: the driver accepted features the device does not offer"
                );
            } else if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                tracing::warn!("virtio-mmio: the driver did not accept VIRTIO_F_VERSION_1");
            } else {
                new |= STATUS_FEATURES_OK;
            }
        }
        self.status = new;
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if let Err(e) = self.try_activate() {
            tracing::warn!("virtio-mmio: {e}");
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            self.interrupt.signal_config_change();
            return;
        }
        self.status |= STATUS_DRIVER_OK;
        self.activated = true;
    }

    fn try_activate(&mut self) -> Result<(), String> {
        for (index, q) in self.queues.iter().enumerate() {
            if !queue_is_valid(q, &self.mem) {
                return Err(format!(
                    "queue {index} is not ready or lies outside guest memory"
                ));
            }
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            queues.push(Queue::try_from(q.state()).map_err(|e| format!("copying a queue: {e}"))?);
        }
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for evt in &self.queue_evts {
            evts.push(
                evt.try_clone()
                    .map_err(|e| format!("cloning an eventfd: {e}"))?,
            );
        }
        lock(&self.device)
            .activate(
                self.driver_features,
                self.mem.clone(),
                queues,
                self.interrupt.clone(),
                evts,
            )
            .map_err(|e| e.to_string())
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

/// Whether a queue is ready and its three rings each lie within one region
/// of guest memory.
fn queue_is_valid(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    if !q.ready() {
        return false;
    }
    let size = u64::from(q.size());
    let fits = |addr: u64, len: u64| {
        usize::try_from(len).is_ok_and(|len| mem.get_slice(GuestAddress(addr), len).is_ok())
    };
    fits(q.desc_table(), 16 * size)
        && fits(q.avail_ring(), 6 + 2 * size)
        && fits(q.used_ring(), 6 + 8 * size)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            tracing::warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register read that is not 32-bit aligned"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & STATUS_DRIVER_OK != 0 || self.status & STATUS_DRIVER != 0 {
                lock(&self.device).write_config(offset - reg::CONFIG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register write that is not 32 bits wide"
            );
            return;
        };
        if offset & 3 != 0 {
            tracing::warn!(offset, "virtio-mmio: unaligned register write");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, INTERRUPT_USED_BUFFER};

    #[derive(Default)]
    struct Dummy {
        activations: Vec<(u64, usize)>,
        resets: usize,
        config: [u8; 8],
        fail: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(
            &mut self,
            features: u64,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            _interrupt: Arc<Interrupt>,
            queue_evts: Vec<EventFd>,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues.len(), queue_evts.len());
            if self.fail {
                return Err(ActivateError("refused".into()));
            }
            self.activations.push((features, queues.len()));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let t = MmioTransport::new(mem, dev.clone(), EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .unwrap();
        (t, dev)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        r(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        w(t, reg::QUEUE_SEL, index);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DRIVER_HIGH, 0);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_DEVICE_HIGH, 0);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 3);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
        w(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        // Narrow or unaligned register reads give 0, never a panic.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(reg::MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
        // Config space at any width.
        let mut b = [0u8; 8];
        t.read(reg::CONFIG, &mut b);
        assert_eq!(b, [0; 8]);
    }

    #[test]
    fn full_negotiation_activates_the_device() {
        let (mut t, dev) = transport();
        let features = (1u64 << VIRTIO_F_VERSION_1) | (1 << 3);
        assert_eq!(
            negotiate(&mut t, features),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::STATUS, ALL);
        assert_eq!(r(&mut t, reg::STATUS), ALL);
        assert!(t.is_activated());
        assert_eq!(dev.lock().unwrap().activations, vec![(features, 2)]);
        // Queue registers are frozen once the device runs.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        // Reset.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // And again from scratch.
        negotiate(&mut t, features);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        w(&mut t, reg::STATUS, ALL);
        assert_eq!(dev.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn features_the_device_does_not_offer_are_refused() {
        let (mut t, _) = transport();
        let status = negotiate(&mut t, (1u64 << VIRTIO_F_VERSION_1) | (1 << 5));
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        // Without VERSION_1 the modern transport refuses too.
        let (mut t, _) = transport();
        let status = negotiate(&mut t, 1 << 3);
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does nothing.
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, reg::STATUS) & STATUS_DRIVER_OK, 0);
    }

    #[test]
    fn status_state_machine_rejects_skips_and_clears() {
        let (mut t, _) = transport();
        // DRIVER before ACKNOWLEDGE.
        w(&mut t, reg::STATUS, STATUS_DRIVER);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        // Features cannot be written before DRIVER.
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, reg::STATUS) & STATUS_FEATURES_OK, 0);
        // Features are frozen after FEATURES_OK.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        // Clearing bits without a reset is ignored.
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        assert_ne!(r(&mut t, reg::STATUS) & STATUS_FEATURES_OK, 0);
        // FAILED sticks.
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED,
        );
        assert_ne!(r(&mut t, reg::STATUS) & STATUS_FAILED, 0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn bad_queues_are_not_activated() {
        let (mut t, dev) = transport();
        negotiate(&mut t, 1u64 << VIRTIO_F_VERSION_1);
        // Queue registers before FEATURES_OK would have been ignored; these
        // are in the right phase but describe bad queues.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 3); // not a power of two: ignored
        w(&mut t, reg::QUEUE_NUM, 32); // above the maximum: ignored
        setup_queue(&mut t, 0, 16, 0x1_0000);
        // Queue 1 outside guest memory.
        setup_queue(&mut t, 1, 8, 0xfff_0000);
        w(&mut t, reg::STATUS, ALL);
        assert!(!t.is_activated());
        let status = r(&mut t, reg::STATUS);
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(status & STATUS_DRIVER_OK, 0);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & 2, 0);
        // A device that refuses activation also ends in NEEDS_RESET.
        let (mut t, dev) = transport();
        dev.lock().unwrap().fail = true;
        negotiate(&mut t, 1u64 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        w(&mut t, reg::STATUS, ALL);
        assert_ne!(r(&mut t, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        // A queue not made ready.
        let (mut t, _) = transport();
        negotiate(&mut t, 1u64 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        w(&mut t, reg::STATUS, ALL);
        assert!(!t.is_activated());
    }

    #[test]
    fn interrupts_and_notifications() {
        let (mut t, _) = transport();
        t.interrupt().signal_used_queue();
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        t.interrupt().signal_config_change();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 3);
        w(&mut t, reg::INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 2);
        w(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        // A QueueNotify that reaches the bus signals that queue's eventfd.
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(
            t.queue_evts()[0].read().is_err(),
            "queue 0 was not notified"
        );
        w(&mut t, reg::QUEUE_NOTIFY, 9); // no such queue: ignored
    }

    #[test]
    fn config_writes_bump_the_generation() {
        let (mut t, dev) = transport();
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let g = r(&mut t, reg::CONFIG_GENERATION);
        t.write(reg::CONFIG + 2, &[7, 8]);
        assert_eq!(dev.lock().unwrap().config[2..4], [7, 8]);
        assert_ne!(r(&mut t, reg::CONFIG_GENERATION), g);
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut b);
        assert_eq!(b, [7, 8]);
    }
}
