//! virtio-net (device ID 1) over a tap file descriptor, served in the VMM
//! process (no vhost), the way Firecracker does it.
//!
//! Two queues: RX (0, device to driver) and TX (1), 256 entries each. Every
//! frame both ways carries a 12-byte `virtio_net_hdr_v1`, which the tap
//! (opened with `IFF_VNET_HDR` by whoever made it; the device sets
//! `TUNSETVNETHDRSZ` 12) reads and writes as is: checksum and segmentation
//! offloads pass straight through. On activation the device sets
//! `TUNSETOFFLOAD` from the features the guest acked ([`tap::offload_flags`]).
//!
//! # Event loop
//!
//! The tap is registered **edge-triggered** for input and output, once, for
//! the device's life. On every input edge the device reads frames until the
//! tap says EAGAIN, unless the guest runs out of receive buffers: then the
//! frame in hand is held in the device (one frame, never lost), reading
//! stops, and it resumes (frame in hand first, then reading to EAGAIN again)
//! on the guest's next RX-queue notification. Whenever the device stops
//! reading before EAGAIN it holds a frame, and it only stops holding one on a
//! path that then reads on to EAGAIN, so no edge is ever missed; while the
//! guest gives no buffers nothing wakes the loop but new frames arriving (one
//! wakeup each at most) — it never spins.
//!
//! TX: each chain is a vnet header and a frame over readable descriptors,
//! gathered and written to the tap with one `write`. On EAGAIN the chain is
//! put back in the ring (not consumed), TX notifications are ignored, and
//! the output edge (EPOLLOUT) resumes it. Used entries are returned and the
//! interrupt raised once per batch, both ways.
//!
//! # Mergeable receive buffers
//!
//! With VIRTIO_NET_F_MRG_RXBUF a received frame is spread over as many RX
//! chains as it needs; `num_buffers` in the first chain's header says how
//! many, and each chain's used length is what was written to it. Chains are
//! taken only once there are enough for the whole frame (otherwise they are
//! put back and the frame waits). Without MRG_RXBUF each frame goes to one
//! chain (`num_buffers` = 1); a frame larger than the chain is dropped and
//! the chain kept for the next frame. A frame that cannot fit even in a
//! full ring is dropped.
//!
//! # Untrusted chains
//!
//! Every chain is walked with virtio-queue's bounds-checked iterator (which
//! follows indirect tables and stops at loops after the queue size), and
//! every buffer is checked against guest memory before use and accessed with
//! vm-memory's checked accessors. A chain with a descriptor of the wrong
//! direction, a buffer outside guest memory, no room for a header, or (TX)
//! more than [`MAX_BUFFER_LEN`] bytes is returned to the guest with used
//! length 0 and counted, with a rate-limited warning. A bad RX chain met
//! while gathering buffers for a frame is returned before the frame's
//! chains, so the frame's chains stay consecutive in the used ring.
//!
//! # No tap
//!
//! A device built without a tap (a template VM) has its link down: TX frames
//! are consumed and dropped, nothing is received. A restore may give it a tap
//! ([`crate::RestoreConfig::net_tap_fd`]); the restored device then raises a
//! configuration-change interrupt so the guest reads the link as up.
//!
//! # Snapshots
//!
//! Allowed with or without a tap. The snapshot keeps the MAC and MTU (not
//! the tap), and the queues' positions: a TX chain not yet written to the
//! tap is still in the ring and is sent by the restored VM. A received frame
//! the device is holding for lack of guest buffers is not saved: the restored
//! VM has lost it, as a network may lose any frame.

pub mod tap;

#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use self::tap::{Tap, TapError, VNET_HDR_LEN};
use super::activation::Activation;
use super::{ActivateError, Interrupt, VirtioDevice, DEVICE_ID_NET, VIRTIO_F_VERSION_1};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive (device to driver) queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit (driver to device) queue.
pub const TX_QUEUE: usize = 1;
/// Largest frame (without its vnet header) either way: a 64 KiB GSO frame
/// with its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest vnet header and frame: TX chains longer than this are dropped.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// The MAC address a NIC gets unless told otherwise (locally administered,
/// "rtv" in its middle bytes).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x72, 0x74, 0x76, 0x00, 0x01];
/// The MTU a NIC gets unless told otherwise.
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest MTU accepted (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Size of the configuration space: mac[6], status, max_virtqueue_pairs,
/// mtu (each u16, little endian).
pub const CONFIG_LEN: usize = 12;

/// Read errors in a row after which the device stops reading the tap until
/// its next readiness edge.
const MAX_READ_ERRORS: u32 = 16;

/// Offset of `num_buffers` in the vnet header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// How the NIC is set up. A snapshot saves the MAC and MTU; the tap is a
/// host-side resource given anew to each restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU the guest is told to use (VIRTIO_NET_F_MTU).
    pub mtu: u16,
    /// An open tap fd of this process (`IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`), or `None` for a NIC with its link down and no backend
    /// (a template). The fd stays the caller's: the device works on its own
    /// duplicate ([`tap`] module), so the number may be given to several
    /// builds and is never closed by the VMM.
    #[serde(skip)]
    pub tap_fd: Option<RawFd>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            mac: DEFAULT_MAC,
            mtu: DEFAULT_MTU,
            tap_fd: None,
        }
    }
}

/// Errors in a virtio-net configuration, or setting the device up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MTU is out of range.
    #[error("virtio-net: MTU {0}: must be between 68 and 65535")]
    Mtu(u32),
    /// The MAC address cannot be a NIC's.
    #[error("virtio-net: MAC address {mac}: {problem}")]
    Mac {
        /// The address.
        mac: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The tap fd is unusable.
    #[error("virtio-net: {0}")]
    Tap(#[from] TapError),
    /// The device's event plumbing could not be made.
    #[error("virtio-net: {what}: {source}")]
    Io {
        /// What was being made.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Formats a MAC address as `02:72:74:76:00:01` (the protocol's writer,
/// which the runtime and the agent use too).
pub use rtv_protocol::format_mac;

/// Parses `02:72:74:76:00:01` (or with `-`); checks only the syntax.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(format!(
            "{text:?} is not a MAC address (six hex bytes, like 02:72:74:76:00:01)"
        ));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.is_empty() || part.len() > 2 {
            return Err(format!("{text:?}: {part:?} is not a hex byte"));
        }
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| format!("{text:?}: {part:?} is not a hex byte"))?;
    }
    Ok(mac)
}

impl NetConfig {
    /// Checks the MAC, the MTU and the tap fd (without taking or changing
    /// the fd).
    pub fn validate(&self) -> Result<(), NetError> {
        if self.mtu < MIN_MTU {
            return Err(NetError::Mtu(u32::from(self.mtu)));
        }
        let mac_err = |problem| NetError::Mac {
            mac: format_mac(&self.mac),
            problem,
        };
        if self.mac[0] & 1 != 0 {
            return Err(mac_err(
                "a multicast address (lowest bit of the first byte set)",
            ));
        }
        if self.mac == [0; 6] {
            return Err(mac_err("all zeros"));
        }
        if let Some(fd) = self.tap_fd {
            tap::inspect(fd)?;
        }
        Ok(())
    }
}

/// What the device has done, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames put in the guest's receive buffers.
    pub rx_frames: u64,
    /// Their bytes (without vnet headers).
    pub rx_bytes: u64,
    /// Frames read from the tap and dropped (too short, too large for the
    /// guest's buffers, or held at a reset).
    pub rx_dropped: u64,
    /// Times a frame had to wait for the guest's receive buffers.
    pub rx_deferred: u64,
    /// Malformed RX chains returned unused.
    pub rx_bad_chains: u64,
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Their bytes (without vnet headers).
    pub tx_bytes: u64,
    /// TX frames dropped: no tap, or the tap refused them.
    pub tx_dropped: u64,
    /// Malformed TX chains dropped (including oversized ones).
    pub tx_malformed: u64,
    /// TX chains dropped for being longer than [`MAX_BUFFER_LEN`].
    pub tx_oversized: u64,
    /// Times a write to the tap said EAGAIN.
    pub tx_blocked: u64,
    /// Events the device handled on the event loop.
    pub events: u64,
}

/// A warning logged the first few times and then at powers of two, so a
/// guest cannot flood the log.
#[derive(Debug, Default)]
struct Limited(u64);

impl Limited {
    /// Counts one occurrence: `Some(count)` when it should be logged.
    fn hit(&mut self) -> Option<u64> {
        self.0 += 1;
        (self.0 <= 4 || self.0.is_power_of_two()).then_some(self.0)
    }
}

#[derive(Debug, Default)]
struct Warnings {
    rx_chain: Limited,
    rx_read: Limited,
    rx_drop: Limited,
    tx_chain: Limited,
    tx_oversized: Limited,
    tx_write: Limited,
    used: Limited,
}

/// One writable buffer of an RX chain.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u32,
    /// Index of its chain in [`Rx::chains`].
    chain: usize,
}

/// Scratch state of the receive path.
struct Rx {
    /// The frame in hand (vnet header first), `len` bytes of it.
    buf: Vec<u8>,
    /// Length of the frame held for the guest's buffers, if one is.
    held: Option<usize>,
    segs: Vec<Seg>,
    /// Heads of the chains gathered for the frame in hand, and their used
    /// lengths.
    chains: Vec<(u16, u32)>,
    /// Heads of malformed chains met meanwhile.
    bad: Vec<u16>,
}

/// What became of one received frame.
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Not enough buffers: the chains are back in the ring.
    NoRoom,
    /// It cannot be delivered.
    Dropped(&'static str),
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    tap: Option<Tap>,
    act: Activation,
    acked: u64,
    /// The TUN_F_* flags set at the last activation.
    offload: Option<u32>,
    rx: Rx,
    tx_buf: Vec<u8>,
    /// A write to the tap said EAGAIN: TX waits for the output edge.
    tx_blocked: bool,
    counters: NetCounters,
    warn: Warnings,
}

impl Net {
    /// Creates the device, on a duplicate of `config.tap_fd` if there is one
    /// (checked to be a tap with a vnet header, made non-blocking, and set to
    /// 12-byte vnet headers).
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        config.validate()?;
        let tap = config.tap_fd.map(Tap::open).transpose()?;
        Self::with_tap(config, tap)
    }

    fn with_tap(config: &NetConfig, tap: Option<Tap>) -> Result<Self, NetError> {
        let act = Activation::new("virtio-net").map_err(|source| NetError::Io {
            what: "control eventfd",
            source,
        })?;
        Ok(Self {
            mac: config.mac,
            mtu: config.mtu,
            tap,
            act,
            acked: 0,
            offload: None,
            rx: Rx {
                buf: vec![0u8; MAX_BUFFER_LEN],
                held: None,
                segs: Vec::new(),
                chains: Vec::new(),
                bad: Vec::new(),
            },
            tx_buf: vec![0u8; MAX_BUFFER_LEN],
            tx_blocked: false,
            counters: NetCounters::default(),
            warn: Warnings::default(),
        })
    }

    /// What the device has done so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether a tap is attached (the link is up).
    pub fn has_tap(&self) -> bool {
        self.tap.is_some()
    }

    /// The tap's interface name, if one is attached.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap.as_ref().map(Tap::name)
    }

    /// The features the driver acked at the last activation.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The `TUN_F_*` offloads set on the tap at the last activation.
    pub fn offload_flags(&self) -> Option<u32> {
        self.offload
    }

    /// Whether a received frame is waiting for the guest's buffers.
    pub fn holds_rx_frame(&self) -> bool {
        self.rx.held.is_some()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let status: u16 = if self.tap.is_some() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn mrg_rxbuf(&self) -> bool {
        self.acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Sends the guest's TX chains to the tap until the ring is empty or the
    /// tap is full.
    fn process_tx(&mut self) {
        let Some(active) = self.act.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match gather_tx(mem, chain, &mut self.tx_buf) {
                Err(TxChainError::Oversized(len)) => {
                    self.counters.tx_malformed += 1;
                    self.counters.tx_oversized += 1;
                    if let Some(count) = self.warn.tx_oversized.hit() {
                        tracing::warn!(
                            head,
                            len,
                            count,
                            "virtio-net: dropping a TX frame larger than {MAX_BUFFER_LEN} bytes"
                        );
                    }
                }
                Err(TxChainError::Malformed(why)) => {
                    self.counters.tx_malformed += 1;
                    if let Some(count) = self.warn.tx_chain.hit() {
                        tracing::warn!(head, count, "virtio-net: dropping a TX chain: {why}");
                    }
                }
                Ok(len) => match &self.tap {
                    None => self.counters.tx_dropped += 1,
                    Some(tap) => match tap.write_frame(&self.tx_buf[..len]) {
                        Ok(_) => {
                            self.counters.tx_frames += 1;
                            self.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                            ) =>
                        {
                            // Keep the chain in the ring; the output edge
                            // (or, if interrupted, the next round) retries.
                            queue.go_to_previous_position();
                            if e.kind() == std::io::ErrorKind::Interrupted {
                                continue;
                            }
                            self.counters.tx_blocked += 1;
                            self.tx_blocked = true;
                            break;
                        }
                        Err(e) => {
                            self.counters.tx_dropped += 1;
                            if let Some(count) = self.warn.tx_write.hit() {
                                tracing::warn!(
                                    count,
                                    "virtio-net: the tap refused a TX frame: {e}"
                                );
                            }
                        }
                    },
                },
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                if let Some(count) = self.warn.used.hit() {
                    tracing::warn!(head, count, "virtio-net: cannot return a TX chain: {e}");
                }
            }
            used = true;
        }
        if used {
            active.interrupt.signal_used_queue();
        }
    }

    /// Moves frames from the tap to the guest until the tap says EAGAIN or
    /// the guest has no buffers left (then the frame in hand is held).
    fn process_rx(&mut self) {
        let Some(tap) = &self.tap else {
            return;
        };
        let Some(active) = self.act.active.as_mut() else {
            return;
        };
        let mrg = self.acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mem = &active.mem;
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = false;
        let mut read_errors = 0;
        loop {
            let len = match self.rx.held.take() {
                Some(len) => len,
                None => match tap.read_frame(&mut self.rx.buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        self.counters.rx_dropped += 1;
                        if n == 0 {
                            break;
                        }
                        continue;
                    }
                    Ok(n) => {
                        read_errors = 0;
                        n
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // A frame the kernel could not hand over is lost
                        // (the next one may be fine: keep draining), but a
                        // tap that only fails is left until its next edge.
                        self.counters.rx_dropped += 1;
                        if let Some(count) = self.warn.rx_read.hit() {
                            tracing::warn!(count, "virtio-net: reading the tap: {e}");
                        }
                        read_errors += 1;
                        if read_errors >= MAX_READ_ERRORS {
                            break;
                        }
                        continue;
                    }
                },
            };
            let outcome = deliver(mem, queue, &mut self.rx, len, mrg, &mut self.warn);
            // Malformed chains met on the way go back first (with length 0).
            for head in self.rx.bad.drain(..) {
                self.counters.rx_bad_chains += 1;
                if let Err(e) = queue.add_used(mem, head, 0) {
                    if let Some(count) = self.warn.used.hit() {
                        tracing::warn!(head, count, "virtio-net: cannot return an RX chain: {e}");
                    }
                }
                used = true;
            }
            match outcome {
                Delivery::Delivered => {
                    for &(head, n) in &self.rx.chains {
                        if let Err(e) = queue.add_used(mem, head, n) {
                            if let Some(count) = self.warn.used.hit() {
                                tracing::warn!(
                                    head,
                                    count,
                                    "virtio-net: cannot return an RX chain: {e}"
                                );
                            }
                        }
                    }
                    used = true;
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                Delivery::NoRoom => {
                    self.rx.held = Some(len);
                    self.counters.rx_deferred += 1;
                    break;
                }
                Delivery::Dropped(why) => {
                    self.counters.rx_dropped += 1;
                    if let Some(count) = self.warn.rx_drop.hit() {
                        tracing::warn!(len, count, "virtio-net: dropping a received frame: {why}");
                    }
                }
            }
        }
        if used {
            active.interrupt.signal_used_queue();
        }
    }
}

/// Why a TX chain is dropped.
enum TxChainError {
    Oversized(u64),
    Malformed(&'static str),
}

/// Gathers a TX chain (vnet header and frame over readable descriptors)
/// into `buf`; its length.
fn gather_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, TxChainError> {
    let mut len: u64 = 0;
    let mut descs = 0usize;
    for desc in chain {
        descs += 1;
        if desc.is_write_only() {
            return Err(TxChainError::Malformed("a write-only descriptor"));
        }
        let n = u64::from(desc.len());
        let end = len + n;
        if end > MAX_BUFFER_LEN as u64 {
            return Err(TxChainError::Oversized(end));
        }
        if n == 0 {
            continue;
        }
        let (start, stop) = (len as usize, end as usize);
        let target = buf
            .get_mut(start..stop)
            .ok_or(TxChainError::Oversized(end))?;
        if !mem.check_range(desc.addr(), target.len()) {
            return Err(TxChainError::Malformed("a buffer outside guest memory"));
        }
        mem.read_slice(target, desc.addr())
            .map_err(|_| TxChainError::Malformed("an unreadable buffer"))?;
        len = end;
    }
    if descs == 0 {
        return Err(TxChainError::Malformed("no descriptors"));
    }
    if len < VNET_HDR_LEN as u64 {
        return Err(TxChainError::Malformed("shorter than a vnet header"));
    }
    Ok(len as usize)
}

/// The writable buffers of an RX chain, appended to `segs`; the chain's
/// capacity.
fn rx_segments(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    index: usize,
    segs: &mut Vec<Seg>,
) -> Result<u64, &'static str> {
    let first = segs.len();
    let mut cap: u64 = 0;
    let mut fail = None;
    for desc in chain {
        if !desc.is_write_only() {
            fail = Some("a read-only descriptor");
            break;
        }
        if desc.len() == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            fail = Some("a buffer outside guest memory");
            break;
        }
        cap += u64::from(desc.len());
        segs.push(Seg {
            addr: desc.addr(),
            len: desc.len(),
            chain: index,
        });
    }
    if fail.is_none() && cap < VNET_HDR_LEN as u64 {
        fail = Some("no room for a vnet header");
    }
    match fail {
        Some(why) => {
            segs.truncate(first);
            Err(why)
        }
        None => Ok(cap),
    }
}

/// Puts the frame in hand (`rx.buf[..len]`) in the guest's RX buffers: as
/// many chains as it needs with `mrg`, one without. Chains are consumed only
/// if the whole frame fits; malformed chains met are left in `rx.bad`, to be
/// returned before the frame's.
fn deliver(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    rx: &mut Rx,
    len: usize,
    mrg: bool,
    warn: &mut Warnings,
) -> Delivery {
    rx.segs.clear();
    rx.chains.clear();
    rx.bad.clear();
    let start = queue.next_avail();
    let mut cap: u64 = 0;
    let mut popped = 0usize;
    while cap < len as u64 {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Not enough buffers: put everything back, bad chains too (they
            // are returned with the frame that finally goes).
            queue.set_next_avail(start);
            rx.bad.clear();
            return if popped >= usize::from(queue.size()) {
                Delivery::Dropped("larger than the guest's whole receive ring")
            } else {
                Delivery::NoRoom
            };
        };
        popped += 1;
        let head = chain.head_index();
        match rx_segments(mem, chain, rx.chains.len(), &mut rx.segs) {
            Err(why) => {
                if let Some(count) = warn.rx_chain.hit() {
                    tracing::warn!(head, count, "virtio-net: dropping an RX chain: {why}");
                }
                rx.bad.push(head);
            }
            Ok(n) if !mrg && n < len as u64 => {
                // One chain per frame, and this one is too small: keep it
                // for the next frame, drop this one.
                queue.go_to_previous_position();
                rx.segs.clear();
                return Delivery::Dropped("larger than the guest's receive buffer");
            }
            Ok(n) => {
                rx.chains.push((head, 0));
                cap += n;
            }
        }
    }
    let num_buffers = rx.chains.len() as u16;
    rx.buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
    let mut off = 0usize;
    for seg in &rx.segs {
        if off >= len {
            break;
        }
        let n = (seg.len as usize).min(len - off);
        if let Err(e) = mem.write_slice(&rx.buf[off..off + n], seg.addr) {
            // Checked against guest memory already: cannot happen.
            tracing::warn!("virtio-net: writing an RX buffer: {e}");
        }
        if let Some(chain) = rx.chains.get_mut(seg.chain) {
            chain.1 += n as u32;
        }
        off += n;
    }
    Delivery::Delivered
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn device_features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(0u64, |f, &bit| f | (1u64 << bit))
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o));
            *b = at.copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-net: the driver wrote the read-only config space"
        );
    }

    fn activate(
        &mut self,
        features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.acked = features;
        self.offload = None;
        if let Some(tap) = &self.tap {
            let flags = tap::offload_flags(features);
            match tap.set_offload(flags) {
                Ok(()) => self.offload = Some(flags),
                Err(e) => tracing::warn!(
                    tap = tap.name(),
                    flags,
                    "virtio-net: TUNSETOFFLOAD failed: {e}"
                ),
            }
        }
        self.act.activate(2, mem, queues, interrupt, queue_evts)?;
        tracing::debug!(
            features = format_args!("{features:#x}"),
            mrg_rxbuf = self.mrg_rxbuf(),
            offload = ?self.offload,
            "virtio-net: activated"
        );
        Ok(())
    }

    fn reset(&mut self) {
        if self.rx.held.take().is_some() {
            self.counters.rx_dropped += 1;
        }
        self.tx_blocked = false;
        self.acked = 0;
        self.act.reset();
        tracing::debug!("virtio-net: reset");
    }

    fn active_queue_states(&self) -> Vec<QueueState> {
        self.act.queue_states()
    }

    fn restored(&mut self) {
        // The snapshot's guest may have read another link status (a
        // template without a tap): have it read the status again.
        if let Some(active) = &self.act.active {
            if self.tap.is_some() {
                active.interrupt.signal_config_change();
            }
        }
        self.act.wake("a restore");
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.counters.events += 1;
        let fd = events.fd();
        let set = events.event_set();
        if self.act.is_control(fd) {
            if self.act.sync(ops) {
                self.tx_blocked = false;
                self.process_tx();
            }
            self.process_rx();
        } else if let Some(index) = self.act.queue_event(fd) {
            match index {
                RX_QUEUE => self.process_rx(),
                _ if !self.tx_blocked => self.process_tx(),
                _ => {}
            }
        } else if self.tap.as_ref().is_some_and(|t| t.as_raw_fd() == fd) {
            if set.contains(EventSet::OUT) && self.tx_blocked {
                self.tx_blocked = false;
                self.process_tx();
            }
            if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                self.process_rx();
            }
        } else if self.act.drain_stale(fd) {
        } else {
            tracing::debug!(fd, "virtio-net: event for an unknown fd");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.act.init(ops);
        if let Some(tap) = &self.tap {
            let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::new(tap, set)) {
                tracing::error!(tap = tap.name(), "virtio-net: cannot watch the tap: {e}");
            }
        }
    }
}
