//! virtio-fs: the device's configuration space and feature negotiation
//! through the virtio-mmio transport, and one real boot in which the guest
//! mounts a shared directory, reads and writes it, and cannot reach host
//! paths outside it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use rtv_vmm::devices::bus::BusDevice;
use rtv_vmm::devices::virtio::fs::{FsConfig, VirtioFs, CONFIG_LEN, REQUEST_QUEUE, TAG_LEN};
use rtv_vmm::devices::virtio::mmio::{reg, MmioTransport};
use rtv_vmm::devices::virtio::{
    Interrupt, VirtioDevice, DEVICE_ID_FS, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
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

struct Driver {
    mem: GuestMemoryMmap,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    notify: Vec<EventFd>,
    avail_idx: u16,
    next_desc: u16,
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
            queue.set_size(256);
            queue.set_desc_table_address(Some(desc_table(q) as u32), Some(0));
            queue.set_avail_ring_address(Some((desc_table(q) + 0x1000) as u32), Some(0));
            queue.set_used_ring_address(Some((desc_table(q) + 0x2000) as u32), Some(0));
            queue.set_ready(true);
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
            events,
            notify,
            avail_idx: 0,
            next_desc: 0,
        };
        d.pump();
        d
    }

    fn pump(&mut self) {
        for _ in 0..100 {
            if self.events.run_with_timeout(1).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    /// Sends a chain of (address, length, flags) descriptors on the request
    /// queue; returns the used length.
    fn send(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        let q = REQUEST_QUEUE as u64;
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
        self.avail_idx += 1;
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .unwrap();
        self.notify[REQUEST_QUEUE].write(1).unwrap();
        self.pump();
        let used = desc_table(q) + 0x2000;
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
}

#[test]
fn fuse_requests_are_served_and_dot_dot_is_refused() {
    let dir = TempDir::new("vmm-fs-queue");
    let share = dir.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hi").unwrap();
    let mut d = Driver::new(&share);

    // FUSE_INIT 7.31.
    let mut init = Vec::new();
    for v in [7u32, 31, 0x20000, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let (len, err, unique) = d.fuse(26, 0, 1, &init);
    assert_eq!((err, unique), (0, 1));
    assert!(len > 16, "INIT reply of {len} bytes");

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

fn artifact(script: &str, args: &[&str]) -> Option<PathBuf> {
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
    let (Some(kernel), Some(initrd)) = (
        artifact("guest-kernel/build.sh", &[]),
        artifact("rootfs-builder/build.sh", &["--test"]),
    ) else {
        eprintln!("skipped: guest kernel or test initramfs not available");
        return;
    };
    let tmp = TempDir::new("vmm-fs-e2e");
    let share = tmp.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    let uds = tmp.0.join("vsock.sock");
    let vmm = Vmm(Command::new(env!("CARGO_BIN_EXE_rtv-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&share)
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
}

#[test]
fn a_vm_with_a_shared_dir_refuses_to_snapshot() {
    use rtv_vmm::arch::regs::BootEntry;
    use rtv_vmm::{AfterSnapshot, MachineConfig, Vm, VmExit};
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = TempDir::new("vmm-fs-snap");
    let config = MachineConfig {
        mem_size_mib: 16,
        fs: Some(FsConfig::new(&dir.0)),
        ..Default::default()
    };
    assert_eq!(
        rtv_vmm::vm::virtio_cmdline_entries(&config).len(),
        1,
        "the device is on the kernel command line"
    );
    let vm = Vm::new(&config, Box::new(std::io::sink())).expect("create VM");
    // Real mode at 0x1000: jmp $.
    vm.memory()
        .write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_entry(BootEntry::RealMode { cs: 0, ip: 0x1000 })
        .unwrap();
    assert_eq!(vm.cmdline_entries().len(), 1);
    let controller = vm.controller();
    let thread = std::thread::spawn(move || vm.run().expect("run VM"));
    let err = controller
        .snapshot(&dir.0.join("snap"), AfterSnapshot::Resume)
        .unwrap_err();
    controller.stop();
    assert_eq!(thread.join().unwrap(), VmExit::Stopped);
    assert!(err.to_string().contains("virtio-fs"), "{err}");
    assert!(!dir.0.join("snap").join("memory.bin").exists());
}
