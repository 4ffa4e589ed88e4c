//! The forked child that becomes a container's process.
//!
//! Everything here runs between fork(2) and execve(2) in a child of a
//! multi-threaded process: no allocation, no locks, no printing — only
//! system calls on data the parent prepared ([`super::plan`]). A failure is
//! written to the report pipe as a [`Report`] (step, index, errno) and the
//! child exits; the parent turns it into a message naming the spec field.

use std::ffi::{c_char, CStr, CString};
use std::os::fd::RawFd;

use super::caps::{self, IdentityStep};
use super::plan::{CreatePlan, DevicePlan, MountPlan, ProcessPlan, RelPath, TargetKind};
use super::rlimit;
use super::Errno;

/// A message from the child on the report pipe.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// [`REPORT_READY`] or [`REPORT_FAILED`].
    pub kind: u32,
    /// The [`Step`] that failed.
    pub step: u32,
    /// Which item of a list (a mount's index, ...).
    pub index: u32,
    /// The errno.
    pub errno: i32,
}

/// The container is set up and waits for start.
pub const REPORT_READY: u32 = 1;
/// A step failed; the child exits.
pub const REPORT_FAILED: u32 = 2;

impl Report {
    /// The report's bytes.
    pub fn as_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.kind.to_ne_bytes());
        b[4..8].copy_from_slice(&self.step.to_ne_bytes());
        b[8..12].copy_from_slice(&self.index.to_ne_bytes());
        b[12..16].copy_from_slice(&self.errno.to_ne_bytes());
        b
    }

    /// A report from its bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let word = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        Self {
            kind: u32::from_ne_bytes(word(0)),
            step: u32::from_ne_bytes(word(4)),
            index: u32::from_ne_bytes(word(8)),
            errno: i32::from_ne_bytes(word(12)),
        }
    }
}

macro_rules! steps {
    ($($name:ident),* $(,)?) => {
        /// The steps of setting up a container's process.
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Step { $($name),* }
        impl Step {
            /// The step with this number.
            pub fn from_u32(n: u32) -> Option<Step> {
                [$(Step::$name),*].get(n as usize).copied()
            }
        }
    };
}

steps!(
    Fds,
    Signals,
    Session,
    Terminal,
    Cgroup,
    OomScoreAdj,
    Unshare,
    Setns,
    RootPropagation,
    RootBind,
    OpenRoot,
    MountTarget,
    Mount,
    MountRemount,
    MountPropagation,
    Device,
    DevSymlink,
    Console,
    PivotRoot,
    Sysctl,
    MaskPath,
    ReadonlyPath,
    RootReadonly,
    Hostname,
    Domainname,
    Rlimit,
    IdentityKeepCaps,
    IdentityDropBounding,
    IdentitySetGroups,
    IdentitySetGid,
    IdentitySetUid,
    IdentitySetCaps,
    IdentityAmbient,
    Cwd,
    ExecNotFound,
    NoNewPrivs,
    StartWait,
    Seccomp,
    Exec,
);

/// A failed step.
type Fail = (Step, u32, Errno);

fn fail(step: Step, index: usize) -> Fail {
    (step, index as u32, Errno::last())
}

fn check(rc: libc::c_int, step: Step, index: usize) -> Result<libc::c_int, Fail> {
    if rc < 0 {
        Err(fail(step, index))
    } else {
        Ok(rc)
    }
}

/// Descriptors the child works with, as the parent has them.
#[derive(Debug, Clone, Copy)]
pub struct ChildFds {
    /// stdin, stdout, stderr.
    pub stdio: [RawFd; 3],
    /// Whether stdio is a terminal (its slave side).
    pub tty: bool,
    /// The report pipe's write end.
    pub report: RawFd,
    /// The start pipe's read end (a container's init only).
    pub start: Option<RawFd>,
}

/// Where the child keeps its descriptors after [`arrange_fds`].
const REPORT_FD: RawFd = 3;
const START_FD: RawFd = 4;
const FIRST_EXTRA_FD: RawFd = 5;
const MAX_EXTRA: usize = 10;

/// Moves the descriptors the child needs to fixed numbers (0-2 stdio, 3
/// report, 4 start, 5.. `extra`) and closes every other one, so the child
/// holds none of the agent's descriptors (another container's pipes, the
/// agent's connections). Returns the new numbers of `extra`.
fn arrange_fds(fds: &ChildFds, extra: &[RawFd]) -> Result<[RawFd; MAX_EXTRA], Fail> {
    let mut wanted = [-1; 5 + MAX_EXTRA];
    wanted[0..3].copy_from_slice(&fds.stdio);
    wanted[REPORT_FD as usize] = fds.report;
    wanted[START_FD as usize] = fds.start.unwrap_or(-1);
    if extra.len() > MAX_EXTRA {
        return Err((Step::Fds, 0, Errno(libc::EMFILE)));
    }
    for (i, fd) in extra.iter().enumerate() {
        wanted[FIRST_EXTRA_FD as usize + i] = *fd;
    }
    let count = FIRST_EXTRA_FD as usize + extra.len();
    let high = wanted
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(count as RawFd)
        + 1;
    let mut moved = [-1; 5 + MAX_EXTRA];
    for i in 0..count {
        if wanted[i] >= 0 {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor this process holds.
            moved[i] = check(
                unsafe { libc::fcntl(wanted[i], libc::F_DUPFD_CLOEXEC, high) },
                Step::Fds,
                i,
            )?;
        }
    }
    for (i, &fd) in moved.iter().enumerate().take(count) {
        if fd >= 0 {
            // SAFETY: dup2 between descriptors of this process.
            check(unsafe { libc::dup2(fd, i as RawFd) }, Step::Fds, i)?;
            if i >= 3 {
                // SAFETY: F_SETFD on a descriptor we just made.
                unsafe { libc::fcntl(i as RawFd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
    }
    // SAFETY: close_range(2) closes descriptors from `count` up; none of
    // them is used by this child any more.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, count as u32, u32::MAX, 0u32) };
    if rc < 0 {
        for fd in count as RawFd..1024 {
            // SAFETY: closing descriptors this child does not use.
            unsafe { libc::close(fd) };
        }
    }
    let mut out = [-1; MAX_EXTRA];
    for (i, slot) in out.iter_mut().enumerate().take(extra.len()) {
        *slot = FIRST_EXTRA_FD + i as RawFd;
    }
    Ok(out)
}

fn report(r: Report) {
    let b = r.as_bytes();
    // SAFETY: writing a local buffer to the report pipe.
    unsafe { libc::write(REPORT_FD, b.as_ptr().cast(), b.len()) };
}

fn die(f: Fail) -> ! {
    report(Report {
        kind: REPORT_FAILED,
        step: f.0 as u32,
        index: f.1,
        errno: f.2 .0,
    });
    // SAFETY: _exit(2) ends the child without running the parent's
    // destructors or atexit handlers.
    unsafe { libc::_exit(127) }
}

/// Resets what a child of the agent inherits but a container's process
/// must not: SIGPIPE ignored and the SIGSEGV/SIGBUS handlers (Rust's
/// runtime sets those up), a signal mask.
fn reset_signals() -> Result<(), Fail> {
    for sig in [libc::SIGPIPE, libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: restoring a default disposition.
        if unsafe { libc::signal(sig, libc::SIG_DFL) } == libc::SIG_ERR {
            return Err(fail(Step::Signals, 0));
        }
    }
    // SAFETY: an empty sigset_t is filled by sigemptyset; sigprocmask
    // reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()),
            Step::Signals,
            1,
        )?;
    }
    Ok(())
}

fn session(tty: bool) -> Result<(), Fail> {
    // SAFETY: setsid(2) has no arguments.
    check(unsafe { libc::setsid() }, Step::Session, 0)?;
    if tty {
        check(
            // SAFETY: TIOCSCTTY on stdin, the terminal's slave side.
            unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) },
            Step::Terminal,
            0,
        )?;
    }
    Ok(())
}

fn write_file(path: &CStr, value: &[u8], step: Step, index: usize) -> Result<(), Fail> {
    // SAFETY: a valid path; the result is checked.
    let fd = check(
        unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) },
        step,
        index,
    )?;
    // SAFETY: writing a valid buffer to our descriptor.
    let n = unsafe { libc::write(fd, value.as_ptr().cast(), value.len()) };
    let err = Errno::last();
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err((step, index as u32, err));
    }
    Ok(())
}

fn join_cgroup(procs: Option<&CStr>) -> Result<(), Fail> {
    match procs {
        Some(p) => write_file(p, b"0", Step::Cgroup, 0),
        None => Ok(()),
    }
}

/// "/proc/self/fd/N" in `buf`, NUL-terminated.
fn fd_path(fd: RawFd, buf: &mut [u8; 32]) -> *const c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    buf.as_ptr().cast()
}

fn openat2(dir: RawFd, path: &CStr, flags: libc::c_int) -> libc::c_int {
    // SAFETY: open_how is plain data; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with a valid path and a valid open_how of the
    // size given; the result is checked by the callers.
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        ) as libc::c_int
    }
}

fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this child opened.
    unsafe { libc::close(fd) };
}

/// Opens `path` below `root` (symlinks resolved as if `root` were `/`),
/// creating missing directories (and a missing last component as `kind`).
/// Returns an O_PATH descriptor.
fn ensure_path(
    root: RawFd,
    path: &RelPath,
    kind: TargetKind,
    step: Step,
    index: usize,
) -> Result<RawFd, Fail> {
    if path.steps.is_empty() {
        // SAFETY: dup of our descriptor.
        return check(
            unsafe { libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0) },
            step,
            index,
        );
    }
    let last = path.steps.len() - 1;
    // Most targets exist (the image has them): one lookup then, the walk
    // that creates what is missing only when the path is not there.
    let fd = openat2(root, &path.steps[last].0, libc::O_PATH);
    if fd >= 0 {
        return Ok(fd);
    }
    if Errno::last().0 != libc::ENOENT {
        return Err(fail(step, index));
    }
    for (i, (prefix, name)) in path.steps.iter().enumerate() {
        let fd = openat2(root, prefix, libc::O_PATH);
        if fd >= 0 {
            if i == last {
                return Ok(fd);
            }
            close(fd);
            continue;
        }
        if Errno::last().0 != libc::ENOENT {
            return Err(fail(step, index));
        }
        let parent = if i == 0 {
            // SAFETY: dup of our descriptor.
            unsafe { libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0) }
        } else {
            openat2(root, &path.steps[i - 1].0, libc::O_PATH | libc::O_DIRECTORY)
        };
        let parent = check(parent, step, index)?;
        let rc = if i == last && kind == TargetKind::File {
            // SAFETY: creating a file below a directory descriptor we hold.
            let fd = unsafe {
                libc::openat(
                    parent,
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd >= 0 {
                close(fd);
            }
            fd
        } else {
            // SAFETY: mkdirat below a directory descriptor we hold.
            unsafe { libc::mkdirat(parent, name.as_ptr(), 0o755) }
        };
        let err = Errno::last();
        close(parent);
        if rc < 0 && err.0 != libc::EEXIST {
            return Err((step, index as u32, err));
        }
        let fd = check(openat2(root, prefix, libc::O_PATH), step, index)?;
        if i == last {
            return Ok(fd);
        }
        close(fd);
    }
    Err((step, index as u32, Errno(libc::ENOENT)))
}

const SYS_OPEN_TREE: libc::c_long = 428;
const SYS_MOVE_MOUNT: libc::c_long = 429;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// A detached mount of the file on fd 0 (the terminal).
fn open_tree_of_stdin() -> Result<RawFd, Fail> {
    // SAFETY: open_tree(2) of fd 0 with an empty path and AT_EMPTY_PATH.
    let fd = unsafe {
        libc::syscall(
            SYS_OPEN_TREE,
            0,
            c"".as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(fail(Step::Console, 0));
    }
    Ok(fd as RawFd)
}

fn sys_mount(
    source: *const c_char,
    target: *const c_char,
    fstype: *const c_char,
    flags: libc::c_ulong,
    data: *const c_char,
) -> libc::c_int {
    // SAFETY: every pointer is null or a valid NUL-terminated string owned
    // by the plan or the caller's stack; mount(2) does not keep them.
    unsafe { libc::mount(source, target, fstype, flags, data.cast()) }
}

fn nonempty(s: &CStr) -> *const c_char {
    if s.is_empty() {
        std::ptr::null()
    } else {
        s.as_ptr()
    }
}

fn do_mount(root: RawFd, m: &MountPlan) -> Result<(), Fail> {
    let target = ensure_path(root, &m.target, m.kind, Step::MountTarget, m.index)?;
    let mut buf = [0u8; 32];
    let path = fd_path(target, &mut buf);
    let rc = sys_mount(
        m.source.as_ptr(),
        path,
        nonempty(&m.fstype),
        m.flags,
        nonempty(&m.data),
    );
    let err = Errno::last();
    close(target);
    if rc < 0 {
        return Err((Step::Mount, m.index as u32, err));
    }
    if m.remount_flags.is_none() && m.propagation.is_empty() {
        return Ok(());
    }
    // The new mount is on top of the old target: open it again.
    let target = ensure_path(root, &m.target, m.kind, Step::MountTarget, m.index)?;
    let path = fd_path(target, &mut buf);
    let mut result = Ok(());
    if let Some(flags) = m.remount_flags {
        if sys_mount(
            std::ptr::null(),
            path,
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) < 0
        {
            result = Err(fail(Step::MountRemount, m.index));
        }
    }
    for p in &m.propagation {
        if result.is_ok()
            && sys_mount(
                std::ptr::null(),
                path,
                std::ptr::null(),
                *p,
                std::ptr::null(),
            ) < 0
        {
            result = Err(fail(Step::MountPropagation, m.index));
        }
    }
    close(target);
    result
}

fn make_device(root: RawFd, d: &DevicePlan, i: usize) -> Result<(), Fail> {
    let Some((_, name)) = d.path.steps.last() else {
        return Err((Step::Device, i as u32, Errno(libc::EINVAL)));
    };
    if d.path.steps.len() < 2 {
        return Err((Step::Device, i as u32, Errno(libc::EINVAL)));
    }
    // Its directory, made when missing (runc makes it too).
    let dir = ensure_path(root, &d.dir, TargetKind::Dir, Step::Device, i)?;
    // SAFETY: unlinking/creating a node below a directory descriptor we hold.
    unsafe { libc::unlinkat(dir, name.as_ptr(), 0) };
    // SAFETY: as above.
    let rc = unsafe { libc::mknodat(dir, name.as_ptr(), d.mode, d.dev) };
    if rc < 0 {
        let e = Errno::last();
        close(dir);
        return Err((Step::Device, i as u32, e));
    }
    // SAFETY: fchmodat/fchownat below our directory descriptor (mknod's
    // mode is filtered by the umask; set it exactly).
    let rc = unsafe {
        libc::fchmodat(dir, name.as_ptr(), d.mode & 0o7777, 0)
            | libc::fchownat(dir, name.as_ptr(), d.uid, d.gid, libc::AT_SYMLINK_NOFOLLOW)
    };
    let e = Errno::last();
    close(dir);
    if rc < 0 {
        return Err((Step::Device, i as u32, e));
    }
    Ok(())
}

fn make_symlink(root: RawFd, target: &CStr, link: &RelPath, i: usize) -> Result<(), Fail> {
    let n = link.steps.len();
    if n < 2 {
        return Err((Step::DevSymlink, i as u32, Errno(libc::EINVAL)));
    }
    let dir = check(
        openat2(root, &link.steps[n - 2].0, libc::O_PATH | libc::O_DIRECTORY),
        Step::DevSymlink,
        i,
    )?;
    // SAFETY: symlinkat below a directory descriptor we hold.
    let rc = unsafe { libc::symlinkat(target.as_ptr(), dir, link.steps[n - 1].1.as_ptr()) };
    let e = Errno::last();
    close(dir);
    if rc < 0 && e.0 != libc::EEXIST {
        return Err((Step::DevSymlink, i as u32, e));
    }
    Ok(())
}

fn pivot_root(rootfs: &CStr) -> Result<(), Fail> {
    let dot = c".";
    // SAFETY: chdir to a valid path.
    check(unsafe { libc::chdir(rootfs.as_ptr()) }, Step::PivotRoot, 0)?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; it
    // takes two valid paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc < 0 {
        return Err(fail(Step::PivotRoot, 1));
    }
    // The old root is now on top of "/": make it a slave so the detach does
    // not propagate, then detach it.
    if sys_mount(
        std::ptr::null(),
        dot.as_ptr(),
        std::ptr::null(),
        libc::MS_SLAVE | libc::MS_REC,
        std::ptr::null(),
    ) < 0
    {
        return Err(fail(Step::PivotRoot, 2));
    }
    check(
        // SAFETY: umount2 of a valid path.
        unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) },
        Step::PivotRoot,
        3,
    )?;
    // SAFETY: chdir to a valid path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, Step::PivotRoot, 4)?;
    Ok(())
}

fn is_dir(path: &CStr) -> Option<bool> {
    // SAFETY: an all-zero stat is a valid out-value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: stat(2) with a valid path and out-pointer.
    if unsafe { libc::stat(path.as_ptr(), &mut st) } < 0 {
        return None;
    }
    Some(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

fn mask_path(path: &CStr, i: usize) -> Result<(), Fail> {
    let rc = match is_dir(path) {
        None => return Ok(()), // runc skips paths that do not exist
        Some(true) => sys_mount(
            c"tmpfs".as_ptr(),
            path.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY,
            std::ptr::null(),
        ),
        Some(false) => sys_mount(
            c"/dev/null".as_ptr(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ),
    };
    if rc < 0 && Errno::last().0 != libc::ENOENT {
        return Err(fail(Step::MaskPath, i));
    }
    Ok(())
}

fn readonly_path(path: &CStr, i: usize) -> Result<(), Fail> {
    if is_dir(path).is_none() {
        return Ok(());
    }
    if sys_mount(
        path.as_ptr(),
        path.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    ) < 0
    {
        return Err(fail(Step::ReadonlyPath, i));
    }
    let flags = libc::MS_BIND
        | libc::MS_REMOUNT
        | libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC;
    if sys_mount(
        std::ptr::null(),
        path.as_ptr(),
        std::ptr::null(),
        flags,
        std::ptr::null(),
    ) < 0
    {
        return Err(fail(Step::ReadonlyPath, i));
    }
    Ok(())
}

/// The file-system part of a container's creation, in its new mount
/// namespace: mounts, /dev, pivot_root, masked and read-only paths.
fn setup_rootfs(plan: &CreatePlan, console_tree: Option<RawFd>) -> Result<(), Fail> {
    if sys_mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        plan.root_propagation,
        std::ptr::null(),
    ) < 0
    {
        return Err(fail(Step::RootPropagation, 0));
    }
    if sys_mount(
        plan.rootfs.as_ptr(),
        plan.rootfs.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    ) < 0
    {
        return Err(fail(Step::RootBind, 0));
    }
    // SAFETY: open(2) of a valid path.
    let root = check(
        unsafe {
            libc::open(
                plan.rootfs.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        },
        Step::OpenRoot,
        0,
    )?;
    let mut result = Ok(());
    for m in &plan.mounts {
        result = do_mount(root, m);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        for (i, d) in plan.devices.iter().enumerate() {
            result = make_device(root, d, d.index.unwrap_or(i));
            if result.is_err() {
                break;
            }
        }
    }
    if result.is_ok() {
        for (i, (target, link)) in plan.dev_symlinks.iter().enumerate() {
            result = make_symlink(root, target, link, i);
            if result.is_err() {
                break;
            }
        }
    }
    if result.is_ok() {
        if let (Some(console), Some(tree)) = (&plan.console, console_tree) {
            result =
                ensure_path(root, console, TargetKind::File, Step::Console, 0).and_then(|fd| {
                    // SAFETY: move_mount(2) of the detached copy of the
                    // terminal onto the O_PATH descriptor of /dev/console;
                    // empty paths with the *_EMPTY_PATH flags.
                    let rc = unsafe {
                        libc::syscall(
                            SYS_MOVE_MOUNT,
                            tree,
                            c"".as_ptr(),
                            fd,
                            c"".as_ptr(),
                            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
                        )
                    };
                    let e = Errno::last();
                    close(fd);
                    if rc < 0 {
                        Err((Step::Console, 1, e))
                    } else {
                        Ok(())
                    }
                });
        }
    }
    close(root);
    result?;
    pivot_root(&plan.rootfs)?;
    for (i, (_, file, value)) in plan.sysctl.iter().enumerate() {
        write_file(file, value.as_bytes(), Step::Sysctl, i)?;
    }
    for (i, p) in plan.masked.iter().enumerate() {
        mask_path(p, i)?;
    }
    for (i, p) in plan.readonly.iter().enumerate() {
        readonly_path(p, i)?;
    }
    if plan.root_readonly
        && sys_mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        ) < 0
    {
        return Err(fail(Step::RootReadonly, 0));
    }
    Ok(())
}

fn identity_step(s: IdentityStep) -> Step {
    match s {
        IdentityStep::KeepCaps => Step::IdentityKeepCaps,
        IdentityStep::DropBounding => Step::IdentityDropBounding,
        IdentityStep::SetGroups => Step::IdentitySetGroups,
        IdentityStep::SetGid => Step::IdentitySetGid,
        IdentityStep::SetUid => Step::IdentitySetUid,
        IdentityStep::SetCaps => Step::IdentitySetCaps,
        IdentityStep::Ambient => Step::IdentityAmbient,
    }
}

/// Limits, identity, working directory, program lookup, no_new_privs:
/// everything of the process but the exec, and its seccomp filter when
/// `noNewPrivileges` is set. Returns the index of the candidate path to
/// execute.
///
/// The seccomp filter goes where runc puts it: without no_new_privs the
/// kernel takes a filter only from a task with CAP_SYS_ADMIN, so it is
/// installed here, before the identity and capabilities change (Docker's
/// default and Kubernetes' RuntimeDefault have it so); with no_new_privs,
/// as late as possible, just before the program's execve (see
/// [`seccomp_at_exec`]), so that fewer of the runtime's own system calls
/// run under it.
fn setup_process(p: &ProcessPlan) -> Result<usize, Fail> {
    rlimit::apply(&p.rlimits).map_err(|(i, e)| (Step::Rlimit, i as u32, e))?;
    if !p.no_new_privs {
        if let Some(f) = &p.seccomp {
            f.install().map_err(|e| (Step::Seccomp, 0, e))?;
        }
    }
    caps::switch_identity(&p.identity, &p.caps, p.cap_last_cap)
        .map_err(|(s, e)| (identity_step(s), 0, e))?;
    // SAFETY: chdir to a valid path, as the container's user.
    check(unsafe { libc::chdir(p.cwd.as_ptr()) }, Step::Cwd, 0)?;
    // The program's lookup as runc's (Go's exec.LookPath): the first
    // regular file with an execute bit; a regular file without one is
    // skipped and, if nothing else is found, is "permission denied" now,
    // at create, rather than a failed start.
    let mut found = None;
    let mut denied = false;
    for (i, c) in p.candidates.iter().enumerate() {
        // SAFETY: an all-zero stat is a valid out-value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: stat(2) with a valid path and out-pointer.
        if unsafe { libc::stat(c.as_ptr(), &mut st) } == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
        {
            if st.st_mode & 0o111 == 0 {
                denied = true;
                continue;
            }
            found = Some(i);
            break;
        }
    }
    let found = match found {
        Some(i) => i,
        None if denied => return Err((Step::Exec, 0, Errno(libc::EACCES))),
        None => return Err((Step::ExecNotFound, 0, Errno(libc::ENOENT))),
    };
    if p.no_new_privs {
        check(
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) with constant arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            Step::NoNewPrivs,
            0,
        )?;
    }
    Ok(found)
}

/// The seccomp filter to install just before the program's execve: only
/// with no_new_privs (without it [`setup_process`] installed it already).
pub fn seccomp_at_exec(p: &ProcessPlan) -> Option<&super::seccomp::Filter> {
    p.seccomp.as_ref().filter(|_| p.no_new_privs)
}

fn exec(p: &ProcessPlan, candidate: usize, argv: &[*const c_char], envp: &[*const c_char]) -> Fail {
    if let Some(f) = seccomp_at_exec(p) {
        if let Err(e) = f.install() {
            return (Step::Seccomp, 0, e);
        }
    }
    // SAFETY: argv and envp are NULL-terminated arrays of pointers into
    // the plan's C strings, which outlive the call.
    unsafe {
        libc::execve(
            p.candidates[candidate].as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    fail(Step::Exec, candidate)
}

/// What the child of a create execs once set up: the agent's binary (an
/// O_PATH descriptor opened before `pivot_root`) as the init stub, with
/// the handover memfd (see stub.rs).
#[derive(Debug, Clone, Copy)]
pub struct StubFds {
    /// The agent's binary.
    pub exe: RawFd,
    /// The handover memfd.
    pub handover: RawFd,
}

/// The child side of a container's creation, spawned with CLONE_VM |
/// CLONE_VFORK (see `vfork_in`: nothing here may touch memory the agent
/// uses, nor state the processes sharing an mm share, such as
/// oom_score_adj, which the agent writes itself): namespaces, cgroup, root
/// file system and identity, then the agent's binary as the init stub
/// (`stub_argv[candidate]`), which waits for the start. Never returns.
pub fn create(
    plan: &CreatePlan,
    cgroup_procs: Option<&CString>,
    fds: &ChildFds,
    stub: StubFds,
    stub_argv: &[[*const c_char; 3]],
) -> ! {
    let mut extra = [-1; MAX_EXTRA];
    let n = plan.join.len().min(MAX_EXTRA - 2);
    for (slot, (_, fd)) in extra.iter_mut().zip(plan.join.iter()) {
        *slot = std::os::fd::AsRawFd::as_raw_fd(fd);
    }
    // The handover before the binary: its place after arrange_fds is at or
    // above HANDOVER_FD, where it moves, and the binary's is above that.
    extra[n] = stub.handover;
    extra[n + 1] = stub.exe;
    let result = (|| {
        let moved = arrange_fds(fds, &extra[..n + 2])?;
        reset_signals()?;
        session(fds.tty)?;
        join_cgroup(cgroup_procs.map(CString::as_c_str))?;
        // The terminal lives on the agent's devpts, in the agent's mount
        // namespace: take a detached copy of it now, to mount on the
        // container's /dev/console later (a bind across namespaces fails).
        let console_tree = match plan.console {
            Some(_) => Some(open_tree_of_stdin()?),
            None => None,
        };
        for (i, (t, _)) in plan.join.iter().enumerate().take(n) {
            // SAFETY: setns(2) on a namespace descriptor we hold.
            check(unsafe { libc::setns(moved[i], *t) }, Step::Setns, i)?;
        }
        // SAFETY: unshare(2) with CLONE_NEW* flags.
        check(unsafe { libc::unshare(plan.unshare) }, Step::Unshare, 0)?;
        if let Some(h) = &plan.hostname {
            check(
                // SAFETY: a valid buffer of the given length.
                unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) },
                Step::Hostname,
                0,
            )?;
        }
        if let Some(d) = &plan.domainname {
            check(
                // SAFETY: a valid buffer of the given length.
                unsafe { libc::setdomainname(d.as_ptr(), d.as_bytes().len()) },
                Step::Domainname,
                0,
            )?;
        }
        setup_rootfs(plan, console_tree)?;
        let candidate = setup_process(&plan.process)?;
        let (handover, exe) = (moved[n], moved[n + 1]);
        // The stub's descriptors: the report and start pipes stay at 3 and
        // 4, the handover goes to 5 (a namespace descriptor, used by now,
        // may have been there); all three survive the exec.
        if handover != super::stub::HANDOVER_FD {
            check(
                // SAFETY: dup2 between descriptors of this child.
                unsafe { libc::dup2(handover, super::stub::HANDOVER_FD) },
                Step::Fds,
                0,
            )?;
        }
        for fd in [REPORT_FD, START_FD, super::stub::HANDOVER_FD] {
            // SAFETY: F_SETFD on a descriptor of this child.
            check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, Step::Fds, 0)?;
        }
        let argv =
            stub_argv
                .get(candidate)
                .ok_or((Step::Exec, candidate as u32, Errno(libc::EINVAL)))?;
        let envp: [*const c_char; 1] = [std::ptr::null()];
        // SAFETY: execveat(2) of the agent's binary by descriptor with an
        // empty path, NUL-terminated, null-ended argument arrays the
        // parent prepared.
        unsafe {
            libc::syscall(
                libc::SYS_execveat,
                exe,
                c"".as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        Err(fail(Step::Exec, candidate))
    })();
    match result {
        Err(f) => die(f),
        Ok(()) => die((Step::Exec, 0, Errno(libc::EINVAL))),
    }
}

/// The child side of a built-in pause (see `CreateContainer::builtin_pause`),
/// spawned as [`create`]'s: the pod's namespaces, cgroup, hostname,
/// domainname and sysctls (the agent writes the OOM score), then `exe` (the agent's own binary) as `argv` (the pause).
/// Never returns.
pub fn pause(
    part: &super::plan::PodPart,
    cgroup_procs: Option<&CString>,
    fds: &ChildFds,
    exe: &CStr,
    argv: &[*const c_char],
    envp: &[*const c_char],
) -> ! {
    let mut extra = [-1; MAX_EXTRA];
    let n = part.join.len().min(MAX_EXTRA);
    for (slot, (_, fd)) in extra.iter_mut().zip(part.join.iter()) {
        *slot = std::os::fd::AsRawFd::as_raw_fd(fd);
    }
    let result = (|| {
        let moved = arrange_fds(fds, &extra[..n])?;
        reset_signals()?;
        session(false)?;
        join_cgroup(cgroup_procs.map(CString::as_c_str))?;
        for (i, (t, _)) in part.join.iter().enumerate().take(n) {
            // SAFETY: setns(2) on a namespace descriptor we hold.
            check(unsafe { libc::setns(moved[i], *t) }, Step::Setns, i)?;
            close(moved[i]);
        }
        // The pod's ipc, uts and cgroup namespaces; not a mount namespace:
        // the pause has no root file system of its own.
        let unshare =
            part.ns.new & (libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP);
        // SAFETY: unshare(2) with CLONE_NEW* flags.
        check(unsafe { libc::unshare(unshare) }, Step::Unshare, 0)?;
        if let Some(h) = &part.hostname {
            check(
                // SAFETY: a valid buffer of the given length.
                unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) },
                Step::Hostname,
                0,
            )?;
        }
        if let Some(d) = &part.domainname {
            check(
                // SAFETY: a valid buffer of the given length.
                unsafe { libc::setdomainname(d.as_ptr(), d.as_bytes().len()) },
                Step::Domainname,
                0,
            )?;
        }
        for (i, (_, file, value)) in part.sysctl.iter().enumerate() {
            write_file(file, value.as_bytes(), Step::Sysctl, i)?;
        }
        // SAFETY: execve(2) of the agent's binary with NUL-terminated,
        // null-ended argument and environment arrays the parent prepared.
        unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err(fail(Step::Exec, 0))
    })();
    match result {
        Err(f) => die(f),
        Ok(()) => die((Step::Exec, 0, Errno(libc::EINVAL))),
    }
}

/// The child side of an exec in a running container: join its namespaces
/// (`ns`: CLONE_NEW* type and descriptor, the pid namespace already joined
/// by the forking thread) and cgroup, then become the process. Never returns.
pub fn exec_in(
    plan: &ProcessPlan,
    ns: &[(libc::c_int, RawFd)],
    cgroup_procs: Option<&CString>,
    fds: &ChildFds,
    argv: &[*const c_char],
    envp: &[*const c_char],
) -> ! {
    let mut extra = [-1; MAX_EXTRA];
    let n = ns.len().min(MAX_EXTRA);
    for (slot, (_, fd)) in extra.iter_mut().zip(ns.iter()) {
        *slot = *fd;
    }
    let result = (|| {
        let moved = arrange_fds(fds, &extra[..n])?;
        reset_signals()?;
        session(fds.tty)?;
        join_cgroup(cgroup_procs.map(CString::as_c_str))?;
        for (i, (t, _)) in ns.iter().enumerate().take(n) {
            // SAFETY: setns(2) on a namespace descriptor we hold.
            check(unsafe { libc::setns(moved[i], *t) }, Step::Setns, i)?;
            close(moved[i]);
        }
        let candidate = setup_process(plan)?;
        Err(exec(plan, candidate, argv, envp))
    })();
    match result {
        Err(f) => die(f),
        Ok(()) => die((Step::Exec, 0, Errno(libc::EINVAL))),
    }
}
