//! The profiler's sample-to-stack logic against guest memory images built
//! here: task names from the per-cpu `current_task`, kernel call chains,
//! user samples, and guest data that lies.

use super::*;

/// Guest memory: 4 MiB, the kernel half's top GiB mapped onto physical 0
/// with one 1 GiB page (as Linux maps its image), nothing else.
struct Image(Vec<u8>);

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const KBASE: u64 = 0xffff_ffff_8000_0000;

impl Image {
    fn new() -> Self {
        let mut img = Image(vec![0; 4 << 20]);
        img.w64(PML4 + 511 * 8, PDPT | 3);
        img.w64(PDPT + 510 * 8, 0x83);
        img
    }
    /// Writes at a kernel virtual address.
    fn w64(&mut self, addr: u64, v: u64) {
        let a = (addr & 0x3fff_ffff) as usize;
        self.0[a..a + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, addr: u64, b: &[u8]) {
        let a = (addr & 0x3fff_ffff) as usize;
        self.0[a..a + b.len()].copy_from_slice(b);
    }
}

const TEXT: u64 = KBASE + 0x10_0000;
const INFO: u64 = KBASE + 0x20_0000;
const PERCPU: u64 = KBASE + 0x21_0000;
const CURRENT_TASK: u64 = 0x40;
const TASK: u64 = KBASE + 0x22_0000;
const COMM: u64 = 0x5c8;
const STACK: u64 = KBASE + 0x30_0000;

fn system_map() -> String {
    format!(
        "{CURRENT_TASK:016x} D current_task\n\
         {:016x} T main\n\
         {:016x} t outer\n\
         {:016x} T spin\n\
         {:016x} T _etext\n\
         {INFO:016x} R rtv_profile_info\n",
        TEXT,
        TEXT + 0x100,
        TEXT + 0x200,
        TEXT + 0x300
    )
}

fn info(img: &mut Image, magic: u64, frame_pointers: u64) {
    for (i, v) in [magic, 56, COMM, 16, 0x4c0, 0x4c4, frame_pointers]
        .iter()
        .enumerate()
    {
        img.w64(INFO + 8 * i as u64, *v);
    }
}

/// A guest running task "spinner" in spin(), called by outer(), called by
/// main(), with frame pointers.
fn guest() -> Image {
    let mut img = Image::new();
    info(&mut img, PROFILE_INFO_MAGIC, 1);
    img.w64(PERCPU + CURRENT_TASK, TASK);
    img.bytes(TASK + COMM, b"spinner\0garbage!");
    img.w64(STACK + 0x100, STACK + 0x200);
    img.w64(STACK + 0x108, TEXT + 0x110); // return into outer
    img.w64(STACK + 0x200, 0);
    img.w64(STACK + 0x208, TEXT + 0x10); // return into main
    img
}

fn sampler(map: &str) -> VcpuSampler {
    let dir = std::env::temp_dir();
    let profiler = Profiler {
        config: ProfileConfig::new(dir),
        symbols: Some(Arc::new(SymbolMap::parse(map))),
        trigger: DumpHandle::default(),
    };
    profiler.session(1).sampler(0)
}

fn kernel_cpu(rip: u64) -> CpuView {
    CpuView {
        rip,
        rbp: STACK + 0x100,
        cpl: 0,
        gs_base: PERCPU,
        paging: Paging::long_mode(PML4),
    }
}

#[test]
fn a_kernel_sample_is_the_task_and_its_call_chain() {
    let img = guest();
    let s = sampler(&system_map());
    let stack = s.stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None);
    assert_eq!(stack, "spinner;main;outer;spin");
    // Outside kernel text: the address in hex, no walk past it is needed.
    let stack = s.stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x5000), || None);
    assert_eq!(stack, format!("spinner;main;outer;{:#x}", TEXT + 0x5000));
}

#[test]
fn a_uniprocessor_kernel_has_current_task_at_its_own_address() {
    // CONFIG_SMP=n: no per-cpu base; `current_task` is a plain variable.
    let mut img = guest();
    let current = KBASE + 0x21_8000;
    img.w64(current, TASK);
    let map = system_map().replace(
        &format!("{CURRENT_TASK:016x} D current_task"),
        &format!("{current:016x} D current_task"),
    );
    let s = sampler(&map);
    let mut cpu = kernel_cpu(TEXT + 0x205);
    cpu.gs_base = 0;
    let stack = s.stack(img.0.as_slice(), &cpu, || None);
    assert_eq!(stack, "spinner;main;outer;spin");
    cpu.cpl = 3;
    let stack = s.stack(img.0.as_slice(), &cpu, || None);
    assert_eq!(stack, "spinner;[user]");
}

#[test]
fn a_user_sample_is_the_task_found_through_kernel_gs_base() {
    let img = guest();
    let s = sampler(&system_map());
    let cpu = CpuView {
        rip: 0x40_1000,
        rbp: 0x7fff_0000,
        cpl: 3,
        gs_base: 0,
        paging: Paging::long_mode(PML4),
    };
    assert_eq!(
        s.stack(img.0.as_slice(), &cpu, || Some(PERCPU)),
        "spinner;[user]"
    );
    assert_eq!(
        s.stack(img.0.as_slice(), &cpu, || None),
        "[unknown task];[user]"
    );
}

#[test]
fn without_frame_pointers_kernel_stacks_are_the_leaf() {
    let mut img = guest();
    info(&mut img, PROFILE_INFO_MAGIC, 0);
    let s = sampler(&system_map());
    assert_eq!(
        s.stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None),
        "spinner;spin"
    );
}

#[test]
fn a_system_map_of_another_kernel_gives_no_names_and_no_walk() {
    let mut img = guest();
    info(&mut img, 0x1234, 1);
    let s = sampler(&system_map());
    for _ in 0..2 * MAX_LAYOUT_TRIES {
        assert_eq!(
            s.stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None),
            "[unknown task];spin"
        );
    }
    assert_eq!(
        s.shared.layout_tries.load(Ordering::Relaxed),
        MAX_LAYOUT_TRIES,
        "gives up after MAX_LAYOUT_TRIES"
    );
}

#[test]
fn hostile_task_pointers_and_names() {
    let s = sampler(&system_map());
    // current_task: a user address, misaligned, unmapped.
    for task in [0x1000, TASK + 3, 0xffff_8880_0000_0000] {
        let mut img = guest();
        img.w64(PERCPU + CURRENT_TASK, task);
        assert!(s
            .stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None)
            .starts_with("[unknown task];"));
    }
    // A name with separators and control characters, no NUL in 16 bytes.
    let mut img = guest();
    img.bytes(TASK + COMM, b"a;b c\n\xffdefghijklmnop");
    let stack = s.stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None);
    assert_eq!(stack, "a_b c__defghijkl;main;outer;spin");
    // An empty name.
    img.bytes(TASK + COMM, b"\0");
    assert!(s
        .stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None)
        .starts_with("[unknown task];"));
    // A GS base that is not a kernel address, in kernel mode: the MSR.
    let img = guest();
    let mut cpu = kernel_cpu(TEXT + 0x205);
    cpu.gs_base = 0x7f00_0000_0000;
    assert_eq!(
        s.stack(img.0.as_slice(), &cpu, || Some(PERCPU)),
        "spinner;main;outer;spin"
    );
}

#[test]
fn samples_outside_long_mode_and_without_symbols() {
    let img = guest();
    let s = sampler(&system_map());
    let mut cpu = kernel_cpu(0x1000);
    cpu.paging = Paging::off();
    assert_eq!(s.stack(img.0.as_slice(), &cpu, || None), NOT_LONG_MODE);
    let bare = Profiler {
        config: ProfileConfig::new(std::env::temp_dir()),
        symbols: None,
        trigger: DumpHandle::default(),
    }
    .session(1)
    .sampler(0);
    assert_eq!(
        bare.stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None),
        format!("[unknown task];{:#x}", TEXT + 0x205)
    );
}

#[test]
fn init_task_fallback_finds_comm_without_rtv_profile_info() {
    let mut img = guest();
    let init = KBASE + 0x23_0000;
    img.bytes(init + 0x7a8, b"swapper/0\0");
    img.bytes(TASK + 0x7a8, b"sh\0");
    let map = format!(
        "{CURRENT_TASK:016x} D current_task\n{:016x} T spin\n{init:016x} D init_task\n",
        TEXT + 0x200
    );
    let s = sampler(&map);
    assert_eq!(
        s.stack(img.0.as_slice(), &kernel_cpu(TEXT + 0x205), || None),
        "sh;spin",
        "comm found, no frame walk assumed"
    );
}

#[test]
fn stack_counts_are_bounded() {
    let mut stacks = Stacks::new();
    for i in 0..MAX_STACKS + 10 {
        count(&mut stacks, &format!("s;{i}"), 1);
    }
    count(&mut stacks, "s;0", 5);
    assert_eq!(stacks.len(), MAX_STACKS + 1);
    assert_eq!(stacks[OTHER_STACKS], 10);
    assert_eq!(stacks["s;0"], 6);
}

#[test]
fn output_names_are_recognised_and_nothing_else() {
    for yes in ["1.folded", "12.svg", "all.svg", "all.folded", ".3.svg.tmp"] {
        assert!(is_output_name(yes), "{yes}");
    }
    for no in [
        "a.svg",
        ".svg",
        "1.txt",
        "all",
        "x1.folded",
        "notes.md",
        "1.svg.tmp",
    ] {
        assert!(!is_output_name(no), "{no}");
    }
}

#[test]
fn profiler_checks_rate_map_and_cleans_its_directory() {
    let dir = std::env::temp_dir().join(format!("rtv-profile-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["1.svg", "2.folded", "all.svg", "keep.txt"] {
        std::fs::write(dir.join(f), "old").unwrap();
    }
    let mut config = ProfileConfig::new(&dir);
    config.hz = 0;
    assert!(matches!(Profiler::new(config.clone()), Err(Error::Rate(0))));
    config.hz = MAX_HZ + 1;
    assert!(matches!(Profiler::new(config.clone()), Err(Error::Rate(_))));
    config.hz = 99;
    config.system_map = Some(dir.join("missing.map"));
    assert!(matches!(
        Profiler::new(config.clone()),
        Err(Error::Symbols(_))
    ));
    config.system_map = None;
    let p = Profiler::new(config).unwrap();
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["keep.txt"]);
    assert!(!p.dump_handle().request(), "not running yet");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn folded_files_read_back() {
    let counts = parse_folded("a;b 3\nc d;e 2\nbad\na;b 1\n");
    assert_eq!(counts["a;b"], 4);
    assert_eq!(counts["c d;e"], 2);
    assert_eq!(counts.len(), 2);
}
