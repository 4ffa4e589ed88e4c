//! The device driven as the guest's driver would: split virtqueues written
//! into real guest memory, the device on a real event loop, and a real tap
//! in a private network namespace each test makes for itself (a thread
//! unshares CLONE_NEWNET, creates the tap and its sockets there, and hands
//! them back: the machine's own interfaces are never touched).

use std::collections::HashMap;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::{Interrupt, INTERRUPT_CONFIG_CHANGE};

const MEM_SIZE: u64 = 40 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const HOST_IP: [u8; 4] = [10, 0, 0, 1];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const TAP_NAME: &str = "rtvnet0";

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// What a Linux guest acks: everything offered.
const ALL: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_STATUS);
/// Without mergeable buffers nor receive offloads.
const PLAIN: u64 = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS);

// ---------------------------------------------------------------------------
// The tap side: a private network namespace.

/// A tap in a network namespace of its own, with the kernel's end: the
/// interface is up as 10.0.0.1/24, and 10.0.0.2 (the guest) has a static
/// neighbour entry with the guest's MAC.
struct NetNs {
    tap: OwnedFd,
    /// An AF_INET socket in the namespace, for interface ioctls.
    ctl: OwnedFd,
    /// A UDP socket bound to 10.0.0.1 in the namespace.
    udp: UdpSocket,
    tap_mac: [u8; 6],
}

fn ifreq_named(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

fn sockaddr_in(ip: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs;
    // this is the cast the socket API is built on.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_ifr(fd: &OwnedFd, req: libc::c_ulong, ifr: &mut libc::ifreq, what: &str) {
    // SAFETY: every request used here reads or writes at most a struct
    // ifreq at the pointer, which points to one we own.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut libc::ifreq) };
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Makes the namespace and its tap (with `IFF_VNET_HDR` if `vnet_hdr`)
/// with MTU `mtu`.
fn netns_with(vnet_hdr: bool, mtu: i32) -> NetNs {
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this
        // thread into a new network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        // No IPv6 chatter (router solicitations, MLD) on the tap.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        let tap = OwnedFd::from(tun);
        let mut ifr = ifreq_named(TAP_NAME);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        ioctl_ifr(&tap, libc::TUNSETIFF, &mut ifr, "TUNSETIFF");
        // SAFETY: socket takes no pointers.
        let ctl = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(ctl >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let ctl = unsafe { OwnedFd::from_raw_fd(ctl) };
        let mut ifr = ifreq_named(TAP_NAME);
        ifr.ifr_ifru.ifru_mtu = mtu;
        ioctl_ifr(&ctl, libc::SIOCSIFMTU, &mut ifr, "SIOCSIFMTU");
        let mut ifr = ifreq_named(TAP_NAME);
        ifr.ifr_ifru.ifru_addr = sockaddr_in(HOST_IP);
        ioctl_ifr(&ctl, libc::SIOCSIFADDR, &mut ifr, "SIOCSIFADDR");
        let mut ifr = ifreq_named(TAP_NAME);
        ifr.ifr_ifru.ifru_netmask = sockaddr_in([255, 255, 255, 0]);
        ioctl_ifr(&ctl, libc::SIOCSIFNETMASK, &mut ifr, "SIOCSIFNETMASK");
        let mut ifr = ifreq_named(TAP_NAME);
        ioctl_ifr(&ctl, libc::SIOCGIFFLAGS, &mut ifr, "SIOCGIFFLAGS");
        // SAFETY: SIOCGIFFLAGS set ifru_flags.
        let up = unsafe { ifr.ifr_ifru.ifru_flags } | libc::IFF_UP as libc::c_short;
        ifr.ifr_ifru.ifru_flags = up;
        ioctl_ifr(&ctl, libc::SIOCSIFFLAGS, &mut ifr, "SIOCSIFFLAGS");
        // The guest's neighbour entry: 10.0.0.2 is at the guest's MAC.
        let mut ha = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (d, s) in ha.sa_data.iter_mut().zip(DEFAULT_MAC) {
            *d = s as libc::c_char;
        }
        let mut dev = [0 as libc::c_char; 16];
        for (d, s) in dev.iter_mut().zip(TAP_NAME.bytes()) {
            *d = s as libc::c_char;
        }
        let mut arp = libc::arpreq {
            arp_pa: sockaddr_in(GUEST_IP),
            arp_ha: ha,
            arp_flags: 0x02 | 0x04, // ATF_COM | ATF_PERM
            arp_netmask: sockaddr_in([0; 4]),
            arp_dev: dev,
        };
        // SAFETY: SIOCSARP reads a struct arpreq from the pointer, which
        // points to one we own.
        let rc = unsafe {
            libc::ioctl(
                ctl.as_raw_fd(),
                libc::SIOCSARP,
                &mut arp as *mut libc::arpreq,
            )
        };
        assert_eq!(rc, 0, "SIOCSARP: {}", std::io::Error::last_os_error());
        let mut ifr = ifreq_named(TAP_NAME);
        ioctl_ifr(&ctl, libc::SIOCGIFHWADDR, &mut ifr, "SIOCGIFHWADDR");
        // SAFETY: SIOCGIFHWADDR set ifru_hwaddr.
        let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
        let mut tap_mac = [0u8; 6];
        for (d, s) in tap_mac.iter_mut().zip(hw.sa_data) {
            *d = s as u8;
        }
        let udp = UdpSocket::bind((std::net::Ipv4Addr::from(HOST_IP), 0)).expect("bind");
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        NetNs {
            tap,
            ctl,
            udp,
            tap_mac,
        }
    })
    .join()
    .expect("the namespace thread failed")
}

fn netns() -> NetNs {
    netns_with(true, 1500)
}

impl NetNs {
    fn config(&self) -> NetConfig {
        NetConfig {
            tap_fd: Some(self.tap.as_raw_fd()),
            ..NetConfig::default()
        }
    }

    fn host_port(&self) -> u16 {
        self.udp.local_addr().unwrap().port()
    }

    /// Sends a UDP datagram from the kernel side to the guest.
    fn send_to_guest(&self, port: u16, payload: &[u8]) {
        self.udp
            .send_to(payload, (std::net::Ipv4Addr::from(GUEST_IP), port))
            .expect("send to the guest");
    }

    /// An ethtool "get" value of the tap (`ETHTOOL_GTSO`, ...).
    fn ethtool_get(&self, cmd: u32) -> u32 {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut ifr = ifreq_named(TAP_NAME);
        ifr.ifr_ifru.ifru_data = &mut value as *mut EthtoolValue as *mut libc::c_char;
        ioctl_ifr(&self.ctl, libc::SIOCETHTOOL, &mut ifr, "SIOCETHTOOL");
        value.data
    }
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_GTSO: u32 = 0x1e;

// ---------------------------------------------------------------------------
// Frames.

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame from the guest to the kernel side.
fn udp_frame(dst_mac: [u8; 6], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&DEFAULT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let csum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The destination port and payload of an IPv4/UDP frame.
fn parse_udp(frame: &[u8]) -> Option<(u16, &[u8])> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let udp = frame.get(14 + ihl..)?;
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    Some((dport, udp.get(8..len)?))
}

fn with_hdr(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}

// ---------------------------------------------------------------------------
// The guest side.

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
/// 64 KiB of buffer per descriptor index and queue.
fn buffer(q: usize, i: u16) -> u64 {
    0x10_0000 + q as u64 * 0x110_0000 + u64::from(i) * 0x1_0000
}

/// A frame the guest received: its header, the frame, and each chain's
/// used length.
#[derive(Debug)]
struct RxFrame {
    hdr: [u8; VNET_HDR_LEN],
    frame: Vec<u8>,
    lens: Vec<u32>,
}

impl RxFrame {
    fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Net>>,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    notify: Vec<EventFd>,
    interrupt: Option<Arc<Interrupt>>,
    avail_idx: [u16; 2],
    used_seen: [u16; 2],
    next_desc: [u16; 2],
    /// RX chains offered: head -> (address, length) of each buffer.
    posted: HashMap<u16, Vec<(u64, u32)>>,
}

impl Guest {
    fn new(config: &NetConfig, features: u64) -> Self {
        Self::with(Net::new(config).expect("device"), features)
    }

    fn with(net: Net, features: u64) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dev = Arc::new(Mutex::new(net));
        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        events.add_subscriber(dev.clone());
        let mut g = Guest {
            mem,
            dev,
            events,
            notify: (0..2)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt: None,
            avail_idx: [0; 2],
            used_seen: [0; 2],
            next_desc: [0; 2],
            posted: HashMap::new(),
        };
        g.activate(features);
        g
    }

    fn activate(&mut self, features: u64) {
        let mut queues = Vec::new();
        for q in 0..2 {
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
        self.avail_idx = [0; 2];
        self.used_seen = [0; 2];
        self.next_desc = [0; 2];
        self.posted.clear();
        let evts = self.notify.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        self.interrupt = Some(irq.clone());
        self.dev
            .lock()
            .unwrap()
            .activate(features, self.mem.clone(), queues, irq, evts)
            .unwrap();
        self.pump();
    }

    /// Runs the event loop until it has nothing more to do; the number of
    /// events handled.
    fn pump(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..10_000 {
            match self.events.run_with_timeout(1).unwrap() {
                0 => return total,
                n => total += n,
            }
        }
        panic!("the event loop never went idle");
    }

    /// Runs the event loop until `done` or 5 s.
    fn pump_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            self.events.run_with_timeout(10).unwrap();
            if done(self) {
                return;
            }
        }
        panic!("timed out");
    }

    fn counters(&self) -> NetCounters {
        self.dev.lock().unwrap().counters()
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

    fn alloc_desc(&mut self, q: usize) -> u16 {
        let i = self.next_desc[q];
        self.next_desc[q] = (i + 1) % QUEUE_SIZE;
        i
    }

    /// Offers one RX chain of buffers of `lens` bytes (not kicked).
    fn post_rx(&mut self, lens: &[u32]) -> u16 {
        let ids: Vec<u16> = lens.iter().map(|_| self.alloc_desc(RX_QUEUE)).collect();
        let mut segs = Vec::new();
        for (k, (&id, &len)) in ids.iter().zip(lens).enumerate() {
            let addr = buffer(RX_QUEUE, id);
            let (flags, next) = match ids.get(k + 1) {
                Some(&n) => (F_WRITE | F_NEXT, n),
                None => (F_WRITE, 0),
            };
            self.write_desc(RX_QUEUE, id, addr, len, flags, next);
            segs.push((addr, len));
        }
        self.posted.insert(ids[0], segs);
        self.publish(RX_QUEUE, ids[0]);
        ids[0]
    }

    /// Offers `n` one-buffer RX chains of `len` bytes and kicks.
    fn post_rx_n(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            self.post_rx(&[len]);
        }
        self.kick(RX_QUEUE);
    }

    /// Used entries of queue `q` since the last call.
    fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(used(q) + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != used_idx {
            let slot = u64::from(self.used_seen[q] % QUEUE_SIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(used(q) + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(used(q) + 8 + 8 * slot))
                .unwrap();
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            out.push((id as u16, len));
        }
        out
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(used(q) + 2)).unwrap()
    }

    fn chain_bytes(&self, head: u16, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, seg) in &self.posted[&head] {
            let n = left.min(seg as usize);
            let mut buf = vec![0u8; n];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            out.extend(buf);
            left -= n;
        }
        assert_eq!(left, 0, "used length {len} beyond chain {head}");
        out
    }

    /// Frames in the RX used ring since the last call (merged as
    /// `num_buffers` says), and the heads returned with length 0.
    fn rx_frames(&mut self) -> (Vec<RxFrame>, Vec<u16>) {
        let entries = self.take_used(RX_QUEUE);
        let mut frames = Vec::new();
        let mut zero = Vec::new();
        let mut it = entries.into_iter();
        while let Some((head, len)) = it.next() {
            if len == 0 {
                zero.push(head);
                continue;
            }
            assert!(len as usize >= VNET_HDR_LEN, "used length {len}");
            let mut bytes = self.chain_bytes(head, len);
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr.copy_from_slice(&bytes[..VNET_HDR_LEN]);
            let num = u16::from_le_bytes([hdr[10], hdr[11]]);
            assert!(num >= 1, "num_buffers 0");
            let mut lens = vec![len];
            for _ in 1..num {
                let (h, l) = it.next().expect("fewer used entries than num_buffers");
                assert!(l > 0, "an empty buffer inside a merged frame");
                bytes.extend(self.chain_bytes(h, l));
                lens.push(l);
            }
            frames.push(RxFrame {
                hdr,
                frame: bytes[VNET_HDR_LEN..].to_vec(),
                lens,
            });
        }
        (frames, zero)
    }

    /// UDP payloads to `port` received since the last call.
    fn udp_received(&mut self, port: u16) -> Vec<Vec<u8>> {
        self.rx_frames()
            .0
            .iter()
            .filter_map(|f| parse_udp(&f.frame).filter(|(p, _)| *p == port))
            .map(|(_, d)| d.to_vec())
            .collect()
    }

    /// Sends `bytes` (vnet header and frame) as one TX chain, cut at `cuts`.
    fn send_tx(&mut self, bytes: &[u8], cuts: &[usize]) {
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < bytes.len()));
        bounds.push(bytes.len());
        let ids: Vec<u16> = (1..bounds.len())
            .map(|_| self.alloc_desc(TX_QUEUE))
            .collect();
        for (k, &id) in ids.iter().enumerate() {
            let part = &bytes[bounds[k]..bounds[k + 1]];
            let addr = buffer(TX_QUEUE, id);
            self.mem.write_slice(part, GuestAddress(addr)).unwrap();
            let (flags, next) = match ids.get(k + 1) {
                Some(&n) => (F_NEXT, n),
                None => (0, 0),
            };
            self.write_desc(TX_QUEUE, id, addr, part.len() as u32, flags, next);
        }
        self.publish(TX_QUEUE, ids[0]);
        self.kick(TX_QUEUE);
    }
}

fn read_udp(sock: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut buf).expect("a datagram from the guest");
    buf.truncate(n);
    buf
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn identity_config_space_and_link_status() {
    let g = Guest::new(&NetConfig::default(), ALL);
    let dev = g.dev.lock().unwrap();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let f = dev.device_features();
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b} not offered");
    }
    let mut c = [0xffu8; CONFIG_LEN];
    dev.read_config(0, &mut c);
    assert_eq!(&c[0..6], &DEFAULT_MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 0, "link up without a tap");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
    let mut far = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    assert!(dev.can_snapshot().is_ok());
    drop(dev);

    let ns = netns();
    let config = NetConfig {
        mac: [0x02, 0, 0, 0, 0, 0x42],
        mtu: 9000,
        ..ns.config()
    };
    let g = Guest::new(&config, ALL);
    let mut c = [0u8; CONFIG_LEN];
    g.dev.lock().unwrap().read_config(0, &mut c);
    assert_eq!(&c[0..6], &[0x02, 0, 0, 0, 0, 0x42]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link down with a tap");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    assert_eq!(g.dev.lock().unwrap().tap_name(), Some(TAP_NAME));
    assert!(g.dev.lock().unwrap().can_snapshot().is_ok());
    // A restored device with a tap has the guest re-read its link status.
    let irq = g.interrupt.clone().unwrap();
    irq.ack(u32::MAX);
    g.dev.lock().unwrap().restored();
    assert_ne!(irq.status() & INTERRUPT_CONFIG_CHANGE, 0);
}

#[test]
fn a_frame_the_guest_sends_reaches_the_kernel() {
    let ns = netns();
    let mut g = Guest::new(&ns.config(), ALL);
    let payload = b"hello from the guest".repeat(20);
    let frame = udp_frame(ns.tap_mac, ns.host_port(), &payload);
    // Header and frame over three descriptors, the header itself cut.
    g.send_tx(&with_hdr(&frame), &[5, 30]);
    g.pump();
    assert_eq!(read_udp(&ns.udp), payload);
    assert_eq!(g.take_used(TX_QUEUE), [(0, 0)]);
    let c = g.counters();
    assert_eq!((c.tx_frames, c.tx_bytes), (1, frame.len() as u64));
    // A batch: all arrive, in order.
    for i in 0..20u8 {
        g.send_tx(
            &with_hdr(&udp_frame(ns.tap_mac, ns.host_port(), &[i; 100])),
            &[],
        );
    }
    g.pump();
    for i in 0..20u8 {
        assert_eq!(read_udp(&ns.udp), [i; 100]);
    }
    assert_eq!(g.take_used(TX_QUEUE).len(), 20);
    assert_eq!(g.counters().tx_frames, 21);
}

#[test]
fn a_frame_the_kernel_sends_is_merged_over_small_buffers() {
    let ns = netns_with(true, 9000);
    let mut g = Guest::new(&ns.config(), ALL);
    // Small buffers, some chains of several descriptors (the first cuts
    // the header).
    for k in 0..24 {
        if k % 3 == 0 {
            g.post_rx(&[8, 300, 716]);
        } else {
            g.post_rx(&[1024]);
        }
    }
    g.kick(RX_QUEUE);
    g.pump();
    let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    ns.send_to_guest(7777, &payload);
    let mut got = Vec::new();
    g.pump_until(|g| {
        got.extend(
            g.rx_frames()
                .0
                .into_iter()
                .filter(|f| parse_udp(&f.frame).is_some_and(|(p, _)| p == 7777)),
        );
        !got.is_empty()
    });
    let f = &got[0];
    assert_eq!(parse_udp(&f.frame).unwrap().1, payload.as_slice());
    let total = VNET_HDR_LEN + 14 + 20 + 8 + 5000;
    assert_eq!(f.lens.iter().sum::<u32>() as usize, total);
    assert_eq!(usize::from(f.num_buffers()), f.lens.len());
    assert_eq!(f.lens.len(), total.div_ceil(1024), "{:?}", f.lens);
    assert!(f.lens[..f.lens.len() - 1].iter().all(|&l| l == 1024));
    // The vnet header: no GSO; the checksum left to the guest, or done.
    assert_eq!(f.hdr[1], 0, "gso_type");
    match f.hdr[0] {
        0 => {}
        1 => {
            assert_eq!(u16::from_le_bytes([f.hdr[6], f.hdr[7]]), 34, "csum_start");
            assert_eq!(u16::from_le_bytes([f.hdr[8], f.hdr[9]]), 6, "csum_offset");
        }
        flags => panic!("vnet header flags {flags}"),
    }
    let c = g.counters();
    assert!(c.rx_frames >= 1 && c.rx_bytes >= (total - VNET_HDR_LEN) as u64);
}

#[test]
fn without_mrg_rxbuf_each_frame_takes_one_chain() {
    let ns = netns_with(true, 9000);
    let mut g = Guest::new(&ns.config(), PLAIN);
    g.post_rx_n(4, 2048);
    g.pump();
    ns.send_to_guest(5000, b"small");
    let mut frames = Vec::new();
    g.pump_until(|g| {
        frames.extend(g.rx_frames().0);
        frames
            .iter()
            .any(|f| parse_udp(&f.frame).is_some_and(|(p, _)| p == 5000))
    });
    for f in &frames {
        assert_eq!((f.num_buffers(), f.lens.len()), (1, 1));
    }
    assert_eq!(g.dev.lock().unwrap().offload_flags(), Some(0));
    // Too large for a 2 KiB buffer: dropped, the buffer kept for the next.
    let dropped = g.counters().rx_dropped;
    ns.send_to_guest(5001, &[1u8; 3000]);
    g.pump_until(|g| g.counters().rx_dropped > dropped);
    ns.send_to_guest(5002, b"after");
    let mut got = Vec::new();
    g.pump_until(|g| {
        got.extend(g.udp_received(5002));
        !got.is_empty()
    });
    assert_eq!(got, [b"after".to_vec()]);
}

#[test]
fn frames_wait_for_rx_buffers_and_none_are_lost() {
    let ns = netns();
    let mut g = Guest::new(&ns.config(), ALL);
    const N: usize = 40;
    for i in 0..N {
        ns.send_to_guest(6000, &[i as u8; 200]);
    }
    // The device holds one frame; the loop goes quiet (no spinning).
    g.pump_until(|g| g.dev.lock().unwrap().holds_rx_frame());
    let before = g.counters().events;
    let start = Instant::now();
    let mut handled = 0;
    while start.elapsed() < Duration::from_millis(300) {
        handled += g.events.run_with_timeout(20).unwrap();
    }
    assert!(
        handled <= N,
        "{handled} events in 300 ms without RX buffers: spinning"
    );
    assert_eq!(g.events.run_with_timeout(100).unwrap(), 0, "not idle");
    assert!(g.counters().events - before <= N as u64);
    assert!(g.dev.lock().unwrap().holds_rx_frame());
    assert_eq!(g.used_idx(RX_QUEUE), 0);
    // Buffers and a notification: everything arrives, in order.
    g.post_rx_n(16, 2048);
    g.pump();
    let mut got = g.udp_received(6000);
    g.post_rx_n(64, 2048);
    g.pump_until(|g| {
        got.extend(g.udp_received(6000));
        got.len() >= N
    });
    let want: Vec<Vec<u8>> = (0..N).map(|i| vec![i as u8; 200]).collect();
    assert_eq!(got, want);
    assert!(!g.dev.lock().unwrap().holds_rx_frame());
    assert!(g.counters().rx_deferred >= 1);
}

#[test]
fn offloads_follow_the_acked_features() {
    let ns = netns();
    let mut g = Guest::new(&ns.config(), ALL);
    let flags = g.dev.lock().unwrap().offload_flags();
    assert_eq!(
        flags,
        Some(
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        )
    );
    assert_eq!(g.dev.lock().unwrap().acked_features(), ALL);
    assert_eq!(ns.ethtool_get(ETHTOOL_GTXCSUM), 1);
    assert_eq!(ns.ethtool_get(ETHTOOL_GTSO), 1);

    // A reset and a driver that takes only checksums.
    g.dev.lock().unwrap().reset();
    g.activate(PLAIN | bit(VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(
        g.dev.lock().unwrap().offload_flags(),
        Some(libc::TUN_F_CSUM)
    );
    assert_eq!(ns.ethtool_get(ETHTOOL_GTXCSUM), 1);
    assert_eq!(ns.ethtool_get(ETHTOOL_GTSO), 0);

    // TSO without checksums is not asked of the kernel (it refuses it).
    g.dev.lock().unwrap().reset();
    g.activate(PLAIN | bit(VIRTIO_NET_F_GUEST_TSO4));
    assert_eq!(g.dev.lock().unwrap().offload_flags(), Some(0));
    assert_eq!(ns.ethtool_get(ETHTOOL_GTXCSUM), 0);
    assert_eq!(ns.ethtool_get(ETHTOOL_GTSO), 0);
    assert_eq!(tap::offload_flags(0), 0);
}

#[test]
fn malformed_chains_are_dropped_and_the_device_keeps_working() {
    let ns = netns();
    let mut g = Guest::new(&ns.config(), ALL);
    let good = with_hdr(&udp_frame(ns.tap_mac, ns.host_port(), b"ok"));
    let base = buffer(TX_QUEUE, 200);
    g.mem.write_slice(&good, GuestAddress(base)).unwrap();
    // TX: shorter than a header.
    g.write_desc(TX_QUEUE, 200, base, 6, 0, 0);
    g.publish(TX_QUEUE, 200);
    // A write-only descriptor.
    g.write_desc(TX_QUEUE, 201, base, good.len() as u32, F_WRITE, 0);
    g.publish(TX_QUEUE, 201);
    // Beyond guest memory, and wrapping around.
    g.write_desc(TX_QUEUE, 202, MEM_SIZE - 8, 64, 0, 0);
    g.publish(TX_QUEUE, 202);
    g.write_desc(TX_QUEUE, 203, u64::MAX - 8, 64, 0, 0);
    g.publish(TX_QUEUE, 203);
    // Oversized: 65563 bytes over two descriptors.
    g.write_desc(TX_QUEUE, 204, base, 12, F_NEXT, 205);
    g.write_desc(TX_QUEUE, 205, buffer(TX_QUEUE, 0), 65551, 0, 0);
    g.publish(TX_QUEUE, 204);
    // A loop (1000 bytes, 256 times round): oversized.
    g.write_desc(TX_QUEUE, 206, base, 1000, F_NEXT, 206);
    g.publish(TX_QUEUE, 206);
    // An indirect table of garbage, and one outside memory.
    g.mem
        .write_slice(&[0xa5u8; 64], GuestAddress(buffer(TX_QUEUE, 208)))
        .unwrap();
    g.write_desc(TX_QUEUE, 207, buffer(TX_QUEUE, 208), 64, F_INDIRECT, 0);
    g.publish(TX_QUEUE, 207);
    g.write_desc(TX_QUEUE, 209, MEM_SIZE + 0x1000, 64, F_INDIRECT, 0);
    g.publish(TX_QUEUE, 209);
    // A head index beyond the queue.
    g.publish(TX_QUEUE, 999);
    g.kick(TX_QUEUE);
    g.pump();
    let c = g.counters();
    assert_eq!(c.tx_frames, 0);
    assert_eq!(c.tx_malformed, 9, "{c:?}");
    assert_eq!(c.tx_oversized, 2, "{c:?}");
    // Every chain with a head inside the queue came back, with length 0.
    let used = g.take_used(TX_QUEUE);
    assert_eq!(used.len(), 8, "{used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0));

    // RX: a read-only descriptor, a buffer outside memory, no room for a
    // header, then a good chain.
    g.write_desc(RX_QUEUE, 100, buffer(RX_QUEUE, 100), 2048, 0, 0);
    g.publish(RX_QUEUE, 100);
    g.write_desc(RX_QUEUE, 101, MEM_SIZE - 100, 2048, F_WRITE, 0);
    g.publish(RX_QUEUE, 101);
    g.write_desc(RX_QUEUE, 102, buffer(RX_QUEUE, 102), 4, F_WRITE, 0);
    g.publish(RX_QUEUE, 102);
    g.next_desc[RX_QUEUE] = 110;
    g.post_rx(&[2048]);
    g.post_rx(&[2048]);
    g.kick(RX_QUEUE);
    g.pump();
    ns.send_to_guest(6100, b"still works");
    let mut got = Vec::new();
    let mut zero = Vec::new();
    g.pump_until(|g| {
        let (frames, z) = g.rx_frames();
        zero.extend(z);
        got.extend(
            frames
                .iter()
                .filter_map(|f| parse_udp(&f.frame).filter(|(p, _)| *p == 6100))
                .map(|(_, d)| d.to_vec()),
        );
        !got.is_empty()
    });
    assert_eq!(got, [b"still works".to_vec()]);
    zero.sort();
    assert_eq!(zero, [100, 101, 102]);
    assert_eq!(g.counters().rx_bad_chains, 3);

    // And TX still works.
    g.next_desc[TX_QUEUE] = 0;
    g.send_tx(&good, &[]);
    g.pump();
    assert_eq!(read_udp(&ns.udp), b"ok");
}

#[test]
fn tx_waits_for_the_backend_to_drain_and_loses_nothing() {
    // EAGAIN from a tap needs its socket buffer full, which the kernel
    // never lets happen for long; a datagram socket pair has the same
    // semantics (one frame per write, EAGAIN, then EPOLLOUT) and fills.
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (dev_end, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let small: libc::c_int = 4096;
    // SAFETY: SO_SNDBUF reads one c_int from the pointer.
    unsafe {
        libc::setsockopt(
            dev_end.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let tap = Tap::unchecked(dev_end, "pair");
    let net = Net::with_tap(&NetConfig::default(), Some(tap)).unwrap();
    let mut g = Guest::with(net, ALL);
    const N: usize = 100;
    for i in 0..N {
        let mut frame = with_hdr(&[i as u8; 1000]);
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 2].copy_from_slice(&(i as u16).to_le_bytes());
        g.send_tx(&frame, &[]);
    }
    g.pump();
    let c = g.counters();
    assert!(c.tx_blocked >= 1, "the pair never filled: {c:?}");
    let sent = g.used_idx(TX_QUEUE);
    assert!((sent as usize) < N);
    assert_eq!(c.tx_frames, u64::from(sent));
    // Blocked: guest kicks do not make it retry, and nothing spins.
    g.kick(TX_QUEUE);
    assert!(g.pump() <= 2);
    assert_eq!(g.events.run_with_timeout(50).unwrap(), 0);
    // The peer reads: everything goes, in order.
    let peer = std::fs::File::from(peer);
    let set_nb = {
        // SAFETY: F_SETFL on the peer fd; no memory passed.
        unsafe { libc::fcntl(peer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) }
    };
    assert_eq!(set_nb, 0);
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < N && start.elapsed() < Duration::from_secs(5) {
        let mut buf = [0u8; 2048];
        match std::io::Read::read(&mut &peer, &mut buf) {
            Ok(n) => {
                assert_eq!(n, VNET_HDR_LEN + 1000);
                got.push(u16::from_le_bytes([buf[12], buf[13]]));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                g.events.run_with_timeout(10).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, (0..N as u16).collect::<Vec<_>>());
    g.pump();
    assert_eq!(usize::from(g.used_idx(TX_QUEUE)), N);
    assert_eq!(g.counters().tx_frames, N as u64);
}

#[test]
fn without_a_tap_tx_is_dropped_and_nothing_is_received() {
    let mut g = Guest::new(&NetConfig::default(), ALL);
    g.post_rx_n(8, 2048);
    for _ in 0..5 {
        g.send_tx(&with_hdr(&[0u8; 60]), &[]);
    }
    g.pump();
    assert_eq!(g.take_used(TX_QUEUE).len(), 5);
    assert_eq!(g.used_idx(RX_QUEUE), 0);
    let c = g.counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (0, 5));
    assert_eq!(g.dev.lock().unwrap().offload_flags(), None);
    assert!(g.dev.lock().unwrap().can_snapshot().is_ok());
}

#[test]
fn config_is_saved_without_the_tap_and_restored_with_the_restores() {
    use crate::device_manager::{restore_plan, MmioSlot, VirtioSnapshot};
    let config = NetConfig {
        mac: [0x02, 1, 2, 3, 4, 5],
        mtu: 9000,
        tap_fd: Some(42),
    };
    let json = serde_json::to_value(DeviceConfig::Net(config.clone())).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"kind": "net", "mac": [2, 1, 2, 3, 4, 5], "mtu": 9000})
    );
    let back: DeviceConfig = serde_json::from_value(json).unwrap();
    let saved = NetConfig {
        tap_fd: None,
        ..config
    };
    assert_eq!(back, DeviceConfig::Net(saved.clone()));
    assert_eq!(back.name(), "virtio-net");

    let transport = dummy_transport();
    let snap = [VirtioSnapshot {
        slot: MmioSlot::nth(0).unwrap(),
        device: back,
        transport,
    }];
    // No tap: the NIC stays, with no backend.
    assert_eq!(
        restore_plan(&snap, &RestoreConfig::default()).unwrap(),
        [DeviceConfig::Net(saved.clone())]
    );
    let with_tap = RestoreConfig {
        net_tap_fd: Some(7),
        ..Default::default()
    };
    assert_eq!(
        restore_plan(&snap, &with_tap).unwrap(),
        [DeviceConfig::Net(NetConfig {
            tap_fd: Some(7),
            ..saved
        })]
    );
    // A tap for a snapshot without a NIC is refused.
    let err = restore_plan(&[], &with_tap).unwrap_err();
    assert!(
        err.contains("no virtio-net device") && err.contains("--net-tap-fd"),
        "{err}"
    );
}

use crate::device_manager::DeviceConfig;
use crate::vm::RestoreConfig;

fn dummy_transport() -> crate::devices::virtio::mmio::MmioState {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let dev = Arc::new(Mutex::new(Net::new(&NetConfig::default()).unwrap()));
    crate::devices::virtio::mmio::MmioTransport::new(
        mem,
        dev,
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
    .unwrap()
    .state()
}

#[test]
fn the_tap_fd_is_checked_and_stays_the_callers() {
    // Not open.
    let err = NetConfig {
        tap_fd: Some(100_000),
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("fd 100000 is not an open file descriptor"),
        "{err}"
    );
    // Open, but not a tap.
    let file = std::fs::File::open("/dev/null").unwrap();
    let err = Net::new(&NetConfig {
        tap_fd: Some(file.as_raw_fd()),
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("is not a tap device"), "{err}");
    // A tap without a vnet header.
    let ns = netns_with(false, 1500);
    let err = Net::new(&ns.config()).err().unwrap().to_string();
    assert!(
        err.contains(TAP_NAME) && err.contains("IFF_VNET_HDR"),
        "{err}"
    );
    // A good one: the device works on a duplicate; the caller's fd stays
    // open after the device is gone.
    let ns = netns();
    let dev = Net::new(&ns.config()).unwrap();
    drop(dev);
    assert!(tap::inspect(ns.tap.as_raw_fd()).is_ok());
    // MTU and MAC.
    let bad_mtu = NetConfig {
        mtu: 67,
        ..Default::default()
    };
    assert!(matches!(bad_mtu.validate(), Err(NetError::Mtu(67))));
    let multicast = NetConfig {
        mac: [1, 0, 0, 0, 0, 1],
        ..Default::default()
    };
    assert!(matches!(multicast.validate(), Err(NetError::Mac { .. })));
}

#[test]
fn mac_addresses_parse_and_print() {
    assert_eq!(parse_mac("02:72:74:76:00:01").unwrap(), DEFAULT_MAC);
    assert_eq!(parse_mac("02-72-74-76-00-01").unwrap(), DEFAULT_MAC);
    assert_eq!(format_mac(&DEFAULT_MAC), "02:72:74:76:00:01");
    // The placeholder the runtime tells the agent to look for.
    assert_eq!(format_mac(&DEFAULT_MAC), rtv_protocol::PLACEHOLDER_MAC);
    for bad in [
        "",
        "02:72:74:76:00",
        "02:72:74:76:00:01:02",
        "zz:72:74:76:00:01",
        "002:72:74:76:00:01",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad}");
    }
}

use crate::devices::virtio::test_rng::Rng;

/// A descriptor address: mostly inside the queue's buffers, sometimes at
/// the end of memory, beyond it, or near u64::MAX.
fn random_addr(rng: &mut Rng, q: usize) -> u64 {
    match rng.below(10) {
        0 => MEM_SIZE - rng.below(64),
        1 => MEM_SIZE + rng.below(1 << 20),
        2 => u64::MAX - rng.below(128),
        3 => rng.below(MEM_SIZE),
        _ => buffer(q, rng.below(u64::from(QUEUE_SIZE)) as u16),
    }
}

/// A descriptor length: small, huge, just past 64 KiB, or anything below.
fn random_len(rng: &mut Rng) -> u32 {
    match rng.below(6) {
        0 => rng.below(16) as u32,
        1 => u32::MAX - rng.below(16) as u32,
        2 => 65_536 + rng.below(256) as u32,
        _ => rng.below(0x1_0000) as u32,
    }
}

/// Descriptor tables, rings and TX frames written at random by a hostile
/// driver (addresses in and out of memory, any length, flag and next
/// index, loops, indirect tables of garbage, heads beyond the queue, avail
/// indexes that jump, vnet headers with any GSO type and checksum offsets,
/// frames from the host side) must neither panic nor wedge the device: the
/// event loop goes idle after each round, and after a driver reset frames
/// flow both ways. `RTV_FUZZ_CASES` (default 500) and `RTV_FUZZ_SEED` set
/// the run; CI runs the default with a fixed seed, a longer run is by hand.
#[test]
fn random_driver_input_never_panics_or_wedges_the_device() {
    let cases: u64 = std::env::var("RTV_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let seed: u64 = std::env::var("RTV_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7274_7600_6e65_7400);
    eprintln!("RTV_FUZZ_SEED={seed} RTV_FUZZ_CASES={cases}");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let ns = netns();
    let mut g = Guest::new(&ns.config(), ALL);
    for case in 0..cases {
        let mut jumped = false;
        for _ in 0..1 + rng.below(12) {
            let q = rng.below(2) as usize;
            let i = rng.below(u64::from(QUEUE_SIZE)) as u16;
            let flags = (rng.below(8) as u16) | if rng.below(20) == 0 { 0xfff8 } else { 0 };
            let next = if rng.below(10) == 0 {
                rng.next() as u16
            } else {
                rng.below(u64::from(QUEUE_SIZE)) as u16
            };
            let (addr, len) = (random_addr(&mut rng, q), random_len(&mut rng));
            g.write_desc(q, i, addr, len, flags, next);
            // The buffer's bytes: a vnet header and frame of garbage, or a
            // plausible header with random GSO fields, or an indirect table.
            if addr < MEM_SIZE - 0x1_0000 {
                let n = rng.below(0x800) as usize;
                let mut bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                if bytes.len() >= VNET_HDR_LEN && rng.below(2) == 0 {
                    bytes[0] = [0, 1, 2, 3][rng.below(4) as usize]; // flags
                    bytes[1] = [0, 1, 3, 4, 5, 0x80][rng.below(6) as usize]; // gso type
                }
                g.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            }
            if rng.below(3) > 0 {
                let head = if rng.below(15) == 0 {
                    QUEUE_SIZE + rng.below(1000) as u16
                } else {
                    i
                };
                g.publish(q, head);
            }
            if rng.below(60) == 0 {
                // The avail index jumps by more than the queue holds.
                g.avail_idx[q] = g.avail_idx[q].wrapping_add(QUEUE_SIZE + rng.below(500) as u16);
                g.mem
                    .write_obj(g.avail_idx[q], GuestAddress(avail(q) + 2))
                    .unwrap();
                jumped = true;
            }
            if rng.below(2) == 0 {
                g.kick(q);
            }
        }
        if rng.below(3) == 0 {
            let n = rng.below(1400) as usize;
            let payload: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            ns.send_to_guest(7000 + (case % 100) as u16, &payload);
        }
        g.pump();
        let _ = g.take_used(TX_QUEUE);
        let _ = g.take_used(RX_QUEUE);
        if jumped {
            // The device gives up on a queue whose avail index is beyond
            // reason until the driver resets it, as a driver then would.
            g.dev.lock().unwrap().reset();
            g.activate(ALL);
        }
    }
    let c = g.counters();
    eprintln!("after {cases} rounds: {c:?}");
    assert!(
        c.tx_malformed > 0 && c.rx_bad_chains > 0,
        "nothing malformed was tried: {c:?}"
    );

    // A driver reset, then the device works both ways.
    g.dev.lock().unwrap().reset();
    g.activate(ALL);
    let good = with_hdr(&udp_frame(ns.tap_mac, ns.host_port(), b"alive"));
    g.send_tx(&good, &[]);
    g.pump();
    assert_eq!(read_udp(&ns.udp), b"alive");
    ns.send_to_guest(6200, b"alive too");
    // Frames of the rounds may still wait in the tap: buffers for all.
    let mut got = Vec::new();
    g.pump_until(|g| {
        let (frames, zero) = g.rx_frames();
        for _ in 0..(frames.len() + zero.len()).max(1) {
            g.post_rx(&[2048]);
        }
        g.kick(RX_QUEUE);
        got.extend(
            frames
                .iter()
                .filter_map(|f| parse_udp(&f.frame).filter(|(p, _)| *p == 6200))
                .map(|(_, d)| d.to_vec()),
        );
        !got.is_empty()
    });
    assert_eq!(got, [b"alive too".to_vec()]);
}
