//! The guest profiler (`rtv-vmm --profile DIR`): samples every vCPU's
//! instruction pointer at a fixed rate and writes folded stacks and SVG
//! flame graphs of where the guest spends its time.
//!
//! One timer thread (only when profiling is on) marks each vCPU due and
//! kicks its thread out of KVM_RUN with the vCPU kick signal; the vCPU
//! thread reads its registers (KVM_GET_REGS, KVM_GET_SREGS; for user mode
//! also the KERNEL_GS_BASE MSR), turns them into a stack and counts it, and
//! re-enters the guest. A sample in guest kernel mode is the kernel's call
//! chain, walked through RBP frame pointers in guest memory (translated by
//! the guest's page tables) when the kernel keeps them, named with the
//! guest kernel's `System.map`; a sample in user mode is `[user]`. Both get
//! the name (`comm`) of the task the vCPU runs as their root frame, read
//! from the kernel's per-cpu `current_task`.
//!
//! Samples are counted by stack in a bounded map, never stored one by one.
//! [`DumpHandle::request`] (SIGUSR1 in `rtv-vmm`) writes the counts since
//! the previous dump as `DIR/<n>.folded` and `DIR/<n>.svg` and starts
//! counting anew; the end of the VM writes the last part and
//! `DIR/all.folded` / `DIR/all.svg` with everything. Nothing of this is in
//! a snapshot. With profiling off the VMM has no timer, no signal and no
//! sample: a vCPU checks one `Option` per KVM exit.

pub mod output;
pub mod symbols;
pub mod walk;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use crate::devices::bus::lock;
use output::Stacks;
use symbols::SymbolMap;
use walk::{GuestPhys, GuestView, Paging};

/// Samples a second per vCPU unless asked otherwise (99, not 100, so as
/// not to beat in step with the guest's 100 Hz timer tick).
pub const DEFAULT_HZ: u32 = 99;
/// The highest sampling rate accepted.
pub const MAX_HZ: u32 = 1000;
/// The most distinct stacks counted in one part (and in `all`); samples of
/// further stacks are counted as [`OTHER_STACKS`]. Bounds the profiler's
/// memory to a few MiB whatever the guest does.
pub const MAX_STACKS: usize = 16384;
/// The stack that counts samples past [`MAX_STACKS`].
pub const OTHER_STACKS: &str = "[other stacks]";
/// Root frame of a sample whose task could not be read.
pub const UNKNOWN_TASK: &str = "[unknown task]";
/// The frame of a sample in guest user mode.
pub const USER_FRAME: &str = "[user]";
/// The stack of a sample taken outside long mode (firmware-less boot code,
/// real mode, 32-bit entry): no page tables the profiler walks.
pub const NOT_LONG_MODE: &str = "[not in long mode]";
/// The stack of a sample of a secondary vCPU the guest has not started yet
/// (waiting for INIT/SIPI).
pub const NOT_STARTED: &str = "[vCPU not started]";

const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// `rtv_profile_info.magic`: "rtvprof1", little-endian.
const PROFILE_INFO_MAGIC: u64 = u64::from_le_bytes(*b"rtvprof1");
/// The fields of `rtv_profile_info` the profiler reads (7 u64).
const PROFILE_INFO_SIZE: usize = 56;
/// How far into `init_task` the fallback looks for its name.
const INIT_TASK_SCAN: usize = 16 << 10;
/// Reads of the task layout that found data but not a valid one before
/// the profiler stops trying (and names the likely cause).
const MAX_LAYOUT_TRIES: u32 = 20;

/// How to profile a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileConfig {
    /// Where the folded stacks and flame graphs go (created if missing).
    pub dir: PathBuf,
    /// Samples a second per vCPU (1 to [`MAX_HZ`]).
    pub hz: u32,
    /// The guest kernel's System.map; without it kernel addresses stay
    /// hexadecimal and samples have no task name.
    pub system_map: Option<PathBuf>,
}

impl ProfileConfig {
    /// Profiling into `dir` at [`DEFAULT_HZ`], without symbols.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            hz: DEFAULT_HZ,
            system_map: None,
        }
    }
}

/// Errors setting up the profiler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sampling rate is out of range.
    #[error("a sampling rate of {0} Hz: use 1 to {MAX_HZ}")]
    Rate(u32),
    /// The output directory cannot be made or cleaned.
    #[error("profile directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The System.map cannot be used.
    #[error(transparent)]
    Symbols(#[from] symbols::Error),
    /// The timer thread cannot be started.
    #[error("cannot start the profiler's timer thread: {0}")]
    Thread(std::io::Error),
}

/// Whether `name` is a file the profiler writes (or its temporary file).
fn is_output_name(name: &str) -> bool {
    let name = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .unwrap_or(name);
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    (ext == "folded" || ext == "svg")
        && (stem == "all" || (!stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit())))
}

/// A profiler for one VM, set up and checked before the VM runs.
pub struct Profiler {
    config: ProfileConfig,
    symbols: Option<Arc<SymbolMap>>,
    trigger: DumpHandle,
}

impl Profiler {
    /// Checks the rate, loads the System.map, makes the output directory
    /// and removes the profile files an earlier run left there (`<n>.folded`,
    /// `<n>.svg`, `all.*`; nothing else), so that a file's appearance means
    /// this run wrote it.
    pub fn new(config: ProfileConfig) -> Result<Self, Error> {
        if config.hz == 0 || config.hz > MAX_HZ {
            return Err(Error::Rate(config.hz));
        }
        let symbols = match &config.system_map {
            Some(path) => Some(Arc::new(SymbolMap::load(path)?)),
            None => None,
        };
        let dir_err = |source| Error::Dir {
            path: config.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.dir).map_err(dir_err)?;
        for entry in std::fs::read_dir(&config.dir).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            let name = entry.file_name();
            if is_output_name(&name.to_string_lossy()) {
                std::fs::remove_file(entry.path()).map_err(dir_err)?;
            }
        }
        Ok(Self {
            config,
            symbols,
            trigger: DumpHandle::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ProfileConfig {
        &self.config
    }

    /// Asks for dumps (SIGUSR1, [`crate::VmController::dump_profile`]).
    pub fn dump_handle(&self) -> DumpHandle {
        self.trigger.clone()
    }

    /// The sampling state for a VM of `vcpus` vCPUs: hand [`Session::sampler`]
    /// to each vCPU, then [`Session::start`] the timer.
    pub fn session(self, vcpus: usize) -> Session {
        let shared = Arc::new(Shared {
            symbols: self.symbols,
            layout: OnceLock::new(),
            layout_tries: AtomicU32::new(0),
            due: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            phase: Mutex::new(Phase::new()),
            cost_ns: AtomicU64::new(0),
            samples: AtomicU64::new(0),
        });
        Session {
            config: self.config,
            shared,
            trigger: self.trigger,
        }
    }
}

enum Command {
    Dump,
    Stop,
}

/// Asks a running profiler to write the samples since its previous dump
/// and start counting anew. Cheap to clone; usable from any thread.
#[derive(Clone, Default)]
pub struct DumpHandle(Arc<Mutex<Option<Sender<Command>>>>);

impl DumpHandle {
    /// Requests a dump; `false` when the profiler is not running (before
    /// the VM runs or after it ended). The files appear a little later:
    /// `<n>.svg` last.
    pub fn request(&self) -> bool {
        lock(&self.0)
            .as_ref()
            .is_some_and(|tx| tx.send(Command::Dump).is_ok())
    }
}

/// How the kernel lays out what the profiler reads in a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// `offsetof(struct task_struct, comm)`.
    pub comm_offset: u64,
    /// `TASK_COMM_LEN`.
    pub comm_len: usize,
    /// Whether kernel code keeps the RBP frame chain.
    pub frame_pointers: bool,
}

/// Reads `rtv_profile_info` (guest-kernel patch 0007) at `addr`: `None`
/// when unreadable, `Some(None)` when read but not valid.
pub fn read_profile_info<M: GuestPhys + ?Sized>(
    view: &mut GuestView<'_, M>,
    addr: u64,
) -> Option<Option<TaskLayout>> {
    let mut raw = [0u8; PROFILE_INFO_SIZE];
    if !view.read(addr, &mut raw) {
        return None;
    }
    let field = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let (magic, size, comm_offset, comm_len, frame_pointers) =
        (field(0), field(1), field(2), field(3), field(6));
    let valid = magic == PROFILE_INFO_MAGIC
        && size >= PROFILE_INFO_SIZE as u64
        && comm_offset < 64 << 10
        && (1..=64).contains(&comm_len)
        && frame_pointers <= 1;
    Some(valid.then_some(TaskLayout {
        comm_offset,
        comm_len: comm_len as usize,
        frame_pointers: frame_pointers == 1,
    }))
}

/// Finds `comm` in `init_task` by its name ("swapper"), for kernels
/// without `rtv_profile_info`; frame pointers are then not assumed.
fn scan_init_task<M: GuestPhys + ?Sized>(
    view: &mut GuestView<'_, M>,
    addr: u64,
) -> Option<Option<TaskLayout>> {
    let mut raw = vec![0u8; INIT_TASK_SCAN];
    if !view.read(addr, &mut raw) {
        return None;
    }
    let at = raw.windows(7).position(|w| w == b"swapper");
    Some(at.map(|offset| TaskLayout {
        comm_offset: offset as u64,
        comm_len: 16,
        frame_pointers: false,
    }))
}

/// The upper (kernel) half of the canonical address space.
fn is_kernel_address(addr: u64) -> bool {
    addr >> 47 == 0x1_ffff
}

/// The task name at `task`, sanitized for a folded stack (no `;`, no
/// control characters).
fn read_comm<M: GuestPhys + ?Sized>(
    view: &mut GuestView<'_, M>,
    layout: &TaskLayout,
    task: u64,
) -> Option<String> {
    let mut raw = [0u8; 64];
    let raw = &mut raw[..layout.comm_len];
    if !view.read(task.checked_add(layout.comm_offset)?, raw) {
        return None;
    }
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    if len == 0 {
        return None;
    }
    Some(
        raw[..len]
            .iter()
            .map(|&b| {
                if (b.is_ascii_graphic() && b != b';') || b == b' ' {
                    b as char
                } else {
                    '_'
                }
            })
            .collect(),
    )
}

/// Counts of one part of the VM's life.
struct Phase {
    stacks: Stacks,
    samples: u64,
    started: Instant,
}

impl Phase {
    fn new() -> Self {
        Self {
            stacks: Stacks::new(),
            samples: 0,
            started: Instant::now(),
        }
    }
}

/// Adds `count` samples of `stack` to `stacks`, within [`MAX_STACKS`].
fn count(stacks: &mut Stacks, stack: &str, count: u64) {
    if let Some(c) = stacks.get_mut(stack) {
        *c += count;
    } else if stacks.len() < MAX_STACKS {
        stacks.insert(stack.to_string(), count);
    } else {
        *stacks.entry(OTHER_STACKS.to_string()).or_insert(0) += count;
    }
}

/// What the vCPU threads and the timer share.
struct Shared {
    symbols: Option<Arc<SymbolMap>>,
    layout: OnceLock<TaskLayout>,
    layout_tries: AtomicU32,
    due: Vec<AtomicBool>,
    phase: Mutex<Phase>,
    /// Time the vCPU threads spent taking samples, and how many.
    cost_ns: AtomicU64,
    samples: AtomicU64,
}

impl Shared {
    /// The task layout, read from the guest the first time it can be.
    fn layout<M: GuestPhys + ?Sized>(&self, view: &mut GuestView<'_, M>) -> Option<TaskLayout> {
        if let Some(layout) = self.layout.get() {
            return Some(*layout);
        }
        if self.layout_tries.load(Ordering::Relaxed) >= MAX_LAYOUT_TRIES {
            return None;
        }
        let known = self.symbols.as_ref()?.known();
        let (found, source) = if let Some(addr) = known.rtv_profile_info {
            (read_profile_info(view, addr)?, "rtv_profile_info")
        } else if let Some(addr) = known.init_task {
            (scan_init_task(view, addr)?, "init_task's name")
        } else {
            self.layout_tries.store(MAX_LAYOUT_TRIES, Ordering::Relaxed);
            tracing::warn!("profile: the System.map has neither rtv_profile_info nor init_task: samples get no task names");
            return None;
        };
        match found {
            Some(layout) => {
                if self.layout.set(layout).is_ok() {
                    tracing::info!(
                        comm_offset = layout.comm_offset,
                        frame_pointers = layout.frame_pointers,
                        "profile: task layout from {source}"
                    );
                }
                Some(layout)
            }
            None => {
                if self.layout_tries.fetch_add(1, Ordering::Relaxed) + 1 == MAX_LAYOUT_TRIES {
                    tracing::warn!("profile: {source} in guest memory is not what the System.map promises (a System.map of another kernel?): samples get no task names and kernel stacks only their leaf");
                }
                None
            }
        }
    }

    fn record(&self, stack: &str) {
        let mut phase = lock(&self.phase);
        phase.samples += 1;
        count(&mut phase.stacks, stack, 1);
    }

    fn name_frame(&self, addr: u64, out: &mut String) {
        match self.symbols.as_ref().and_then(|s| s.lookup(addr)) {
            Some(name) => out.push_str(name),
            None => out.push_str(&format!("{addr:#x}")),
        }
    }
}

/// What one sample sees of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuView {
    /// The instruction pointer.
    pub rip: u64,
    /// The frame pointer.
    pub rbp: u64,
    /// The privilege level (CS.DPL): 0 kernel, 3 user.
    pub cpl: u8,
    /// The GS base (the kernel's per-cpu base while in kernel mode).
    pub gs_base: u64,
    /// Paging registers.
    pub paging: Paging,
}

impl CpuView {
    /// From KVM's registers.
    pub fn from_kvm(regs: &kvm_bindings::kvm_regs, sregs: &kvm_sregs) -> Self {
        Self {
            rip: regs.rip,
            rbp: regs.rbp,
            cpl: sregs.cs.dpl,
            gs_base: sregs.gs.base,
            paging: Paging {
                cr0: sregs.cr0,
                cr3: sregs.cr3,
                cr4: sregs.cr4,
                efer: sregs.efer,
            },
        }
    }
}

/// A profiler's state for one VM: samplers for the vCPUs and, once
/// started, the timer.
pub struct Session {
    config: ProfileConfig,
    shared: Arc<Shared>,
    trigger: DumpHandle,
}

/// Takes samples on one vCPU thread.
pub struct VcpuSampler {
    shared: Arc<Shared>,
    index: usize,
}

impl Session {
    /// The sampler for vCPU `index`.
    pub fn sampler(&self, index: usize) -> VcpuSampler {
        VcpuSampler {
            shared: self.shared.clone(),
            index,
        }
    }

    /// Starts the timer thread, which marks every vCPU due and kicks
    /// `threads[i]` (vCPU i's thread) out of KVM_RUN with `signal`, `hz`
    /// times a second. The threads must stay joinable until
    /// [`Running::stop_timer`] returns.
    pub fn start(
        self,
        threads: Vec<libc::pthread_t>,
        signal: libc::c_int,
    ) -> Result<Running, Error> {
        let (tx, rx) = mpsc::channel();
        let period = Duration::from_nanos(1_000_000_000 / u64::from(self.config.hz));
        let shared = self.shared.clone();
        let mut writer = Writer {
            config: self.config.clone(),
            vcpus: self.shared.due.len(),
            next: 1,
            all: Stacks::new(),
            all_samples: 0,
            started: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("profile".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::enter(crate::seccomp::Thread::Profiler) {
                    // No unfiltered thread goes on: no samples are taken.
                    tracing::error!("the profiler stops: {e}");
                    return writer;
                }
                let mut next = Instant::now() + period;
                loop {
                    let wait = next.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(Command::Dump) => writer.dump(&shared, false),
                        Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                        Err(RecvTimeoutError::Timeout) => {
                            for (due, &thread) in shared.due.iter().zip(&threads) {
                                due.store(true, Ordering::SeqCst);
                                // SAFETY: the vCPU threads are joined only
                                // after this thread has ended (see
                                // Running::stop_timer), so `thread` names a
                                // live or finished-but-joinable thread;
                                // the kick handler is installed.
                                unsafe { libc::pthread_kill(thread, signal) };
                            }
                            next += period;
                            let now = Instant::now();
                            if next < now {
                                // Behind (a dump, a busy host): skip ticks
                                // rather than burst.
                                next = now + period;
                            }
                        }
                    }
                }
                writer
            })
            .map_err(Error::Thread)?;
        *lock(&self.trigger.0) = Some(tx.clone());
        Ok(Running {
            tx,
            thread,
            shared: self.shared,
            trigger: self.trigger,
        })
    }
}

/// A started profiler.
pub struct Running {
    tx: Sender<Command>,
    thread: JoinHandle<Writer>,
    shared: Arc<Shared>,
    trigger: DumpHandle,
}

impl Running {
    /// Stops the timer (no vCPU is kicked after this returns) and refuses
    /// further dump requests; [`Stopped::finish`] writes the last files
    /// once the vCPUs are stopped.
    pub fn stop_timer(self) -> Stopped {
        *lock(&self.trigger.0) = None;
        let _ = self.tx.send(Command::Stop);
        let writer = match self.thread.join() {
            Ok(w) => Some(w),
            Err(_) => {
                tracing::error!("the profiler's timer thread panicked");
                None
            }
        };
        Stopped {
            writer,
            shared: self.shared,
        }
    }
}

/// A profiler whose timer has stopped.
pub struct Stopped {
    writer: Option<Writer>,
    shared: Arc<Shared>,
}

impl Stopped {
    /// Writes the last part and `all.folded` / `all.svg`.
    pub fn finish(self) {
        if let Some(mut writer) = self.writer {
            writer.dump(&self.shared, true);
        }
    }
}

/// Writes the parts; lives on the timer thread, then on the VM's thread for
/// the last dump.
struct Writer {
    config: ProfileConfig,
    vcpus: usize,
    next: u64,
    all: Stacks,
    all_samples: u64,
    started: Instant,
}

impl Writer {
    fn write(
        &self,
        name: &str,
        stacks: &Stacks,
        title: &str,
        subtitle: &str,
    ) -> std::io::Result<()> {
        let folded = output::folded(stacks);
        output::write_atomic(
            &self.config.dir.join(format!("{name}.folded")),
            folded.as_bytes(),
        )?;
        let svg = output::svg(&folded, title, subtitle)?;
        // Written last: its appearance means the part is complete.
        output::write_atomic(&self.config.dir.join(format!("{name}.svg")), &svg)
    }

    fn dump(&mut self, shared: &Shared, last: bool) {
        let phase = std::mem::replace(&mut *lock(&shared.phase), Phase::new());
        let n = self.next;
        self.next += 1;
        for (stack, c) in &phase.stacks {
            count(&mut self.all, stack, *c);
        }
        self.all_samples += phase.samples;
        let secs = phase.started.elapsed().as_secs_f64();
        let stacks_note = match shared.layout.get() {
            Some(l) if l.frame_pointers => "kernel call chains from frame pointers",
            Some(_) => "kernel stacks: the sampled function only",
            None if shared.symbols.is_some() => "no task layout found: kernel stacks leaf only",
            None => "no System.map: hexadecimal addresses",
        };
        let subtitle = |samples: u64, secs: f64| {
            format!(
                "{samples} samples in {secs:.2} s, {} vCPU(s) at {} Hz; root frame: the task's comm; {stacks_note}",
                self.vcpus, self.config.hz
            )
        };
        let dir = self.config.dir.display();
        match self.write(
            &n.to_string(),
            &phase.stacks,
            &format!("rtv-vmm guest profile, part {n}"),
            &subtitle(phase.samples, secs),
        ) {
            Ok(()) => eprintln!(
                "rtv-vmm: profile part {n}: {} samples over {secs:.2} s ({} vCPU(s) at {} Hz), {} stacks: {dir}/{n}.svg",
                phase.samples,
                self.vcpus,
                self.config.hz,
                phase.stacks.len()
            ),
            Err(e) => tracing::error!("profile part {n} to {dir}: {e}"),
        }
        if !last {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        let taken = shared.samples.load(Ordering::Relaxed);
        let cost = Duration::from_nanos(shared.cost_ns.load(Ordering::Relaxed));
        let mean_us = if taken > 0 {
            cost.as_secs_f64() * 1e6 / taken as f64
        } else {
            0.0
        };
        let share = if secs > 0.0 && self.vcpus > 0 {
            cost.as_secs_f64() * 100.0 / (secs * self.vcpus as f64)
        } else {
            0.0
        };
        match self.write(
            "all",
            &self.all,
            "rtv-vmm guest profile, all parts",
            &subtitle(self.all_samples, secs),
        ) {
            Ok(()) => eprintln!(
                "rtv-vmm: profile: {} samples over {secs:.2} s in {n} part(s), {} stacks, {mean_us:.0} us a sample in the vCPU thread ({share:.2}% of the vCPUs' time): {dir}/all.svg",
                self.all_samples,
                self.all.len()
            ),
            Err(e) => tracing::error!("profile all to {dir}: {e}"),
        }
    }
}

/// The KERNEL_GS_BASE MSR: the kernel's per-cpu base while the vCPU runs
/// user code (SWAPGS exchanges it with GS.base at kernel entry).
fn kernel_gs_base(fd: &VcpuFd) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KERNEL_GS_BASE,
        ..Default::default()
    }])
    .ok()?;
    let n = fd.get_msrs(&mut msrs).ok()?;
    (n == 1).then(|| msrs.as_slice()[0].data)
}

impl VcpuSampler {
    /// Whether the timer asked this vCPU for a sample (and clears it).
    pub fn due(&self) -> bool {
        let due = &self.shared.due[self.index];
        due.load(Ordering::Relaxed) && due.swap(false, Ordering::SeqCst)
    }

    /// Takes a sample of the vCPU, which must be out of KVM_RUN with its
    /// registers consistent (no I/O exit pending).
    pub fn sample(&self, fd: &VcpuFd, memory: &GuestMemoryMmap) {
        let start = Instant::now();
        let (Ok(regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) else {
            return;
        };
        let cpu = CpuView::from_kvm(&regs, &sregs);
        let waiting = !cpu.paging.long_mode_active()
            && fd.get_mp_state().is_ok_and(|s| {
                matches!(
                    s.mp_state,
                    kvm_bindings::KVM_MP_STATE_UNINITIALIZED
                        | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED
                        | kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED
                )
            });
        if waiting {
            self.shared.record(NOT_STARTED);
        } else {
            let stack = self.stack(memory, &cpu, || kernel_gs_base(fd));
            self.shared.record(&stack);
        }
        self.shared.samples.fetch_add(1, Ordering::Relaxed);
        self.shared
            .cost_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The folded stack of one sample: `comm;[user]` in user mode,
    /// `comm;outermost;...;leaf` in kernel mode.
    pub fn stack<M: GuestPhys + ?Sized>(
        &self,
        memory: &M,
        cpu: &CpuView,
        kernel_gs_base: impl FnOnce() -> Option<u64>,
    ) -> String {
        if !cpu.paging.long_mode_active() {
            return NOT_LONG_MODE.to_string();
        }
        let shared = &*self.shared;
        let mut view = GuestView::new(memory, cpu.paging);
        let layout = shared.layout(&mut view);
        let mut stack = String::with_capacity(256);
        let comm = layout.and_then(|layout| {
            let symbols = shared.symbols.as_ref()?;
            let at = symbols.known().current_task.or(symbols.known().pcpu_hot)?;
            // An SMP kernel's per-cpu variables are offsets from the CPU's
            // per-cpu base; a uniprocessor kernel's are plain variables at
            // kernel addresses.
            let address = if is_kernel_address(at) {
                at
            } else if cpu.cpl == 0 && is_kernel_address(cpu.gs_base) {
                cpu.gs_base.wrapping_add(at)
            } else {
                kernel_gs_base()?.wrapping_add(at)
            };
            let task = view.read_u64(address)?;
            if !is_kernel_address(task) || task & 7 != 0 {
                return None;
            }
            read_comm(&mut view, &layout, task)
        });
        stack.push_str(comm.as_deref().unwrap_or(UNKNOWN_TASK));
        stack.push(';');
        if cpu.cpl != 0 {
            stack.push_str(USER_FRAME);
            return stack;
        }
        let mut frames = Vec::with_capacity(32);
        frames.push(cpu.rip);
        if let (Some(layout), Some(symbols)) = (layout, shared.symbols.as_ref()) {
            if layout.frame_pointers {
                walk::walk_frames(&mut view, cpu.rbp, |a| symbols.in_text(a), &mut frames);
            }
        }
        for (i, &addr) in frames.iter().rev().enumerate() {
            if i > 0 {
                stack.push(';');
            }
            shared.name_frame(addr, &mut stack);
        }
        stack
    }
}

/// Counts of folded stacks, read back from a `.folded` file (tests, tools).
pub fn parse_folded(text: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some((stack, n)) = line.rsplit_once(' ') {
            if let Ok(n) = n.parse::<u64>() {
                *out.entry(stack.to_string()).or_insert(0) += n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
