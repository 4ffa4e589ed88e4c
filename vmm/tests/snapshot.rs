//! Snapshot and restore with tiny guests on the real /dev/kvm: a guest that
//! counts in memory and prints the count is snapshotted mid-run and goes
//! on counting in restored VMs; damaged snapshots are refused with the file
//! and the problem named.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rtv_vmm::arch::layout::{HIMEM_START, PVH_INFO_START};
use rtv_vmm::arch::regs::BootEntry;
use rtv_vmm::{
    AfterSnapshot, DeviceConfig, MachineConfig, RestoreConfig, Vm, VmController, VmExit,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod common;
use common::{Console, TempDir};

/// Where the counter lives in guest memory (and in memory.bin).
const COUNTER: u64 = 0x2000;

/// Real mode at 0x1000: mov dx, 0x3f8; l: inc dword [0x2000];
/// mov al, [0x2000]; out dx, al; jmp l
const COUNTER_GUEST: &[u8] = &[
    0xba, 0xf8, 0x03, 0x66, 0xff, 0x06, 0x00, 0x20, 0xa0, 0x00, 0x20, 0xee, 0xeb, 0xf5,
];

struct Running {
    console: Console,
    memory: GuestMemoryMmap,
    controller: VmController,
    thread: JoinHandle<VmExit>,
}

impl Running {
    fn start(vm: Vm, console: Console) -> Self {
        let memory = vm.memory().clone();
        let controller = vm.controller();
        let thread = std::thread::spawn(move || vm.run().expect("run VM"));
        Running {
            console,
            memory,
            controller,
            thread,
        }
    }

    fn counter(&self) -> u32 {
        self.memory.read_obj(GuestAddress(COUNTER)).unwrap()
    }

    fn stop(self) -> VmExit {
        self.controller.stop();
        self.thread.join().unwrap()
    }
}

fn counter_vm(vcpus: u8, vsock: Option<rtv_vmm::VsockConfig>) -> Running {
    let console = Console::default();
    let config = MachineConfig {
        mem_size_mib: 16,
        vcpus,
        devices: vsock.map(DeviceConfig::Vsock).into_iter().collect(),
        ..Default::default()
    };
    let vm = Vm::new(&config, Box::new(console.clone())).expect("create VM");
    vm.memory()
        .write_slice(COUNTER_GUEST, GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_entry(BootEntry::RealMode { cs: 0, ip: 0x1000 })
        .unwrap();
    Running::start(vm, console)
}

fn restore(dir: &Path, config: &RestoreConfig) -> Running {
    let console = Console::default();
    let vm = Vm::restore(dir, config, Box::new(console.clone())).expect("restore VM");
    Running::start(vm, console)
}

fn counter_in_file(dir: &Path) -> u32 {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(dir.join("memory.bin")).unwrap();
    let mut b = [0u8; 4];
    file.read_exact_at(&mut b, COUNTER).unwrap();
    u32::from_le_bytes(b)
}

/// A snapshot of the counting guest (2 vCPUs: the second never started),
/// taken after it printed 600 bytes; the guest goes on running.
fn counter_snapshot(dir: &Path) -> u32 {
    let vm = counter_vm(2, None);
    vm.console.wait_for(600);
    let info = vm
        .controller
        .snapshot(dir, AfterSnapshot::Resume)
        .expect("snapshot");
    assert_eq!(info.memory_size, 16 << 20);
    assert!(
        info.memory_data <= 64 * 1024,
        "{} bytes of a guest that touched a few pages",
        info.memory_data
    );
    assert!(
        info.disk_usage < 1 << 20,
        "snapshot takes {} bytes on disk",
        info.disk_usage
    );
    // The original goes on after the snapshot.
    let printed = vm.console.len();
    vm.console.wait_for(printed + 100);
    assert_eq!(vm.stop(), VmExit::Stopped);
    let saved = counter_in_file(dir);
    assert!(saved >= 600, "counter {saved} in the snapshot");
    saved
}

#[test]
fn restored_guest_goes_on_counting_from_the_snapshot() {
    let dir = TempDir::new("snap-counter");
    let snap = dir.0.join("snap");
    let saved = counter_snapshot(&snap);

    let vm = restore(&snap, &RestoreConfig::default());
    vm.console.wait_for(50);
    let now = vm.counter();
    let out = vm.console.bytes();
    assert_eq!(vm.stop(), VmExit::Stopped);
    // The first byte printed is the saved count (stopped between the
    // increment and the print) or the next one: not 1.
    assert!(
        out[0] == saved as u8 || out[0] == saved.wrapping_add(1) as u8,
        "first byte {} after a snapshot at {saved}",
        out[0]
    );
    // Each print follows an increment.
    for w in out.windows(2).take(40) {
        assert_eq!(w[1], w[0].wrapping_add(1), "{:?}", &out[..40]);
    }
    assert!(now >= saved + 49, "counter {now}, saved {saved}");
    // The restored guest's writes stayed in its private mapping.
    assert_eq!(counter_in_file(&snap), saved);
}

#[test]
fn two_vms_restored_from_one_snapshot_run_independently() {
    let dir = TempDir::new("snap-twins");
    let snap = dir.0.join("snap");
    let saved = counter_snapshot(&snap);

    let a = restore(&snap, &RestoreConfig::default());
    let b = restore(&snap, &RestoreConfig::default());
    a.console.wait_for(100);
    b.console.wait_for(100);
    // A write in one guest's memory is not seen by the other.
    a.memory
        .write_obj(0xdead_beefu32, GuestAddress(0x3000))
        .unwrap();
    let seen: u32 = b.memory.read_obj(GuestAddress(0x3000)).unwrap();
    assert_ne!(seen, 0xdead_beef);
    // Stopping one leaves the other running.
    assert_eq!(a.stop(), VmExit::Stopped);
    let printed = b.console.len();
    b.console.wait_for(printed + 100);
    assert!(b.counter() >= saved + 100);
    assert_eq!(b.stop(), VmExit::Stopped);
    assert_eq!(counter_in_file(&snap), saved);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn restore_error(dir: &Path, config: &RestoreConfig) -> String {
    match Vm::restore(dir, config, Box::new(Console::default())) {
        Ok(_) => panic!("a damaged snapshot in {} was restored", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("state.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn assert_names(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

#[test]
fn damaged_snapshots_are_refused_with_the_file_and_problem_named() {
    let dir = TempDir::new("snap-damaged");
    let snap = dir.0.join("snap");
    counter_snapshot(&snap);
    let ok = RestoreConfig::default();
    let case = |name: &str| {
        let d = dir.0.join(name);
        copy_dir(&snap, &d);
        d
    };

    let d = case("corrupt");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("memory.bin"))
            .unwrap();
        f.write_all_at(&[0x55], 0x5000).unwrap();
    }
    assert_names(
        &restore_error(&d, &ok),
        &["memory.bin", "corrupted", "sha256"],
    );

    let d = case("truncated");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    f.set_len(8 << 20).unwrap();
    assert_names(&restore_error(&d, &ok), &["memory.bin", "truncated"]);

    let d = case("vcpu-corrupt");
    std::fs::write(d.join("vcpu-1.json"), b"{}").unwrap();
    assert_names(&restore_error(&d, &ok), &["vcpu-1.json", "truncated"]);

    let d = case("vcpu-missing");
    std::fs::remove_file(d.join("vcpu-0.json")).unwrap();
    assert_names(&restore_error(&d, &ok), &["vcpu-0.json", "missing"]);

    let d = case("version");
    edit_manifest(&d, |m| m["format_version"] = 99.into());
    assert_names(
        &restore_error(&d, &ok),
        &[
            "state.json",
            "format_version 99",
            &format!("version {}", rtv_vmm::snapshot::FORMAT_VERSION),
        ],
    );

    let d = case("build");
    edit_manifest(&d, |m| m["vmm"]["build_id"] = "0123456789abcdef".into());
    assert_names(
        &restore_error(&d, &ok),
        &["state.json", "build 0123456789abcdef"],
    );

    let d = case("mem-size");
    edit_manifest(&d, |m| m["mem_size_mib"] = 32.into());
    assert_names(
        &restore_error(&d, &ok),
        &["state.json", "memory size mismatch"],
    );

    let d = case("vcpu-count");
    edit_manifest(&d, |m| m["vcpus"] = 3.into());
    assert_names(
        &restore_error(&d, &ok),
        &["state.json", "vCPU count mismatch"],
    );

    let d = case("unfinished");
    std::fs::remove_file(d.join("state.json")).unwrap();
    assert_names(&restore_error(&d, &ok), &["state.json", "missing"]);

    let d = case("garbage");
    std::fs::write(d.join("state.json"), b"not json").unwrap();
    assert_names(
        &restore_error(&d, &ok),
        &["state.json", "not a snapshot manifest"],
    );

    let err = restore_error(
        &snap,
        &RestoreConfig {
            expect_mem_mib: Some(128),
            ..Default::default()
        },
    );
    assert_names(&err, &["memory size mismatch", "16 MiB", "128 MiB"]);
    let err = restore_error(
        &snap,
        &RestoreConfig {
            expect_vcpus: Some(1),
            ..Default::default()
        },
    );
    assert_names(&err, &["vCPU count mismatch"]);
    // A snapshot without vsock given a socket.
    let err = restore_error(
        &snap,
        &RestoreConfig {
            vsock_uds: Some(dir.0.join("v.sock")),
            ..Default::default()
        },
    );
    assert_names(&err, &["no vsock device"]);
    // The intact snapshot still restores.
    let vm = restore(&snap, &ok);
    vm.console.wait_for(10);
    assert_eq!(vm.stop(), VmExit::Stopped);
}

#[test]
fn restored_vsock_device_gets_its_own_socket_and_cid() {
    // 32-bit PVH entry: loop { al = low byte of the vsock config space
    // (the guest CID); out 0x3f8, al }
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xa1, 0x00, 0x01, 0x00, 0xd0, // l: mov eax, [0xd0000100]
        0xee, // out dx, al
        0xeb, 0xf8, // jmp l
    ];
    let dir = TempDir::new("snap-vsock");
    let snap = dir.0.join("snap");
    let console = Console::default();
    let config = MachineConfig {
        mem_size_mib: 16,
        devices: vec![DeviceConfig::Vsock(rtv_vmm::VsockConfig {
            guest_cid: 3,
            uds_path: dir.0.join("orig.sock"),
        })],
        ..Default::default()
    };
    let vm = Vm::new(&config, Box::new(console.clone())).unwrap();
    vm.memory()
        .write_slice(&code, GuestAddress(HIMEM_START))
        .unwrap();
    vm.set_boot_entry(BootEntry::Pvh {
        entry: HIMEM_START,
        start_info: PVH_INFO_START,
    })
    .unwrap();
    let vm = Running::start(vm, console);
    vm.console.wait_for(20);
    vm.controller
        .snapshot(&snap, AfterSnapshot::Exit)
        .expect("snapshot");
    assert_eq!(vm.thread.join().unwrap(), VmExit::Snapshotted);
    assert!(!dir.0.join("orig.sock").exists());

    // A socket is required; the CID may change.
    let err = restore_error(&snap, &RestoreConfig::default());
    assert!(err.contains("--vsock-uds"), "{err}");
    let uds = dir.0.join("restored.sock");
    let vm = restore(
        &snap,
        &RestoreConfig {
            vsock_uds: Some(uds.clone()),
            vsock_cid: Some(7),
            ..Default::default()
        },
    );
    vm.console.wait_for(20);
    assert!(uds.exists());
    let out = vm.console.bytes();
    assert!(out[2..].iter().all(|&b| b == 7), "{out:?}");
    assert_eq!(vm.stop(), VmExit::Stopped);
    assert!(!uds.exists(), "vsock socket left behind");
}

#[test]
fn a_snapshot_of_a_stopped_vm_fails_cleanly() {
    let vm = counter_vm(1, None);
    let controller = vm.controller.clone();
    assert_eq!(vm.stop(), VmExit::Stopped);
    let dir = TempDir::new("snap-stopped");
    let err = controller
        .snapshot(&dir.0.join("snap"), AfterSnapshot::Resume)
        .unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
}

fn rtv_vmm() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_rtv-vmm"))
}

#[test]
fn cli_restores_a_snapshot_and_names_bad_ones() {
    let dir = TempDir::new("snap-cli");
    let snap = dir.0.join("snap");
    let saved = counter_snapshot(&snap);

    // Mismatches and missing snapshots: exit 1, the problem named, no
    // console file left.
    let console = dir.0.join("console.txt");
    let out = rtv_vmm()
        .args(["--restore", snap.to_str().unwrap(), "--mem", "64"])
        .arg("--console")
        .arg(&console)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--restore") && stderr.contains("memory size mismatch"),
        "{stderr}"
    );
    assert!(!console.exists());
    let out = rtv_vmm()
        .args(["--restore", "/nonexistent/snap"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/snap/state.json: missing"),
        "{stderr}"
    );
    let out = rtv_vmm()
        .args(["--restore", "/x", "--kernel", "/y"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kernel"));

    // A good one runs until SIGTERM, counting on from the snapshot.
    let mut child = rtv_vmm()
        .args(["--restore", snap.to_str().unwrap(), "--vcpus", "2"])
        .arg("--console")
        .arg(&console)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::metadata(&console).map_or(0, |m| m.len()) < 100 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no console output"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    let out = std::fs::read(&console).unwrap();
    assert!(out[0] == saved as u8 || out[0] == saved.wrapping_add(1) as u8);
}
