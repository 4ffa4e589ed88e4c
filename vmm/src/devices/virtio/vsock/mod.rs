//! virtio-vsock (device ID 19) with the hybrid-vsock host side of
//! Firecracker, Cloud Hypervisor and Dragonball.
//!
//! The VMM listens on a Unix socket. A host client connects to it, writes
//! `CONNECT <port>\n` (any case), and the device sends a connection REQUEST
//! to that guest port; on the guest's RESPONSE the client reads
//! `OK <hostport>\n` and the rest is the byte stream. If the guest answers
//! RST (nobody listening), the client's connection is closed. A guest
//! connection to host CID 2, port P is connected to the Unix socket
//! `<path>_<P>`, or reset if that fails.
//!
//! The device runs on the VMM's event loop: it watches its queue eventfds,
//! the listener and each connection's socket (writability only while it
//! has output waiting). Flow control is virtio-vsock's credit scheme in
//! both directions; nothing is buffered beyond the credit the device
//! advertised, and the number of connections is bounded, so the host
//! memory a guest can make the VMM hold is bounded too.

mod conn;
pub mod unix;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use self::conn::{Conn, ConnKey, RxOp};
pub use self::unix::{ListenError, UdsListener};
use super::activation::Activation;
use super::{ActivateError, Interrupt, VirtioDevice, DEVICE_ID_VSOCK, VIRTIO_F_VERSION_1};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The lowest CID a guest may have.
pub const MIN_GUEST_CID: u64 = 3;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive (device to driver) queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit (driver to device) queue.
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Largest payload accepted in one packet from the guest, and largest sent.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Receive buffer the device advertises per connection (its `buf_alloc`):
/// the most guest data it ever holds for one connection.
pub const CONN_BUF_SIZE: u32 = 128 * 1024;
/// Most connections at once (both directions together).
pub const MAX_CONNECTIONS: usize = 512;
/// Most host clients that have connected but not yet sent their
/// `CONNECT` line.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// Longest `CONNECT <port>` line accepted.
pub const MAX_CONNECT_LINE: usize = 64;
/// Most reset packets waiting for guest receive buffers.
pub const MAX_QUEUED_RESETS: usize = 1024;
/// First host-side port handed to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// virtio_vsock_event id: the transport was reset (after a snapshot
/// restore); the guest drops its connections and re-reads its CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

pub(crate) const TYPE_STREAM: u16 = 1;
pub(crate) const OP_REQUEST: u16 = 1;
pub(crate) const OP_RESPONSE: u16 = 2;
pub(crate) const OP_RST: u16 = 3;
pub(crate) const OP_SHUTDOWN: u16 = 4;
pub(crate) const OP_RW: u16 = 5;
pub(crate) const OP_CREDIT_UPDATE: u16 = 6;
pub(crate) const OP_CREDIT_REQUEST: u16 = 7;
pub(crate) const SHUTDOWN_RCV: u32 = 1;
pub(crate) const SHUTDOWN_SEND: u32 = 2;

/// How the device is set up. A snapshot saves the CID only: a restored VM
/// is given its own socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// The Unix socket the VMM listens on for host clients; guest
    /// connections to host port P go to `<uds_path>_<P>`.
    #[serde(skip)]
    pub uds_path: PathBuf,
}

/// Errors in a vsock configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The CID is reserved or out of range.
    #[error("guest CID {0}: must be between 3 and 4294967294")]
    Cid(u64),
    /// The socket path is not usable.
    #[error("vsock socket {path}: {reason}")]
    Path {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl VsockConfig {
    /// Checks the CID and the path (without creating anything).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < MIN_GUEST_CID || self.guest_cid >= u64::from(u32::MAX) {
            return Err(ConfigError::Cid(self.guest_cid));
        }
        let path_err = |reason: &str| ConfigError::Path {
            path: self.uds_path.clone(),
            reason: reason.to_string(),
        };
        let len = self.uds_path.as_os_str().len();
        if len == 0 {
            return Err(path_err("empty path"));
        }
        if len > unix::MAX_PATH_LEN {
            return Err(path_err(&format!(
                "{len} bytes is too long for a Unix socket (at most {})",
                unix::MAX_PATH_LEN
            )));
        }
        if self.uds_path.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return Err(path_err("names a directory"));
        }
        let parent = match self.uds_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(path_err(&format!(
                "its directory {} does not exist",
                parent.display()
            )));
        }
        Ok(())
    }
}

/// What the device holds once the driver has activated it.
/// A host client that has connected but not yet said where to.
struct PendingClient {
    stream: UnixStream,
    registered: EventSet,
    line: Vec<u8>,
}

/// A reset to send for a packet that has no connection.
#[derive(Debug, Clone, Copy)]
struct Reset {
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
}

/// The connections and everything waiting to be sent to the guest.
struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    conns: HashMap<ConnKey, Conn>,
    conn_fds: HashMap<RawFd, ConnKey>,
    pending: HashMap<RawFd, PendingClient>,
    /// Connections with something for the guest, in the order to serve them.
    rxq: VecDeque<ConnKey>,
    resets: VecDeque<Reset>,
    /// Sockets to take out of the event loop and close.
    graveyard: Vec<(UnixStream, EventSet)>,
    next_local_port: u32,
    bounce: Vec<u8>,
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    listener: UdsListener,
    act: Activation,
    drop_conns: bool,
    reset_event: bool,
    /// Set while the guest has not yet taken in a transport reset: nothing
    /// is sent to it, so a connection made now is not reset with the old
    /// ones, and its packets carry the guest's new CID. Cleared by the
    /// guest's next event-queue notification (Linux refills the event
    /// buffer once it has handled the event), or by this timer.
    reset_gate: Option<TimerFd>,
    muxer: Muxer,
}

/// How long host connections wait for the guest to take in a transport
/// reset before they go ahead anyway.
pub const RESET_GATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Vsock {
    /// Creates the device and starts listening at `config.uds_path`.
    pub fn new(config: &VsockConfig) -> Result<Self, ListenError> {
        if let Err(e) = config.validate() {
            return Err(ListenError::Io {
                path: config.uds_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
            });
        }
        let listener = UdsListener::bind(&config.uds_path)?;
        let act = Activation::new("vsock").map_err(|source| ListenError::Io {
            path: config.uds_path.clone(),
            source,
        })?;
        Ok(Self {
            cid: config.guest_cid,
            listener,
            act,
            drop_conns: false,
            reset_event: false,
            reset_gate: None,
            muxer: Muxer {
                guest_cid: config.guest_cid,
                uds_path: config.uds_path.clone(),
                conns: HashMap::new(),
                conn_fds: HashMap::new(),
                pending: HashMap::new(),
                rxq: VecDeque::new(),
                resets: VecDeque::new(),
                graveyard: Vec::new(),
                next_local_port: FIRST_LOCAL_PORT,
                bounce: vec![0u8; MAX_PKT_DATA as usize],
            },
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// The path of the listening socket.
    pub fn uds_path(&self) -> &Path {
        self.listener.path()
    }

    /// Number of open connections (for tests and diagnostics).
    pub fn connection_count(&self) -> usize {
        self.muxer.conns.len()
    }

    /// Guest data held for host sockets that have not taken it yet.
    pub fn buffered_bytes(&self) -> usize {
        self.muxer.conns.values().map(|c| c.tx_buf.len()).sum()
    }

    fn process_tx(&mut self) {
        let Some(active) = self.act.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let mut used = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.muxer.handle_guest_packet(&pkt),
                Err(e) => {
                    tracing::warn!(head, "vsock: dropping a malformed tx descriptor chain: {e}")
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!(head, "vsock: cannot return a tx descriptor: {e}");
            }
            used = true;
        }
        if used {
            active.interrupt.signal_used_queue();
        }
    }

    fn process_rx(&mut self) {
        if self.reset_gate.is_some() {
            return;
        }
        let Some(active) = self.act.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = false;
        while self.muxer.has_rx_work() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt) {
                    Some(len) => len,
                    None => {
                        // Nothing to send after all: give the buffer back.
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::warn!(head, "vsock: dropping a malformed rx descriptor chain: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(head, "vsock: cannot return an rx descriptor: {e}");
            }
            used = true;
        }
        if used {
            active.interrupt.signal_used_queue();
        }
    }

    fn sync_activation(&mut self, ops: &mut EventOps) {
        let newly = self.act.sync(ops);
        if std::mem::take(&mut self.drop_conns) {
            self.muxer.drop_all();
        }
        if newly {
            self.process_tx();
        }
        if self.reset_event && self.act.active.as_ref().is_some_and(|a| a.registered) {
            self.reset_event = false;
            if self.send_transport_reset() {
                self.close_reset_gate(ops);
            }
        }
    }

    /// Holds back everything for the guest until it has taken in the
    /// transport reset (or [`RESET_GATE_TIMEOUT`] passed).
    fn close_reset_gate(&mut self, ops: &mut EventOps) {
        let timer = TimerFd::new().and_then(|mut t| {
            t.reset(RESET_GATE_TIMEOUT, None)?;
            Ok(t)
        });
        match timer {
            Ok(timer) => match ops.add(Events::new(&timer, EventSet::IN)) {
                Ok(()) => self.reset_gate = Some(timer),
                Err(e) => tracing::warn!("vsock: cannot watch the reset timer: {e}"),
            },
            Err(e) => tracing::warn!("vsock: cannot create the reset timer: {e}"),
        }
    }

    fn open_reset_gate(&mut self, ops: &mut EventOps, why: &str) {
        if let Some(timer) = self.reset_gate.take() {
            if let Err(e) = ops.remove(Events::new(&timer, EventSet::IN)) {
                tracing::warn!("vsock: cannot stop watching the reset timer: {e}");
            }
            tracing::debug!("vsock: transport reset taken in ({why})");
        }
    }

    /// Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the guest's next event
    /// buffer; `true` if it was sent.
    fn send_transport_reset(&mut self) -> bool {
        let Some(active) = self.act.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[EVENT_QUEUE];
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: no event buffer for the transport reset");
            return false;
        };
        let head = chain.head_index();
        let written = match chain.next() {
            Some(desc) if desc.is_write_only() && desc.len() >= 4 => mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), desc.addr())
                .map(|()| 4)
                .unwrap_or_else(|e| {
                    tracing::warn!("vsock: cannot write the transport reset event: {e}");
                    0
                }),
            _ => {
                tracing::warn!("vsock: unusable event buffer");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!("vsock: cannot return an event buffer: {e}");
        }
        active.interrupt.signal_used_queue();
        tracing::debug!("vsock: sent the transport reset event");
        written > 0
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o));
            *b = at.copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            offset,
            len = data.len(),
            "vsock: the driver wrote the read-only config space"
        );
    }

    fn activate(
        &mut self,
        _features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.act.activate(3, mem, queues, interrupt, queue_evts)?;
        tracing::debug!(cid = self.cid, "vsock: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.drop_conns = true;
        self.reset_event = false;
        self.act.reset();
        tracing::debug!("vsock: reset");
    }

    fn active_queue_states(&self) -> Vec<QueueState> {
        self.act.queue_states()
    }

    fn restored(&mut self) {
        // Connections are not saved: the guest must drop its own.
        self.reset_event = true;
        self.act.wake("a restore");
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        if self.act.is_control(fd) {
            self.sync_activation(ops);
        } else if let Some(index) = self.act.queue_event(fd) {
            match index {
                TX_QUEUE => self.process_tx(),
                RX_QUEUE => {}
                // The guest refilled its event buffers: it has handled the
                // transport reset.
                _ => self.open_reset_gate(ops, "the guest refilled its event queue"),
            }
        } else if self
            .reset_gate
            .as_ref()
            .is_some_and(|t| t.as_raw_fd() == fd)
        {
            if let Some(timer) = self.reset_gate.as_mut() {
                let _ = timer.wait();
            }
            tracing::warn!("vsock: the guest did not take in the transport reset in time");
            self.open_reset_gate(ops, "timeout");
        } else if fd == self.listener.as_raw_fd() {
            self.muxer.accept(&self.listener);
        } else if self.act.drain_stale(fd) {
        } else {
            self.muxer.socket_event(fd, set);
        }
        self.process_rx();
        self.muxer.reconcile(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.act.init(ops);
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("vsock: cannot watch the listening socket: {e}");
        }
    }
}

impl Muxer {
    fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.rxq.is_empty()
    }

    fn total_connections(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    fn queue_reset(&mut self, src_cid: u64, src_port: u32, dst_port: u32) {
        if self.resets.len() >= MAX_QUEUED_RESETS {
            tracing::warn!(
                src_port,
                dst_port,
                "vsock: too many resets queued; dropping one"
            );
            return;
        }
        self.resets.push_back(Reset {
            src_cid,
            src_port,
            dst_port,
        });
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_rxq && conn.has_rx_work() {
                conn.in_rxq = true;
                self.rxq.push_back(key);
            }
        }
    }

    /// Closes a connection, telling the guest with a reset when `rst`.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            self.conn_fds.remove(&conn.stream.as_raw_fd());
            if rst {
                self.queue_reset(HOST_CID, key.local_port, key.peer_port);
            }
            self.graveyard.push((conn.stream, conn.registered));
        }
    }

    fn drop_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        self.rxq.clear();
        self.resets.clear();
    }

    fn insert(&mut self, conn: Conn) {
        let key = conn.key;
        self.conn_fds.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// One packet from the guest's tx queue.
    fn handle_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
        let (src_cid, dst_cid) = (pkt.src_cid(), pkt.dst_cid());
        let (src_port, dst_port) = (pkt.src_port(), pkt.dst_port());
        let op = pkt.op();
        if src_cid != self.guest_cid {
            tracing::warn!(
                src_cid,
                "vsock: dropping a packet with a source CID that is not the guest's"
            );
            return;
        }
        if dst_cid != HOST_CID || pkt.type_() != TYPE_STREAM {
            tracing::debug!(
                dst_cid,
                type_ = pkt.type_(),
                op,
                "vsock: packet for no host stream"
            );
            if op != OP_RST {
                self.queue_reset(dst_cid, dst_port, src_port);
            }
            return;
        }
        let key = ConnKey {
            local_port: dst_port,
            peer_port: src_port,
        };
        if op == OP_REQUEST {
            self.guest_connect(key, pkt.buf_alloc(), pkt.fwd_cnt());
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if op != OP_RST {
                tracing::debug!(op, src_port, dst_port, "vsock: packet for no connection");
                self.queue_reset(HOST_CID, dst_port, src_port);
            }
            return;
        };
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        let outcome = match op {
            OP_RESPONSE => conn.on_response(),
            OP_RST => conn::Outcome::Close { rst: false },
            OP_SHUTDOWN => conn.on_shutdown(pkt.flags()),
            OP_RW => {
                let len = pkt.len() as usize;
                match pkt.data_slice() {
                    Some(data) if len <= self.bounce.len() && data.len() >= len => {
                        let buf = &mut self.bounce[..len];
                        match data.read_slice(buf, 0) {
                            Ok(()) => conn.on_data(buf),
                            Err(e) => {
                                tracing::warn!("vsock: cannot read packet data: {e}");
                                conn::Outcome::Close { rst: true }
                            }
                        }
                    }
                    None if len == 0 => conn::Outcome::Keep,
                    _ => {
                        tracing::warn!(len, "vsock: data packet without its data");
                        conn::Outcome::Keep
                    }
                }
            }
            OP_CREDIT_UPDATE => conn::Outcome::Keep,
            OP_CREDIT_REQUEST => {
                conn.want(RxOp::CreditUpdate);
                conn::Outcome::Keep
            }
            other => {
                tracing::warn!(
                    op = other,
                    "vsock: unknown operation; resetting the connection"
                );
                conn::Outcome::Close { rst: true }
            }
        };
        match outcome {
            conn::Outcome::Keep => self.schedule(key),
            conn::Outcome::Close { rst } => self.kill(key, rst),
        }
    }

    fn guest_connect(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32) {
        if self.conns.contains_key(&key) {
            tracing::warn!(?key, "vsock: guest asked for a connection that exists");
            self.queue_reset(HOST_CID, key.local_port, key.peer_port);
            return;
        }
        if self.total_connections() >= MAX_CONNECTIONS {
            tracing::warn!(
                ?key,
                "vsock: too many connections; refusing one from the guest"
            );
            self.queue_reset(HOST_CID, key.local_port, key.peer_port);
            return;
        }
        let path = unix::port_path(&self.uds_path, key.local_port);
        match unix::connect_nonblocking(&path) {
            Ok(stream) => {
                tracing::debug!(?key, path = %path.display(), "vsock: guest connected to the host");
                let mut conn = Conn::new(key, stream, true);
                conn.update_peer_credit(buf_alloc, fwd_cnt);
                conn.want(RxOp::Response);
                self.insert(conn);
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), "vsock: guest connection refused: {e}");
                self.queue_reset(HOST_CID, key.local_port, key.peer_port);
            }
        }
    }

    /// Fills one rx buffer; `None` if there was nothing to send.
    fn fill_rx(&mut self, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        if let Some(r) = self.resets.pop_front() {
            write_header(
                pkt,
                Header {
                    src_cid: r.src_cid,
                    dst_cid: self.guest_cid,
                    src_port: r.src_port,
                    dst_port: r.dst_port,
                    len: 0,
                    op: OP_RST,
                    flags: 0,
                    buf_alloc: 0,
                    fwd_cnt: 0,
                },
            );
            return Some(virtio_vsock::packet::PKT_HEADER_SIZE as u32);
        }
        let mut deferred = Vec::new();
        let mut result = None;
        while let Some(key) = self.rxq.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            let capacity = pkt
                .data_slice()
                .map_or(0, |d| d.len())
                .min(self.bounce.len());
            let (op, flags, len) = match conn.next_rx(&mut self.bounce[..capacity]) {
                conn::Built::Nothing => {
                    if conn.has_rx_work() {
                        // Data this buffer cannot hold: try again later.
                        deferred.push(key);
                    }
                    continue;
                }
                conn::Built::Packet { op, flags, len } => (op, flags, len),
                conn::Built::Reset => {
                    self.kill(key, true);
                    result = self.fill_rx(pkt);
                    break;
                }
            };
            let header = conn.header(self.guest_cid, op, flags, len);
            if len > 0 {
                let data = &self.bounce[..len as usize];
                let written = pkt.data_slice().map(|d| d.write_slice(data, 0));
                if !matches!(written, Some(Ok(()))) {
                    tracing::warn!("vsock: cannot write packet data to the guest");
                    self.kill(key, true);
                    result = self.fill_rx(pkt);
                    break;
                }
            }
            write_header(pkt, header);
            self.schedule(key);
            result = Some(virtio_vsock::packet::PKT_HEADER_SIZE as u32 + len);
            break;
        }
        for key in deferred {
            self.schedule(key);
        }
        result
    }

    fn accept(&mut self, listener: &UdsListener) {
        loop {
            match listener.listener().accept() {
                Ok((stream, _)) => {
                    if self.total_connections() >= MAX_CONNECTIONS
                        || self.pending.len() >= MAX_PENDING_CLIENTS
                    {
                        tracing::warn!("vsock: too many connections; closing a new host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: host client: {e}");
                        continue;
                    }
                    self.pending.insert(
                        stream.as_raw_fd(),
                        PendingClient {
                            stream,
                            registered: EventSet::empty(),
                            line: Vec::with_capacity(16),
                        },
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    break;
                }
            }
        }
    }

    fn socket_event(&mut self, fd: RawFd, set: EventSet) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.conn_fds.get(&fd) else {
            tracing::debug!(fd, "vsock: event for an unknown socket");
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.on_socket_event(set) {
            conn::Outcome::Keep => self.schedule(key),
            conn::Outcome::Close { rst } => self.kill(key, rst),
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        use std::io::Read;
        let Some(client) = self.pending.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match client.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT".to_string()),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&client.line),
                Ok(_) => {
                    client.line.push(byte[0]);
                    if client.line.len() > MAX_CONNECT_LINE {
                        break Err("CONNECT line too long".into());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(client) = self.pending.remove(&fd) else {
            return;
        };
        let port = match port {
            Ok(port) => port,
            Err(e) => {
                tracing::debug!("vsock: host client: {e}");
                self.graveyard.push((client.stream, client.registered));
                return;
            }
        };
        let Some(local_port) = self.allocate_local_port() else {
            tracing::warn!("vsock: no free host port");
            self.graveyard.push((client.stream, client.registered));
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        tracing::debug!(?key, "vsock: host client connecting to the guest");
        let mut conn = Conn::new(key, client.stream, false);
        conn.registered = client.registered;
        conn.want(RxOp::Request);
        self.insert(conn);
    }

    fn allocate_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = if port == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            if !self.conns.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    /// Brings the event loop's view of every socket up to date.
    fn reconcile(&mut self, ops: &mut EventOps) {
        for (stream, registered) in self.graveyard.drain(..) {
            if !registered.is_empty() {
                if let Err(e) = ops.remove(Events::new(&stream, registered)) {
                    tracing::warn!("vsock: cannot stop watching a socket: {e}");
                }
            }
        }
        for conn in self.conns.values_mut() {
            let desired = conn.interest();
            apply_interest(ops, &conn.stream, &mut conn.registered, desired);
        }
        for client in self.pending.values_mut() {
            apply_interest(ops, &client.stream, &mut client.registered, EventSet::IN);
        }
    }
}

fn apply_interest(
    ops: &mut EventOps,
    stream: &UnixStream,
    registered: &mut EventSet,
    desired: EventSet,
) {
    if *registered == desired {
        return;
    }
    let result = if registered.is_empty() {
        ops.add(Events::new(stream, desired))
    } else if desired.is_empty() {
        ops.remove(Events::new(stream, *registered))
    } else {
        ops.modify(Events::new(stream, desired))
    };
    match result {
        Ok(()) => *registered = desired,
        Err(e) => tracing::warn!("vsock: cannot update a socket's events: {e}"),
    }
}

/// Parses `CONNECT <port>` (any case).
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not text".to_string())?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(cmd), Some(port), None) if cmd.eq_ignore_ascii_case("connect") => port
            .parse::<u32>()
            .map_err(|_| format!("bad port in {text:?}")),
        _ => Err(format!("expected CONNECT <port>, got {text:?}")),
    }
}

/// A packet header to write into an rx buffer.
#[derive(Debug, Clone, Copy)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn write_header(pkt: &mut VsockPacket<'_, ()>, h: Header) {
    pkt.set_src_cid(h.src_cid)
        .set_dst_cid(h.dst_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_len(h.len)
        .set_type(TYPE_STREAM)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt);
}
