//! One stream connection between a guest port and a host Unix socket, with
//! virtio-vsock's credit-based flow control.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::{
    Header, CONN_BUF_SIZE, HOST_CID, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// A connection's identity: the host-side port and the guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host side's port (the guest's destination port).
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
}

/// Control packets a connection owes the guest.
#[derive(Debug, Clone, Copy)]
pub enum RxOp {
    /// Connection request (host-initiated connections).
    Request = 1,
    /// Acceptance of the guest's request.
    Response = 2,
    /// Our receive credit changed.
    CreditUpdate = 4,
    /// We ran out of the guest's credit.
    CreditRequest = 8,
}

/// What to do with a connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It goes on.
    Keep,
    /// Close it, with a reset to the guest when `rst`.
    Close {
        /// Whether to send the guest a reset.
        rst: bool,
    },
}

/// The next packet a connection wants to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    /// Nothing to send now.
    Nothing,
    /// A packet; for data, the payload is in the buffer given.
    Packet {
        /// Operation.
        op: u16,
        /// Flags (SHUTDOWN).
        flags: u32,
        /// Payload length.
        len: u32,
    },
    /// The connection failed: reset it.
    Reset,
}

/// One connection.
pub struct Conn {
    pub key: ConnKey,
    pub stream: UnixStream,
    /// The events the event loop watches on `stream`.
    pub registered: EventSet,
    /// Whether the connection is queued for rx service.
    pub in_rxq: bool,
    /// Guest data (and the `OK` line) the host socket has not taken yet.
    pub tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` that are the `OK` line, not guest data.
    ok_prefix: usize,
    established: bool,
    pending: u8,
    /// The host socket may have data (epoll said so).
    readable: bool,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    local_eof: bool,
    unix_write_shut: bool,
    /// Guest bytes passed on to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard.
    last_fwd_sent: Wrapping<u32>,
    /// Guest bytes received.
    recv_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
}

impl Conn {
    /// A connection over `stream`; `established` for guest-initiated ones,
    /// which are accepted as soon as the host socket connects.
    pub fn new(key: ConnKey, stream: UnixStream, established: bool) -> Self {
        Self {
            key,
            stream,
            registered: EventSet::empty(),
            in_rxq: false,
            tx_buf: VecDeque::new(),
            ok_prefix: 0,
            established,
            pending: 0,
            readable: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            local_eof: false,
            unix_write_shut: false,
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            recv_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
        }
    }

    /// Queues a control packet for the guest.
    pub fn want(&mut self, op: RxOp) {
        self.pending |= op as u8;
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the credit fields of a packet from the guest.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    fn can_read(&self) -> bool {
        self.established && !self.local_eof && !self.peer_shut_rcv && self.peer_credit() > 0
    }

    /// Whether the connection has something for the guest.
    pub fn has_rx_work(&self) -> bool {
        self.pending != 0 || (self.readable && self.can_read())
    }

    /// The events to watch on the host socket.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.can_read() && !self.readable {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    fn finished(&self) -> bool {
        self.peer_shut_rcv && self.peer_shut_send && self.tx_buf.is_empty()
    }

    /// The guest accepted a host-initiated connection.
    pub fn on_response(&mut self) -> Outcome {
        if self.established {
            tracing::warn!(key = ?self.key, "vsock: unexpected RESPONSE; ignored");
            return Outcome::Keep;
        }
        self.established = true;
        let line = format!("OK {}\n", self.key.local_port);
        self.ok_prefix = line.len();
        self.tx_buf.extend(line.as_bytes());
        self.flush_or_close()
    }

    /// The guest shut down one or both directions.
    pub fn on_shutdown(&mut self, flags: u32) -> Outcome {
        if !self.established {
            tracing::debug!(key = ?self.key, "vsock: SHUTDOWN before the connection was up");
            return Outcome::Close { rst: true };
        }
        if flags & SHUTDOWN_RCV != 0 && !self.peer_shut_rcv {
            self.peer_shut_rcv = true;
            self.readable = false;
            // The host client's further writes fail rather than pile up.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.peer_shut_send = true;
        }
        self.flush_or_close()
    }

    /// Data from the guest, for the host socket.
    pub fn on_data(&mut self, data: &[u8]) -> Outcome {
        if !self.established || self.peer_shut_send {
            tracing::warn!(key = ?self.key, "vsock: data on a connection that cannot take it");
            return Outcome::Close { rst: true };
        }
        let held = self.tx_buf.len() - self.ok_prefix;
        if held + data.len() > CONN_BUF_SIZE as usize {
            tracing::warn!(
                key = ?self.key,
                held,
                len = data.len(),
                "vsock: the guest sent more than its credit; resetting"
            );
            return Outcome::Close { rst: true };
        }
        self.recv_cnt += Wrapping(data.len() as u32);
        self.tx_buf.extend(data);
        self.flush_or_close()
    }

    /// The event loop reported `set` on the host socket.
    pub fn on_socket_event(&mut self, set: EventSet) -> Outcome {
        if set.contains(EventSet::OUT) || !self.tx_buf.is_empty() {
            if let Outcome::Close { rst } = self.flush_or_close() {
                return Outcome::Close { rst };
            }
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            if self.established && !self.local_eof && !self.peer_shut_rcv {
                self.readable = true;
            } else if !self.established {
                // The host client left before the guest answered.
                return Outcome::Close { rst: true };
            }
        }
        Outcome::Keep
    }

    fn flush_or_close(&mut self) -> Outcome {
        if let Err(e) = self.flush() {
            tracing::debug!(key = ?self.key, "vsock: host socket write: {e}");
            return Outcome::Close { rst: true };
        }
        if self.finished() {
            // The guest closed both directions and everything it sent is
            // delivered: the reset completes its close.
            return Outcome::Close { rst: true };
        }
        Outcome::Keep
    }

    /// Writes what the host socket will take.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let prefix = n.min(self.ok_prefix);
                    self.ok_prefix -= prefix;
                    self.fwd_cnt += Wrapping((n - prefix) as u32);
                    self.tx_buf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_buf.is_empty() {
            if self.tx_buf.capacity() > MAX_PKT_DATA as usize {
                self.tx_buf.shrink_to_fit();
            }
            if self.peer_shut_send && !self.unix_write_shut {
                self.unix_write_shut = true;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        // Tell the guest about freed space before it runs short.
        let unacked = (self.recv_cnt - self.last_fwd_sent).0;
        let perceived_free = CONN_BUF_SIZE.saturating_sub(unacked);
        if self.fwd_cnt != self.last_fwd_sent && perceived_free < MAX_PKT_DATA {
            self.want(RxOp::CreditUpdate);
        }
        Ok(())
    }

    /// The next packet for the guest, reading host data into `buf` (whose
    /// length is what the guest's buffer can hold).
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Built {
        let packet = |op, flags, len| Built::Packet { op, flags, len };
        if self.pending & RxOp::Request as u8 != 0 {
            self.pending &= !(RxOp::Request as u8);
            return packet(OP_REQUEST, 0, 0);
        }
        if self.pending & RxOp::Response as u8 != 0 {
            self.pending &= !(RxOp::Response as u8);
            return packet(OP_RESPONSE, 0, 0);
        }
        if self.readable {
            if !self.can_read() {
                self.readable = false;
            } else {
                let max = buf.len().min(self.peer_credit() as usize);
                if max > 0 {
                    match self.stream.read(&mut buf[..max]) {
                        Ok(0) => {
                            self.readable = false;
                            self.local_eof = true;
                            return packet(OP_SHUTDOWN, SHUTDOWN_SEND, 0);
                        }
                        Ok(n) => {
                            self.rx_cnt += Wrapping(n as u32);
                            if self.peer_credit() == 0 && !self.credit_requested {
                                self.credit_requested = true;
                                self.want(RxOp::CreditRequest);
                            }
                            return packet(OP_RW, 0, n as u32);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::debug!(key = ?self.key, "vsock: host socket read: {e}");
                            return Built::Reset;
                        }
                    }
                }
            }
        }
        if self.pending & RxOp::CreditUpdate as u8 != 0 {
            self.pending &= !(RxOp::CreditUpdate as u8);
            return packet(OP_CREDIT_UPDATE, 0, 0);
        }
        if self.pending & RxOp::CreditRequest as u8 != 0 {
            self.pending &= !(RxOp::CreditRequest as u8);
            return packet(OP_CREDIT_REQUEST, 0, 0);
        }
        Built::Nothing
    }

    /// The header of a packet this connection sends; every packet carries
    /// the current credit.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32, len: u32) -> Header {
        self.last_fwd_sent = self.fwd_cnt;
        self.pending &= !(RxOp::CreditUpdate as u8);
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}
