//! The VMM's boot paths and exits, with purpose-built guests of a few bytes
//! of machine code on the real /dev/kvm. They run in milliseconds, even
//! where guest kernel code is emulated.

use std::time::{Duration, Instant};

use rtv_vmm::arch::layout::{HIMEM_START, PVH_INFO_START};
use rtv_vmm::arch::regs::BootEntry;
use rtv_vmm::{DeviceConfig, MachineConfig, Vm, VmExit};
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::Console;

fn run_guest(
    code: &[u8],
    load: u64,
    entry: BootEntry,
    vcpus: u8,
    mem_mib: u64,
) -> (VmExit, Vec<u8>) {
    let console = Console::default();
    let config = MachineConfig {
        mem_size_mib: mem_mib,
        vcpus,
        ..Default::default()
    };
    let vm = Vm::new(&config, Box::new(console.clone())).expect("create VM");
    vm.memory()
        .write_slice(code, GuestAddress(load))
        .expect("load guest code");
    vm.set_boot_entry(entry).expect("set boot entry");
    let exit = vm.run().expect("run VM");
    let out = console.0.lock().unwrap().clone();
    (exit, out)
}

/// mov dx, 0x3f8; mov al, 'O'; out dx, al; mov al, 'K'; out dx, al;
/// mov al, '\n'; out dx, al; mov al, 0xfe; out 0x64, al; hlt
const REAL_MODE_HELLO: &[u8] = &[
    0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee, 0xb0, 0xfe, 0xe6,
    0x64, 0xf4,
];

#[test]
fn real_mode_guest_prints_and_resets() {
    let (exit, out) = run_guest(
        REAL_MODE_HELLO,
        0x1000,
        BootEntry::RealMode { cs: 0, ip: 0x1000 },
        1,
        16,
    );
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(out, b"OK\n");
}

#[test]
fn long_mode_entry_has_working_paging_and_segments() {
    // In 64-bit mode: mov dx, 0x3f8; mov al, 'L'; out dx, al; mov al, '\n';
    // out dx, al; mov al, 0xfe; out 0x64, al; hlt
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'L', 0xee, 0xb0, b'\n', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
    ];
    let (exit, out) = run_guest(
        &code,
        HIMEM_START,
        BootEntry::Long64 { entry: HIMEM_START },
        1,
        16,
    );
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(out, b"L\n");
}

#[test]
fn pvh_entry_is_32_bit_protected_mode_with_start_info_in_ebx() {
    // mov dx, 0x3f8; cmp ebx, PVH_INFO_START; mov al, 'P'; je +2; mov al, 'F';
    // out dx, al; mov al, 0xfe; out 0x64, al; hlt
    let info = (PVH_INFO_START as u32).to_le_bytes();
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0x81, 0xfb, info[0], info[1], info[2], info[3], 0xb0, b'P', 0x74,
        0x02, 0xb0, b'F', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
    ];
    let (exit, out) = run_guest(
        &code,
        HIMEM_START,
        BootEntry::Pvh {
            entry: HIMEM_START,
            start_info: PVH_INFO_START,
        },
        1,
        16,
    );
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(out, b"P");
}

#[test]
fn unclaimed_ports_read_as_floating_bus() {
    // mov dx, 0x2f8; in al, dx; mov dx, 0x3f8; out dx, al; mov al, 0xfe; out 0x64, al; hlt
    let code = [
        0xba, 0xf8, 0x02, 0xec, 0xba, 0xf8, 0x03, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
    ];
    let (exit, out) = run_guest(
        &code,
        0x1000,
        BootEntry::RealMode { cs: 0, ip: 0x1000 },
        1,
        16,
    );
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(out, [0xff]);
}

#[test]
fn triple_fault_is_a_guest_shutdown() {
    // ud2 with an IDT that has no usable entry: #UD, #GP, #DF, shutdown.
    let (exit, _) = run_guest(
        &[0x0f, 0x0b],
        HIMEM_START,
        BootEntry::Long64 { entry: HIMEM_START },
        1,
        16,
    );
    assert_eq!(exit, VmExit::Shutdown);
}

#[test]
fn executing_from_unbacked_memory_is_a_clear_error() {
    // mov eax, 0x2000_0000 (identity-mapped, but no RAM behind it); jmp rax
    let code = [0xb8, 0x00, 0x00, 0x00, 0x20, 0xff, 0xe0];
    let (exit, _) = run_guest(
        &code,
        HIMEM_START,
        BootEntry::Long64 { entry: HIMEM_START },
        1,
        16,
    );
    match exit {
        VmExit::Error(msg) => {
            assert!(msg.contains("vCPU 0"), "{msg}");
            assert!(msg.contains("0x20000000"), "{msg}");
        }
        other => panic!("expected an error exit, got {other:?}"),
    }
}

#[test]
fn secondary_vcpus_are_stopped_when_the_guest_resets() {
    // vCPU 1 never gets a startup IPI: it sits in KVM_RUN until kicked.
    let start = Instant::now();
    let (exit, out) = run_guest(
        REAL_MODE_HELLO,
        0x1000,
        BootEntry::RealMode { cs: 0, ip: 0x1000 },
        4,
        32,
    );
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(out, b"OK\n");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "stopping the VM hung"
    );
}

fn vsock_config(tag: &str) -> rtv_vmm::VsockConfig {
    let uds = std::env::temp_dir().join(format!("rtv-tiny-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    rtv_vmm::VsockConfig {
        guest_cid: 3,
        uds_path: uds,
    }
}

#[test]
fn virtio_mmio_registers_answer_through_kvm() {
    // 32-bit PVH entry, paging off: read MagicValue and DeviceID of the
    // device at 0xd0000000; print 'V' if they are virtio's and vsock's.
    let code = [
        0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]
        0x3d, 0x76, 0x69, 0x72, 0x74, // cmp eax, "virt"
        0x75, 0x0e, // jne fail
        0xa1, 0x08, 0x00, 0x00, 0xd0, // mov eax, [0xd0000008]
        0x83, 0xf8, 0x13, // cmp eax, 19
        0x75, 0x04, // jne fail
        0xb0, b'V', // mov al, 'V'
        0xeb, 0x02, // jmp out
        0xb0, b'F', // fail: mov al, 'F'
        0x66, 0xba, 0xf8, 0x03, 0xee, // out: mov dx, 0x3f8; out dx, al
        0xb0, 0xfe, 0xe6, 0x64, 0xf4, // reset; hlt
    ];
    let vsock = vsock_config("mmio");
    let path = vsock.uds_path.clone();
    let console = Console::default();
    let config = MachineConfig {
        mem_size_mib: 16,
        devices: vec![DeviceConfig::Vsock(vsock)],
        ..Default::default()
    };
    let vm = Vm::new(&config, Box::new(console.clone())).expect("create VM");
    assert_eq!(
        vm.cmdline_entries(),
        ["virtio_mmio.device=4K@0xd0000000:5".to_string()]
    );
    assert!(path.exists(), "the vsock socket listens from VM creation");
    vm.memory()
        .write_slice(&code, GuestAddress(HIMEM_START))
        .unwrap();
    vm.set_boot_entry(BootEntry::Pvh {
        entry: HIMEM_START,
        start_info: PVH_INFO_START,
    })
    .unwrap();
    let exit = vm.run().expect("run VM");
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(console.0.lock().unwrap().as_slice(), b"V");
    assert!(!path.exists(), "vsock socket left behind");
}

#[test]
fn sigterm_stops_the_vm_and_removes_the_vsock_socket() {
    // jmp $: the guest never stops by itself.
    let vsock = vsock_config("sigterm");
    let path = vsock.uds_path.clone();
    let config = MachineConfig {
        mem_size_mib: 16,
        devices: vec![DeviceConfig::Vsock(vsock)],
        stop_on_signals: true,
        ..Default::default()
    };
    let vm = Vm::new(&config, Box::new(Console::default())).expect("create VM");
    vm.memory()
        .write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_entry(BootEntry::RealMode { cs: 0, ip: 0x1000 })
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        vm.run()
    });
    let thread = rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(path.exists());
    // A thread-directed SIGTERM: the VM's thread blocks it and reads it
    // from its signalfd; the rest of the test process is untouched.
    // SAFETY: `thread` is alive until joined below.
    assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGTERM) }, 0);
    let exit = runner.join().unwrap().expect("run VM");
    assert_eq!(exit, VmExit::Signal(libc::SIGTERM));
    assert_eq!(exit.exit_code(), 143);
    assert!(!path.exists(), "vsock socket left behind");
}
