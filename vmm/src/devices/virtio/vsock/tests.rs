//! The device driven as the guest's driver would: split virtqueues written
//! into real guest memory, host clients on real Unix sockets, and the
//! device on a real event loop.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::Interrupt;

const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 16 << 20;
const RX_SLOTS: u16 = 128;
const DATA_BUF: u32 = 4096;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn queue_base(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}
fn desc_addr(q: usize, i: u16) -> u64 {
    queue_base(q) + 16 * u64::from(i)
}
fn avail(q: usize) -> u64 {
    queue_base(q) + 0x1000
}
fn used(q: usize) -> u64 {
    queue_base(q) + 0x2000
}
fn buffer(q: usize, i: u16) -> u64 {
    0x10_0000 + q as u64 * 0x40_0000 + u64::from(i) * 0x4000
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pkt {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
}

impl Pkt {
    /// A packet from the guest on `src_port` to host port `dst_port`.
    fn from_guest(op: u16, src_port: u32, dst_port: u32) -> Self {
        Pkt {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 256 * 1024,
            ..Default::default()
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(44);
        h.extend_from_slice(&self.src_cid.to_le_bytes());
        h.extend_from_slice(&self.dst_cid.to_le_bytes());
        h.extend_from_slice(&self.src_port.to_le_bytes());
        h.extend_from_slice(&self.dst_port.to_le_bytes());
        h.extend_from_slice(&self.len.to_le_bytes());
        h.extend_from_slice(&self.type_.to_le_bytes());
        h.extend_from_slice(&self.op.to_le_bytes());
        h.extend_from_slice(&self.flags.to_le_bytes());
        h.extend_from_slice(&self.buf_alloc.to_le_bytes());
        h.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        h
    }

    fn decode(h: &[u8]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(h[o..o + 2].try_into().unwrap());
        Pkt {
            src_cid: u64::from_le_bytes(h[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(h[8..16].try_into().unwrap()),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
            data: Vec::new(),
        }
    }
}

use crate::devices::virtio::test_rng::Rng;

struct TempPath(PathBuf);
impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The guest side: memory, the three split queues, and the event loop the
/// device runs on.
struct Guest {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    notify: Vec<EventFd>,
    irq: EventFd,
    avail_idx: [u16; 3],
    used_seen: [u16; 3],
    tx_next: u16,
    uds: PathBuf,
    _cleanup: TempPath,
}

impl Guest {
    fn new(tag: &str) -> Self {
        let uds = std::env::temp_dir().join(format!(
            "rtv-vsock-{tag}-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&uds);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dev = Arc::new(Mutex::new(
            Vsock::new(&VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: uds.clone(),
            })
            .unwrap(),
        ));
        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        events.add_subscriber(dev.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut g = Guest {
            mem,
            dev,
            events,
            notify: (0..3)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            irq,
            avail_idx: [0; 3],
            used_seen: [0; 3],
            tx_next: 0,
            uds: uds.clone(),
            _cleanup: TempPath(uds),
        };
        g.activate();
        g
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for q in 0..3 {
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.set_size(QUEUE_SIZE);
            queue.set_desc_table_address(Some(queue_base(q) as u32), Some(0));
            queue.set_avail_ring_address(Some(avail(q) as u32), Some(0));
            queue.set_used_ring_address(Some(used(q) as u32), Some(0));
            queue.set_ready(true);
            queues.push(queue);
            self.mem
                .write_obj(0u16, GuestAddress(avail(q) + 2))
                .unwrap();
            self.mem.write_obj(0u16, GuestAddress(used(q) + 2)).unwrap();
        }
        self.avail_idx = [0; 3];
        self.used_seen = [0; 3];
        let evts = self.notify.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = Interrupt::new(self.irq.try_clone().unwrap());
        self.dev
            .lock()
            .unwrap()
            .activate(
                1 << VIRTIO_F_VERSION_1,
                self.mem.clone(),
                queues,
                Arc::new(irq),
                evts,
            )
            .unwrap();
        self.pump();
        self.fill_rx(RX_SLOTS);
    }

    /// Runs the event loop until it has nothing more to do.
    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.events.run_with_timeout(1).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(desc_addr(q, i)))
            .unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let slot = self.avail_idx[q] % QUEUE_SIZE;
        self.mem
            .write_obj(head, GuestAddress(avail(q) + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail(q) + 2))
            .unwrap();
    }

    fn kick(&self, q: usize) {
        self.notify[q].write(1).unwrap();
    }

    /// Offers `n` rx buffers (header + 4 KiB data, as Linux 6.1 does).
    fn fill_rx(&mut self, n: u16) {
        for slot in 0..n {
            let head = 2 * slot;
            self.write_desc(
                RX_QUEUE,
                head,
                buffer(RX_QUEUE, head),
                44,
                F_WRITE | F_NEXT,
                head + 1,
            );
            self.write_desc(
                RX_QUEUE,
                head + 1,
                buffer(RX_QUEUE, head + 1),
                DATA_BUF,
                F_WRITE,
                0,
            );
            self.publish(RX_QUEUE, head);
        }
        self.kick(RX_QUEUE);
    }

    /// Packets the device put in the rx queue since the last call; their
    /// buffers go straight back to the device.
    fn recv(&mut self) -> Vec<Pkt> {
        self.pump();
        let used_idx: u16 = self.mem.read_obj(GuestAddress(used(RX_QUEUE) + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[RX_QUEUE] != used_idx {
            let slot = u64::from(self.used_seen[RX_QUEUE] % QUEUE_SIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(used(RX_QUEUE) + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(used(RX_QUEUE) + 8 + 8 * slot))
                .unwrap();
            self.used_seen[RX_QUEUE] = self.used_seen[RX_QUEUE].wrapping_add(1);
            let head = id as u16;
            let mut h = [0u8; 44];
            self.mem
                .read_slice(&mut h, GuestAddress(buffer(RX_QUEUE, head)))
                .unwrap();
            let mut p = Pkt::decode(&h);
            assert!(len >= 44, "used length {len} shorter than a header");
            assert_eq!(len - 44, p.len, "used length and header disagree");
            assert!(p.len <= DATA_BUF, "more data than the buffer holds");
            p.data = vec![0; p.len as usize];
            self.mem
                .read_slice(&mut p.data, GuestAddress(buffer(RX_QUEUE, head + 1)))
                .unwrap();
            out.push(p);
            self.publish(RX_QUEUE, head);
        }
        if !out.is_empty() {
            self.kick(RX_QUEUE);
            self.pump();
        }
        out
    }

    /// Sends one packet on the tx queue.
    fn send(&mut self, mut p: Pkt, data: &[u8]) {
        p.len = data.len() as u32;
        let head = self.tx_next;
        self.tx_next = (self.tx_next + 2) % QUEUE_SIZE;
        self.mem
            .write_slice(&p.encode(), GuestAddress(buffer(TX_QUEUE, head)))
            .unwrap();
        if data.is_empty() {
            self.write_desc(TX_QUEUE, head, buffer(TX_QUEUE, head), 44, 0, 0);
        } else {
            self.mem
                .write_slice(data, GuestAddress(buffer(TX_QUEUE, head + 1)))
                .unwrap();
            self.write_desc(TX_QUEUE, head, buffer(TX_QUEUE, head), 44, F_NEXT, head + 1);
            self.write_desc(
                TX_QUEUE,
                head + 1,
                buffer(TX_QUEUE, head + 1),
                data.len() as u32,
                0,
                0,
            );
        }
        self.publish(TX_QUEUE, head);
        self.kick(TX_QUEUE);
        self.pump();
    }

    fn tx_used(&self) -> u16 {
        self.mem.read_obj(GuestAddress(used(TX_QUEUE) + 2)).unwrap()
    }

    fn client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// A host client connected through to guest port `port`: returns the
    /// stream (past the OK line) and the host-side port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = self.client();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let reqs = self.recv();
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        let req = &reqs[0];
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(req.dst_port, port);
        let local = req.src_port;
        self.send(Pkt::from_guest(OP_RESPONSE, port, local), &[]);
        assert_eq!(read_line(&mut c), format!("OK {local}"));
        (c, local)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF before a newline");
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn data_of(pkts: &[Pkt]) -> Vec<u8> {
    pkts.iter()
        .filter(|p| p.op == OP_RW)
        .flat_map(|p| p.data.clone())
        .collect()
}

#[test]
fn config_space_and_identity() {
    let g = Guest::new("config");
    let dev = g.dev.lock().unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_ne!(dev.device_features() & (1 << VIRTIO_F_VERSION_1), 0);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut tail = [0xffu8; 4];
    dev.read_config(6, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0]);
    let mut far = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let mut g = Guest::new("handshake");
    let mut c = g.client();
    c.write_all(b"CONNECT 1024\n").unwrap();
    let reqs = g.recv();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port, req.type_),
        (HOST_CID, GUEST_CID, 1024, TYPE_STREAM)
    );
    assert_eq!(req.src_port, FIRST_LOCAL_PORT);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    g.send(Pkt::from_guest(OP_RESPONSE, 1024, req.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", 1u32 << 30));

    c.write_all(b"hello guest").unwrap();
    let pkts = g.recv();
    assert_eq!(data_of(&pkts), b"hello guest");
    assert!(pkts
        .iter()
        .all(|p| p.src_port == FIRST_LOCAL_PORT && p.dst_port == 1024));

    g.send(
        Pkt::from_guest(OP_RW, 1024, FIRST_LOCAL_PORT),
        b"hello host",
    );
    assert_eq!(read_exact_n(&mut c, 10), b"hello host");

    // The next client gets the next host port; the command is case-blind.
    let mut c2 = g.client();
    c2.write_all(b"connect 1024\n").unwrap();
    let reqs = g.recv();
    assert_eq!(reqs[0].src_port, FIRST_LOCAL_PORT + 1);
    g.send(
        Pkt::from_guest(OP_RESPONSE, 1024, FIRST_LOCAL_PORT + 1),
        &[],
    );
    assert_eq!(read_line(&mut c2), format!("OK {}", FIRST_LOCAL_PORT + 1));
    assert_eq!(g.dev.lock().unwrap().connection_count(), 2);
}

#[test]
fn data_sent_right_after_connect_is_kept_for_the_stream() {
    let mut g = Guest::new("pipelined");
    let mut c = g.client();
    c.write_all(b"CONNECT 7\nearly bytes").unwrap();
    let reqs = g.recv();
    assert_eq!(reqs.len(), 1);
    g.send(Pkt::from_guest(OP_RESPONSE, 7, reqs[0].src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", reqs[0].src_port));
    assert_eq!(data_of(&g.recv()), b"early bytes");
}

#[test]
fn guest_reset_closes_the_host_client() {
    let mut g = Guest::new("rst");
    let mut c = g.client();
    c.write_all(b"CONNECT 9999\n").unwrap();
    let reqs = g.recv();
    g.send(Pkt::from_guest(OP_RST, 9999, reqs[0].src_port), &[]);
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).unwrap(), 0, "expected EOF, nobody listens");
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut g = Guest::new("badline");
    for line in [
        &b"HELLO 1024\n"[..],
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 1 2\n",
        &[b'x'; 200][..],
    ] {
        let mut c = g.client();
        c.write_all(line).unwrap();
        g.pump();
        let mut buf = [0u8; 8];
        // Closed with unread input, the client may see a reset instead of EOF.
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("{line:?} was not refused: {other:?}"),
        }
    }
    assert!(g.recv().is_empty(), "no request reaches the guest");
}

#[test]
fn guest_connects_to_the_host_socket_for_its_port() {
    let mut g = Guest::new("guestconn");
    let host = UnixListener::bind(unix::port_path(&g.uds, 5000)).unwrap();
    let _cleanup = TempPath(unix::port_path(&g.uds, 5000));
    g.send(Pkt::from_guest(OP_REQUEST, 4000, 5000), &[]);
    let (mut s, _) = host.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].op, pkts[0].src_port, pkts[0].dst_port),
        (OP_RESPONSE, 5000, 4000)
    );
    g.send(Pkt::from_guest(OP_RW, 4000, 5000), b"ping");
    assert_eq!(read_exact_n(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    assert_eq!(data_of(&g.recv()), b"pong");

    // Nobody at <uds>_5001: the guest gets a reset.
    g.send(Pkt::from_guest(OP_REQUEST, 4001, 5001), &[]);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].op, pkts[0].src_port, pkts[0].dst_port),
        (OP_RST, 5001, 4001)
    );
    // Data for a connection that does not exist: reset.
    g.send(Pkt::from_guest(OP_RW, 4002, 5002), b"x");
    assert_eq!(g.recv()[0].op, OP_RST);
    // A guest packet to a CID other than the host's: reset from that CID.
    let mut other = Pkt::from_guest(OP_REQUEST, 4003, 80);
    other.dst_cid = 7;
    g.send(other, &[]);
    let rst = &g.recv()[0];
    assert_eq!((rst.op, rst.src_cid, rst.dst_port), (OP_RST, 7, 4003));
}

#[test]
fn device_never_exceeds_the_guest_credit() {
    let mut g = Guest::new("credit");
    let mut c = g.client();
    c.write_all(b"CONNECT 1024\n").unwrap();
    let local = g.recv()[0].src_port;
    let mut resp = Pkt::from_guest(OP_RESPONSE, 1024, local);
    resp.buf_alloc = 1000;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut c), format!("OK {local}"));

    let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    c.write_all(&payload).unwrap();
    let pkts = g.recv();
    let got = data_of(&pkts);
    assert_eq!(got.len(), 1000, "sent beyond the 1000 bytes of credit");
    assert!(pkts.iter().any(|p| p.op == OP_CREDIT_REQUEST));
    // Nothing more while the credit stays exhausted.
    assert!(data_of(&g.recv()).is_empty());

    // The guest consumed it all: 1000 more.
    let mut upd = Pkt::from_guest(OP_CREDIT_UPDATE, 1024, local);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    g.send(upd.clone(), &[]);
    let more = data_of(&g.recv());
    assert_eq!(more.len(), 1000);
    // A larger buffer lets the rest through.
    upd.buf_alloc = 1 << 20;
    upd.fwd_cnt = 2000;
    g.send(upd, &[]);
    let rest = data_of(&g.recv());
    let mut all = got;
    all.extend(more);
    all.extend(rest);
    assert_eq!(all, payload);
}

#[test]
fn guest_data_is_bounded_by_the_advertised_buffer_and_credit_is_returned() {
    let mut g = Guest::new("bounded");
    let (mut c, local) = g.host_connect(1024);
    let chunk = vec![0x5au8; 4096];
    let mut sent = 0usize;
    let mut reset = false;
    // The client does not read: the socket fills, then the device's buffer.
    for _ in 0..2048 {
        g.send(Pkt::from_guest(OP_RW, 1024, local), &chunk);
        sent += chunk.len();
        assert!(g.dev.lock().unwrap().buffered_bytes() <= CONN_BUF_SIZE as usize);
        let pkts = g.recv();
        if pkts.iter().any(|p| p.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest that ignores its credit is reset");
    assert!(sent > CONN_BUF_SIZE as usize);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    drop(c.read(&mut [0u8; 1]));

    // A well-behaved guest gets its credit back as the client reads.
    let (mut c, local) = g.host_connect(1025);
    let mut fwd_seen = 0u32;
    let total = 3 * CONN_BUF_SIZE as usize;
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut in_flight_limit_ok = true;
    c.set_nonblocking(true).unwrap();
    while received < total {
        while sent < total && (sent as u32).wrapping_sub(fwd_seen) + 4096 <= CONN_BUF_SIZE {
            g.send(Pkt::from_guest(OP_RW, 1025, local), &chunk);
            sent += 4096;
        }
        let mut buf = vec![0u8; 65536];
        match c.read(&mut buf) {
            Ok(n) => received += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        g.pump();
        for p in g.recv() {
            assert_ne!(p.op, OP_RST);
            assert_eq!(p.buf_alloc, CONN_BUF_SIZE);
            fwd_seen = p.fwd_cnt;
        }
        in_flight_limit_ok &= g.dev.lock().unwrap().buffered_bytes() <= CONN_BUF_SIZE as usize;
    }
    assert!(in_flight_limit_ok);
    assert_eq!(received, total);
    assert!(fwd_seen > 0, "the device sent credit updates");
}

#[test]
fn shutdown_in_each_direction() {
    let mut g = Guest::new("shutdown");
    let (mut c, local) = g.host_connect(1024);
    // The guest stops sending: the client sees EOF but can still write.
    g.send(Pkt::from_guest(OP_RW, 1024, local), b"last words");
    let mut shut = Pkt::from_guest(OP_SHUTDOWN, 1024, local);
    shut.flags = SHUTDOWN_SEND;
    g.send(shut, &[]);
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    c.write_all(b"still here").unwrap();
    assert_eq!(data_of(&g.recv()), b"still here");
    // The client stops sending: the guest gets SHUTDOWN(SEND).
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let pkts = g.recv();
    assert!(
        pkts.iter()
            .any(|p| p.op == OP_SHUTDOWN && p.flags == SHUTDOWN_SEND),
        "{pkts:?}"
    );
    assert_eq!(g.dev.lock().unwrap().connection_count(), 1);
    // The guest closes: the device completes the close with a reset.
    let mut close = Pkt::from_guest(OP_SHUTDOWN, 1024, local);
    close.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(close, &[]);
    let pkts = g.recv();
    assert!(pkts.iter().any(|p| p.op == OP_RST), "{pkts:?}");
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn fifty_concurrent_connections() {
    let mut g = Guest::new("fifty");
    const N: u32 = 60;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = g.client();
        c.write_all(format!("CONNECT {}\n", 2000 + i).as_bytes())
            .unwrap();
        clients.push(c);
    }
    let mut requests = Vec::new();
    for _ in 0..10 {
        requests.extend(g.recv());
        if requests.len() == N as usize {
            break;
        }
    }
    assert_eq!(requests.len(), N as usize);
    let mut local_of = std::collections::HashMap::new();
    for r in &requests {
        assert_eq!(r.op, OP_REQUEST);
        local_of.insert(r.dst_port, r.src_port);
        g.send(Pkt::from_guest(OP_RESPONSE, r.dst_port, r.src_port), &[]);
    }
    assert_eq!(g.dev.lock().unwrap().connection_count(), N as usize);
    for (i, c) in clients.iter_mut().enumerate() {
        let port = 2000 + i as u32;
        assert_eq!(read_line(c), format!("OK {}", local_of[&port]));
        c.write_all(format!("msg {i}").as_bytes()).unwrap();
    }
    let mut by_port: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    for _ in 0..10 {
        for p in g.recv() {
            assert_eq!(p.op, OP_RW);
            by_port.entry(p.dst_port).or_default().extend(p.data);
        }
    }
    for i in 0..N {
        assert_eq!(by_port[&(2000 + i)], format!("msg {i}").as_bytes());
        // The guest echoes back.
        g.send(
            Pkt::from_guest(OP_RW, 2000 + i, local_of[&(2000 + i)]),
            format!("echo {i}").as_bytes(),
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let want = format!("echo {i}");
        assert_eq!(read_exact_n(c, want.len()), want.as_bytes());
    }
    // Clients leave: the guest hears SHUTDOWN from each.
    drop(clients);
    let mut shut = 0;
    for _ in 0..10 {
        shut += g.recv().iter().filter(|p| p.op == OP_SHUTDOWN).count();
    }
    assert_eq!(shut, N as usize);
}

#[test]
fn reset_drops_connections_and_the_device_comes_back() {
    let mut g = Guest::new("devreset");
    let (mut c, _) = g.host_connect(1024);
    g.dev.lock().unwrap().reset();
    g.pump();
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    g.activate();
    let (mut c, local) = g.host_connect(1024);
    g.send(Pkt::from_guest(OP_RW, 1024, local), b"again");
    assert_eq!(read_exact_n(&mut c, 5), b"again");
}

#[test]
fn listener_path_is_removed_with_the_device() {
    let g = Guest::new("cleanup");
    let path = g.uds.clone();
    assert!(path.exists());
    drop(g);
    assert!(!path.exists(), "socket file left behind");
}

#[test]
fn hostile_headers_never_panic_and_stay_bounded() {
    let mut g = Guest::new("hostile-hdr");
    let (_c, local) = g.host_connect(1024);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for round in 0..3000u32 {
        let pick =
            |rng: &mut Rng, choices: &[u64]| choices[rng.below(choices.len() as u64) as usize];
        let (r1, r2) = (rng.next(), rng.next());
        let mut p = Pkt {
            src_cid: pick(&mut rng, &[GUEST_CID, GUEST_CID, 2, 0, u64::MAX, r1]),
            dst_cid: pick(&mut rng, &[HOST_CID, HOST_CID, 3, 1, u64::MAX]),
            src_port: pick(&mut rng, &[1024, 1024, 0, u32::MAX as u64, r2]) as u32,
            dst_port: pick(
                &mut rng,
                &[local as u64, local as u64, 5000, 0, u32::MAX as u64],
            ) as u32,
            len: 0,
            type_: pick(&mut rng, &[1, 1, 1, 2, 0, 0xffff]) as u16,
            op: rng.below(10) as u16,
            flags: rng.next() as u32,
            buf_alloc: rng.next() as u32,
            fwd_cnt: rng.next() as u32,
            data: Vec::new(),
        };
        let len = pick(&mut rng, &[0, 1, 100, 4096]) as usize;
        let data = vec![round as u8; len];
        // Sometimes a header whose length field lies about the data.
        if rng.below(4) == 0 {
            p.len = rng.next() as u32;
            let head = g.tx_next;
            g.tx_next = (g.tx_next + 2) % QUEUE_SIZE;
            g.mem
                .write_slice(&p.encode(), GuestAddress(buffer(TX_QUEUE, head)))
                .unwrap();
            g.write_desc(TX_QUEUE, head, buffer(TX_QUEUE, head), 44, F_NEXT, head + 1);
            g.write_desc(
                TX_QUEUE,
                head + 1,
                buffer(TX_QUEUE, head + 1),
                len as u32,
                0,
                0,
            );
            g.publish(TX_QUEUE, head);
            g.kick(TX_QUEUE);
            g.pump();
        } else {
            g.send(p, &data);
        }
        let dev = g.dev.lock().unwrap();
        assert!(dev.connection_count() <= MAX_CONNECTIONS);
        assert!(dev.buffered_bytes() <= MAX_CONNECTIONS * CONN_BUF_SIZE as usize);
        drop(dev);
        if round % 64 == 0 {
            g.recv();
        }
    }
    g.recv();
    // Every chain came back.
    assert_eq!(g.tx_used(), g.avail_idx[TX_QUEUE]);
    // And the device still works.
    let (mut c, local) = g.host_connect(2048);
    g.send(Pkt::from_guest(OP_RW, 2048, local), b"alive");
    assert_eq!(read_exact_n(&mut c, 5), b"alive");
}

#[test]
fn hostile_descriptor_chains_are_dropped() {
    let mut g = Guest::new("hostile-desc");
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let addrs = [
        0u64,
        MEM_SIZE - 8,
        MEM_SIZE - 44,
        MEM_SIZE,
        MEM_SIZE + 0x1000,
        u64::MAX - 8,
        u64::MAX,
        queue_base(TX_QUEUE),
        buffer(TX_QUEUE, 3),
    ];
    let lens = [0u32, 1, 43, 44, 45, 4096, 65536, u32::MAX, 0x8000_0000];
    let mut valid_tx_heads = 0u16;
    for round in 0..2000u32 {
        let q = if rng.below(3) == 0 {
            RX_QUEUE
        } else {
            TX_QUEUE
        };
        let head = rng.below(u64::from(QUEUE_SIZE)) as u16;
        // A chain of up to 4 random descriptors starting at `head`.
        let mut idx = head;
        for _ in 0..=rng.below(4) {
            let addr = addrs[rng.below(addrs.len() as u64) as usize];
            let len = lens[rng.below(lens.len() as u64) as usize];
            let flags = (rng.next() as u16) & (F_NEXT | F_WRITE | F_INDIRECT);
            let next = match rng.below(4) {
                0 => idx,                    // a loop onto itself
                1 => head,                   // a loop to the head
                2 => rng.next() as u16,      // anywhere, maybe out of range
                _ => (idx + 1) % QUEUE_SIZE, // the next one
            };
            g.write_desc(q, idx, addr, len, flags, next);
            // A plausible header wherever it lands inside memory.
            let hdr = Pkt::from_guest(
                [OP_REQUEST, OP_RW, OP_RESPONSE, OP_SHUTDOWN][rng.below(4) as usize],
                rng.below(3) as u32,
                rng.below(3) as u32 + 5000,
            );
            let mut bytes = hdr.encode();
            bytes[24..28].copy_from_slice(&(rng.next() as u32 % 70000).to_le_bytes());
            if addr.checked_add(44).is_some_and(|end| end <= MEM_SIZE)
                && addr >= buffer(TX_QUEUE, 0)
            {
                g.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            }
            idx = next % QUEUE_SIZE;
        }
        // Sometimes a head index beyond the queue.
        let published = if rng.below(10) == 0 {
            QUEUE_SIZE + rng.below(1000) as u16
        } else {
            head
        };
        g.publish(q, published);
        if q == TX_QUEUE && published < QUEUE_SIZE {
            valid_tx_heads = valid_tx_heads.wrapping_add(1);
        }
        g.kick(q);
        g.pump();
        if round % 100 == 0 {
            // Drain whatever the device sent so the rx queue stays usable.
            let used_idx: u16 = g.mem.read_obj(GuestAddress(used(RX_QUEUE) + 2)).unwrap();
            g.used_seen[RX_QUEUE] = used_idx;
        }
    }
    // The tx queue returned every chain with a head inside the queue (a
    // head index beyond it cannot be named in the used ring).
    assert_eq!(g.tx_used(), valid_tx_heads);
    assert!(g.dev.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
}

#[test]
fn too_many_connections_are_refused_not_buffered() {
    let mut g = Guest::new("limit");
    // Guest-initiated: past the limit, the guest gets resets.
    let host = UnixListener::bind(unix::port_path(&g.uds, 6000)).unwrap();
    host.set_nonblocking(true).unwrap();
    let _cleanup = TempPath(unix::port_path(&g.uds, 6000));
    let mut accepted = Vec::new();
    let mut resets = 0;
    for i in 0..(MAX_CONNECTIONS as u32 + 20) {
        g.send(Pkt::from_guest(OP_REQUEST, 10_000 + i, 6000), &[]);
        while let Ok((s, _)) = host.accept() {
            accepted.push(s);
        }
        resets += g.recv().iter().filter(|p| p.op == OP_RST).count();
    }
    assert!(g.dev.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
    assert!(resets >= 20, "only {resets} resets");
}

#[test]
fn restored_device_sends_a_transport_reset_and_holds_connections_until_it_is_taken_in() {
    let mut g = Guest::new("restored");
    // The guest offers one 4-byte event buffer, as Linux does.
    let event_buf = buffer(EVENT_QUEUE, 0);
    g.mem
        .write_obj(0xffff_ffffu32, GuestAddress(event_buf))
        .unwrap();
    g.write_desc(EVENT_QUEUE, 0, event_buf, 4, F_WRITE, 0);
    g.publish(EVENT_QUEUE, 0);
    g.dev.lock().unwrap().restored();
    g.pump();
    let used_idx: u16 = g.mem.read_obj(GuestAddress(used(EVENT_QUEUE) + 2)).unwrap();
    assert_eq!(used_idx, 1, "the event buffer was not used");
    let len: u32 = g.mem.read_obj(GuestAddress(used(EVENT_QUEUE) + 8)).unwrap();
    assert_eq!(len, 4);
    let id: u32 = g.mem.read_obj(GuestAddress(event_buf)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    // A host client now waits: nothing goes to the guest...
    let mut c = g.client();
    c.write_all(b"CONNECT 1024\n").unwrap();
    assert!(
        g.recv().is_empty(),
        "a request before the guest took in the reset"
    );
    // ...until the guest refills its event queue.
    g.write_desc(EVENT_QUEUE, 1, buffer(EVENT_QUEUE, 1), 4, F_WRITE, 0);
    g.publish(EVENT_QUEUE, 1);
    g.kick(EVENT_QUEUE);
    let reqs = g.recv();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!((reqs[0].op, reqs[0].dst_port), (OP_REQUEST, 1024));
    g.send(Pkt::from_guest(OP_RESPONSE, 1024, reqs[0].src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", reqs[0].src_port));
    // The queue positions are there for a snapshot.
    let states = g.dev.lock().unwrap().active_queue_states();
    assert_eq!(states.len(), 3);
    assert_eq!(states[EVENT_QUEUE].next_avail, 1);
    assert_eq!(states[EVENT_QUEUE].next_used, 1);
}
