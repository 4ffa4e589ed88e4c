//! The guest profiler (`--profile`) on the real /dev/kvm: hand-assembled
//! guests that spin in known functions (kernel mode, with a frame chain;
//! user mode, named through KERNEL_GS_BASE), given a System.map and the
//! kernel data the profiler reads, and one boot of the real guest kernel to
//! agent readiness. Every exit path writes the profile: a request to stop,
//! SIGTERM, the guest's own reset.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rtv_vmm::arch::layout::{HIMEM_START, PDE_START, PDPTE_START, PML4_START};
use rtv_vmm::arch::regs::BootEntry;
use rtv_vmm::profile::{parse_folded, ProfileConfig, Profiler, NOT_STARTED};
use rtv_vmm::{MachineConfig, Vm, VmExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod common;
use common::{artifact, Console, TempDir};

/// The guest's kernel half: virtual 0xffffffff80000000 + x is physical x
/// for the first 32 MiB (2 MiB pages, as Linux maps its image).
const KBASE: u64 = 0xffff_ffff_8000_0000;
/// The page-directory-pointer table and page directory the test adds for
/// the kernel half.
const HIGH_PDPT: u64 = 0x1_0000;
const HIGH_PD: u64 = 0x1_1000;
const MAIN: u64 = KBASE + 0x100_0000;
const PERCPU: u64 = KBASE + 0x20_0000;
const CURRENT_TASK: u64 = 0x100;
const STACK_TOP: u64 = KBASE + 0x30_0000;
const INFO: u64 = KBASE + 0x40_0000;
const TASK: u64 = KBASE + 0x50_0000;
const COMM_OFFSET: u64 = 0x5c8;

fn phys(kva: u64) -> GuestAddress {
    GuestAddress(kva - KBASE)
}

fn lo(v: u64) -> [u8; 4] {
    (v as u32).to_le_bytes()
}

fn hi(v: u64) -> [u8; 4] {
    ((v >> 32) as u32).to_le_bytes()
}

/// `mov ecx, msr; mov eax, lo(value); mov edx, hi(value); wrmsr`
fn wrmsr(msr: u32, value: u64) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend(msr.to_le_bytes());
    c.push(0xb8);
    c.extend(lo(value));
    c.push(0xba);
    c.extend(hi(value));
    c.extend([0x0f, 0x30]);
    c
}

/// Maps the kernel half, and writes what the profiler reads: the
/// `rtv_profile_info` of guest-kernel patch 0007 (frame pointers on), the
/// per-cpu `current_task` and the task's name.
fn kernel_data(mem: &GuestMemoryMmap, comm: &[u8]) {
    mem.write_obj(HIGH_PDPT | 3, GuestAddress(PML4_START + 511 * 8))
        .unwrap();
    mem.write_obj(HIGH_PD | 3, GuestAddress(HIGH_PDPT + 510 * 8))
        .unwrap();
    for i in 0..16u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(HIGH_PD + i * 8))
            .unwrap();
    }
    let info = [
        u64::from_le_bytes(*b"rtvprof1"),
        56,
        COMM_OFFSET,
        16,
        0x4c0,
        0x4c4,
        1,
    ];
    for (i, v) in info.iter().enumerate() {
        mem.write_obj(*v, phys(INFO + 8 * i as u64)).unwrap();
    }
    mem.write_obj(TASK, phys(PERCPU + CURRENT_TASK)).unwrap();
    mem.write_slice(comm, phys(TASK + COMM_OFFSET)).unwrap();
}

/// main() calls outer(), which calls spin(), which spins; each with a
/// frame (push rbp; mov rbp, rsp), as a kernel built with frame pointers.
fn functions() -> Vec<u8> {
    let mut f = vec![0u8; 0x30];
    // main (+0x00): push rbp; mov rbp, rsp; call outer; jmp $
    f[0x00..0x0b].copy_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0xe8, 0x07, 0, 0, 0, 0xeb, 0xfe]);
    // outer (+0x10): push rbp; mov rbp, rsp; call spin; jmp $
    f[0x10..0x1b].copy_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0xe8, 0x07, 0, 0, 0, 0xeb, 0xfe]);
    // spin (+0x20): push rbp; mov rbp, rsp; jmp $
    f[0x20..0x26].copy_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0xeb, 0xfe]);
    f
}

fn system_map() -> String {
    format!(
        "{CURRENT_TASK:016x} D current_task\n\
         {MAIN:016x} T main\n\
         {:016x} t outer\n\
         {:016x} T spin\n\
         {:016x} T _etext\n\
         {INFO:016x} R rtv_profile_info\n",
        MAIN + 0x10,
        MAIN + 0x20,
        MAIN + 0x30,
    )
}

fn profiler(dir: &TempDir, hz: u32) -> Profiler {
    let map = dir.file("System.map", system_map().as_bytes());
    Profiler::new(ProfileConfig {
        dir: dir.0.join("profile"),
        hz,
        system_map: Some(map),
    })
    .expect("profiler")
}

fn wait_for_file(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn folded(dir: &Path, name: &str) -> HashMap<String, u64> {
    let path = dir.join(format!("{name}.folded"));
    parse_folded(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
}

fn total(stacks: &HashMap<String, u64>) -> u64 {
    stacks.values().sum()
}

/// Parses `path` as XML and checks that its root element is `<svg>`.
fn assert_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = quick_xml::Reader::from_str(&text);
    let mut root = None;
    let mut depth = 0i64;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(e)) => {
                if depth == 0 && root.is_none() {
                    root = Some(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                }
                depth += 1;
            }
            Ok(quick_xml::events::Event::End(_)) => depth -= 1,
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("{}: not XML: {e}", path.display()),
        }
    }
    assert_eq!(depth, 0, "{}: unbalanced elements", path.display());
    assert_eq!(root.as_deref(), Some("svg"), "{}", path.display());
}

/// The sums of the parts are `all`.
fn assert_all_is_the_sum(dir: &Path, parts: u64) {
    let mut sum: HashMap<String, u64> = HashMap::new();
    for n in 1..=parts {
        for (stack, c) in folded(dir, &n.to_string()) {
            *sum.entry(stack).or_insert(0) += c;
        }
        assert_svg(&dir.join(format!("{n}.svg")));
    }
    assert!(
        !dir.join(format!("{}.folded", parts + 1)).exists(),
        "more parts than asked for"
    );
    assert_eq!(folded(dir, "all"), sum);
    assert_svg(&dir.join("all.svg"));
}

#[test]
fn kernel_mode_spinner_is_named_with_its_call_chain() {
    let tmp = TempDir::new("vmm-profile-kernel");
    let out = tmp.0.join("profile");
    // vCPU 1 is never started by the guest.
    let config = MachineConfig {
        mem_size_mib: 32,
        vcpus: 2,
        ..Default::default()
    };
    let mut vm = Vm::new(&config, Box::new(Console::default())).expect("create VM");
    vm.set_boot_entry(BootEntry::Long64 { entry: HIMEM_START })
        .unwrap();
    let mem = vm.memory();
    kernel_data(mem, b"spinner\0");
    mem.write_slice(&functions(), phys(MAIN)).unwrap();
    // At the identity-mapped entry: the per-cpu base in GS, a stack in the
    // kernel half, no frame above main(), and a jump to main().
    let mut boot = wrmsr(0xc000_0101, PERCPU);
    boot.extend([0x48, 0xbc]);
    boot.extend(STACK_TOP.to_le_bytes()); // mov rsp, STACK_TOP
    boot.extend([0x31, 0xed]); // xor ebp, ebp
    boot.extend([0x48, 0xb8]);
    boot.extend(MAIN.to_le_bytes()); // mov rax, MAIN
    boot.extend([0xff, 0xe0]); // jmp rax
    mem.write_slice(&boot, GuestAddress(HIMEM_START)).unwrap();
    vm.set_profiler(profiler(&tmp, 250));
    let controller = vm.controller();
    assert!(!controller.dump_profile(), "not running yet");
    let runner = std::thread::spawn(move || vm.run());

    std::thread::sleep(Duration::from_millis(800));
    if !controller.dump_profile() {
        panic!("the VM ended early: {:?}", runner.join().unwrap());
    }
    wait_for_file(&out.join("1.svg"), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    controller.stop();
    let exit = runner.join().unwrap().expect("run VM");
    assert_eq!(exit, VmExit::Stopped);
    assert!(!controller.dump_profile(), "no longer running");

    let part1 = folded(&out, "1");
    let n = total(&part1);
    let spinning = part1.get("spinner;main;outer;spin").copied().unwrap_or(0);
    let waiting = part1.get(NOT_STARTED).copied().unwrap_or(0);
    eprintln!("part 1: {n} samples, {spinning} in spin: {part1:?}");
    assert!(n >= 40, "only {n} samples in 0.8 s at 250 Hz: {part1:?}");
    // Half the samples are vCPU 0's.
    assert!(
        spinning * 20 >= n * 9,
        "the spinning function is not where the time goes: {part1:?}"
    );
    assert!(
        waiting * 20 >= n * 9 && spinning + waiting >= n - 2,
        "vCPU 1 is not shown waiting: {part1:?}"
    );
    let part2 = folded(&out, "2");
    assert!(
        part2
            .keys()
            .all(|s| s == "spinner;main;outer;spin" || s == NOT_STARTED),
        "{part2:?}"
    );
    assert_all_is_the_sum(&out, 2);
    let svg = std::fs::read_to_string(out.join("1.svg")).unwrap();
    assert!(svg.contains("spin") && svg.contains("outer") && svg.contains("spinner"));
}

#[test]
fn user_mode_spinner_is_its_task_and_signals_dump_and_stop() {
    let tmp = TempDir::new("vmm-profile-user");
    let out = tmp.0.join("profile");
    let console = Console::default();
    let config = MachineConfig {
        mem_size_mib: 32,
        stop_on_signals: true,
        ..Default::default()
    };
    let mut vm = Vm::new(&config, Box::new(console.clone())).expect("create VM");
    vm.set_boot_entry(BootEntry::Long64 { entry: HIMEM_START })
        .unwrap();
    let mem = vm.memory();
    kernel_data(mem, b"userspin\0");
    // User pages: the user bit on the identity map's way to the 2 MiB
    // page at 8 MiB, which holds the user code and stack.
    for table in [PML4_START, PDPTE_START] {
        let e: u64 = mem.read_obj(GuestAddress(table)).unwrap();
        mem.write_obj(e | 4, GuestAddress(table)).unwrap();
    }
    let at = GuestAddress(PDE_START + 4 * 8);
    let e: u64 = mem.read_obj(at).unwrap();
    mem.write_obj(e | 4, at).unwrap();
    mem.write_slice(&[0xeb, 0xfe], GuestAddress(0x80_0000))
        .unwrap(); // jmp $
                   // A GDT with 64-bit user code (0x1b) and data (0x23) segments.
    let gdt: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_fa00_0000_ffff,
        0x00cf_f200_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(0x1_2000 + 8 * i as u64))
            .unwrap();
    }
    mem.write_obj(39u16, GuestAddress(0x1_3000)).unwrap();
    mem.write_obj(0x1_2000u64, GuestAddress(0x1_3002)).unwrap();
    // The kernel's per-cpu base where user mode keeps it, a line on the
    // console, then IRETQ to user mode.
    let mut boot = wrmsr(0xc000_0102, PERCPU);
    boot.extend([0x0f, 0x01, 0x14, 0x25, 0x00, 0x30, 0x01, 0x00]); // lgdt [0x13000]
    boot.extend([0x66, 0xba, 0xf8, 0x03, 0xb0, b'U', 0xee]); // out 0x3f8, 'U'
    boot.extend([0x6a, 0x23]); // push ss
    boot.extend([0x68, 0x00, 0x00, 0xa0, 0x00]); // push rsp = 0xa00000
    boot.extend([0x68, 0x02, 0x00, 0x00, 0x00]); // push rflags = 0x2
    boot.extend([0x6a, 0x1b]); // push cs
    boot.extend([0x68, 0x00, 0x00, 0x80, 0x00]); // push rip = 0x800000
    boot.extend([0x48, 0xcf]); // iretq
    mem.write_slice(&boot, GuestAddress(HIMEM_START)).unwrap();
    vm.set_profiler(profiler(&tmp, 250));

    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        vm.run()
    });
    let thread = rx.recv().unwrap();
    // The guest printed: the VM runs, and its thread reads SIGUSR1 and
    // SIGTERM from its signalfd (thread-directed signals: the rest of the
    // test process is untouched).
    console.wait_for(1);
    std::thread::sleep(Duration::from_millis(600));
    // SAFETY: `thread` is alive until joined below.
    assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR1) }, 0);
    wait_for_file(&out.join("1.svg"), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGTERM) }, 0);
    let exit = runner.join().unwrap().expect("run VM");
    assert_eq!(exit, VmExit::Signal(libc::SIGTERM));

    let part1 = folded(&out, "1");
    let n = total(&part1);
    let user = part1.get("userspin;[user]").copied().unwrap_or(0);
    eprintln!("part 1: {n} samples, {user} in user mode: {part1:?}");
    assert!(n >= 20, "only {n} samples: {part1:?}");
    assert!(user * 10 >= n * 9, "user time not attributed: {part1:?}");
    assert_all_is_the_sum(&out, 2);
}

#[test]
fn a_guest_that_resets_at_once_still_gets_its_profile() {
    let tmp = TempDir::new("vmm-profile-reset");
    let out = tmp.0.join("profile");
    let config = MachineConfig {
        mem_size_mib: 16,
        ..Default::default()
    };
    let mut vm = Vm::new(&config, Box::new(Console::default())).expect("create VM");
    // mov al, 0xfe; out 0x64, al; hlt
    vm.memory()
        .write_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4], GuestAddress(0x1000))
        .unwrap();
    vm.set_boot_entry(BootEntry::RealMode { cs: 0, ip: 0x1000 })
        .unwrap();
    vm.set_profiler(profiler(&tmp, 99));
    assert_eq!(vm.run().expect("run VM"), VmExit::Reset);
    // One part (whatever was sampled: real mode is "[not in long mode]").
    assert!(folded(&out, "1")
        .keys()
        .all(|s| s == rtv_vmm::profile::NOT_LONG_MODE));
    assert_all_is_the_sum(&out, 1);
}

/// One boot of the real guest kernel with `--profile`, snapshotted at
/// readiness (the profile goes on through the pause), and one restore of
/// that snapshot with `--profile` of its own.
#[test]
fn booted_kernel_profile_names_kernel_functions_to_agent_readiness() {
    let kernel = artifact("RTV_KERNEL", "guest-kernel/build.sh");
    let initrd = artifact("RTV_INITRAMFS", "rootfs-builder/build.sh");
    let system_map = kernel.with_file_name("System.map");
    assert!(
        system_map.is_file(),
        "{} missing: guest-kernel/build.sh keeps it beside vmlinux",
        system_map.display()
    );
    let tmp = TempDir::new("vmm-profile-boot");
    let out = tmp.0.join("profile");
    let console = tmp.0.join("console");
    let log = tmp.0.join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rtv-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--console")
        .arg(&console)
        .args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(tmp.0.join("vsock.sock"))
        .arg("--profile")
        .arg(&out)
        .arg("--snapshot-on-ready")
        .arg(tmp.0.join("snap"))
        .args(["--after-snapshot", "resume"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(rtv_vmm::READY_MARKER) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "rtv-vmm exited ({status}) before readiness: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            panic!("no readiness line within 180 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = start.elapsed();
    // Part 1: the boot. Part 2: the idle agent until SIGTERM.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    wait_for_file(&out.join("1.svg"), Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    eprintln!("ready after {ready:?}; rtv-vmm's log:\n{stderr}");
    assert_eq!(status.code(), Some(143), "{stderr}");

    let boot = folded(&out, "1");
    let n = total(&boot);
    // ~99 samples a second of a boot of several seconds.
    assert!(
        n as f64 >= ready.as_secs_f64() * 99.0 * 0.5,
        "{n} samples in {ready:?}"
    );
    let frames: HashMap<&str, u64> = boot.iter().fold(HashMap::new(), |mut m, (s, c)| {
        for f in s.split(';') {
            *m.entry(f).or_insert(0) += c;
        }
        m
    });
    for name in [
        "start_kernel",
        "do_one_initcall",
        "kernel_init",
        "swapper/0",
    ] {
        assert!(frames.contains_key(name), "no {name} in the boot profile");
    }
    // Call chains are walked (frame pointers): start_kernel is reached
    // from the entry code in most samples of the boot CPU's early work.
    let deep = boot
        .iter()
        .filter(|(s, _)| s.split(';').count() >= 6)
        .map(|(_, c)| c)
        .sum::<u64>();
    assert!(deep * 2 >= n, "{deep} of {n} samples have 5+ frames");
    let hex = boot
        .iter()
        .filter(|(s, _)| s.rsplit(';').next().is_some_and(|f| f.starts_with("0x")))
        .map(|(_, c)| c)
        .sum::<u64>();
    assert!(
        hex * 20 <= n,
        "{hex} of {n} samples end in an unnamed address"
    );
    assert!(stderr.contains("rtv-vmm: profile part 1: "), "{stderr}");
    assert!(stderr.contains("rtv-vmm: profile: "), "{stderr}");
    assert_all_is_the_sum(&out, 2);

    // The restored VM, profiled on its own (no profile state in the
    // snapshot; --system-map given, as --restore has no kernel path).
    let restored = tmp.0.join("restored");
    let log2 = tmp.0.join("log2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rtv-vmm"))
        .arg("--restore")
        .arg(tmp.0.join("snap"))
        .arg("--vsock-uds")
        .arg(tmp.0.join("vsock2.sock"))
        .arg("--console")
        .arg(tmp.0.join("console2"))
        .arg("--profile")
        .arg(&restored)
        .arg("--system-map")
        .arg(&system_map)
        .env("RTV_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log2).unwrap())
        .spawn()
        .unwrap();
    // Profiled from when it runs, just after this line.
    let start = Instant::now();
    while !std::fs::read_to_string(&log2)
        .unwrap_or_default()
        .contains("VM restored from")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no restore: {}",
            std::fs::read_to_string(&log2).unwrap_or_default()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "rtv-vmm --restore exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    let after = folded(&restored, "1");
    assert!(total(&after) >= 20, "{after:?}");
    // The restored agent idles: its vCPU sits in the idle loop.
    assert!(
        after
            .keys()
            .any(|s| s.starts_with("swapper/0;") && s.ends_with("default_idle")),
        "{after:?}"
    );
    assert_all_is_the_sum(&restored, 1);
}
