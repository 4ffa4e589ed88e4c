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
use rtv_vmm::devices::bus::{Bus, BusDevice};
use rtv_vmm::devices::virtio::fs::{FsConfig, VirtioFs, CONFIG_LEN, REQUEST_QUEUE, TAG_LEN};
use rtv_vmm::devices::virtio::mmio::{reg, MmioTransport};
use rtv_vmm::devices::virtio::{
    Interrupt, VirtioDevice, DEVICE_ID_FS, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use rtv_vmm::{AfterSnapshot, MachineConfig, RestoreConfig, Vm, VmExit};
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
    let mut c = hello(uds, r#"{"control":{"version":1}}"#);
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
        &format!(r#"{{"stream":{{"version":1,"exec_id":{exec_id},"stream":"stdout"}}}}"#),
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
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
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

    // Escapes: `..` past the mount root and a symlink to /etc stay in the
    // guest; the host's /etc/hostname is never what the guest reads.
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let (dotdot, _) = run(&uds, 7, "{ cat /mnt/../../etc/hostname; ls /mnt/..; }");
    let (link, _) = run(
        &uds,
        9,
        "{ ln -s /etc /mnt/esc && cat /mnt/esc/hostname; ls /mnt/esc/; }",
    );
    assert_eq!(
        std::fs::read_link(share.join("esc")).unwrap(),
        Path::new("/etc"),
        "the guest made the symlink in the share"
    );
    let (ls, code) = run(&uds, 11, "ls -a /mnt");
    assert_eq!(code, 0);
    assert!(ls.contains("hello.txt") && ls.contains("out.txt") && ls.contains("esc"));
    let host_etc_names = std::fs::read_dir("/etc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() > 6)
        .collect::<Vec<_>>();
    for out in [&dotdot, &link] {
        if !host_hostname.trim().is_empty() {
            assert!(
                !out.contains(host_hostname.trim()),
                "the guest read the host's /etc/hostname: {out}"
            );
        }
        // The host's /etc listing is not what the guest sees either (names
        // only the host has).
        let leaked = host_etc_names
            .iter()
            .filter(|n| out.lines().any(|l| l.trim() == n.as_str()))
            .count();
        assert!(leaked < 3, "host /etc names in the guest's listing: {out}");
    }
    eprintln!("escape attempts: `..` -> {dotdot:?}; symlink -> {link:?}");
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
        fs: Some(FsConfig::new(share)),
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
    let (base, _) = rtv_vmm::vm::virtio_slot(0);
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
    let (base, _) = rtv_vmm::vm::virtio_slot(0);
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
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
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
