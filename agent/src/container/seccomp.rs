//! `linux.seccomp`: an OCI seccomp profile compiled to a classic BPF program
//! (parent side), and installing it with seccomp(2) (child side, right
//! before execve).
//!
//! Only the native x86_64 ABI is filtered. The program is laid out as
//!
//! ```text
//!     ld  [arch]
//!     jeq AUDIT_ARCH_X86_64, +1, +0
//!     ret KILL_PROCESS                  ; i386 (int 0x80) calls and any other ABI
//!     ld  [nr]
//!     jge 0x40000000, +0, +1
//!     ret <default>                     ; x32 (and nr = -1) calls
//!   a binary search over the syscall numbers, cut into ranges (runs of
//!   numbers with the same unconditional action, the gaps between them
//!   with the default, each syscall with argument conditions alone):
//!     jge <first of the upper half>, ->upper, +0   ; or jge .., +0, +1; ja ->upper
//!     <the lower half's search>
//!     <the upper half's search>
//!   each range ends in `ret <action>`, or in `ja` to its syscall's block:
//!   one block per syscall with argument conditions:
//!     <conditions of rule 1, each failing to rule 2>
//!     ret <action 1>
//!     <conditions of rule 2, ...>
//!     ret <action 2>
//!     ret <default>                     ; no rule matched
//! ```
//!
//! A syscall costs about log2(ranges) jumps, not a walk through up to
//! every listed number. That walk also happened once per syscall number
//! when a filter was installed (the kernel's `seccomp_cache_prepare`
//! emulates the program for every number to find the calls it always
//! allows): under PVM, where guest kernel code is emulated, installing
//! the linear program of containerd's default profile cost ~1.7 s of
//! guest time for each container and exec.
//!
//! x32 calls are not matched against the rules (their numbers differ) and
//! get the default action: with a default of SCMP_ACT_ALLOW they would
//! bypass deny rules on a kernel built with CONFIG_X86_X32_ABI, which rtv's
//! guest kernel (tinyconfig + `guest-kernel/config.fragment`) is not.
//!
//! Classic BPF jumps only forward, and conditional jumps by at most 255
//! instructions. Every conditional jump here stays short: a search node
//! picks the `ja` (32-bit offset) form when its lower half is too long,
//! ranges reach their blocks with `ja`, and a condition whose failure
//! target is too far away jumps to a `ja` trampoline right after its own
//! code.

use std::collections::HashMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

use super::{Errno, SpecError};

/// `AUDIT_ARCH_X86_64` in `<linux/audit.h>`: `EM_X86_64 | __AUDIT_ARCH_64BIT
/// | __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// `__X32_SYSCALL_BIT`: x32 system calls enter the kernel as x86_64 calls
/// with this bit set in their number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `BPF_MAXINSNS`: the longest program the kernel accepts.
const MAX_INSNS: usize = libc::BPF_MAXINSNS as usize;

/// Offsets in `struct seccomp_data`: `int nr; __u32 arch; __u64
/// instruction_pointer; __u64 args[6];`, little-endian.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

/// `EPERM`, the errno of SCMP_ACT_ERRNO and the trace value of
/// SCMP_ACT_TRACE when the spec gives none (as runc).
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// A compiled `linux.seccomp`: the BPF program and the seccomp(2) flags.
#[derive(Clone)]
pub struct Filter {
    /// The classic BPF program, at most `BPF_MAXINSNS` instructions.
    program: Vec<libc::sock_filter>,
    /// `SECCOMP_FILTER_FLAG_*` bits from `linux.seccomp.flags`.
    flags: libc::c_ulong,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("instructions", &self.program.len())
            .field("flags", &self.flags)
            .finish()
    }
}

/// One BPF instruction as (code, jt, jf, k).
pub type Insn = (u16, u8, u8, u32);

impl Filter {
    /// The program's instructions (code, jt, jf, k) and the flags, to hand
    /// over to another process.
    pub fn parts(&self) -> (Vec<Insn>, u64) {
        (
            self.program
                .iter()
                .map(|i| (i.code, i.jt, i.jf, i.k))
                .collect(),
            self.flags,
        )
    }

    /// A filter from [`Filter::parts`].
    pub fn from_parts(program: &[Insn], flags: u64) -> Filter {
        Filter {
            program: program
                .iter()
                .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
                .collect(),
            flags: flags as libc::c_ulong,
        }
    }

    /// CHILD: installs the filter on the calling thread with
    /// `seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog)`.
    ///
    /// Runs in a freshly forked child right before execve: it only makes the
    /// system call, on data prepared by [`compile`]. The caller must have set
    /// no_new_privs or hold CAP_SYS_ADMIN. With SECCOMP_FILTER_FLAG_TSYNC, a
    /// thread that cannot be synchronized is reported as `ESRCH`.
    pub fn install(&self) -> Result<(), Errno> {
        let prog = libc::sock_fprog {
            // compile() keeps the program at most BPF_MAXINSNS (4096) long.
            len: self.program.len() as libc::c_ushort,
            filter: self.program.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points to `len` initialized instructions that live
        // as long as `self`; the kernel only reads them (and copies them)
        // during the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        match rc {
            0 => Ok(()),
            // With TSYNC the kernel returns the id of a thread it could not
            // synchronize instead of an error.
            rc if rc > 0 => Err(Errno(libc::ESRCH)),
            _ => Err(Errno::last()),
        }
    }
}

/// One argument comparison of a rule, on the 64-bit `seccomp_data.args[index]`.
#[derive(Debug, Clone, Copy)]
struct Cond {
    index: u32,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: u64,
}

/// A rule for one syscall: `action` if every condition holds.
#[derive(Debug, Clone)]
struct Rule {
    conds: Vec<Cond>,
    action: u32,
}

/// Compiles `linux.seccomp` into a [`Filter`] for the native x86_64 ABI.
///
/// Errors name the field by its JSON path, such as
/// `linux.seccomp.syscalls[3].names[1]: unknown syscall "fooo"`.
///
/// Semantics, as in libseccomp/runc except where noted:
/// - calls of another ABI than x86_64 (i386 through `int 0x80`) kill the
///   process, whatever `architectures` lists (SCMP_ARCH_X86, SCMP_ARCH_X32
///   and SCMP_ARCH_X86_64 are accepted there, others are errors); x32 calls
///   get the default action;
/// - a name that is a system call of another architecture only (see
///   [`FOREIGN_SYSCALLS`]) is skipped, as libseccomp does: it can never be
///   called on x86_64; a name unknown on every architecture is an error;
/// - the rules of one syscall are tried in the spec's order and the first
///   whose conditions all hold gives the action (libseccomp orders rules
///   by its own precedence instead); conditions of a rule are ANDed, even
///   several on the same argument;
/// - SCMP_ACT_NOTIFY, `listenerPath`, `listenerMetadata` and
///   SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV are errors: rtv has no seccomp
///   agent.
pub fn compile(s: &LinuxSeccomp) -> Result<Filter, SpecError> {
    if cfg!(not(target_arch = "x86_64")) {
        return Err(SpecError::new(
            "linux.seccomp",
            "seccomp filters are only supported on x86_64",
        ));
    }
    let default = action(
        "linux.seccomp.defaultAction",
        "linux.seccomp.defaultErrnoRet",
        s.default_action(),
        s.default_errno_ret(),
    )?;

    for (i, arch) in s.architectures().iter().flatten().enumerate() {
        match arch {
            Arch::ScmpArchNative | Arch::ScmpArchX86_64 | Arch::ScmpArchX86 | Arch::ScmpArchX32 => {
            }
            other => {
                return Err(SpecError::new(
                    format!("linux.seccomp.architectures[{i}]"),
                    format!("{other} is not supported: rtv runs x86_64 guests"),
                ))
            }
        }
    }

    let mut flags: libc::c_ulong = 0;
    for (i, flag) in s.flags().iter().flatten().enumerate() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            other => {
                return Err(SpecError::new(
                    format!("linux.seccomp.flags[{i}]"),
                    format!("{other} is not supported (it needs a seccomp notify listener)"),
                ))
            }
        };
    }
    if s.listener_path().is_some() {
        return Err(SpecError::new(
            "linux.seccomp.listenerPath",
            "seccomp notify listeners are not supported",
        ));
    }
    if s.listener_metadata().is_some() {
        return Err(SpecError::new(
            "linux.seccomp.listenerMetadata",
            "seccomp notify listeners are not supported",
        ));
    }

    // The rules of each syscall, in the spec's order; syscalls in order of
    // first appearance so that the program does not depend on hashing.
    let mut order: Vec<(u32, Vec<Rule>)> = Vec::new();
    let mut slot: HashMap<u32, usize> = HashMap::new();
    for (i, sc) in s.syscalls().iter().flatten().enumerate() {
        let act = action(
            &format!("linux.seccomp.syscalls[{i}].action"),
            &format!("linux.seccomp.syscalls[{i}].errnoRet"),
            sc.action(),
            sc.errno_ret(),
        )?;
        let mut conds = Vec::new();
        for (j, arg) in sc.args().iter().flatten().enumerate() {
            let index = u32::try_from(arg.index())
                .ok()
                .filter(|index| *index < 6)
                .ok_or_else(|| {
                    SpecError::new(
                        format!("linux.seccomp.syscalls[{i}].args[{j}].index"),
                        format!(
                            "{} is out of range: system calls have arguments 0 to 5",
                            arg.index()
                        ),
                    )
                })?;
            conds.push(Cond {
                index,
                op: arg.op(),
                value: arg.value(),
                value_two: arg.value_two().unwrap_or(0),
            });
        }
        for (j, name) in sc.names().iter().enumerate() {
            let nr = match name.parse::<syscalls::Sysno>() {
                Ok(sysno) => u32::try_from(sysno.id()).ok(),
                Err(()) => None,
            };
            let Some(nr) = nr else {
                if foreign_syscall(name) {
                    continue;
                }
                return Err(SpecError::new(
                    format!("linux.seccomp.syscalls[{i}].names[{j}]"),
                    format!("unknown syscall {name:?}"),
                ));
            };
            let k = *slot.entry(nr).or_insert_with(|| {
                order.push((nr, Vec::new()));
                order.len() - 1
            });
            order[k].1.push(Rule {
                conds: conds.clone(),
                action: act,
            });
        }
    }

    // Rules after an unconditional one are unreachable.
    for (_, rules) in &mut order {
        if let Some(k) = rules.iter().position(|r| r.conds.is_empty()) {
            rules.truncate(k + 1);
        }
    }
    let too_long = |len: usize| {
        SpecError::new(
            "linux.seccomp.syscalls",
            format!(
                "the filter needs more than {MAX_INSNS} BPF instructions \
                 (at least {len}), the kernel's limit"
            ),
        )
    };
    // Every syscall number below the x32 bit goes to a target: the `ret`
    // of its action when its only rule is unconditional, else the block
    // of its rules. Numbers of no rule get the default action.
    let mut targets: Vec<(u32, Target)> = Vec::with_capacity(order.len());
    let mut blocks: Vec<Vec<libc::sock_filter>> = Vec::new();
    for (nr, rules) in &order {
        if *nr >= X32_SYSCALL_BIT {
            // Not an x86_64 number (the crate's table has none this high).
            continue;
        }
        match rules.as_slice() {
            [only] if only.conds.is_empty() => {
                if only.action != default {
                    targets.push((*nr, Target::Ret(only.action)));
                }
            }
            rules => {
                let mut body = Vec::new();
                for rule in rules {
                    emit_rule(rule, &mut body);
                    if body.len() > MAX_INSNS {
                        return Err(too_long(body.len()));
                    }
                }
                if rules.last().is_some_and(|r| !r.conds.is_empty()) {
                    body.push(ret(default));
                }
                targets.push((*nr, Target::Block(blocks.len())));
                blocks.push(body);
            }
        }
    }
    targets.sort_unstable_by_key(|(nr, _)| *nr);
    let ranges = ranges(&targets, default);

    let mut program = vec![
        load(OFF_ARCH),
        jump(libc::BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
        load(OFF_NR),
        jump(libc::BPF_JGE, X32_SYSCALL_BIT, 0, 1),
        ret(default),
    ];
    let mut tree = Vec::new();
    search_tree(&ranges, &mut tree);
    let blocks_at = program.len() + tree.len();
    if blocks_at > MAX_INSNS {
        return Err(too_long(blocks_at));
    }
    let mut starts = Vec::with_capacity(blocks.len());
    let mut at = blocks_at;
    for body in &blocks {
        starts.push(at);
        at += body.len();
        if at > MAX_INSNS {
            return Err(too_long(at));
        }
    }
    for (ins, to_block) in tree {
        let ins = match to_block {
            // A `ja` to its block, which starts after the whole tree.
            Some(b) => ja((starts[b] - program.len() - 1) as u32),
            None => ins,
        };
        program.push(ins);
    }
    for body in blocks {
        program.extend_from_slice(&body);
    }
    Ok(Filter { program, flags })
}

/// Where the search tree sends a syscall number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `ret` of this action.
    Ret(u32),
    /// The code of the syscall's rules: the block with this index.
    Block(usize),
}

/// The numbers 0 to `X32_SYSCALL_BIT - 1` cut into ranges `(first,
/// target)`, each lasting until the next one's first, in order: runs of
/// numbers with the same action are one range, gaps get `default`, a
/// syscall with a block is a range of its own.
fn ranges(targets: &[(u32, Target)], default: u32) -> Vec<(u32, Target)> {
    let mut out: Vec<(u32, Target)> = vec![(0, Target::Ret(default))];
    for &(nr, t) in targets {
        match out.last_mut() {
            Some(last) if last.0 == nr => last.1 = t,
            _ => out.push((nr, t)),
        }
        // The numbers after it get the default, until the next target.
        if nr + 1 < X32_SYSCALL_BIT {
            out.push((nr + 1, Target::Ret(default)));
        }
    }
    // Neighbours with the same `ret` are one range (blocks all differ).
    out.dedup_by(|b, a| a.1 == b.1);
    out
}

/// Appends a binary search over `ranges` (the accumulator holds the
/// number): `jge` on the first number of the upper half, down to a single
/// range, which is its `ret` or a `ja` to its block (marked with the
/// block's index, resolved by the caller). A syscall costs about
/// log2(ranges) jumps instead of a walk through every listed number;
/// the kernel also walks the program once per syscall number when it is
/// installed (`seccomp_cache_prepare`), which is emulated under PVM.
fn search_tree(ranges: &[(u32, Target)], out: &mut Vec<(libc::sock_filter, Option<usize>)>) {
    match ranges {
        [] => {}
        [(_, Target::Ret(k))] => out.push((ret(*k), None)),
        [(_, Target::Block(b))] => out.push((ja(0), Some(*b))),
        _ => {
            let (low, high) = ranges.split_at(ranges.len() / 2);
            let mut left = Vec::new();
            search_tree(low, &mut left);
            match u8::try_from(left.len()) {
                Ok(skip) => out.push((jump(libc::BPF_JGE, high[0].0, skip, 0), None)),
                Err(_) => {
                    out.push((jump(libc::BPF_JGE, high[0].0, 0, 1), None));
                    out.push((ja(left.len() as u32), None));
                }
            }
            out.extend(left);
            search_tree(high, out);
        }
    }
}

/// The system call names of the other architectures libseccomp supports
/// that x86_64 does not have, sorted and separated by spaces: in a profile
/// they are skipped, as libseccomp (and so runc and crun) skips them, since
/// a process on x86_64 can never make those calls. Docker's and Kubernetes'
/// RuntimeDefault profiles list such names (`_llseek`, `chown32`,
/// `socketcall`, `arm_fadvise64_64`, `s390_pci_mmio_read`, ...).
///
/// A list rather than the `syscalls` crate's per-architecture tables: with
/// their features on, the name parsers of ten architectures added 146 KB
/// to the agent, this list under 2 KB. It was generated from the tables
/// of syscalls 0.8.1, for the architectures that both it and libseccomp
/// have, with
///
/// ```sh
/// cd ~/.cargo/registry/src/*/syscalls-0.8.1/src/arch
/// names() { grep -hoE '^ {8}(r#)?[a-z_][a-z0-9_]* = ' "$@" |
///   sed -E 's/^ +(r#)?//; s/ = $//' | LC_ALL=C sort -u; }
/// names x86_64.rs > /tmp/native
/// names x86.rs arm.rs aarch64.rs loongarch64.rs mips.rs mips64.rs \
///   powerpc.rs powerpc64.rs riscv64.rs s390x.rs |
///   grep -vxE 'fstatat|reserved[0-9]+|unused[0-9]+' > /tmp/other
/// { LC_ALL=C comm -23 /tmp/other /tmp/native
///   printf '%s\n' atomic_barrier atomic_cmpxchg_32 breakpoint get_tls \
///     getpagesize set_tls usr26 usr32
/// } | LC_ALL=C sort | tr '\n' ' '
/// ```
///
/// The filter drops the crate's placeholders (`reserved177`, `unused109`)
/// and its `fstatat`, libseccomp's `newfstatat`; the additions are what
/// libseccomp knows and the crate has no table for: the ARM private calls
/// and m68k's. The result contains every non-x86_64 name of libseccomp
/// 2.5.4 (checked with `seccomp_syscall_resolve_name_arch`). Names only
/// sparc has (`utrap_install`, ...) are not in it: libseccomp does not
/// support sparc and rejects them too.
const FOREIGN_SYSCALLS: &str = "\
    _llseek _newselect arm_fadvise64_64 arm_sync_file_range atomic_barrier \
    atomic_cmpxchg_32 bdflush break breakpoint cachectl cacheflush chown32 \
    clock_adjtime64 clock_getres_time64 clock_gettime64 clock_nanosleep_time64 \
    clock_settime64 fadvise64_64 fchown32 fcntl64 fstat64 fstatat64 fstatfs64 ftime \
    ftruncate64 futex_time64 get_tls getegid32 geteuid32 getgid32 getgroups32 \
    getpagesize getresgid32 getresuid32 getuid32 gtty idle io_pgetevents_time64 ipc \
    lchown32 lock lstat64 mmap2 mpx mq_timedreceive_time64 mq_timedsend_time64 \
    multiplexer nice oldfstat oldlstat oldolduname oldstat olduname pciconfig_iobase \
    pciconfig_read pciconfig_write ppoll_time64 prof profil pselect6_time64 readdir recv \
    recvmmsg_time64 riscv_flush_icache riscv_hwprobe rt_sigtimedwait_time64 rtas \
    s390_guarded_storage s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr \
    s390_sthyi sched_rr_get_interval_time64 semtimedop_time64 send sendfile64 set_tls \
    setfsgid32 setfsuid32 setgid32 setgroups32 setregid32 setresgid32 setresuid32 \
    setreuid32 setuid32 sgetmask sigaction signal sigpending sigprocmask sigreturn \
    sigsuspend socketcall spu_create spu_run ssetmask stat64 statfs64 stime stty \
    subpage_prot swapcontext switch_endian sync_file_range2 sys_debug_setcontext syscall \
    sysmips timer_gettime64 timer_settime64 timerfd timerfd_gettime64 timerfd_settime64 \
    truncate64 ugetrlimit ulimit umount usr26 usr32 utimensat_time64 vm86 vm86old \
    waitpid";

/// Whether `name` is a system call of another architecture only (see
/// [`FOREIGN_SYSCALLS`]).
fn foreign_syscall(name: &str) -> bool {
    FOREIGN_SYSCALLS.split(' ').any(|n| n == name)
}

/// The `SECCOMP_RET_*` value of an action; `errno_ret` is the errno of
/// SCMP_ACT_ERRNO and the trace value of SCMP_ACT_TRACE (EPERM if unset).
fn action(
    field: &str,
    errno_field: &str,
    act: LinuxSeccompAction,
    errno_ret: Option<u32>,
) -> Result<u32, SpecError> {
    let data = || match errno_ret {
        None => Ok(DEFAULT_ERRNO),
        Some(v) if v <= libc::SECCOMP_RET_DATA => Ok(v),
        Some(v) => Err(SpecError::new(
            errno_field,
            format!("{v} does not fit in the 16 bits of SECCOMP_RET_DATA"),
        )),
    };
    Ok(match act {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            libc::SECCOMP_RET_KILL_THREAD
        }
        LinuxSeccompAction::ScmpActKillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => libc::SECCOMP_RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => libc::SECCOMP_RET_ERRNO | data()?,
        LinuxSeccompAction::ScmpActTrace => libc::SECCOMP_RET_TRACE | data()?,
        LinuxSeccompAction::ScmpActLog => libc::SECCOMP_RET_LOG,
        LinuxSeccompAction::ScmpActAllow => libc::SECCOMP_RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SpecError::new(
                field,
                "SCMP_ACT_NOTIFY is not supported (rtv has no seccomp notify listener)",
            ))
        }
    })
}

/// Appends a rule: its conditions, each jumping past the rule's `ret` when
/// it fails, then `ret action`.
fn emit_rule(rule: &Rule, out: &mut Vec<libc::sock_filter>) {
    // Laid out backwards, since whether a condition may jump straight to the
    // failure target depends on the length of what follows it.
    let mut parts: Vec<Vec<libc::sock_filter>> = Vec::with_capacity(rule.conds.len());
    let mut rest = 1; // the `ret`
    for cond in rule.conds.iter().rev() {
        let mut part = Vec::new();
        lower(&cond_code(cond), rest, &mut part);
        rest += part.len();
        parts.push(part);
    }
    for part in parts.iter().rev() {
        out.extend_from_slice(part);
    }
    out.push(ret(rule.action));
}

/// Where a jump of a condition goes.
#[derive(Debug, Clone, Copy)]
enum To {
    /// The next instruction.
    Next,
    /// Just after the condition's code: it holds.
    Pass,
    /// The failure target of the rule: it does not hold.
    Fail,
}

/// An instruction of a condition, before its jumps are resolved.
#[derive(Debug, Clone, Copy)]
enum Ins {
    Load(u32),
    And(u32),
    Jump(u32, u32, To, To),
}

/// The code of a 64-bit comparison, as the kernel ABI is little-endian:
/// `args[i]` has its low word at `16 + 8i` and its high word at `20 + 8i`.
/// Unsigned comparisons decide on the high words unless they are equal.
fn cond_code(c: &Cond) -> Vec<Ins> {
    use libc::{BPF_JEQ, BPF_JGE, BPF_JGT};
    use To::{Fail, Next, Pass};
    let lo = OFF_ARGS + 8 * c.index;
    let hi = lo + 4;
    let (vh, vl) = ((c.value >> 32) as u32, c.value as u32);
    match c.op {
        LinuxSeccompOperator::ScmpCmpEq => vec![
            Ins::Load(hi),
            Ins::Jump(BPF_JEQ, vh, Next, Fail),
            Ins::Load(lo),
            Ins::Jump(BPF_JEQ, vl, Pass, Fail),
        ],
        LinuxSeccompOperator::ScmpCmpNe => vec![
            Ins::Load(hi),
            Ins::Jump(BPF_JEQ, vh, Next, Pass),
            Ins::Load(lo),
            Ins::Jump(BPF_JEQ, vl, Fail, Pass),
        ],
        LinuxSeccompOperator::ScmpCmpGt => vec![
            Ins::Load(hi),
            Ins::Jump(BPF_JGT, vh, Pass, Next),
            Ins::Jump(BPF_JEQ, vh, Next, Fail),
            Ins::Load(lo),
            Ins::Jump(BPF_JGT, vl, Pass, Fail),
        ],
        LinuxSeccompOperator::ScmpCmpGe => vec![
            Ins::Load(hi),
            Ins::Jump(BPF_JGT, vh, Pass, Next),
            Ins::Jump(BPF_JEQ, vh, Next, Fail),
            Ins::Load(lo),
            Ins::Jump(BPF_JGE, vl, Pass, Fail),
        ],
        LinuxSeccompOperator::ScmpCmpLt => vec![
            Ins::Load(hi),
            Ins::Jump(BPF_JGE, vh, Next, Pass),
            Ins::Jump(BPF_JEQ, vh, Next, Fail),
            Ins::Load(lo),
            Ins::Jump(BPF_JGE, vl, Fail, Pass),
        ],
        LinuxSeccompOperator::ScmpCmpLe => vec![
            Ins::Load(hi),
            Ins::Jump(BPF_JGE, vh, Next, Pass),
            Ins::Jump(BPF_JEQ, vh, Next, Fail),
            Ins::Load(lo),
            Ins::Jump(BPF_JGT, vl, Fail, Pass),
        ],
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            // (arg & value) == valueTwo.
            let (dh, dl) = ((c.value_two >> 32) as u32, c.value_two as u32);
            vec![
                Ins::Load(hi),
                Ins::And(vh),
                Ins::Jump(BPF_JEQ, dh, Next, Fail),
                Ins::Load(lo),
                Ins::And(vl),
                Ins::Jump(BPF_JEQ, dl, Pass, Fail),
            ]
        }
    }
}

/// Appends a condition's code, whose failure target is `rest` instructions
/// after its end. If a jump from it could not reach that far (8-bit
/// offsets), failures jump to a `ja rest` appended after the code, and
/// successes jump over it.
fn lower(code: &[Ins], rest: usize, out: &mut Vec<libc::sock_filter>) {
    let n = code.len();
    // The farthest failure jump is from the first instruction: n - 1 + rest.
    let direct = n + rest <= 256;
    for (i, ins) in code.iter().enumerate() {
        let to_end = n - i - 1;
        let resolve = |to: To| -> u8 {
            let off = match to {
                To::Next => 0,
                To::Pass if direct => to_end,
                To::Pass => to_end + 1,
                To::Fail if direct => to_end + rest,
                To::Fail => to_end,
            };
            // Short by construction: at most 255 when direct, else at most n.
            off as u8
        };
        out.push(match *ins {
            Ins::Load(off) => load(off),
            Ins::And(k) => stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, k),
            Ins::Jump(op, k, jt, jf) => jump(op, k, resolve(jt), resolve(jf)),
        });
    }
    if !direct {
        // rest counts instructions of one rule held in memory: far below
        // 2^32.
        out.push(ja(rest as u32));
    }
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// `ld [off]`: a 32-bit word of `seccomp_data`.
fn load(off: u32) -> libc::sock_filter {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, off)
}

/// `ret k`.
fn ret(k: u32) -> libc::sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, k)
}

/// `ja +k`: the only jump with a 32-bit offset.
fn ja(k: u32) -> libc::sock_filter {
    stmt(libc::BPF_JMP | libc::BPF_JA, k)
}

/// A conditional jump `op` (BPF_JEQ, BPF_JGT, BPF_JGE) on the constant `k`.
fn jump(op: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile(v: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(v).expect("profile")
    }

    fn compiled(v: serde_json::Value) -> Filter {
        compile(&profile(v)).expect("compile")
    }

    fn err(v: serde_json::Value) -> String {
        compile(&profile(v)).expect_err("should fail").to_string()
    }

    /// Forks a child that installs `filter` (after no_new_privs, without
    /// core dumps) when given, then exits with `body()`; returns the raw
    /// wait status. The child only makes system calls: the test process is
    /// multi-threaded.
    fn run(filter: Option<&Filter>, body: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only calls async-signal-safe functions (system
        // calls, no allocation) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = child(filter, body);
            // SAFETY: _exit ends the child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid out-pointer.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc == pid {
                return status;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EINTR), "waitpid: {e}");
        }
    }

    fn child(filter: Option<&Filter>, body: impl FnOnce() -> i32) -> i32 {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit with a valid pointer; affects the child only.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        if let Some(filter) = filter {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return 120;
            }
            if filter.install().is_err() {
                return 121;
            }
        }
        body()
    }

    fn exit_code(status: i32) -> i32 {
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// A raw system call with two arguments: its return value, and errno
    /// when it failed.
    fn sys(nr: libc::c_long, a0: u64, a1: u64) -> (i64, i32) {
        // SAFETY: only called with system calls that ignore their arguments
        // or take integers.
        let rc = unsafe { libc::syscall(nr, a0, a1) };
        (rc, if rc == -1 { Errno::last().0 } else { 0 })
    }

    /// `uname(&buf)`: its return value and errno.
    fn uname() -> (i32, i32) {
        // SAFETY: utsname is plain data.
        let mut buf: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out-pointer.
        let rc = unsafe { libc::uname(&mut buf) };
        (rc, if rc == -1 { Errno::last().0 } else { 0 })
    }

    #[test]
    fn errno_rules_and_allow_default() {
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["uname", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                {"names": ["getppid"], "action": "SCMP_ACT_ERRNO"}
            ]
        }));
        let status = run(Some(&f), || {
            if uname() != (-1, 38) {
                return 1;
            }
            let path = c"/nonexistent-rtv-seccomp-test/x";
            // SAFETY: a valid NUL-terminated path.
            let rc = unsafe { libc::mkdirat(libc::AT_FDCWD, path.as_ptr(), 0o700) };
            if rc != -1 || Errno::last().0 != 38 {
                return 2;
            }
            // No errnoRet: EPERM.
            if sys(libc::SYS_getppid, 0, 0) != (-1, libc::EPERM) {
                return 3;
            }
            // Not listed: the default, ALLOW.
            if sys(libc::SYS_getpid, 0, 0).0 <= 0 {
                return 4;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn default_errno_ret() {
        for (errno_ret, expected) in [(Some(13), libc::EACCES), (None, libc::EPERM)] {
            let mut p = json!({
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["exit_group", "exit"], "action": "SCMP_ACT_ALLOW"}]
            });
            if let Some(e) = errno_ret {
                p["defaultErrnoRet"] = json!(e);
            }
            let f = compiled(p);
            let status = run(Some(&f), || {
                if sys(libc::SYS_getpid, 0, 0) != (-1, expected) {
                    return 1;
                }
                if uname() != (-1, expected) {
                    return 2;
                }
                0
            });
            assert_eq!(exit_code(status), 0, "defaultErrnoRet {errno_ret:?}");
        }
    }

    #[test]
    fn kill_and_trap_actions_raise_sigsys() {
        for act in [
            "SCMP_ACT_KILL_PROCESS",
            "SCMP_ACT_KILL",
            "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_TRAP",
        ] {
            let f = compiled(json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["uname"], "action": act}]
            }));
            let status = run(Some(&f), || {
                uname();
                7
            });
            assert!(libc::WIFSIGNALED(status), "{act}: status {status:#x}");
            assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "{act}");
        }
    }

    #[test]
    fn log_allows_and_trace_without_tracer_is_enosys() {
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["getpid"], "action": "SCMP_ACT_LOG"},
                {"names": ["getppid"], "action": "SCMP_ACT_TRACE", "errnoRet": 5}
            ]
        }));
        let status = run(Some(&f), || {
            if sys(libc::SYS_getpid, 0, 0).0 <= 0 {
                return 1;
            }
            // seccomp(2): with no tracer, SECCOMP_RET_TRACE fails with ENOSYS.
            if sys(libc::SYS_getppid, 0, 0) != (-1, libc::ENOSYS) {
                return 2;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn personality_argument_selects_the_rule() {
        // Docker's default profile allows a few personalities only.
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 4294967295u64, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
            ]
        }));
        let status = run(Some(&f), || {
            // 0xffffffff queries the persona.
            if sys(libc::SYS_personality, 0xffff_ffff, 0).0 < 0 {
                return 1;
            }
            if sys(libc::SYS_personality, 0, 0) != (-1, libc::EPERM) {
                return 2;
            }
            // Same low word, another high word: the full 64 bits count.
            if sys(libc::SYS_personality, 0x1_ffff_ffff, 0) != (-1, libc::EPERM) {
                return 3;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    /// Arguments around `V` that differ in the high word, the low word or
    /// both, in every direction.
    const V: u64 = 0x0000_0001_0000_0005;
    const PROBES: [u64; 12] = [
        V,
        V - 1,
        V + 1,
        0x0000_0000_0000_0005,
        0x0000_0002_0000_0005,
        0x0000_0000_ffff_ffff,
        0x0000_0002_0000_0000,
        0x0000_0001_ffff_ffff,
        0x0000_0001_0000_0000,
        0,
        u64::MAX,
        0x8000_0001_0000_0005,
    ];

    /// Calls getpid(arg) for each probe in a child with the filter: a match
    /// must fail with errno 77, others must return the pid.
    fn check_probes(f: &Filter, expected: &[(u64, bool)]) -> i32 {
        let status = run(Some(f), || {
            for (i, (arg, matches)) in expected.iter().enumerate() {
                let (rc, errno) = sys(libc::SYS_getpid, *arg, 0);
                let ok = if *matches {
                    rc == -1 && errno == 77
                } else {
                    rc > 0
                };
                if !ok {
                    return i as i32 + 1;
                }
            }
            0
        });
        exit_code(status)
    }

    #[test]
    fn comparisons_are_unsigned_64_bit() {
        let mask: u64 = 0xffff_0000_0000_ff00;
        type Holds = fn(u64) -> bool;
        let ops: [(&str, Holds); 7] = [
            ("SCMP_CMP_EQ", |a| a == V),
            ("SCMP_CMP_NE", |a| a != V),
            ("SCMP_CMP_LT", |a| a < V),
            ("SCMP_CMP_LE", |a| a <= V),
            ("SCMP_CMP_GT", |a| a > V),
            ("SCMP_CMP_GE", |a| a >= V),
            ("SCMP_CMP_MASKED_EQ", |a| {
                a & 0xffff_0000_0000_ff00 == 0x8000_0000_0000_0000
            }),
        ];
        for (op, holds) in ops {
            let (value, value_two) = if op == "SCMP_CMP_MASKED_EQ" {
                (mask, 0x8000_0000_0000_0000u64)
            } else {
                (V, 0)
            };
            let f = compiled(json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 77,
                    "args": [{"index": 0, "value": value, "valueTwo": value_two, "op": op}]}]
            }));
            let mut probes: Vec<u64> = PROBES.to_vec();
            probes.extend([
                0x8000_0000_0000_0000,
                0x8000_1234_5678_00ff,
                0x8001_0000_0000_0000,
            ]);
            let expected: Vec<(u64, bool)> = probes.iter().map(|a| (*a, holds(*a))).collect();
            let code = check_probes(&f, &expected);
            assert_eq!(code, 0, "{op}: probe {:?}", expected.get(code as usize - 1));
        }
    }

    #[test]
    fn conditions_of_a_rule_are_anded() {
        // Same index twice: a range; and a second argument.
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 77,
                "args": [
                    {"index": 0, "value": 0x1_0000_0000u64, "op": "SCMP_CMP_GE"},
                    {"index": 0, "value": 0x2_0000_0000u64, "op": "SCMP_CMP_LT"},
                    {"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}
                ]}]
        }));
        let status = run(Some(&f), || {
            let cases = [
                (0x1_0000_0000, 9, true),
                (0x1_ffff_ffff, 9, true),
                (0x1_0000_0000, 8, false),
                (0x2_0000_0000, 9, false),
                (0xffff_ffff, 9, false),
            ];
            for (i, (a0, a1, matches)) in cases.into_iter().enumerate() {
                let (rc, errno) = sys(libc::SYS_getpid, a0, a1);
                if matches != (rc == -1 && errno == 77) {
                    return i as i32 + 1;
                }
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn first_matching_rule_in_spec_order_wins() {
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 21,
                 "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
                {"names": ["getppid", "getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22},
                {"names": ["getpid", "getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 23,
                 "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]}
            ]
        }));
        let status = run(Some(&f), || {
            if sys(libc::SYS_getpid, 1, 0) != (-1, 21) {
                return 1;
            }
            if sys(libc::SYS_getpid, 2, 0) != (-1, 22) {
                return 2;
            }
            if sys(libc::SYS_getppid, 2, 0) != (-1, 22) {
                return 3;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn x32_calls_get_the_default_action() {
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 78,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 77},
                {"names": ["exit_group"], "action": "SCMP_ACT_ALLOW"}
            ]
        }));
        let status = run(Some(&f), || {
            if sys(libc::SYS_getpid, 0, 0) != (-1, 77) {
                return 1;
            }
            let x32_getpid = libc::SYS_getpid | X32_SYSCALL_BIT as libc::c_long;
            if sys(x32_getpid, 0, 0) != (-1, 78) {
                return 2;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    /// getpid through the i386 ABI.
    fn int80_getpid() -> i64 {
        let mut rax: i64 = 20; // __NR_getpid on i386
                               // SAFETY: `int 0x80` is a system call; getpid takes no argument and
                               // only rax (and, on old kernels, r8-r11) is changed.
        unsafe {
            std::arch::asm!(
                "int 0x80",
                inout("rax") rax,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                options(nostack)
            );
        }
        rax
    }

    #[test]
    fn other_abis_kill_the_process() {
        // Without a filter, int 0x80 works if the kernel emulates i386.
        let control = run(None, || {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            i32::from(int80_getpid() != i64::from(pid))
        });
        assert!(
            libc::WIFEXITED(control) && libc::WEXITSTATUS(control) == 0,
            "this test needs the kernel's i386 emulation (status {control:#x})"
        );
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
        }));
        let status = run(Some(&f), || {
            int80_getpid();
            7
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn docker_sized_profile() {
        // One entry allowing every x86_64 syscall but a few, as Docker's
        // default profile does with ~350 names, plus argument rules.
        let names: Vec<&str> = syscalls::Sysno::iter()
            .map(|s| s.name())
            .filter(|n| !["uname", "personality", "getpid"].contains(n))
            .collect();
        assert!(names.len() > 350, "{}", names.len());
        let personality = |v: u64| {
            json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]})
        };
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": names, "action": "SCMP_ACT_ALLOW"},
                personality(0x0),
                personality(0x8),
                personality(0x20000),
                personality(0x20008),
                personality(0xffff_ffff),
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0x7e02_0000u64, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }));
        assert!(
            f.program.len() < names.len() + 100,
            "{} instructions",
            f.program.len()
        );
        let status = run(Some(&f), || {
            if sys(libc::SYS_getppid, 0, 0).0 <= 0 {
                return 1;
            }
            if uname() != (-1, libc::EPERM) {
                return 2;
            }
            if sys(libc::SYS_personality, 0xffff_ffff, 0).0 < 0 {
                return 3;
            }
            if sys(libc::SYS_personality, 0x1234, 0) != (-1, libc::EPERM) {
                return 4;
            }
            if sys(libc::SYS_getpid, 0x100, 0).0 <= 0 {
                return 5;
            }
            if sys(libc::SYS_getpid, 0x1_0000_0100, 0).0 <= 0 {
                return 6;
            }
            if sys(libc::SYS_getpid, 0x0200_0000, 0) != (-1, libc::EPERM) {
                return 7;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn long_blocks_and_conditions_use_ja() {
        let mut rules: Vec<serde_json::Value> = (0..80u64)
            .map(|k| {
                json!({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": k + 1,
                       "args": [{"index": 0, "value": 1000 + k, "op": "SCMP_CMP_EQ"}]})
            })
            .collect();
        // A rule of 71 conditions, longer than 255 instructions.
        let mut args: Vec<serde_json::Value> = (0..70u64)
            .map(|k| json!({"index": 0, "value": k, "op": "SCMP_CMP_GE"}))
            .collect();
        args.push(json!({"index": 1, "value": 42, "op": "SCMP_CMP_EQ"}));
        rules.push(
            json!({"names": ["gettid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 55,
                          "args": args}),
        );
        rules.push(
            json!({"names": ["getuid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 9,
                          "args": [{"index": 0, "value": 7, "op": "SCMP_CMP_EQ"}]}),
        );
        let f = compiled(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}));
        let ja_code = (libc::BPF_JMP | libc::BPF_JA) as u16;
        let jas = f.program.iter().filter(|i| i.code == ja_code).count();
        // Two block heads and the trampolines of the early conditions.
        assert!(jas > 10, "{jas} ja instructions");
        let status = run(Some(&f), || {
            let cases: [(libc::c_long, u64, u64, i64, i32); 8] = [
                (libc::SYS_getpid, 1000, 0, -1, 1),
                (libc::SYS_getpid, 1079, 0, -1, 80),
                (libc::SYS_gettid, 100, 42, -1, 55),
                (libc::SYS_gettid, 69, 42, -1, 55),
                (libc::SYS_getuid, 7, 0, -1, 9),
                // Not matched: ALLOW.
                (libc::SYS_getpid, 5, 0, 0, 0),
                (libc::SYS_gettid, 3, 42, 0, 0),
                (libc::SYS_gettid, 100, 41, 0, 0),
            ];
            for (i, (nr, a0, a1, rc, errno)) in cases.into_iter().enumerate() {
                let got = sys(nr, a0, a1);
                let ok = if rc == -1 {
                    got == (-1, errno)
                } else {
                    got.0 > 0
                };
                if !ok {
                    return i as i32 + 1;
                }
            }
            if sys(libc::SYS_getuid, 0, 0).0 < 0 {
                return 20;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn jumps_stay_inside_the_program() {
        let mut rules: Vec<serde_json::Value> = (0..300u64)
            .map(|k| {
                json!({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                       "args": [{"index": (k % 6), "value": k, "op": "SCMP_CMP_GT"}]})
            })
            .collect();
        rules.push(json!({"names": ["read", "write"], "action": "SCMP_ACT_LOG"}));
        let f = compiled(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}));
        let len = f.program.len();
        assert!(len <= MAX_INSNS);
        for (i, ins) in f.program.iter().enumerate() {
            let code = u32::from(ins.code);
            if code & 0x07 != libc::BPF_JMP {
                continue;
            }
            if code == libc::BPF_JMP | libc::BPF_JA {
                assert!(i + 1 + (ins.k as usize) < len, "ja at {i}");
            } else {
                assert!(i + 1 + usize::from(ins.jt.max(ins.jf)) < len, "jump at {i}");
            }
        }
        let ret_code = (libc::BPF_RET | libc::BPF_K) as u16;
        assert_eq!(f.program[len - 1].code, ret_code);
    }

    #[test]
    fn flags_map_to_seccomp_bits() {
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                      "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]
        }));
        assert_eq!(
            f.flags,
            libc::SECCOMP_FILTER_FLAG_TSYNC
                | libc::SECCOMP_FILTER_FLAG_LOG
                | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
        );
        assert_eq!(
            compiled(json!({"defaultAction": "SCMP_ACT_ALLOW"})).flags,
            0
        );
        // Flags the OCI spec does not define are rejected when parsing.
        assert!(serde_json::from_value::<LinuxSeccomp>(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]
        }))
        .is_err());
    }

    #[test]
    fn errors_name_their_field() {
        assert_eq!(
            err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["write", "fooo"], "action": "SCMP_ACT_ERRNO"}
            ]})),
            r#"linux.seccomp.syscalls[1].names[1]: unknown syscall "fooo""#
        );
        // A sparc-only system call: libseccomp has no sparc either.
        assert!(err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["utrap_install"], "action": "SCMP_ACT_ERRNO"}
        ]}))
        .starts_with("linux.seccomp.syscalls[0].names[0]: unknown syscall"));
        assert!(err(json!({"defaultAction": "SCMP_ACT_NOTIFY"}))
            .starts_with("linux.seccomp.defaultAction: SCMP_ACT_NOTIFY is not supported"));
        assert!(err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_NOTIFY"}
        ]}))
        .starts_with("linux.seccomp.syscalls[0].action: SCMP_ACT_NOTIFY is not supported"));
        assert!(err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [
                {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                {"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}
            ]}
        ]}))
        .starts_with("linux.seccomp.syscalls[0].args[1].index: 6 is out of range"));
        assert!(err(json!({"defaultAction": "SCMP_ACT_ALLOW", "flags": [
            "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"
        ]}))
        .starts_with("linux.seccomp.flags[1]: "));
        assert!(err(json!({"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_ARM"]}))
        .starts_with("linux.seccomp.architectures[1]: "));
        assert!(
            err(json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}))
                .starts_with("linux.seccomp.listenerPath: ")
        );
        assert!(
            err(json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerMetadata": "x"}))
                .starts_with("linux.seccomp.listenerMetadata: ")
        );
        assert!(
            err(json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}))
                .starts_with("linux.seccomp.defaultErrnoRet: ")
        );
        assert!(err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_TRACE", "errnoRet": 65536}
        ]}))
        .starts_with("linux.seccomp.syscalls[0].errnoRet: "));
        // 1000 rules of 5 instructions: over BPF_MAXINSNS.
        let rules: Vec<serde_json::Value> = (0..1000u64)
            .map(|k| {
                json!({"names": ["getpid"], "action": "SCMP_ACT_ERRNO",
                       "args": [{"index": 0, "value": k, "op": "SCMP_CMP_EQ"}]})
            })
            .collect();
        assert!(
            err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}))
                .starts_with("linux.seccomp.syscalls: ")
        );
    }

    #[test]
    fn architecture_error_message() {
        let msg = err(json!({"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_AARCH64"]}));
        assert!(msg.contains("SCMP_ARCH_AARCH64"), "{msg}");
    }

    #[test]
    fn other_architectures_names_are_skipped() {
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["_llseek", "chown32", "socketcall", "mkdirat"],
                          "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
        }));
        // The foreign names left no code: the same program as mkdirat alone.
        let alone = compiled(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
        }));
        let words = |f: &Filter| -> Vec<(u16, u8, u8, u32)> {
            f.program
                .iter()
                .map(|i| (i.code, i.jt, i.jf, i.k))
                .collect()
        };
        assert_eq!(words(&f), words(&alone));
        let status = run(Some(&f), || {
            let path = c"/nonexistent-rtv-seccomp-test/x";
            // SAFETY: a valid NUL-terminated path.
            let rc = unsafe { libc::mkdirat(libc::AT_FDCWD, path.as_ptr(), 0o700) };
            if rc != -1 || Errno::last().0 != 38 {
                return 1;
            }
            if sys(libc::SYS_getpid, 0, 0).0 <= 0 {
                return 2;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn names_unknown_everywhere_are_errors() {
        assert_eq!(
            err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["_llseek", "mkdirat", "not_a_syscall_anywhere"],
                 "action": "SCMP_ACT_ERRNO"}
            ]})),
            r#"linux.seccomp.syscalls[1].names[2]: unknown syscall "not_a_syscall_anywhere""#
        );
        // Names are matched exactly: no case folding, prefixes or spaces.
        for name in ["", "SOCKETCALL", "_llsee", "chown32 ", "r#break", "llseek"] {
            let msg = err(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": [name], "action": "SCMP_ACT_ERRNO"}
            ]}));
            assert_eq!(
                msg,
                format!("linux.seccomp.syscalls[0].names[0]: unknown syscall {name:?}")
            );
        }
    }

    #[test]
    fn foreign_syscalls_list_is_sorted_and_not_native() {
        let names: Vec<&str> = FOREIGN_SYSCALLS.split(' ').collect();
        assert_eq!(names.len(), 123);
        for pair in names.windows(2) {
            assert!(pair[0] < pair[1], "{pair:?} not sorted or repeated");
        }
        for name in names {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b == b'_' || b.is_ascii_lowercase() || b.is_ascii_digit()),
                "{name:?}"
            );
            assert!(
                name.parse::<syscalls::Sysno>().is_err(),
                "{name} is an x86_64 system call"
            );
            assert!(foreign_syscall(name), "{name}");
        }
    }

    /// The names of Docker's default seccomp profile
    /// (moby/profiles/seccomp/default.json), separated by spaces, entry by
    /// entry in the file's order (its five `personality` entries, which
    /// differ only in their argument, as one), whatever the entries'
    /// `includes` and `excludes` (architectures, capabilities, kernel
    /// versions).
    const DOCKER_DEFAULT_NAMES: [&str; 26] = [
        "\
            accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32 \
            clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime \
            clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect \
            copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old \
            epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat \
            exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark \
            fchdir fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr \
            flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 \
            fsync ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat getcpu getcwd \
            getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups \
            getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom \
            getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid \
            getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr \
            inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl \
            io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set \
            io_setup io_submit io_uring_enter io_uring_register io_uring_setup ipc kill \
            landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 \
            lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr \
            lstat lstat64 madvise membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod \
            mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open \
            mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink \
            mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at \
            nanosleep newfstatat _newselect open openat openat2 pause pidfd_open pidfd_send_signal \
            pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 \
            preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev \
            pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg \
            recvmmsg_time64 recvmsg remap_file_pages removexattr rename renameat renameat2 \
            restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo \
            rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo \
            sched_getaffinity sched_getattr sched_getparam sched_get_priority_max \
            sched_get_priority_min sched_getscheduler sched_rr_get_interval \
            sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam \
            sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop \
            semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32 \
            setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid \
            setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid \
            setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address \
            setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd \
            signalfd4 sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs \
            statfs64 statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time \
            timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime \
            timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime \
            timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink \
            unlinkat utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid \
            write writev",
        "process_vm_readv process_vm_writev ptrace",
        "socket",
        "personality",
        "sync_file_range2 swapcontext",
        "arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint cacheflush set_tls",
        "arch_prctl",
        "modify_ldt",
        "s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr",
        "riscv_flush_icache",
        "open_by_handle_at",
        "\
            bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount \
            mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd setdomainname \
            sethostname setns syslog umount umount2 unshare",
        "clone",
        "clone3",
        "reboot",
        "chroot",
        "delete_module init_module finit_module",
        "acct",
        "kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace",
        "iopl ioperm",
        "settimeofday stime clock_settime clock_settime64",
        "vhangup",
        "get_mempolicy mbind set_mempolicy set_mempolicy_home_node",
        "syslog",
        "bpf",
        "perf_event_open",
    ];

    #[test]
    fn docker_default_profile_compiles() {
        // The entries in the file's order, with their actions and argument
        // conditions, all included as for a container with every
        // capability on every architecture.
        let mut rules: Vec<serde_json::Value> = Vec::new();
        for entry in DOCKER_DEFAULT_NAMES {
            let names: Vec<&str> = entry.split_ascii_whitespace().collect();
            match names[..] {
                ["socket"] => rules.push(json!({"names": names, "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]})),
                ["personality"] => {
                    for v in [0u64, 8, 131072, 131080, 4294967295] {
                        rules.push(json!({"names": names, "action": "SCMP_ACT_ALLOW",
                            "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]}));
                    }
                }
                ["clone"] => rules.push(json!({"names": names, "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": 2114060288u64, "op": "SCMP_CMP_MASKED_EQ"}]})),
                ["clone3"] => {
                    rules.push(json!({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": 38}))
                }
                _ => rules.push(json!({"names": names, "action": "SCMP_ACT_ALLOW"})),
            }
        }
        let f = compiled(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": rules
        }));
        let all: std::collections::BTreeSet<&str> = DOCKER_DEFAULT_NAMES
            .iter()
            .flat_map(|e| e.split_ascii_whitespace())
            .collect();
        let (native, foreign): (Vec<&str>, Vec<&str>) = all
            .iter()
            .partition(|n| n.parse::<syscalls::Sysno>().is_ok());
        assert!(native.len() > 330, "{} x86_64 names", native.len());
        assert!(foreign.iter().all(|n| foreign_syscall(n)), "{foreign:?}");
        assert!(foreign.len() > 70, "{} foreign names", foreign.len());
        // Only the x86_64 names cost instructions.
        assert!(
            f.program.len() < native.len() + 100,
            "{} instructions",
            f.program.len()
        );
        let status = run(Some(&f), || {
            if sys(libc::SYS_getppid, 0, 0).0 <= 0 {
                return 1;
            }
            // keyctl is in no entry: the default, EPERM.
            if sys(libc::SYS_keyctl, 0, 0) != (-1, libc::EPERM) {
                return 2;
            }
            // socket(AF_VSOCK = 40, ...) is not allowed.
            if sys(libc::SYS_socket, 40, 1) != (-1, libc::EPERM) {
                return 3;
            }
            // Allowed by the CAP_SYS_ADMIN entry, before clone3's ENOSYS:
            // the kernel sees an invalid size.
            if sys(libc::SYS_clone3, 0, 0) != (-1, libc::EINVAL) {
                return 4;
            }
            if sys(libc::SYS_personality, 0xffff_ffff, 0).0 < 0 {
                return 5;
            }
            if sys(libc::SYS_personality, 0x1234, 0) != (-1, libc::EPERM) {
                return 6;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    /// Runs `f`'s program on `seccomp_data` {nr, arch, args} the way the
    /// kernel's classic BPF does, for the instructions `compile` emits:
    /// the `ret` value and how many instructions ran. Panics on anything
    /// the kernel would refuse (a jump out of the program, falling off its
    /// end, another instruction).
    fn eval(f: &Filter, nr: u32, arch: u32, args: [u64; 6]) -> (u32, usize) {
        let word = |off: u32| -> u32 {
            match off {
                OFF_NR => nr,
                OFF_ARCH => arch,
                o if (OFF_ARGS..OFF_ARGS + 48).contains(&o) && o.is_multiple_of(4) => {
                    let a = args[((o - OFF_ARGS) / 8) as usize];
                    if (o - OFF_ARGS).is_multiple_of(8) {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                o => panic!("load of offset {o}"),
            }
        };
        let (mut pc, mut acc, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let ins = f
                .program
                .get(pc)
                .unwrap_or_else(|| panic!("pc {pc} is out"));
            steps += 1;
            let code = u32::from(ins.code);
            let next = |off: usize| pc + 1 + off;
            pc = match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    acc = word(ins.k);
                    pc + 1
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => {
                    acc &= ins.k;
                    pc + 1
                }
                c if c == libc::BPF_RET | libc::BPF_K => return (ins.k, steps),
                c if c == libc::BPF_JMP | libc::BPF_JA => next(ins.k as usize),
                c => {
                    let holds = match c {
                        c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => acc == ins.k,
                        c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => acc >= ins.k,
                        c if c == libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K => acc > ins.k,
                        c => panic!("instruction {c:#x} at {pc}"),
                    };
                    next(usize::from(if holds { ins.jt } else { ins.jf }))
                }
            };
        }
    }

    #[test]
    fn every_number_reaches_its_action_in_a_few_jumps() {
        // Random profiles (a fixed seed): numbers with unconditional
        // actions, some denied by the default, a few with an argument
        // rule; every number from 0 to 600, the x32 bit and -1 give what
        // the rules say, and in about log2(ranges) steps.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let native: Vec<(u32, &str)> = syscalls::Sysno::iter()
            .map(|s| (s.id() as u32, s.name()))
            .collect();
        let actions = [
            ("SCMP_ACT_ALLOW", libc::SECCOMP_RET_ALLOW),
            ("SCMP_ACT_LOG", libc::SECCOMP_RET_LOG),
            ("SCMP_ACT_KILL_PROCESS", libc::SECCOMP_RET_KILL_PROCESS),
        ];
        for round in 0..40 {
            let (default_name, default) = if round % 2 == 0 {
                ("SCMP_ACT_ERRNO", libc::SECCOMP_RET_ERRNO | 1)
            } else {
                ("SCMP_ACT_ALLOW", libc::SECCOMP_RET_ALLOW)
            };
            let mut want: HashMap<u32, u32> = HashMap::new();
            let mut conditional: HashMap<u32, (u64, u32)> = HashMap::new();
            let mut rules = Vec::new();
            for &(nr, name) in &native {
                match next() % 10 {
                    0..=5 => {
                        let (a, k) = actions[(next() % 3) as usize];
                        rules.push(json!({"names": [name], "action": a}));
                        want.entry(nr).or_insert(k);
                    }
                    6 if !want.contains_key(&nr) && !conditional.contains_key(&nr) => {
                        let v = next() % 5;
                        rules.push(json!({"names": [name], "action": "SCMP_ACT_ERRNO",
                            "errnoRet": 7, "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]}));
                        conditional.insert(nr, (v, libc::SECCOMP_RET_ERRNO | 7));
                    }
                    _ => {}
                }
            }
            let f = compiled(json!({"defaultAction": default_name, "defaultErrnoRet": 1,
                                    "syscalls": rules}));
            let ranges = {
                let mut seen: Vec<u32> = (0..1024)
                    .map(|nr| eval(&f, nr, AUDIT_ARCH_X86_64, [0; 6]).0)
                    .collect();
                seen.dedup();
                seen.len() + conditional.len()
            };
            let bound = 6 + 2 * (usize::BITS - ranges.leading_zeros()) as usize + 1;
            for nr in (0..600).chain([X32_SYSCALL_BIT, X32_SYSCALL_BIT + 3, u32::MAX]) {
                let (got, steps) = eval(&f, nr, AUDIT_ARCH_X86_64, [9, 0, 0, 0, 0, 0]);
                // x32 numbers, and syscalls with a rule on argument 0
                // (which is 9 here, no rule's value), get the default.
                let expect = if nr >= X32_SYSCALL_BIT || conditional.contains_key(&nr) {
                    default
                } else {
                    want.get(&nr).copied().unwrap_or(default)
                };
                assert_eq!(got, expect, "round {round}, nr {nr}");
                assert!(
                    steps <= bound,
                    "round {round}, nr {nr}: {steps} steps, bound {bound}"
                );
            }
            for (&nr, &(v, k)) in &conditional {
                assert_eq!(
                    eval(&f, nr, AUDIT_ARCH_X86_64, [v, 0, 0, 0, 0, 0]).0,
                    k,
                    "nr {nr}"
                );
            }
            assert_eq!(
                eval(&f, 20, 0x4000_0003, [0; 6]).0,
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
    }

    #[test]
    fn docker_default_profile_takes_a_few_jumps_per_call() {
        let mut rules: Vec<serde_json::Value> = Vec::new();
        for entry in DOCKER_DEFAULT_NAMES {
            rules.push(
                json!({"names": entry.split_ascii_whitespace().collect::<Vec<_>>(),
                              "action": "SCMP_ACT_ALLOW"}),
            );
        }
        let f = compiled(json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": rules}));
        let worst = (0..512)
            .map(|nr| eval(&f, nr, AUDIT_ARCH_X86_64, [0; 6]).1)
            .max()
            .unwrap_or(0);
        // The linear program of before took up to ~350.
        assert!(worst <= 20, "{worst} instructions for the worst number");
        assert!(f.program.len() < 200, "{} instructions", f.program.len());
    }
}
