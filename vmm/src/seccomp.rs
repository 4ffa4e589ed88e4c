//! The VMM's seccomp filters: one per kind of thread, built with
//! `seccompiler`, each installed by its thread once its setup is done and
//! before it handles anything the guest controls.
//!
//! - [`Thread::Vmm`]: the event loop: the virtio devices' queues, the
//!   virtio-fs server acting on the share, vsock's Unix sockets, the tap,
//!   snapshots, the profiler's last files, the VM's teardown. Installed
//!   once every other thread exists, before the first event is handled.
//! - [`Thread::Vcpu`]: `KVM_RUN` and the port and MMIO accesses the guest
//!   makes (device registers, the console), the register reads of a
//!   snapshot and the profiler's samples. Installed before the first
//!   `KVM_RUN`.
//! - [`Thread::Profiler`]: the profiler's timer (it kicks the vCPU threads)
//!   and its dumps (`--profile`).
//! - [`Thread::Snapshot`]: `rtv-vmm --snapshot-on-ready`'s waiter.
//! - [`Thread::Keeper`]: the keeper, the process that stays outside the
//!   VMM's pid namespace (see `jail::prepare`): it waits for the VMM,
//!   passes signals on to it (and to no other process) and ends.
//!
//! Common to all: no thread can start a process or a thread, open a socket
//! other than a Unix one, or map memory executable. `ioctl` is matched on
//! each request number the thread uses. A call outside its thread's filter
//! raises SIGSYS; the handler names the thread and the system call on
//! standard error and ends the VMM with [`EXIT_CODE`] (128 + SIGSYS).
//! [`Mode::Log`] (for development) lets such calls through and has the
//! kernel log them instead (`audit: type=1326 ... syscall=N` in the kernel
//! log).
//!
//! The filters are compiled once, at start ([`init`]); a library user that
//! never calls [`init`] gets none.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the VMM exits with when a thread makes a system call its filter
/// forbids: 128 + SIGSYS, as a shell reports a process the signal killed.
pub const EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// Whether the filters are installed, and what they do with a forbidden
/// call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Installed: a forbidden call ends the VMM ([`EXIT_CODE`]).
    On,
    /// Installed, but a forbidden call goes through and the kernel logs it:
    /// for finding what a filter lacks. Not for production.
    Log,
    /// Not installed.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!("{other:?}: expected on, log or off")),
        }
    }
}

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Thread {
    /// The event loop (the main thread).
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The profiler's timer thread.
    Profiler,
    /// `--snapshot-on-ready`'s waiting thread.
    Snapshot,
    /// The keeper process, outside the VMM's pid namespace.
    Keeper,
}

impl Thread {
    /// Every kind.
    pub const ALL: [Thread; 5] = [
        Thread::Vmm,
        Thread::Vcpu,
        Thread::Profiler,
        Thread::Snapshot,
        Thread::Keeper,
    ];

    /// The kind's name, as messages and the README give it.
    pub fn name(self) -> &'static str {
        match self {
            Thread::Vmm => "vmm",
            Thread::Vcpu => "vcpu",
            Thread::Profiler => "profiler",
            Thread::Snapshot => "snapshot",
            Thread::Keeper => "keeper",
        }
    }
}

/// Building or installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {thread} thread's seccomp filter: {source}")]
    Build {
        thread: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("installing the {thread} thread's seccomp filter: {source}")]
    Install {
        thread: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// The VMM the keeper may signal (its only child); set by the keeper
/// before [`init`].
static KEPT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Names the process the keeper's filter lets it signal and wait for.
pub fn keeper_of(vmm: libc::pid_t) {
    KEPT.store(vmm, std::sync::atomic::Ordering::SeqCst);
}

/// The compiled filters, by [`Thread`] (in [`Thread::ALL`]'s order); empty
/// with [`Mode::Off`].
static FILTERS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

thread_local! {
    /// The kind of the calling thread's filter, for the SIGSYS handler.
    static KIND: Cell<Option<Thread>> = const { Cell::new(None) };
}

/// Compiles the filters for `mode` and, with [`Mode::On`], installs the
/// SIGSYS handler; [`enter`] installs them from then on. Call once, from
/// `main`, before any thread starts (a second call changes nothing).
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    let programs = if mode == Mode::Off {
        Vec::new()
    } else {
        Thread::ALL
            .iter()
            .map(|&t| compile(t, mode))
            .collect::<Result<_, _>>()?
    };
    if mode == Mode::On {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
    }
    let _ = FILTERS.set(programs);
    Ok(())
}

/// Installs `thread`'s filter on the calling thread (nothing without
/// [`init`], or with [`Mode::Off`]). It stays for the thread's life.
pub fn enter(thread: Thread) -> Result<(), SeccompError> {
    let Some(program) = FILTERS.get().and_then(|p| p.get(thread as usize)) else {
        return Ok(());
    };
    KIND.with(|k| k.set(Some(thread)));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        thread: thread.name(),
        source,
    })
}

/// Compiles `thread`'s filter: forbidden calls trap ([`Mode::On`]) or are
/// logged ([`Mode::Log`]).
pub fn compile(thread: Thread, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let build = |source| SeccompError::Build {
        thread: thread.name(),
        source,
    };
    let filter = SeccompFilter::new(
        rules(thread).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// The number of system calls `thread`'s filter allows (some only with
/// certain arguments).
pub fn syscall_count(thread: Thread) -> usize {
    rules(thread).map_or(0, |r| r.len())
}

/// Whether the filter of `thread` allows `syscall` at all (with some
/// arguments).
pub fn allows(thread: Thread, syscall: i64) -> bool {
    rules(thread).is_ok_and(|r| r.contains_key(&syscall))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type BuildResult<T> = Result<T, seccompiler::BackendError>;

fn arg_eq(index: u8, value: u64) -> BuildResult<SeccompCondition> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// Allowed whatever the arguments.
fn any(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for &nr in syscalls {
        rules.insert(nr, Vec::new());
    }
}

/// Allowed when argument `index` is one of `values`. The filters are
/// compiled in the process that installs them ([`init`]), so a value may
/// be its own pid.
fn one_of(rules: &mut Rules, nr: libc::c_long, index: u8, values: &[u64]) -> BuildResult<()> {
    let chain = values
        .iter()
        .map(|&v| SeccompRule::new(vec![arg_eq(index, v)?]))
        .collect::<BuildResult<Vec<_>>>()?;
    rules.insert(nr, chain);
    Ok(())
}

/// Memory may be mapped and protected, never executable.
fn no_exec(rules: &mut Rules) -> BuildResult<()> {
    let exec = libc::PROT_EXEC as u64;
    let not_exec = || {
        SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(exec),
            0,
        )?])
    };
    rules.insert(libc::SYS_mmap, vec![not_exec()?]);
    rules.insert(libc::SYS_mprotect, vec![not_exec()?]);
    Ok(())
}

/// What every thread does: memory, locks, time, its signals, logging
/// (standard error), and ending.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The event loop's file system work: the virtio-fs server acts on the
/// share for the guest (as the guest's user: setresuid/setresgid and
/// CAP_FSETID per call), and snapshots and the profiler's last files are
/// written.
const FILES: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_readlinkat,
    // The virtio-fs import runs in the share (its descriptor) and returns.
    libc::SYS_fchdir,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_dup,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_umask,
    libc::SYS_getuid,
    libc::SYS_getgid,
];

/// The event loop's descriptors: epoll, eventfds, vsock's Unix sockets,
/// the tap (it kicks the vCPU threads to pause and stop them with
/// `tgkill`, which every filter allows for the VMM's own threads).
const EVENTS: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
];

/// ioctl request numbers, each as the kernel's headers define it.
mod ioctls {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
}

/// The vCPU thread's requests: running the guest, and reading its state
/// (a snapshot, the profiler's samples, an unexpected exit's report).
fn vcpu_ioctls() -> Vec<u64> {
    use ioctls::*;
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_TRANSLATE(),
        KVM_GET_MSRS(),
        KVM_GET_FPU(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XSAVE2(),
        KVM_GET_XCRS(),
    ]
    .map(u64::from)
    .to_vec()
}

/// The event loop's requests: the VM's state for a snapshot, the tap's
/// offloads, and non-blocking sockets.
fn vmm_ioctls() -> Vec<u64> {
    use ioctls::*;
    let mut v: Vec<u64> = [
        KVM_GET_MSR_INDEX_LIST(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_IRQCHIP(),
        KVM_GET_CLOCK(),
        KVM_GET_PIT2(),
    ]
    .map(u64::from)
    .to_vec();
    v.extend([libc::TUNSETOFFLOAD, libc::FIONBIO]);
    v
}

/// The fcntl commands every thread may use: descriptor and status flags,
/// duplicates (a vCPU thread duplicates a device's eventfds when the guest
/// activates it); no locks, leases or pipe sizes.
const FCNTL_CMDS: [libc::c_int; 5] = [
    libc::F_GETFD,
    libc::F_SETFD,
    libc::F_GETFL,
    libc::F_SETFL,
    libc::F_DUPFD_CLOEXEC,
];

fn rules(thread: Thread) -> BuildResult<Rules> {
    let mut r = Rules::new();
    any(&mut r, COMMON);
    no_exec(&mut r)?;
    one_of(&mut r, libc::SYS_fcntl, 1, &FCNTL_CMDS.map(|c| c as u64))?;
    // Signals to the VMM's own threads only (the vCPU kicks, abort's
    // SIGABRT): tgkill's thread group is this process.
    one_of(
        &mut r,
        libc::SYS_tgkill,
        0,
        &[u64::from(std::process::id())],
    )?;
    match thread {
        Thread::Vmm => {
            any(&mut r, FILES);
            any(&mut r, EVENTS);
            one_of(&mut r, libc::SYS_ioctl, 1, &vmm_ioctls())?;
            // vsock's connections to the host's listeners.
            one_of(&mut r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
        }
        Thread::Vcpu => {
            one_of(&mut r, libc::SYS_ioctl, 1, &vcpu_ioctls())?;
        }
        Thread::Profiler => {
            // The timer kicks the vCPU threads; a dump writes each file
            // beside its place, syncs it and renames it there.
            any(
                &mut r,
                &[
                    libc::SYS_openat,
                    libc::SYS_fstat,
                    libc::SYS_statx,
                    libc::SYS_lseek,
                    libc::SYS_fdatasync,
                    libc::SYS_rename,
                    libc::SYS_unlink,
                ],
            );
        }
        Thread::Snapshot => {}
        Thread::Keeper => {
            // Waiting for signals and for the VMM; ending as it ended
            // (the signal's default action back, then raised).
            any(
                &mut r,
                &[
                    libc::SYS_rt_sigtimedwait,
                    libc::SYS_rt_sigaction,
                    libc::SYS_wait4,
                ],
            );
            let vmm = KEPT.load(std::sync::atomic::Ordering::SeqCst);
            one_of(&mut r, libc::SYS_kill, 0, &[vmm as u32 as u64])?;
        }
    }
    Ok(r)
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the fields set below are a
    // handler of the SA_SIGINFO signature and an empty mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handle_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is owned by `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only calls async-signal-safe
    // functions (write, _exit); `action` is fully initialised.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `SYS_SECCOMP`: the si_code of a SIGSYS a seccomp filter raised.
const SYS_SECCOMP: libc::c_int = 1;

/// Writes `n` in decimal into `buf` from `at`; returns the new end.
fn put_number(buf: &mut [u8], mut at: usize, n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut v = n;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in (0..len).rev() {
        if at < buf.len() {
            buf[at] = digits[i];
            at += 1;
        }
    }
    at
}

fn put(buf: &mut [u8], mut at: usize, text: &[u8]) -> usize {
    for &b in text {
        if at < buf.len() {
            buf[at] = b;
            at += 1;
        }
    }
    at
}

/// The message of a forbidden call, made without allocating (it is built
/// in a signal handler).
fn sigsys_message(buf: &mut [u8; 160], thread: Option<Thread>, syscall: u64) -> usize {
    let mut at = put(buf, 0, b"rtv-vmm: seccomp: the ");
    at = put(
        buf,
        at,
        thread.map_or("unfiltered", Thread::name).as_bytes(),
    );
    at = put(buf, at, b" thread made system call ");
    at = put_number(buf, at, syscall);
    at = put(buf, at, b", which its filter forbids; the VMM stops (exit ");
    at = put_number(buf, at, EXIT_CODE as u64);
    put(buf, at, b")\n")
}

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code != SYS_SECCOMP {
        return;
    }
    // SAFETY: for an SA_SIGINFO handler the third argument is the
    // interrupted thread's ucontext_t; on x86_64 the system call's number
    // is in RAX when seccomp traps it.
    let syscall = unsafe {
        let uc = ctx as *const libc::ucontext_t;
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] as u64
    };
    let thread = KIND.with(Cell::get);
    let mut buf = [0u8; 160];
    let len = sigsys_message(&mut buf, thread, syscall);
    // SAFETY: write and _exit are async-signal-safe and allowed by every
    // filter; `buf` holds `len` initialised bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_in_both_modes() {
        for thread in Thread::ALL {
            for mode in [Mode::On, Mode::Log] {
                let program = compile(thread, mode).unwrap();
                assert!(!program.is_empty(), "{thread:?}");
            }
        }
    }

    #[test]
    fn no_filter_starts_processes_or_threads_or_changes_the_jail() {
        for thread in Thread::ALL {
            for nr in [
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_umount2,
                libc::SYS_pivot_root,
                libc::SYS_chroot,
                libc::SYS_unshare,
                libc::SYS_setns,
                libc::SYS_prctl,
                libc::SYS_seccomp,
                libc::SYS_bpf,
                libc::SYS_open_by_handle_at,
                libc::SYS_name_to_handle_at,
                libc::SYS_process_vm_writev,
                libc::SYS_kexec_load,
                libc::SYS_init_module,
                libc::SYS_setuid,
                libc::SYS_setgid,
            ] {
                assert!(!allows(thread, nr), "{thread:?} allows {nr}");
            }
        }
    }

    #[test]
    fn the_message_names_the_thread_and_the_call() {
        let mut buf = [0u8; 160];
        let len = sigsys_message(&mut buf, Some(Thread::Vcpu), 41);
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "rtv-vmm: seccomp: the vcpu thread made system call 41, which its filter forbids; the VMM stops (exit 159)\n"
        );
        let len = sigsys_message(&mut buf, None, 0);
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .contains("the unfiltered thread made system call 0,"));
    }

    /// Runs `call` in a child process under `thread`'s filter (with the
    /// SIGSYS handler of [`Mode::On`]): its exit status and what it wrote
    /// to standard error. The child only makes raw system calls (the test
    /// process has other threads).
    fn in_child(thread: Thread, call: fn()) -> (i32, String) {
        let program = compile(thread, Mode::On).unwrap();
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child calls only async-signal-safe functions and
        // raw system calls, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child: descriptor moves, then the filter and
            // the call; nothing allocates.
            unsafe {
                libc::dup2(pipe[1], 2);
                libc::close(pipe[0]);
                if install_sigsys_handler().is_err() {
                    libc::_exit(100);
                }
                KIND.with(|k| k.set(Some(thread)));
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(101);
                }
                call();
                libc::_exit(0);
            }
        }
        // SAFETY: the parent's copy of the write end.
        unsafe { libc::close(pipe[1]) };
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        // SAFETY: the read end is ours; File takes it over.
        let mut err = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut err, &mut text).unwrap();
        assert!(libc::WIFEXITED(status), "{thread:?}: status {status:#x}");
        (libc::WEXITSTATUS(status), text)
    }

    fn allowed(thread: Thread, call: fn()) {
        let (code, err) = in_child(thread, call);
        assert_eq!(code, 0, "{thread:?}: {err}");
    }

    fn forbidden(thread: Thread, call: fn(), syscall: libc::c_long) {
        let (code, err) = in_child(thread, call);
        assert_eq!(code, EXIT_CODE, "{thread:?}: {err}");
        let expected = format!(
            "the {} thread made system call {syscall}, which its filter forbids",
            thread.name()
        );
        assert!(err.contains(&expected), "{thread:?}: {err}");
    }

    /// A raw system call for the filter tests.
    macro_rules! sys {
        ($($arg:expr),+ $(,)?) => {
            // SAFETY: the tests pass integers, descriptors that do not
            // exist, and static C strings: nothing the kernel writes to.
            unsafe { libc::syscall($($arg as libc::c_long),+) }
        };
    }

    static PARENT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    fn map(prot: libc::c_int) {
        // An anonymous private mapping, never used.
        {
            sys!(
                libc::SYS_mmap,
                0,
                4096,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
        }
    }

    #[test]
    fn each_filter_lets_its_calls_through_and_stops_the_vmm_on_others() {
        for thread in Thread::ALL {
            // Every thread: memory (not executable), time, its own ids.
            allowed(thread, || {
                map(libc::PROT_READ | libc::PROT_WRITE);
                {
                    sys!(libc::SYS_getpid);
                    sys!(libc::SYS_gettid);
                }
            });
            forbidden(
                thread,
                || map(libc::PROT_READ | libc::PROT_EXEC),
                libc::SYS_mmap,
            );
            forbidden(
                thread,
                || {
                    sys!(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
                },
                libc::SYS_socket,
            );
            forbidden(
                thread,
                || {
                    sys!(libc::SYS_fork);
                },
                libc::SYS_fork,
            );
            forbidden(
                thread,
                || {
                    sys!(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
                },
                libc::SYS_ptrace,
            );
        }
        // ioctl: each thread's own requests only (on a bad descriptor).
        // (On descriptor -1: a call let through fails with EBADF.)
        allowed(Thread::Vcpu, || {
            sys!(libc::SYS_ioctl, -1, ioctls::KVM_RUN(), 0);
            sys!(libc::SYS_ioctl, -1, ioctls::KVM_GET_REGS(), 0);
        });
        forbidden(
            Thread::Vcpu,
            || {
                sys!(libc::SYS_ioctl, -1, libc::TUNSETIFF, 0);
            },
            libc::SYS_ioctl,
        );
        allowed(Thread::Vmm, || {
            sys!(libc::SYS_ioctl, -1, libc::FIONBIO, 0);
            sys!(libc::SYS_ioctl, -1, libc::TUNSETOFFLOAD, 0);
        });
        forbidden(
            Thread::Vmm,
            || {
                sys!(libc::SYS_ioctl, -1, ioctls::KVM_RUN(), 0);
            },
            libc::SYS_ioctl,
        );
        forbidden(
            Thread::Profiler,
            || {
                sys!(libc::SYS_ioctl, -1, ioctls::KVM_GET_REGS(), 0);
            },
            libc::SYS_ioctl,
        );
        // socket: Unix only, and only for the event loop.
        allowed(Thread::Vmm, || {
            let fd = sys!(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
            sys!(libc::SYS_close, fd);
        });
        forbidden(
            Thread::Vcpu,
            || {
                sys!(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
            },
            libc::SYS_socket,
        );
        // fcntl: flags and duplicates, no locks.
        allowed(Thread::Vmm, || {
            sys!(libc::SYS_fcntl, 2, libc::F_GETFD);
        });
        forbidden(
            Thread::Vmm,
            || {
                sys!(libc::SYS_fcntl, 2, libc::F_SETLK, 0);
            },
            libc::SYS_fcntl,
        );
        // Signals: only to the VMM's own threads (the filter was compiled
        // in the parent, whose pid the children's calls name here).
        let parent = std::process::id();
        PARENT.store(parent, std::sync::atomic::Ordering::SeqCst);
        allowed(Thread::Vmm, || {
            let p = PARENT.load(std::sync::atomic::Ordering::SeqCst);
            sys!(libc::SYS_tgkill, p, p, 0);
        });
        forbidden(
            Thread::Vmm,
            || {
                sys!(libc::SYS_tgkill, 1, 1, 0);
            },
            libc::SYS_tgkill,
        );
        forbidden(
            Thread::Vcpu,
            || {
                sys!(libc::SYS_tgkill, 1, 1, 0);
            },
            libc::SYS_tgkill,
        );
        // The virtio-fs server's file calls are the event loop's alone.
        forbidden(
            Thread::Vcpu,
            || {
                sys!(libc::SYS_unlinkat, -1, c"x".as_ptr(), 0);
            },
            libc::SYS_unlinkat,
        );
    }

    #[test]
    fn the_keeper_signals_and_waits_for_its_vmm_alone() {
        // The test process stands for the VMM the keeper may signal.
        let vmm = std::process::id();
        PARENT.store(vmm, std::sync::atomic::Ordering::SeqCst);
        keeper_of(vmm as libc::pid_t);
        allowed(Thread::Keeper, || {
            let p = PARENT.load(std::sync::atomic::Ordering::SeqCst);
            sys!(libc::SYS_kill, p, 0);
            // No child here: ECHILD, let through.
            sys!(libc::SYS_wait4, -1, 0, libc::WNOHANG, 0);
        });
        forbidden(
            Thread::Keeper,
            || {
                sys!(libc::SYS_kill, 1, 0);
            },
            libc::SYS_kill,
        );
        forbidden(
            Thread::Keeper,
            || {
                sys!(libc::SYS_openat, -1, c"x".as_ptr(), 0);
            },
            libc::SYS_openat,
        );
        // Nor do the VMM's threads signal or wait for other processes.
        forbidden(
            Thread::Vmm,
            || {
                sys!(libc::SYS_kill, 1, 0);
            },
            libc::SYS_kill,
        );
        forbidden(
            Thread::Vmm,
            || {
                sys!(libc::SYS_wait4, -1, 0, libc::WNOHANG, 0);
            },
            libc::SYS_wait4,
        );
    }

    #[test]
    fn the_readme_gives_each_filters_count() {
        let readme = include_str!("../../README.md");
        for thread in Thread::ALL {
            let row = readme
                .lines()
                .find(|l| {
                    l.strip_prefix("| ")
                        .is_some_and(|r| r.starts_with(&format!("{} ", thread.name())))
                })
                .unwrap_or_else(|| panic!("no README row for the {} filter", thread.name()));
            let count = row.split('|').nth(2).map(str::trim);
            assert_eq!(
                count,
                Some(syscall_count(thread).to_string().as_str()),
                "README row {row:?}"
            );
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("yes".parse::<Mode>().is_err());
    }
}
