//! virtio-fs: the device's configuration space and feature negotiation
//! through the virtio-mmio transport, and one real boot in which the guest
//! mounts a shared directory, reads and writes it, and cannot reach host
//! paths outside it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use rtv_vmm::arch::regs::BootEntry;
use rtv_vmm::device_manager::MmioSlot;
use rtv_vmm::devices::bus::{Bus, BusDevice};
use rtv_vmm::devices::virtio::fs::{FsConfig, VirtioFs, CONFIG_LEN, REQUEST_QUEUE, TAG_LEN};
use rtv_vmm::devices::virtio::mmio::{reg, MmioTransport};
use rtv_vmm::devices::virtio::{
    Interrupt, VirtioDevice, DEVICE_ID_FS, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use rtv_vmm::{AfterSnapshot, DeviceConfig, MachineConfig, RestoreConfig, Vm, VmExit};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::TempDir;

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn transport(dir: &Path) -> MmioTransport {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let device = Arc::new(Mutex::new(VirtioFs::new(&FsConfig::new(dir)).unwrap()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    MmioTransport::new(mem, device, irq).unwrap()
}

#[test]
fn config_space_holds_the_tag_and_one_request_queue() {
    let dir = TempDir::new("vmm-fs-config");
    let mut t = transport(&dir.0);
    assert_eq!(read32(&mut t, reg::DEVICE_ID), DEVICE_ID_FS);
    assert_eq!(DEVICE_ID_FS, 26);
    let mut config = [0u8; CONFIG_LEN];
    for (i, chunk) in config.chunks_mut(4).enumerate() {
        t.read(reg::CONFIG + 4 * i as u64, chunk);
    }
    assert_eq!(&config[..5], b"rtvfs");
    assert!(config[5..TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(config[TAG_LEN..].try_into().unwrap()), 1);
    // Byte-wise reads agree; reads past the end give zeros.
    let mut b = [0u8; 1];
    t.read(reg::CONFIG + 1, &mut b);
    assert_eq!(b[0], b't');
    let mut past = [0xffu8; 4];
    t.read(reg::CONFIG + CONFIG_LEN as u64, &mut past);
    assert_eq!(past, [0; 4]);
    // The config space is read-only.
    t.write(reg::CONFIG, b"evil");
    t.read(reg::CONFIG, &mut config[..4]);
    assert_eq!(&config[..4], b"rtvf");
}

#[test]
fn two_queues_and_version_1_negotiated() {
    let dir = TempDir::new("vmm-fs-features");
    let mut t = transport(&dir.0);
    for q in 0..2 {
        write32(&mut t, reg::QUEUE_SEL, q);
        assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 256, "queue {q}");
    }
    write32(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");

    write32(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
    write32(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write32(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(read32(&mut t, reg::DEVICE_FEATURES), 0);
    write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read32(&mut t, reg::DEVICE_FEATURES),
        1,
        "VIRTIO_F_VERSION_1"
    );
    write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    write32(&mut t, reg::DRIVER_FEATURES, 1);
    write32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    write32(&mut t, reg::DRIVER_FEATURES, 0);
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    write32(&mut t, reg::STATUS, s);
    assert_eq!(read32(&mut t, reg::STATUS), s, "FEATURES_OK accepted");
}

#[test]
fn a_missing_shared_dir_is_refused() {
    let err = VirtioFs::new(&FsConfig::new("/nonexistent/rtv-share")).err();
    assert!(err.unwrap().to_string().contains("/nonexistent/rtv-share"));
    let dir = TempDir::new("vmm-fs-tag");
    let mut config = FsConfig::new(&dir.0);
    config.tag = "x".repeat(37);
    assert!(VirtioFs::new(&config).is_err());
    let dev = VirtioFs::new(&FsConfig::new(&dir.0)).unwrap();
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
}

// ---- FUSE requests through a queue ----------------------------------------

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn desc_table(q: u64) -> u64 {
    0x10000 * (q + 1)
}

/// How the test's driver reaches the device.
enum Backend {
    /// The device alone, activated directly, on an event loop of the test's.
    Device {
        events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        notify: Vec<EventFd>,
    },
    /// The device in a running VM: its registers through the VM's MMIO bus
    /// (as a vCPU would reach them), served by the VM's own event loop.
    Vm { bus: Bus, base: u64 },
}

/// A virtio driver on the host side: two queues of 256 at [`desc_table`],
/// requests at 0x80000, replies at 0x90000.
struct Driver {
    mem: GuestMemoryMmap,
    backend: Backend,
    avail_idx: u16,
    next_desc: u16,
}

fn setup_queue(queue: &mut Queue, q: u64) {
    queue.set_size(256);
    queue.set_desc_table_address(Some(desc_table(q) as u32), Some(0));
    queue.set_avail_ring_address(Some((desc_table(q) + 0x1000) as u32), Some(0));
    queue.set_used_ring_address(Some((desc_table(q) + 0x2000) as u32), Some(0));
    queue.set_ready(true);
}

impl Driver {
    fn new(dir: &Path) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(VirtioFs::new(&FsConfig::new(dir)).unwrap()));
        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        events.add_subscriber(dev.clone());
        let notify: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let mut queues = Vec::new();
        for q in 0..2u64 {
            let mut queue = Queue::new(256).unwrap();
            setup_queue(&mut queue, q);
            queues.push(queue);
        }
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.lock()
            .unwrap()
            .activate(
                1 << VIRTIO_F_VERSION_1,
                mem.clone(),
                queues,
                Arc::new(irq),
                notify.iter().map(|e| e.try_clone().unwrap()).collect(),
            )
            .unwrap();
        let mut d = Driver {
            mem,
            backend: Backend::Device { events, notify },
            avail_idx: 0,
            next_desc: 0,
        };
        d.pump();
        d
    }

    /// Drives the virtio-fs device at `base` of a running VM the way the
    /// guest's driver does: status handshake, VERSION_1, both queues, then
    /// DRIVER_OK (which activates the device). Sends no FUSE request.
    fn in_vm(mem: GuestMemoryMmap, bus: Bus, base: u64) -> Self {
        let w = |off: u64, v: u32| assert!(bus.write(base + off, &v.to_le_bytes()), "{off:#x}");
        let r = |off: u64| {
            let mut b = [0u8; 4];
            assert!(bus.read(base + off, &mut b));
            u32::from_le_bytes(b)
        };
        assert_eq!(r(reg::DEVICE_ID), DEVICE_ID_FS);
        w(reg::STATUS, STATUS_ACKNOWLEDGE);
        w(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(reg::DRIVER_FEATURES_SEL, 1);
        w(reg::DRIVER_FEATURES, 1);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(reg::STATUS, s);
        assert_eq!(r(reg::STATUS), s);
        for q in 0..2u64 {
            w(reg::QUEUE_SEL, q as u32);
            w(reg::QUEUE_NUM, 256);
            w(reg::QUEUE_DESC_LOW, desc_table(q) as u32);
            w(reg::QUEUE_DESC_HIGH, 0);
            w(reg::QUEUE_DRIVER_LOW, (desc_table(q) + 0x1000) as u32);
            w(reg::QUEUE_DRIVER_HIGH, 0);
            w(reg::QUEUE_DEVICE_LOW, (desc_table(q) + 0x2000) as u32);
            w(reg::QUEUE_DEVICE_HIGH, 0);
            w(reg::QUEUE_READY, 1);
        }
        w(reg::STATUS, s | STATUS_DRIVER_OK);
        assert_eq!(r(reg::STATUS), s | STATUS_DRIVER_OK, "device activated");
        Self::resumed(mem, bus, base)
    }

    /// Goes on driving an already active device of a (restored) VM, from
    /// the ring positions in guest memory.
    fn resumed(mem: GuestMemoryMmap, bus: Bus, base: u64) -> Self {
        let avail = desc_table(REQUEST_QUEUE as u64) + 0x1000;
        let avail_idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        Driver {
            mem,
            backend: Backend::Vm { bus, base },
            avail_idx,
            next_desc: 0,
        }
    }

    fn pump(&mut self) {
        let Backend::Device { events, .. } = &mut self.backend else {
            return;
        };
        for _ in 0..100 {
            if events.run_with_timeout(1).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    /// Sends a chain of (address, length, flags) descriptors on the request
    /// queue; returns the used length.
    fn send(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        let q = REQUEST_QUEUE as u64;
        // Each chain is returned before the next is sent: the table's
        // start is free again.
        self.next_desc = 0;
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc += 1;
            let last = i + 1 == descs.len();
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&(flags | if last { 0 } else { F_NEXT }).to_le_bytes());
            d.extend_from_slice(&(idx + 1).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(desc_table(q) + 16 * u64::from(idx)))
                .unwrap();
        }
        let avail = desc_table(q) + 0x1000;
        let slot = u64::from(self.avail_idx % 256);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .unwrap();
        let used = desc_table(q) + 0x2000;
        match &mut self.backend {
            Backend::Device { notify, .. } => {
                notify[REQUEST_QUEUE].write(1).unwrap();
                self.pump();
            }
            Backend::Vm { bus, base } => {
                let queue = (REQUEST_QUEUE as u32).to_le_bytes();
                assert!(bus.write(*base + reg::QUEUE_NOTIFY, &queue));
                let start = Instant::now();
                while self.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() != self.avail_idx {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "the VM's device did not serve the request"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        assert_eq!(used_idx, self.avail_idx, "the chain was not returned");
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(used + 4 + 8 * slot))
            .unwrap();
        assert_eq!(id, u32::from(head));
        self.mem
            .read_obj(GuestAddress(used + 8 + 8 * slot))
            .unwrap()
    }

    /// One FUSE request: returns (used length, reply error, reply unique).
    fn fuse(&mut self, opcode: u32, nodeid: u64, unique: u64, body: &[u8]) -> (u32, i32, u64) {
        let (req, reply) = (0x80000u64, 0x90000u64);
        let mut m = Vec::new();
        m.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        m.extend_from_slice(&opcode.to_le_bytes());
        m.extend_from_slice(&unique.to_le_bytes());
        m.extend_from_slice(&nodeid.to_le_bytes());
        m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
        m.extend_from_slice(body);
        self.mem.write_slice(&m, GuestAddress(req)).unwrap();
        self.mem
            .write_slice(&[0xaau8; 16], GuestAddress(reply))
            .unwrap();
        let len = self.send(&[(req, m.len() as u32, 0), (reply, 4096, F_WRITE)]);
        let err: i32 = self.mem.read_obj(GuestAddress(reply + 4)).unwrap();
        let uniq: u64 = self.mem.read_obj(GuestAddress(reply + 8)).unwrap();
        (len, err, uniq)
    }

    /// The reply's bytes after the 16-byte header.
    fn reply_body(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem
            .read_slice(&mut b, GuestAddress(0x90000 + 16))
            .unwrap();
        b
    }

    /// FUSE_INIT 7.31; asserts it succeeded.
    fn init(&mut self, unique: u64) {
        let (len, err, uniq) = self.fuse(FUSE_INIT, 0, unique, &init_body());
        assert_eq!((err, uniq), (0, unique));
        assert!(len > 16, "INIT reply of {len} bytes");
    }
}

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;

/// The body of FUSE_INIT 7.31 with max_readahead 128 KiB and no flags.
fn init_body() -> Vec<u8> {
    let mut init = Vec::new();
    for v in [7u32, 31, 0x20000, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    init
}

#[test]
fn fuse_requests_are_served_and_dot_dot_is_refused() {
    let dir = TempDir::new("vmm-fs-queue");
    let share = dir.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hi").unwrap();
    let mut d = Driver::new(&share);

    d.init(1);

    // LOOKUP of a file in the share.
    let (len, err, unique) = d.fuse(1, 1, 2, b"hello.txt\0");
    assert_eq!((err, unique), (0, 2));
    assert!(len > 16);
    // LOOKUP of a missing one.
    let (_, err, _) = d.fuse(1, 1, 3, b"nope\0");
    assert_eq!(err, -libc::ENOENT);
    // `..` and `.` of the root would leave the share: refused.
    for (i, name) in [&b"..\0"[..], b".\0"].into_iter().enumerate() {
        let (len, err, unique) = d.fuse(1, 1, 4 + i as u64, name);
        assert_eq!((len, err, unique), (16, -libc::EACCES, 4 + i as u64));
    }
    // A name with a slash.
    let (_, err, _) = d.fuse(1, 1, 6, b"../etc\0");
    assert_eq!(err, -libc::EINVAL);
    // RENAME (fuse_rename_in: the new parent, then both names) out of the
    // share, and LINK to a name out of it.
    const FUSE_RENAME: u32 = 12;
    const FUSE_LINK: u32 = 13;
    for (unique, new_name) in [(60, &b"../x\0"[..]), (61, b"..\0"), (62, b"sub/../../x\0")] {
        let mut body = 1u64.to_le_bytes().to_vec();
        body.extend_from_slice(b"hello.txt\0");
        body.extend_from_slice(new_name);
        let (_, err, _) = d.fuse(FUSE_RENAME, 1, unique, &body);
        assert!(
            err == -libc::EINVAL || err == -libc::EACCES,
            "rename: {err}"
        );
    }
    let (_, err, _) = d.fuse(FUSE_LOOKUP, 1, 63, b"hello.txt\0");
    assert_eq!(err, 0);
    let file_node = u64::from_le_bytes(d.reply_body(8)[..8].try_into().unwrap());
    let mut body = file_node.to_le_bytes().to_vec();
    body.extend_from_slice(b"../linked\0");
    let (_, err, _) = d.fuse(FUSE_LINK, 1, 64, &body);
    assert_eq!(err, -libc::EINVAL, "link");
    assert!(share.join("hello.txt").exists());
    assert!(!dir.0.join("x").exists() && !dir.0.join("linked").exists());

    // Malformed chains are returned empty, the device carries on.
    assert_eq!(
        d.send(&[(0x80000, 8, 0), (0x90000, 4096, F_WRITE)]),
        0,
        "short"
    );
    assert_eq!(
        d.send(&[(0x8000_0000, 64, 0), (0x90000, 4096, F_WRITE)]),
        0,
        "outside memory"
    );
    assert_eq!(d.send(&[(0x80000, 40, F_WRITE)]), 0, "no readable part");
    let (_, err, unique) = d.fuse(1, 1, 7, b"hello.txt\0");
    assert_eq!((err, unique), (0, 7), "still serving");
}

impl Driver {
    /// Sends `request` as it is (no header is made up) with a writable
    /// part of `reply_len` bytes (none when 0); returns the used length and,
    /// when a header was written, the reply's error.
    fn raw(&mut self, request: &[u8], reply_len: u32) -> (u32, Option<i32>) {
        let (req, reply) = (0x80000u64, 0x90000u64);
        self.mem.write_slice(request, GuestAddress(req)).unwrap();
        self.mem
            .write_slice(&[0xaau8; 16], GuestAddress(reply))
            .unwrap();
        let mut descs = vec![(req, request.len().max(1) as u32, 0)];
        if reply_len > 0 {
            descs.push((reply, reply_len, F_WRITE));
        }
        let len = self.send(&descs);
        let err = (len >= 16).then(|| self.mem.read_obj(GuestAddress(reply + 4)).unwrap());
        (len, err)
    }
}

/// A FUSE request: header (with `len` as given) and body.
fn request(len: u32, opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&len.to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&[0u8; 16]);
    m.extend_from_slice(body);
    m
}

/// A well-formed request: the header's length is the real one.
fn well_formed(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    request(40 + body.len() as u32, opcode, unique, nodeid, body)
}

#[test]
fn truncated_and_garbage_fuse_requests_get_errors_and_the_device_goes_on() {
    let dir = TempDir::new("vmm-fs-garbage");
    let share = dir.0.join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("hello.txt"), "hi").unwrap();
    let outside = dir.0.join("outside.txt");
    std::fs::write(&outside, "host only").unwrap();
    let mut d = Driver::new(&share);
    // Before INIT nothing is imported: requests fail, nothing panics.
    let (_, err) = d.raw(&well_formed(FUSE_LOOKUP, 1, 1, b"hello.txt\0"), 4096);
    assert!(err.is_some_and(|e| e < 0), "{err:?}");
    d.init(2);
    let (_, err) = d.raw(&well_formed(FUSE_LOOKUP, 3, 1, b"hello.txt\0"), 4096);
    assert_eq!(err, Some(0));

    const GETATTR: u32 = 3;
    const SETXATTR: u32 = 21;
    const GETXATTR: u32 = 22;
    const READ: u32 = 15;
    const WRITE: u32 = 16;
    const BATCH_FORGET: u32 = 42;
    const IOCTL: u32 = 39;
    const MKNOD: u32 = 8;
    const LINK: u32 = 13;
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "length beyond the chain",
            request(4096, FUSE_LOOKUP, 10, 1, b"hello.txt\0"),
            4096,
        ),
        (
            "length shorter than the header",
            request(8, GETATTR, 11, 1, &[0; 16]),
            4096,
        ),
        (
            "length of 16 MiB",
            request(16 << 20, GETATTR, 12, 1, &[0; 16]),
            4096,
        ),
        (
            "GETATTR without its argument",
            well_formed(GETATTR, 13, 1, &[]),
            4096,
        ),
        (
            "name without a NUL",
            well_formed(FUSE_LOOKUP, 14, 1, b"hello.txt"),
            4096,
        ),
        ("empty name", well_formed(FUSE_LOOKUP, 15, 1, b"\0"), 4096),
        ("unknown opcode", well_formed(9999, 16, 1, &[0; 64]), 4096),
        (
            "unknown node",
            well_formed(GETATTR, 17, 0xdead_beef, &[0; 16]),
            4096,
        ),
        (
            "READ of a handle never opened",
            {
                let mut b = Vec::new();
                for v in [7u64, 0] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&(1u32 << 20).to_le_bytes());
                b.extend_from_slice(&[0; 20]);
                well_formed(READ, 18, 2, &b)
            },
            4096,
        ),
        (
            "WRITE of 1 MiB with 10 bytes",
            {
                let mut b = Vec::new();
                for v in [7u64, 0] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&(1u32 << 20).to_le_bytes());
                b.extend_from_slice(&[0; 20]);
                b.extend_from_slice(&[b'x'; 10]);
                well_formed(WRITE, 19, 2, &b)
            },
            4096,
        ),
        (
            "BATCH_FORGET of 4 billion nodes",
            {
                let mut b = u32::MAX.to_le_bytes().to_vec();
                b.extend_from_slice(&[0; 4 + 32]);
                well_formed(BATCH_FORGET, 20, 0, &b)
            },
            4096,
        ),
        (
            "IOCTL with a 4 GiB input",
            {
                let mut b = vec![0u8; 8 + 4 + 4 + 8];
                b.extend_from_slice(&u32::MAX.to_le_bytes());
                b.extend_from_slice(&u32::MAX.to_le_bytes());
                well_formed(IOCTL, 21, 1, &b)
            },
            4096,
        ),
        (
            "SETXATTR (xattrs are off)",
            {
                let mut b = Vec::new();
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(b"security.capability\0abcd");
                well_formed(SETXATTR, 22, 1, &b)
            },
            4096,
        ),
        (
            "GETXATTR (xattrs are off)",
            {
                let mut b = 64u32.to_le_bytes().to_vec();
                b.extend_from_slice(&[0; 4]);
                b.extend_from_slice(b"trusted.x\0");
                well_formed(GETXATTR, 23, 1, &b)
            },
            4096,
        ),
        (
            "a reply buffer too small for the reply",
            well_formed(FUSE_LOOKUP, 24, 1, b"hello.txt\0"),
            20,
        ),
        (
            "a reply buffer smaller than a header",
            well_formed(GETATTR, 25, 1, &[0; 16]),
            8,
        ),
        ("no reply buffer", well_formed(GETATTR, 26, 1, &[0; 16]), 0),
        (
            "LINK of a node that does not exist",
            {
                let mut b = 0x7777u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"stolen\0");
                well_formed(LINK, 27, 1, &b)
            },
            4096,
        ),
    ];
    for (what, req, reply_len) in &cases {
        let (len, err) = d.raw(req, *reply_len);
        eprintln!("{what}: used {len}, error {err:?}");
        if let Some(e) = err {
            assert!(e <= 0, "{what}: error field {e}");
        }
        // Still serving, correctly.
        let (_, err, unique) = d.fuse(FUSE_LOOKUP, 1, 100, b"hello.txt\0");
        assert_eq!((err, unique), (0, 100), "after {what}");
    }
    // Specific answers where there is one to give.
    let (_, err) = d.raw(&well_formed(9999, 30, 1, &[]), 4096);
    assert_eq!(err, Some(-libc::ENOSYS), "unknown opcode");
    let (_, err) = d.raw(&cases[12].1, 4096);
    assert_eq!(err, Some(-libc::ENOSYS), "setxattr with xattrs off");
    assert!(
        std::fs::read_dir(&share).unwrap().count() == 2,
        "nothing created"
    );

    // Block and character devices cannot be made in the share (the VMM
    // runs as root: a device node there would open the host's device for
    // any host process that opens it). FIFOs and plain nodes can.
    let mknod = |mode: u32, rdev: u32, name: &str| {
        let mut b = Vec::new();
        for v in [mode, rdev, 0o022, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        well_formed(MKNOD, 40, 1, &b)
    };
    let sda = libc::makedev(8, 0) as u32;
    let (_, err) = d.raw(&mknod(libc::S_IFBLK | 0o600, sda, "disk"), 4096);
    assert_eq!(err, Some(-libc::EPERM), "block device");
    let (_, err) = d.raw(
        &mknod(libc::S_IFCHR | 0o666, libc::makedev(1, 1) as u32, "mem"),
        4096,
    );
    assert_eq!(err, Some(-libc::EPERM), "character device");
    assert!(!share.join("disk").exists() && !share.join("mem").exists());
    let (_, err) = d.raw(&mknod(libc::S_IFIFO | 0o644, 0, "fifo"), 4096);
    assert_eq!(err, Some(0), "fifo");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(share.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    // Garbage: 3,000 requests of random opcodes, nodes and bodies (a fixed
    // seed). Some succeed (all inside the share); none may stop the device.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000u64 {
        let r = next();
        let opcode = (r % 56) as u32;
        if opcode == FUSE_INIT || opcode == 38 {
            continue; // INIT and DESTROY would only reset the share.
        }
        let nodeid = match (r >> 8) % 5 {
            0 => 0,
            1 => 1,
            2 => 2,
            3 => 3,
            _ => next(),
        };
        let body: Vec<u8> = (0..(r >> 16) % 160).map(|_| next() as u8).collect();
        let len = match (r >> 24) % 4 {
            0 => next() as u32,
            _ => 40 + body.len() as u32,
        };
        let reply_len = [4096, 16, 0, 100][((r >> 32) % 4) as usize];
        d.raw(&request(len, opcode, 1000 + i, nodeid, &body), reply_len);
    }
    let (_, err, unique) = d.fuse(FUSE_LOOKUP, 1, 99_999, b"hello.txt\0");
    assert_eq!(
        (err, unique),
        (0, 99_999),
        "still serving after the garbage"
    );
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host only");
}

/// What the guest's open_by_handle_at(2) on the virtio-fs mount can do: the
/// kernel's FUSE export operations ask the server to resolve a handle (a
/// node id) only when INIT offered FUSE_EXPORT_SUPPORT, and then with a
/// LOOKUP of "." in that node (and ".." for its parent). The device offers
/// no export support even when the guest asks for it, and refuses those
/// lookups on every node, so handles resolve only to inodes the guest
/// already holds, which are in the share. (busybox has no applet calling
/// name_to_handle_at, so this is the device's side of it.)
#[test]
fn file_handles_cannot_reach_outside_the_share() {
    const FUSE_EXPORT_SUPPORT: u32 = 1 << 4;
    let dir = TempDir::new("vmm-fs-handles");
    let share = dir.0.join("share");
    std::fs::create_dir_all(share.join("sub/deeper")).unwrap();
    let mut d = Driver::new(&share);
    // INIT 7.31 asking for every flag, export support included (but
    // FUSE_INIT_EXT, which would need the longer fuse_init_in).
    let mut init = Vec::new();
    for v in [7u32, 31, 0x20000, !(1 << 30)] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let (len, err, _) = d.fuse(FUSE_INIT, 0, 1, &init);
    assert_eq!(err, 0);
    assert!(len >= 16 + 16);
    let out = d.reply_body(16);
    let flags = u32::from_le_bytes(out[12..16].try_into().unwrap());
    assert_eq!(flags & FUSE_EXPORT_SUPPORT, 0, "INIT flags {flags:#x}");
    // The node ids of sub and sub/deeper.
    let (_, err, _) = d.fuse(FUSE_LOOKUP, 1, 2, b"sub\0");
    assert_eq!(err, 0);
    let sub = u64::from_le_bytes(d.reply_body(8)[..8].try_into().unwrap());
    let (_, err, _) = d.fuse(FUSE_LOOKUP, sub, 3, b"deeper\0");
    assert_eq!(err, 0);
    let deeper = u64::from_le_bytes(d.reply_body(8)[..8].try_into().unwrap());
    assert!(sub > 1 && deeper > sub);
    // What fuse_get_dentry (".") and fuse_get_parent ("..") would send.
    for (i, node) in [1, sub, deeper].into_iter().enumerate() {
        for (j, name) in [&b".\0"[..], b"..\0"].into_iter().enumerate() {
            let unique = 10 + 2 * i as u64 + j as u64;
            assert_eq!(
                d.fuse(FUSE_LOOKUP, node, unique, name),
                (16, -libc::EACCES, unique),
                "node {node} {:?}",
                String::from_utf8_lossy(name)
            );
        }
    }
}

/// OPEN replies carry FOPEN_KEEP_CACHE exactly when the file is unchanged
/// on the host since the guest's previous open of its inode (so the guest
/// keeps the pages it read: no invalidation, no second READ), and not on
/// the first open, after a change on the host, or after the inode was
/// forgotten. Opens of unknown nodeids fail and are not remembered.
#[test]
fn open_keeps_the_guest_cache_only_for_unchanged_files() {
    const FUSE_FORGET: u32 = 2;
    const FUSE_OPEN: u32 = 14;
    const FUSE_RELEASE: u32 = 18;
    const FOPEN_KEEP_CACHE: u32 = 2;
    let dir = TempDir::new("vmm-fs-keep-cache");
    let share = dir.0.join("share");
    std::fs::create_dir(&share).unwrap();
    let file = share.join("bin");
    std::fs::write(&file, "version 1").unwrap();
    let mut d = Driver::new(&share);
    d.init(1);
    let mut unique = 10;
    let mut lookup = |d: &mut Driver| {
        unique += 1;
        let (_, err, _) = d.fuse(FUSE_LOOKUP, 1, unique, b"bin\0");
        assert_eq!(err, 0);
        u64::from_le_bytes(d.reply_body(8)[..8].try_into().unwrap())
    };
    let node = lookup(&mut d);
    // OPEN (fuse_open_in: flags, open_flags) then RELEASE; returns the
    // reply's open_flags (fuse_open_out: fh, open_flags, padding).
    let open = |d: &mut Driver, node: u64| -> Result<u32, i32> {
        let mut body = (libc::O_RDONLY as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        let (len, err, _) = d.fuse(FUSE_OPEN, node, 100, &body);
        if err != 0 {
            return Err(err);
        }
        assert_eq!(len, 16 + 16);
        let out = d.reply_body(16);
        let fh = u64::from_le_bytes(out[..8].try_into().unwrap());
        let flags = u32::from_le_bytes(out[8..12].try_into().unwrap());
        // fuse_release_in: fh, flags, release_flags, lock_owner.
        let mut rel = fh.to_le_bytes().to_vec();
        rel.extend_from_slice(&[0u8; 16]);
        assert_eq!(d.fuse(FUSE_RELEASE, node, 101, &rel).1, 0);
        Ok(flags)
    };
    let keeps = |d: &mut Driver, node: u64| open(d, node).unwrap() & FOPEN_KEEP_CACHE != 0;

    assert!(
        !keeps(&mut d, node),
        "first open: the guest's cache is dropped"
    );
    assert!(keeps(&mut d, node), "second open of an unchanged file");
    assert!(keeps(&mut d, node), "third open of an unchanged file");
    // A change of the same size on the host: dropped at the next open.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&file, "version 2").unwrap();
    assert!(!keeps(&mut d, node), "changed on the host");
    assert!(keeps(&mut d, node), "unchanged since the last open");
    // Replaced by another file under the same name: a new inode for the
    // guest (its old one still opens the old file, unchanged).
    std::fs::write(share.join("new"), "version 3").unwrap();
    std::fs::rename(share.join("new"), &file).unwrap();
    let replaced = lookup(&mut d);
    assert_ne!(replaced, node);
    assert!(!keeps(&mut d, replaced), "first open of the new file");
    // Forgotten: the next open of the inode drops the cache.
    // fuse_forget_in: nlookup (one LOOKUP of it). FORGET has no reply.
    d.fuse(FUSE_FORGET, replaced, 102, &1u64.to_le_bytes());
    let again = lookup(&mut d);
    assert!(!keeps(&mut d, again), "first open after a forget");
    // Nodeids the guest makes up.
    for bogus in [0, 0xdead_beef, u64::MAX] {
        assert!(open(&mut d, bogus).is_err(), "nodeid {bogus:#x}");
    }
    assert!(keeps(&mut d, again), "still serving");
}
/// A READ or WRITE whose flags differ from the handle's (the guest's
/// `fcntl(F_SETFL)`) where the host cannot apply them (clearing `O_APPEND`
/// on an append-only file) once closed the handle's descriptor under it in
/// fuse-backend-rs's passthrough: the next file the VMM opened took its
/// number, and the guest's handle read that file. Each request goes on with
/// the handle's own flags.
#[test]
fn a_guests_flags_never_close_a_handles_descriptor() {
    const FUSE_OPEN: u32 = 14;
    const FUSE_READ: u32 = 15;
    const FUSE_WRITE: u32 = 16;
    const FUSE_RELEASE: u32 = 18;
    // linux/fs.h: FS_IOC_SETFLAGS and the append-only flag.
    const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
    const FS_APPEND_FL: libc::c_long = 0x20;
    let dir = TempDir::new("vmm-fs-flags");
    let share = dir.0.join("share");
    std::fs::create_dir(&share).unwrap();
    let log = share.join("log");
    std::fs::write(&log, "0123").unwrap();
    std::fs::write(share.join("other"), "other file").unwrap();
    let set_append_only = |on: bool| {
        let f = std::fs::File::open(&log).unwrap();
        let flags: libc::c_long = if on { FS_APPEND_FL } else { 0 };
        // SAFETY: FS_IOC_SETFLAGS reads one long from the pointer, which
        // lives across the call; the result is checked.
        let rc =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), FS_IOC_SETFLAGS, &flags) };
        assert_eq!(rc, 0, "chattr: {}", std::io::Error::last_os_error());
    };
    set_append_only(true);
    // The attribute comes off again even when an assertion fails, or the
    // directory could not be removed.
    struct Clear<F: Fn(bool)>(F);
    impl<F: Fn(bool)> Drop for Clear<F> {
        fn drop(&mut self) {
            (self.0)(false)
        }
    }
    let _clear = Clear(set_append_only);

    let mut d = Driver::new(&share);
    d.init(1);
    let lookup = |d: &mut Driver, name: &[u8]| {
        let (_, err, _) = d.fuse(FUSE_LOOKUP, 1, 2, name);
        assert_eq!(err, 0);
        u64::from_le_bytes(d.reply_body(8)[..8].try_into().unwrap())
    };
    let open = |d: &mut Driver, node: u64, flags: i32| {
        let mut body = (flags as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        let (_, err, _) = d.fuse(FUSE_OPEN, node, 3, &body);
        assert_eq!(err, 0, "open");
        u64::from_le_bytes(d.reply_body(8)[..8].try_into().unwrap())
    };
    // fuse_read_in / fuse_write_in: fh, offset, size, read/write flags,
    // lock_owner, flags, padding.
    let io_in = |fh: u64, offset: u64, size: u32, flags: i32| {
        let mut b = fh.to_le_bytes().to_vec();
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(flags as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    };
    let read = |d: &mut Driver, node: u64, fh: u64| {
        let (len, err, _) = d.fuse(FUSE_READ, node, 4, &io_in(fh, 0, 64, libc::O_RDONLY));
        assert_eq!(err, 0, "read");
        String::from_utf8(d.reply_body(len as usize - 16)).unwrap()
    };
    let release = |d: &mut Driver, node: u64, fh: u64| {
        let mut rel = fh.to_le_bytes().to_vec();
        rel.extend_from_slice(&[0u8; 16]);
        assert_eq!(d.fuse(FUSE_RELEASE, node, 5, &rel).1, 0, "release");
    };

    let node = lookup(&mut d, b"log\0");
    let other = lookup(&mut d, b"other\0");
    // Opened for appending; read without O_APPEND in the flags.
    let fh = open(&mut d, node, libc::O_RDONLY | libc::O_APPEND);
    assert_eq!(read(&mut d, node, fh), "0123");
    // The next descriptor the VMM opens (the number a closed one frees).
    let other_fh = open(&mut d, other, libc::O_RDONLY);
    assert_eq!(
        read(&mut d, node, fh),
        "0123",
        "the handle still reads its file"
    );
    assert_eq!(read(&mut d, other, other_fh), "other file");
    // A write opened with O_APPEND, sent without it.
    let wfh = open(&mut d, node, libc::O_WRONLY | libc::O_APPEND);
    let mut body = io_in(wfh, 4, 2, libc::O_WRONLY);
    body.extend_from_slice(b"45");
    let (_, err, _) = d.fuse(FUSE_WRITE, node, 6, &body);
    assert_eq!(err, 0, "write");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "012345");
    for (n, h) in [(node, fh), (other, other_fh), (node, wfh)] {
        release(&mut d, n, h);
    }
    // A handle the guest makes up, or one released, is refused.
    for bogus in [fh, 0xdead_beef] {
        let (_, err, _) = d.fuse(FUSE_READ, node, 7, &io_in(bogus, 0, 8, 0));
        assert_eq!(err, -libc::EBADF, "handle {bogus:#x}");
    }
}

// ---- end to end -----------------------------------------------------------

/// A build artifact: `$var` (as scripts/test.sh exports it), or the path
/// the build script prints.
fn artifact(var: &str, script: &str, args: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let out = Command::new("bash")
        .arg(root.join(script))
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && p.is_file()).then_some(p)
}

/// A bind mount on the host, undone (lazily) when dropped.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &Path, target: &Path) -> Self {
        let status = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .status()
            .unwrap();
        assert!(status.success(), "mount --bind (run the tests as root)");
        BindMount(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect(uds: &Path, deadline: Instant) -> UnixStream {
    loop {
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            if s.write_all(b"CONNECT 1024\n").is_ok() {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    if b[0] == b'\n' {
                        break;
                    }
                    line.push(b[0]);
                }
                if line.starts_with(b"OK ") {
                    return s;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not answer on vsock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(s: &mut UnixStream, json: &str) {
    let mut frame = (json.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(json.as_bytes());
    s.write_all(&frame).unwrap();
}

fn recv(s: &mut UnixStream) -> String {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

fn hello(uds: &Path, json: &str) -> UnixStream {
    let mut s = connect(uds, Instant::now() + Duration::from_secs(60));
    send(&mut s, json);
    let reply = recv(&mut s);
    assert!(reply.contains("\"ok\""), "hello refused: {reply}");
    s
}

/// Runs `script` with `sh -c` in the guest; returns its output (stdout and
/// stderr) and its exit code.
fn run(uds: &Path, id: u64, script: &str) -> (String, i32) {
    let mut c = hello(uds, r#"{"control":{"version":2}}"#);
    let argv = serde_json::json!(["sh", "-c", format!("{script} 2>&1")]);
    send(
        &mut c,
        &format!(
            r#"{{"id":{id},"body":{{"exec":{{"argv":{argv},"env":["PATH=/bin:/sbin"],"cwd":null,"uid":0,"gid":0,"tty":null,"stdin":false,"stdout":true,"stderr":false}}}}}}"#
        ),
    );
    let started: serde_json::Value = serde_json::from_str(&recv(&mut c)).unwrap();
    let exec_id = started["body"]["started"]["exec_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("exec failed: {started}"));
    let mut out = hello(
        uds,
        &format!(r#"{{"stream":{{"version":2,"exec_id":{exec_id},"stream":"stdout"}}}}"#),
    );
    let mut stdout = String::new();
    out.read_to_string(&mut stdout).unwrap();
    send(
        &mut c,
        &format!(
            r#"{{"id":{},"body":{{"wait":{{"exec_id":{exec_id}}}}}}}"#,
            id + 1
        ),
    );
    let waited: serde_json::Value = serde_json::from_str(&recv(&mut c)).unwrap();
    let code = waited["body"]["exited"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("wait: {waited}"));
    (stdout, code as i32)
}

#[test]
fn guest_mounts_reads_and_writes_the_share_and_cannot_leave_it() {
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
    let kernel = artifact("RTV_KERNEL", "guest-kernel/build.sh", &[])
        .expect("the guest kernel (RTV_KERNEL or guest-kernel/build.sh)");
    let initrd = artifact("RTV_TEST_INITRAMFS", "rootfs-builder/build.sh", &["--test"])
        .expect("the test initramfs (RTV_TEST_INITRAMFS or rootfs-builder/build.sh --test)");
    let tmp = TempDir::new("vmm-fs-e2e");
    let share = tmp.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    let uds = tmp.0.join("vsock.sock");
    // Snapshotted at readiness, before the share is mounted; restored at
    // the end with another directory.
    let snap = tmp.0.join("snap");
    let vmm = Vmm(Command::new(env!("CARGO_BIN_EXE_rtv-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&share)
        .arg("--snapshot-on-ready")
        .arg(&snap)
        .args(["--after-snapshot", "resume"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap());

    let boot = Instant::now();
    let (_, code) = run(&uds, 1, "true");
    eprintln!(
        "agent answered {} ms after start",
        boot.elapsed().as_millis()
    );
    assert_eq!(code, 0);
    // The snapshot must be written before the guest mounts the share.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !snap.join("state.json").exists() {
        assert!(Instant::now() < deadline, "no snapshot at readiness");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let (_, code) = run(&uds, 3, "true");
    let exec_only = t.elapsed();
    assert_eq!(code, 0);

    let t = Instant::now();
    let (out, code) = run(
        &uds,
        5,
        "read t0 x < /proc/uptime; mkdir -p /mnt && mount -t virtiofs rtvfs /mnt && \
         read t1 x < /proc/uptime && cat /mnt/hello.txt && read t2 x < /proc/uptime && \
         echo written > /mnt/out.txt && read t3 x < /proc/uptime && echo $t0 $t1 $t2 $t3 > /tmp/t",
    );
    let mount_read = t.elapsed();
    assert_eq!(code, 0, "guest output: {out}");
    assert_eq!(out, "hello from the host\n");
    assert_eq!(
        std::fs::read_to_string(share.join("out.txt")).unwrap(),
        "written\n"
    );
    eprintln!(
        "virtio-fs mount + read + write: {} ms (a bare exec: {} ms)",
        mount_read.as_millis(),
        exec_only.as_millis()
    );

    // Close-to-open: the guest has hello.txt's pages cached from the read
    // above; the host rewrites it with the same size (so only the device's
    // OPEN reply, without FOPEN_KEEP_CACHE for a changed file, makes the
    // guest drop them). The next open in the guest reads the new content.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(share.join("hello.txt"), "HELLO FROM THE HOST\n").unwrap();
    let (out, code) = run(&uds, 11, "cat /mnt/hello.txt");
    assert_eq!((out.as_str(), code), ("HELLO FROM THE HOST\n", 0));

    let (times, _) = run(&uds, 13, "cat /tmp/t");
    let t: Vec<f64> = times
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if t.len() == 4 {
        eprintln!(
            "in the guest: mount {:.0} ms, first read {:.0} ms, create+write {:.0} ms",
            (t[1] - t[0]) * 1000.0,
            (t[2] - t[1]) * 1000.0,
            (t[3] - t[2]) * 1000.0
        );
    }

    // Escapes. Paths are resolved by the guest in its own namespace; the
    // device never follows a symlink on the host, refuses `..`, and link(2)
    // and rename(2) cannot cross the mount. Symlinks made on the host
    // (absolute to /etc and /proc, relative up past the share) and in the
    // guest; a hard link each way; a move to `../x`.
    std::os::unix::fs::symlink("/etc", share.join("host-etc")).unwrap();
    std::os::unix::fs::symlink("/proc", share.join("host-proc")).unwrap();
    std::os::unix::fs::symlink("../../..", share.join("up")).unwrap();
    let (out, _) = run(
        &uds,
        7,
        "echo '#dotdot'; cat /mnt/../../etc/hostname; ls /mnt/..; \
         echo '#guest-link'; ln -s /etc /mnt/esc && cat /mnt/esc/hostname; ls /mnt/esc/; \
         echo '#host-etc'; cat /mnt/host-etc/hostname; ls /mnt/host-etc/; \
         echo '#host-proc'; cat /mnt/host-proc/version; \
         echo '#up'; ls /mnt/up/; \
         echo '#root'; ls /; \
         echo '#hardlink'; ln /init /mnt/hard-in; echo in=$?; ln /mnt/hello.txt /hard-out; echo out=$?; \
         echo '#rename'; echo victim > /mnt/victim && mv /mnt/victim /mnt/../x; echo mv=$?; cat /x; \
         echo '#ls'; ls -a /mnt",
    );
    let section = |name: &str| -> String {
        let marker = format!("#{name}\n");
        let start = out
            .find(&marker)
            .unwrap_or_else(|| panic!("no {marker:?} in {out}"))
            + marker.len();
        let rest = &out[start..];
        rest[..rest.find("\n#").map_or(rest.len(), |i| i + 1)].to_string()
    };
    eprintln!("escape attempts, as the guest saw them:\n{out}");
    assert_eq!(
        std::fs::read_link(share.join("esc")).unwrap(),
        Path::new("/etc"),
        "the guest made the symlink in the share"
    );
    let ls = section("ls");
    for name in ["hello.txt", "out.txt", "esc", "host-etc", "up"] {
        assert!(ls.lines().any(|l| l == name), "{name} in {ls}");
    }
    // `..` and the links to /etc: never the host's /etc.
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host_etc_names = std::fs::read_dir("/etc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() > 6)
        .collect::<Vec<_>>();
    for name in ["dotdot", "guest-link", "host-etc"] {
        let out = section(name);
        if !host_hostname.trim().is_empty() {
            assert!(
                !out.contains(host_hostname.trim()),
                "{name}: the guest read the host's /etc/hostname: {out}"
            );
        }
        // The host's /etc listing is not what the guest sees either (names
        // only the host has).
        let leaked = host_etc_names
            .iter()
            .filter(|n| out.lines().any(|l| l.trim() == n.as_str()))
            .count();
        assert!(leaked < 3, "{name}: host /etc names in the guest: {out}");
    }
    // The host's symlink to /proc gives the guest's own /proc: another
    // kernel than the host's.
    let host_version = std::fs::read_to_string("/proc/version").unwrap();
    let guest_version = section("host-proc");
    assert!(
        guest_version.starts_with("Linux version"),
        "{guest_version}"
    );
    assert_ne!(guest_version, host_version, "the host's /proc/version");
    // `../../..` from the share is the guest's root, not the host's.
    assert_eq!(section("up"), section("root"), "the guest's / listing");
    assert!(section("root").lines().any(|l| l == "init"));
    // link(2) across the mount fails both ways.
    let hard = section("hardlink");
    assert!(
        hard.lines().any(|l| l.starts_with("in=") && l != "in=0")
            && hard.lines().any(|l| l.starts_with("out=") && l != "out=0"),
        "{hard}"
    );
    assert!(!share.join("hard-in").exists());
    // rename(2) to `../x` cannot cross the mount: busybox mv then copies
    // into the guest's own / and removes the file from the share; nothing
    // lands next to the share on the host.
    let moved = section("rename");
    assert!(
        moved.contains("mv=0") && moved.contains("victim"),
        "{moved}"
    );
    assert!(!tmp.0.join("x").exists(), "the move reached the host");
    assert!(!share.join("victim").exists());

    // A bind mount the host adds under the share after the guest mounted
    // it is visible to the guest (the host chose to put it there).
    let bind_src = tmp.0.join("bind-src");
    std::fs::create_dir(&bind_src).unwrap();
    std::fs::write(bind_src.join("bound.txt"), "bound by the host\n").unwrap();
    std::fs::create_dir(share.join("bound")).unwrap();
    let _bind = BindMount::new(&bind_src, &share.join("bound"));
    let (out, code) = run(&uds, 9, "cat /mnt/bound/bound.txt");
    assert_eq!((out.as_str(), code), ("bound by the host\n", 0));
    drop(vmm);

    // The snapshot taken before the mount, restored with another share.
    let new_share = tmp.0.join("new-share");
    std::fs::create_dir(&new_share).unwrap();
    std::fs::write(
        new_share.join("only-in-new.txt"),
        "the new sandbox's share\n",
    )
    .unwrap();
    let restore = |args: &[&std::ffi::OsStr]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtv-vmm"));
        cmd.arg("--restore").arg(&snap).args(args);
        cmd
    };
    let uds2 = tmp.0.join("vsock2.sock");
    let out = restore(&["--vsock-uds".as_ref(), uds2.as_os_str()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--shared-dir"), "{stderr}");
    let t = Instant::now();
    let restored = Vmm(restore(&[
        "--vsock-uds".as_ref(),
        uds2.as_os_str(),
        "--shared-dir".as_ref(),
        new_share.as_os_str(),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap());
    let (out, code) = run(
        &uds2,
        1,
        "mkdir -p /mnt && mount -t virtiofs rtvfs /mnt && cat /mnt/only-in-new.txt && ls /mnt",
    );
    eprintln!(
        "restored, mounted the new share and read it in {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(code, 0, "guest output: {out}");
    assert_eq!(out, "the new sandbox's share\nonly-in-new.txt\n");
    drop(restored);
}

/// A tiny guest (`jmp $`) with a virtio-fs device that the test drives
/// through the VM's MMIO bus, as the guest's driver would.
fn tiny_fs_vm(share: &Path) -> (Driver, rtv_vmm::VmController, JoinHandle<VmExit>) {
    let config = MachineConfig {
        mem_size_mib: 16,
        devices: vec![DeviceConfig::Fs(FsConfig::new(share))],
        ..Default::default()
    };
    assert_eq!(
        rtv_vmm::vm::virtio_cmdline_entries(&config).len(),
        1,
        "the device is on the kernel command line"
    );
    let mut vm = Vm::new(&config, Box::new(std::io::sink())).expect("create VM");
    // Real mode at 0x1000: jmp $.
    vm.memory()
        .write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_entry(BootEntry::RealMode { cs: 0, ip: 0x1000 })
        .unwrap();
    assert_eq!(vm.cmdline_entries().len(), 1);
    let mem = vm.memory().clone();
    let bus = vm.mmio_bus_mut().clone();
    let controller = vm.controller();
    let thread = std::thread::spawn(move || vm.run().expect("run VM"));
    let base = MmioSlot::nth(0).unwrap().base;
    (Driver::in_vm(mem, bus, base), controller, thread)
}

/// Restores `snap` with `shared_dir`; the driver goes on from the saved rings.
fn restore_fs_vm(
    snap: &Path,
    shared_dir: &Path,
) -> (Driver, rtv_vmm::VmController, JoinHandle<VmExit>) {
    let config = RestoreConfig {
        shared_dir: Some(shared_dir.to_path_buf()),
        ..Default::default()
    };
    let mut vm = Vm::restore(snap, &config, Box::new(std::io::sink())).expect("restore VM");
    let mem = vm.memory().clone();
    let bus = vm.mmio_bus_mut().clone();
    let controller = vm.controller();
    let thread = std::thread::spawn(move || vm.run().expect("run VM"));
    let base = MmioSlot::nth(0).unwrap().base;
    (Driver::resumed(mem, bus, base), controller, thread)
}

fn restore_err(snap: &Path, shared_dir: Option<&Path>) -> String {
    let config = RestoreConfig {
        shared_dir: shared_dir.map(Path::to_path_buf),
        ..Default::default()
    };
    match Vm::restore(snap, &config, Box::new(std::io::sink())) {
        Ok(_) => panic!("{} restored with shared_dir {shared_dir:?}", snap.display()),
        Err(e) => e.to_string(),
    }
}

/// LOOKUP of `name` in the root: (error, size of the file found).
fn lookup_size(d: &mut Driver, unique: u64, name: &str) -> (i32, u64) {
    let body = format!("{name}\0");
    let (len, err, uniq) = d.fuse(FUSE_LOOKUP, 1, unique, body.as_bytes());
    assert_eq!(uniq, unique);
    if err != 0 {
        return (err, 0);
    }
    // fuse_entry_out: nodeid, generation, entry_valid, attr_valid (u64),
    // two u32 nsecs, then fuse_attr: ino, size.
    assert!(len >= 16 + 40 + 16, "LOOKUP reply of {len} bytes");
    let body = d.reply_body(40 + 16);
    (0, u64::from_le_bytes(body[48..56].try_into().unwrap()))
}

#[test]
fn an_unmounted_share_is_snapshotted_and_restored_with_another_directory() {
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
    let dir = TempDir::new("vmm-fs-snap");
    let (old, new) = (dir.0.join("old"), dir.0.join("new"));
    std::fs::create_dir(&old).unwrap();
    std::fs::create_dir(&new).unwrap();
    std::fs::write(old.join("only-in-old"), "old").unwrap();
    std::fs::write(new.join("only-in-new"), "the new share").unwrap();

    // Driver set up, device active, no FUSE request: the snapshot is taken.
    let (mut d, controller, thread) = tiny_fs_vm(&old);
    let snap = dir.0.join("snap");
    controller
        .snapshot(&snap, AfterSnapshot::Resume)
        .expect("snapshot of a VM whose share is not mounted");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["devices"],
        serde_json::json!([{"kind": "fs", "tag": "rtvfs"}])
    );
    // Once the guest has sent FUSE_INIT (mounted), no more snapshots.
    d.init(1);
    assert_eq!(lookup_size(&mut d, 2, "only-in-old"), (0, 3));
    let refused = dir.0.join("refused");
    let err = controller
        .snapshot(&refused, AfterSnapshot::Resume)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("virtio-fs") && err.contains("2 FUSE requests served"),
        "{err}"
    );
    assert!(!refused.join("state.json").exists());
    // The VM goes on serving after the refusal.
    assert_eq!(lookup_size(&mut d, 3, "only-in-old"), (0, 3));
    controller.stop();
    assert_eq!(thread.join().unwrap(), VmExit::Stopped);

    // The snapshot's device needs a directory, and gets the new one.
    let err = restore_err(&snap, None);
    assert!(err.contains("--shared-dir"), "{err}");
    let err = restore_err(&snap, Some(&dir.0.join("missing")));
    assert!(err.contains("missing"), "{err}");
    let (mut d, controller, thread) = restore_fs_vm(&snap, &new);
    d.init(1);
    assert_eq!(lookup_size(&mut d, 2, "only-in-new"), (0, 13));
    assert_eq!(lookup_size(&mut d, 3, "only-in-old").0, -libc::ENOENT);
    // A restored VM whose share is mounted refuses too.
    let err = controller
        .snapshot(&refused, AfterSnapshot::Resume)
        .unwrap_err();
    assert!(err.to_string().contains("FUSE requests served"), "{err}");
    controller.stop();
    assert_eq!(thread.join().unwrap(), VmExit::Stopped);

    // A snapshot without a virtio-fs device refuses a directory.
    let vm = Vm::new(
        &MachineConfig {
            mem_size_mib: 16,
            ..Default::default()
        },
        Box::new(std::io::sink()),
    )
    .unwrap();
    vm.memory()
        .write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_entry(BootEntry::RealMode { cs: 0, ip: 0x1000 })
        .unwrap();
    let controller = vm.controller();
    let thread = std::thread::spawn(move || vm.run().expect("run VM"));
    let plain = dir.0.join("plain");
    controller.snapshot(&plain, AfterSnapshot::Exit).unwrap();
    assert_eq!(thread.join().unwrap(), VmExit::Snapshotted);
    let err = restore_err(&plain, Some(&new));
    assert!(
        err.contains("no virtio-fs device") && err.contains("--shared-dir"),
        "{err}"
    );
}

/// A small xorshift generator: the fuzz run is a function of its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// A number for a request's field: mostly small, sometimes an edge value
/// (only small ones with `bounded`, for lengths and offsets that could
/// make the host write gigabytes).
fn number(rng: &mut Rng, bounded: bool) -> u64 {
    match rng.below(if bounded { 3 } else { 5 }) {
        0 => rng.below(16),
        1 => rng.below(1 << 20),
        2 => rng.pick(&[0, 1, 4095, 4096, 65536]),
        3 => rng.pick(&[u64::from(u32::MAX), u64::MAX, 1 << 63, u64::MAX - 4095]),
        _ => rng.next(),
    }
}

/// The shape of a FUSE request's argument: its fields in order.
#[derive(Clone, Copy)]
enum Field {
    /// A 32-bit number (bounded: small only).
    U32(bool),
    /// A 64-bit number (bounded: small only).
    U64(bool),
    /// A mode with a file type.
    Mode,
    /// A node id, mostly one a reply gave.
    Node,
    /// A file handle, mostly one a reply gave.
    Fh,
    /// A NUL-terminated name.
    Name,
    /// Data of any length.
    Data,
}

/// The argument of `opcode` (protocol 7.31) as FUSE lays it out, for the
/// requests the passthrough serves; `None` for the others. Lengths and
/// offsets that could make the host allocate or copy gigabytes
/// (FALLOCATE, COPY_FILE_RANGE, a SETATTR size) stay small.
fn shape(opcode: u32) -> Option<Vec<Field>> {
    use Field::*;
    let read_in = vec![
        Fh,
        U64(false),
        U32(true),
        U32(false),
        U64(false),
        U32(false),
        U32(false),
    ];
    Some(match opcode {
        1 | 10 | 11 => vec![Name],
        2 => vec![U64(false)],
        3 => vec![U32(false), U32(false), Fh],
        4 => vec![
            U32(false),
            U32(false),
            Fh,
            U64(true),
            U64(false),
            U64(false),
            U64(false),
            U64(false),
            U32(false),
            U32(false),
            U32(false),
            Mode,
            U32(false),
            U32(false),
            U32(false),
            U32(false),
        ],
        5 | 17 => vec![],
        6 => vec![Name, Name],
        8 => vec![Mode, U32(false), U32(true), U32(false), Name],
        9 => vec![Mode, U32(true), Name],
        12 => vec![Node, Name, Name],
        13 => vec![Node, Name],
        14 | 27 => vec![U32(false), U32(false)],
        15 | 28 | 44 => read_in,
        16 => {
            let mut w = read_in;
            w.push(Data);
            w
        }
        18 | 29 => vec![Fh, U32(false), U32(false), U64(false)],
        20 | 30 => vec![Fh, U32(false), U32(false)],
        25 => vec![Fh, U32(false), U32(false), U64(false)],
        34 => vec![U32(true), U32(false)],
        35 => vec![U32(false), Mode, U32(true), U32(false), Name],
        43 => vec![Fh, U64(true), U64(true), U32(false), U32(false)],
        45 => vec![Node, U32(true), U32(false), Name, Name],
        46 => vec![Fh, U64(false), U32(true), U32(false)],
        47 => vec![Fh, U64(true), Node, Fh, U64(true), U64(true), U64(false)],
        _ => return None,
    })
}

/// A structure-aware random FUSE request body: mostly `opcode`'s own
/// layout ([`shape`]) with random values, node ids and handles the
/// replies gave, hostile names among the names; otherwise fields of the
/// shapes FUSE uses in any order.
fn random_body(rng: &mut Rng, opcode: u32, nodes: &[u64], handles: &[u64]) -> Vec<u8> {
    const NAMES: [&[u8]; 12] = [
        b"a",
        b"b",
        b"sub",
        b"hello.txt",
        b"..",
        b".",
        b"../x",
        b"sub/../../x",
        b"",
        b"fifo",
        b"link",
        b"\xff\xfe",
    ];
    let fields = match shape(opcode) {
        Some(fields) if rng.below(8) != 0 => fields,
        _ => {
            let any = [
                Field::U32(false),
                Field::U64(false),
                Field::Node,
                Field::Fh,
                Field::Name,
                Field::Data,
            ];
            (0..rng.below(7)).map(|_| rng.pick(&any)).collect()
        }
    };
    let mut b = Vec::new();
    for field in fields {
        match field {
            Field::U32(bounded) => {
                b.extend_from_slice(&(number(rng, bounded) as u32).to_le_bytes())
            }
            Field::U64(bounded) => b.extend_from_slice(&number(rng, bounded).to_le_bytes()),
            Field::Mode => {
                let kind = rng.pick(&[
                    libc::S_IFREG,
                    libc::S_IFDIR,
                    libc::S_IFIFO,
                    libc::S_IFSOCK,
                    libc::S_IFCHR,
                    libc::S_IFBLK,
                    libc::S_IFLNK,
                    0,
                ]);
                let perm = rng.pick(&[0o644, 0o755, 0o4755, 0o2777, 0, 0o7777]);
                b.extend_from_slice(&(kind | perm).to_le_bytes());
            }
            Field::Node => {
                let n = if rng.below(10) == 0 {
                    rng.next()
                } else {
                    rng.pick(nodes)
                };
                b.extend_from_slice(&n.to_le_bytes());
            }
            Field::Fh => {
                let h = if handles.is_empty() || rng.below(8) == 0 {
                    number(rng, false)
                } else {
                    rng.pick(handles)
                };
                b.extend_from_slice(&h.to_le_bytes());
            }
            Field::Name => {
                if rng.below(3) == 0 {
                    b.extend_from_slice(rng.pick(&NAMES));
                } else {
                    // A short name of its own, so that files get made.
                    for _ in 0..1 + rng.below(3) {
                        b.push(b'a' + rng.below(4) as u8);
                    }
                }
                if rng.below(16) != 0 {
                    b.push(0);
                }
            }
            Field::Data => {
                for _ in 0..rng.below(256) {
                    b.push(rng.next() as u8);
                }
            }
        }
    }
    b
}

/// Random FUSE requests (every opcode and unknown ones, random node ids
/// and handles mixed with those the replies gave, hostile names, headers
/// whose length lies, requests and replies split over several descriptors
/// or missing, random credentials) never panic the device or wedge it,
/// and nothing outside the share changes: the file and directory beside
/// it stay as they were, nothing new appears next to it, the test's working
/// directory is still its own, and afterwards the device still serves a
/// file the host adds. `RTV_FUZZ_CASES` (default 3000) and `RTV_FUZZ_SEED`
/// set the run; CI runs the default with a fixed seed, longer runs are by
/// hand.
#[test]
fn random_fuse_requests_never_panic_or_leave_the_share() {
    let cases: u64 = std::env::var("RTV_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = std::env::var("RTV_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7274_7600_6675_7365);
    eprintln!("RTV_FUZZ_SEED={seed} RTV_FUZZ_CASES={cases}");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);

    let dir = TempDir::new("vmm-fs-fuzz");
    let share = dir.0.join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("hello.txt"), "hi").unwrap();
    std::fs::write(share.join("sub/a"), "a").unwrap();
    std::os::unix::fs::symlink("../outside.txt", share.join("link")).unwrap();
    let outside = dir.0.join("outside.txt");
    std::fs::write(&outside, "host only").unwrap();
    let beside = dir.0.join("beside");
    std::fs::create_dir(&beside).unwrap();
    std::fs::write(beside.join("x"), "beside").unwrap();
    let stat = |p: &Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        use std::os::unix::fs::MetadataExt;
        (m.mode(), m.uid(), m.gid(), m.len(), m.mtime(), m.ino())
    };
    let before = [stat(&outside), stat(&beside), stat(&beside.join("x"))];
    let cwd = std::env::current_dir().unwrap();

    let mut d = Driver::new(&share);
    d.init(1);
    let mut nodes: Vec<u64> = vec![0, 1, 1, 1, 1, 1, u64::MAX, 0xdead_beef];
    let mut handles: Vec<u64> = Vec::new();
    let (req, reply) = (0x80000u64, 0x90000u64);
    let mut succeeded = 0u64;
    for case in 0..cases {
        // Now and then a LOOKUP or CREATE-like call whose reply gives a
        // node id to use later.
        let opcode = if rng.below(5) == 0 {
            rng.pick(&[FUSE_LOOKUP, 9, 35, 14, 27])
        } else if rng.below(20) == 0 {
            rng.below(1000) as u32
        } else {
            1 + rng.below(51) as u32
        };
        let body = random_body(&mut rng, opcode, &nodes, &handles);
        let nodeid = rng.pick(&nodes);
        let real_len = 40 + body.len() as u32;
        let len = match rng.below(12) {
            0 => rng.next() as u32,
            1 => real_len.saturating_sub(rng.below(48) as u32),
            _ => real_len,
        };
        let (uid, gid) = match rng.below(4) {
            0 => (1000u32, 1000u32),
            1 => (rng.next() as u32, rng.next() as u32),
            _ => (0, 0),
        };
        let mut m = request(len, opcode, case + 2, nodeid, &body);
        m[24..28].copy_from_slice(&uid.to_le_bytes());
        m[28..32].copy_from_slice(&gid.to_le_bytes());
        // The request, in one to three pieces.
        let mut descs = Vec::new();
        let pieces = 1 + rng.below(3) as usize;
        let step = m.len().div_ceil(pieces).max(1);
        for (i, piece) in m.chunks(step).enumerate() {
            let at = req + 0x4000 * i as u64;
            d.mem.write_slice(piece, GuestAddress(at)).unwrap();
            descs.push((at, piece.len() as u32, 0u16));
        }
        // The reply's room: none, too small, or in one or two pieces.
        match rng.below(10) {
            0 => {}
            1 => descs.push((reply, rng.below(24) as u32, F_WRITE)),
            2 => {
                descs.push((reply, 64, F_WRITE));
                descs.push((reply + 0x10000, 4096, F_WRITE));
            }
            _ => descs.push((reply, 4096, F_WRITE)),
        }
        // Hostile chains now and then: a piece outside guest memory, or a
        // readable piece after a writable one.
        match rng.below(40) {
            0 => descs.insert(0, (0x4000_0000, 64, 0)),
            1 => descs.push((req, 16, 0)),
            _ => {}
        }
        d.mem.write_slice(&[0u8; 16], GuestAddress(reply)).unwrap();
        let used = d.send(&descs);
        if used >= 16 && d.mem.read_obj::<i32>(GuestAddress(reply + 4)).unwrap() == 0 {
            succeeded += 1;
        }
        // A driver mounts again after a DESTROY, mostly.
        if opcode == 38 && rng.below(4) != 0 {
            d.init(case + 1_000_000);
        }
        // A successful reply of a LOOKUP, MKDIR or CREATE starts with the
        // new node's id; of an OPEN or OPENDIR with the handle, of a
        // CREATE with it after the entry (128 bytes).
        if used >= 24 && d.mem.read_obj::<i32>(GuestAddress(reply + 4)).unwrap() == 0 {
            let at = |off: u64| {
                d.mem
                    .read_obj::<u64>(GuestAddress(reply + 16 + off))
                    .unwrap()
            };
            // At most 64 of each: a new one takes a random place.
            let keep = |list: &mut Vec<u64>, v: u64, rng: &mut Rng| {
                if list.len() < 64 {
                    list.push(v);
                } else {
                    let i = rng.below(64) as usize;
                    list[i] = v;
                }
            };
            if matches!(opcode, 1 | 9 | 35) {
                keep(&mut nodes, at(0), &mut rng);
            }
            if matches!(opcode, 14 | 27) {
                keep(&mut handles, at(0), &mut rng);
            }
            if opcode == 35 && used >= 16 + 128 + 8 {
                keep(&mut handles, at(128), &mut rng);
            }
        }
    }

    eprintln!(
        "{succeeded} of {cases} requests succeeded; {} node ids and {} handles in use",
        nodes.len(),
        handles.len()
    );
    // The run reached the file system, not only the parsers.
    assert!(succeeded > cases / 50, "{succeeded} of {cases} succeeded");
    let after = [stat(&outside), stat(&beside), stat(&beside.join("x"))];
    assert_eq!(before, after, "something outside the share changed");
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host only");
    let mut next_to: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    next_to.sort();
    assert_eq!(next_to, ["beside", "outside.txt", "share"]);
    assert_eq!(std::fs::read_dir(&beside).unwrap().count(), 1);
    assert_eq!(std::env::current_dir().unwrap(), cwd);
    // Still serving: a new INIT (the run may have sent DESTROY) and a file
    // the host adds now.
    std::fs::write(share.join("after.txt"), "after").unwrap();
    d.init(cases + 10);
    let (_, err, unique) = d.fuse(FUSE_LOOKUP, 1, cases + 11, b"after.txt\0");
    assert_eq!((err, unique), (0, cases + 11), "the device still serves");
}
