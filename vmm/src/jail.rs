//! The VMM's own hardening, applied by `rtv-vmm` before any other thread
//! exists: it runs without an environment ([`reexec_without_environment`]),
//! only the descriptors passed on purpose survive, core dumps are off, it
//! has IPC, UTS, network, pid and mount namespaces of its own, with a procfs that
//! shows only its own processes, and is not dumpable ([`prepare`]; the
//! process started stays outside as its keeper); once the VM is built, a
//! root holding only what it still opens by name, the capability sets cut
//! to what the in-process virtio-fs server needs, and `no_new_privs`
//! ([`lock_down`]).
//!
//! What a guest that broke the VMM would hold afterwards: the kept
//! capabilities below (no `CAP_SYS_ADMIN`, `CAP_NET_ADMIN`,
//! `CAP_DAC_READ_SEARCH`, `CAP_SYS_PTRACE`, ...), no way to gain others by
//! exec (bounding set cut, `no_new_privs`), and only the files it had open.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the VMM keeps: what virtio-fs needs to act for the
/// guest's users on the share (virtiofsd's set, less `CAP_SETFCAP`: the
/// device offers no extended attributes, so file capabilities cannot be
/// set through it). `CAP_MKNOD` stays because containers with it (Docker
/// gives it by default) make device nodes in their root file systems, which
/// live on the share.
pub const KEPT_CAPS: [Capability; 7] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
];

/// The bit mask of [`KEPT_CAPS`], as `/proc/<pid>/status` shows it.
pub fn kept_mask() -> u64 {
    KEPT_CAPS.iter().fold(0, |m, c| m | c.bitmask())
}

/// A step of [`harden`] that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("closing inherited file descriptors: {0}")]
    CloseFds(#[source] std::io::Error),
    #[error("setting {what}: {source}")]
    Rlimit {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reducing the capabilities ({what}): {source}")]
    Caps {
        what: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("entering new IPC, UTS, network and pid namespaces: {0}")]
    Namespaces(#[source] std::io::Error),
    #[error("making the VMM undumpable (PR_SET_DUMPABLE): {0}")]
    Dumpable(#[source] std::io::Error),
    #[error("the VMM's keeper: {step}: {source}")]
    Keeper {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("the VMM's root: {step} ({}): {source}", path.display())]
    Root {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Starts rtv-vmm again with an empty environment when it has one and the
/// jail is not off (`--jail off` among `args`): clearing the variables in
/// place would leave the original block readable in
/// `/proc/<pid>/environ`. `RTV_LOG` becomes `--log-level` unless that is
/// given. Returns only if there is nothing to do, or with the exec's error.
pub fn reexec_without_environment() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if std::env::vars_os().next().is_none() || jail_off(&args) {
        return Ok(());
    }
    // The binary's own path, not /proc/self/exe: the kernel names the
    // process (comm, what ps and pgrep show) after the path's last part.
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    cmd.args(args.iter().skip(1));
    let has_level = args
        .iter()
        .any(|a| a == "--log-level" || a.to_string_lossy().starts_with("--log-level="));
    if let (false, Some(level)) = (has_level, std::env::var_os("RTV_LOG")) {
        cmd.arg("--log-level").arg(level);
    }
    cmd.env_clear();
    Err(cmd.exec())
}

/// Whether `args` turn the jail off (`--jail off` or `--jail=off`).
fn jail_off(args: &[std::ffi::OsString]) -> bool {
    args.windows(2).any(|w| w[0] == "--jail" && w[1] == "off")
        || args.iter().any(|a| a == "--jail=off")
}

/// The first part of the jail, before the VM is built: only `keep_fds`
/// (besides 0, 1 and 2) of the inherited descriptors survive, the rlimits,
/// new IPC, UTS, network, pid and mount namespaces. Must run while the process is
/// single-threaded (namespaces are per thread; threads made later inherit
/// them).
///
/// The pid namespace takes a fork: the process that was started stays
/// outside as the VMM's keeper ([`KEEPER_NAME`]: it relays signals and
/// ends as the VMM ends, see [`keep`]) and never returns from here; the VMM
/// goes on as pid 1 of its namespace, killed by the kernel if the keeper
/// dies. The VMM's `/proc` is then a procfs of its own namespace with
/// only the process directories (`subset=pid`): what the virtio-fs server
/// opens to reopen its files shows no other process and none of the
/// host's kernel files. Without CAP_SYS_ADMIN (a VMM not started as root)
/// the namespaces are skipped.
pub fn prepare(keep_fds: &[RawFd], seccomp: crate::seccomp::Mode) -> Result<(), JailError> {
    close_other_fds(keep_fds).map_err(JailError::CloseFds)?;
    // The environment is already empty: reexec_without_environment.
    limits()?;
    if !has_admin()? {
        tracing::info!("no CAP_SYS_ADMIN: the VMM keeps the host's namespaces");
        return Ok(());
    }
    // The network namespace is a new, empty one: the VMM reaches the
    // pod's network only through the tap descriptor it was given, and the
    // host only through Unix sockets named by path (vsock), which no
    // network namespace scopes.
    let flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWPID | libc::CLONE_NEWNET;
    // SAFETY: unshare takes flags only; the process is single-threaded.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(JailError::Namespaces(std::io::Error::last_os_error()));
    }
    split_off_keeper(seccomp)?;
    own_mounts()?;
    // Nobody else's: /proc/<pid> of the VMM belongs to root and needs
    // CAP_SYS_PTRACE to read into (another VMM, which has the same user
    // and capabilities, cannot reach this one's root or memory).
    // SAFETY: PR_SET_DUMPABLE takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(JailError::Dumpable(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The keeper's name (`comm`, what `ps` shows), beside the VMM's `rtv-vmm`.
pub const KEEPER_NAME: &str = "rtv-vmm-keeper";
const KEEPER_COMM: &std::ffi::CStr = c"rtv-vmm-keeper";

fn has_admin() -> Result<bool, JailError> {
    caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).map_err(|source| {
        JailError::Caps {
            what: "reading",
            source,
        }
    })
}

/// Forks after `unshare(CLONE_NEWPID)`: returns in the child (the VMM,
/// pid 1 of the new namespace); the parent becomes the keeper.
fn split_off_keeper(seccomp: crate::seccomp::Mode) -> Result<(), JailError> {
    let keeper_err = |step| move |source| JailError::Keeper { step, source };
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `pipe`, which we own.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(keeper_err("a pipe")(std::io::Error::last_os_error()));
    }
    // SIGCHLD blocked before the fork: the keeper waits for it with
    // sigwaitinfo and cannot miss a VMM that ends at once.
    let old = crate::signals::sigmask(
        libc::SIG_BLOCK,
        &crate::signals::signal_set(&[libc::SIGCHLD]),
    )
    .map_err(keeper_err("blocking SIGCHLD"))?;
    // SAFETY: the process is single-threaded, so the child is a complete
    // copy; each side only uses its own copies from here on.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(keeper_err("fork")(std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // SAFETY: the read end is ours and not used again here.
        unsafe { libc::close(pipe[0]) };
        keep(pid, pipe[1], seccomp);
    }
    // The VMM.
    // SAFETY: the write end is ours and not used again here.
    unsafe { libc::close(pipe[1]) };
    crate::signals::sigmask(libc::SIG_SETMASK, &old).map_err(keeper_err("the signal mask"))?;
    // SAFETY: PR_SET_PDEATHSIG takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(keeper_err("PR_SET_PDEATHSIG")(
            std::io::Error::last_os_error(),
        ));
    }
    // A keeper that died before the line above sent nothing: its end of
    // the pipe is closed then.
    let mut fd = libc::pollfd {
        fd: pipe[0],
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd we own; no wait.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    // SAFETY: the read end is ours and not used again.
    unsafe { libc::close(pipe[0]) };
    if n != 0 {
        return Err(keeper_err("the keeper ended first")(
            std::io::Error::from_raw_os_error(libc::ESRCH),
        ));
    }
    Ok(())
}

/// The keeper: outside the VMM's pid namespace, with no capabilities, no
/// descriptors but standard input, output and error, and its own seccomp
/// filter ([`crate::seccomp::Thread::Keeper`]). It passes SIGTERM, SIGINT
/// and SIGUSR1 on to the VMM and ends as the VMM ended (the same exit
/// status, or killed by the same signal), so that whoever started rtv-vmm
/// sees one process. SIGKILL of the keeper kills the VMM too
/// (`PR_SET_PDEATHSIG`).
fn keep(vmm: libc::pid_t, hold: RawFd, seccomp: crate::seccomp::Mode) -> ! {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, KEEPER_COMM.as_ptr(), 0, 0, 0) };
    if let Err(e) = keeper_lock_down(vmm, hold, seccomp) {
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("rtv-vmm: error: the VMM's keeper: {e}\n"),
        );
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(vmm, libc::SIGKILL) };
    }
    let set =
        crate::signals::signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGCHLD]);
    loop {
        // SAFETY: sigwaitinfo reads `set`; no siginfo is asked for.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: kill(2) of our own child, which cannot have been
            // reaped (only this loop reaps it).
            unsafe { libc::kill(vmm, sig) };
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status into `status`, which we own.
        if unsafe { libc::waitpid(vmm, &mut status, libc::WNOHANG) } == vmm {
            end_like(status);
        }
    }
}

fn keeper_lock_down(
    vmm: libc::pid_t,
    hold: RawFd,
    seccomp: crate::seccomp::Mode,
) -> Result<(), Box<dyn std::error::Error>> {
    close_other_fds(&[hold]).map_err(JailError::CloseFds)?;
    let caps_err = |what| move |source| JailError::Caps { what, source };
    // Every set empty: the bounding set first, while CAP_SETPCAP is held.
    for cap in caps::read(None, CapSet::Bounding).map_err(caps_err("reading"))? {
        caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("bounding set"))?;
    }
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient set"))?;
    }
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).map_err(caps_err("the capability sets"))?;
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::NoNewPrivs(std::io::Error::last_os_error()).into());
    }
    crate::seccomp::keeper_of(vmm);
    crate::seccomp::init(seccomp)?;
    crate::seccomp::enter(crate::seccomp::Thread::Keeper)?;
    Ok(())
}

/// Ends the keeper as the VMM ended (`status` from waitpid).
fn end_like(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: the default action for `sig`, the signal unblocked, then
        // raised; all of it on this single-threaded process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let _ = crate::signals::sigmask(libc::SIG_UNBLOCK, &crate::signals::signal_set(&[sig]));
            libc::raise(sig);
        }
        // A signal whose default is not to end the process.
        std::process::exit(128 + sig);
    }
    std::process::exit(libc::WEXITSTATUS(status));
}

/// The VMM's own mount namespace, `/` a slave of the host's (nothing it
/// mounts reaches the host), and a procfs of its pid namespace on `/proc`
/// with only the process directories.
fn own_mounts() -> Result<(), JailError> {
    // SAFETY: unshare takes flags only; the process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(JailError::Root {
            step: "a new mount namespace",
            path: PathBuf::from("/"),
            source: std::io::Error::last_os_error(),
        });
    }
    mount(
        "making / a slave of the host's mounts",
        None,
        Path::new("/"),
        None,
        libc::MS_SLAVE | libc::MS_REC,
        None,
    )?;
    mount(
        "a procfs of the VMM's pid namespace",
        Some(Path::new("proc")),
        Path::new("/proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("subset=pid"),
    )
}

/// The last part, once the VM is built (every file it reads is open) and
/// before any other thread exists: the VMM's own root ([`confine`]), then the capabilities cut to [`KEPT_CAPS`] and
/// `no_new_privs`.
pub fn lock_down(paths: &[&Path]) -> Result<(), JailError> {
    confine(paths)?;
    reduce_caps()?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(JailError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The directories bound into the VMM's root for `paths` (the ones it
/// still opens by name): each path's nearest existing directory (the path
/// itself, or for a file or a path not made yet, an ancestor), without
/// ones inside another.
pub fn root_binds(paths: &[&Path]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.is_absolute())
        .filter_map(|p| p.ancestors().find(|a| a.is_dir()).map(Path::to_path_buf))
        .filter(|d| d != Path::new("/"))
        .collect();
    dirs.sort();
    dirs.dedup();
    let all = dirs.clone();
    dirs.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    dirs
}

/// A directory the VMM needs (for one of `paths`) that a bind of `binds`
/// would hide: it lies on a mount (one of `mount_points`) below a
/// directory bound for another path, and the binds are not recursive (see
/// [`confine`]). `(the hidden directory, the bind that hides it)`.
pub fn hidden_by_a_bind(
    paths: &[&Path],
    binds: &[PathBuf],
    mount_points: &[PathBuf],
) -> Option<(PathBuf, PathBuf)> {
    paths
        .iter()
        .filter(|p| p.is_absolute())
        .filter_map(|p| p.ancestors().find(|a| a.is_dir()))
        .find_map(|dir| {
            let bind = binds
                .iter()
                .find(|b| dir.starts_with(b) && dir != b.as_path())?;
            mount_points
                .iter()
                .any(|m| m.starts_with(bind) && m != bind && dir.starts_with(m))
                .then(|| (dir.to_path_buf(), bind.clone()))
        })
}

/// The mount points of this mount namespace (`/proc/self/mountinfo`'s
/// fifth field, octal escapes decoded).
fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|field| {
            let mut out = Vec::with_capacity(field.len());
            let bytes = field.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let octal = bytes.get(i + 1..i + 4).and_then(|d| {
                    std::str::from_utf8(d)
                        .ok()
                        .and_then(|d| u8::from_str_radix(d, 8).ok())
                });
                match (bytes[i], octal) {
                    (b'\\', Some(b)) => {
                        out.push(b);
                        i += 4;
                    }
                    (b, _) => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect())
}

fn cstr(p: &Path) -> Result<std::ffi::CString, JailError> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| JailError::Root {
        step: "a path with a NUL byte",
        path: p.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn mount(
    step: &'static str,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let err = |source| JailError::Root {
        step,
        path: target.to_path_buf(),
        source,
    };
    let src = source.map(cstr).transpose()?;
    let tgt = cstr(target)?;
    let fs = fstype
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let dat = data
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let ptr = |c: &Option<std::ffi::CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    let rc = unsafe { libc::mount(ptr(&src), tgt.as_ptr(), ptr(&fs), flags, ptr(&dat).cast()) };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where the new root's tmpfs is mounted while it is made (in the VMM's
/// own mount namespace: the host's is not touched).
const BUILD_AT: [&str; 3] = ["/tmp", "/mnt", "/run"];

/// A new root in the VMM's own mount namespace (made by [`prepare`]): a
/// read-only tmpfs
/// holding only the directories of `paths` (bound, nosuid, nodev, noexec),
/// what the VMM still opens by name once it runs (the vsock socket's
/// directory, the snapshot and profile directories). Everything else it
/// needs is open already (KVM, guest memory, the kernel and snapshot files,
/// the console, the share's directory and `/proc/self/fd`, by which the
/// virtio-fs server reopens files). The old root is detached. Skipped
/// without CAP_SYS_ADMIN (a VMM not started as root).
pub fn confine(paths: &[&Path]) -> Result<(), JailError> {
    if !has_admin()? {
        tracing::info!("no CAP_SYS_ADMIN: the VMM keeps the host's root");
        return Ok(());
    }
    let binds = root_binds(paths);
    let io = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| JailError::Root { step, path, source }
    };
    let mounts = mount_points().map_err(io("reading the mount table", Path::new("/proc")))?;
    if let Some((hidden, _)) = hidden_by_a_bind(paths, &binds, &mounts) {
        return Err(io(
            "a directory the VMM uses is on a mount inside another directory it uses, \
             which its root would show without that mount",
            &hidden,
        )(std::io::Error::from_raw_os_error(libc::EXDEV)));
    }
    // The directories to bind, opened before the tmpfs may cover them.
    let sources = binds
        .iter()
        .map(|dir| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(dir)
                .map_err(io("opening a directory to bind", dir))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let at = BUILD_AT
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            io(
                "finding a directory to build the root in",
                Path::new("/tmp"),
            )(std::io::Error::from_raw_os_error(libc::ENOENT))
        })?;
    mount(
        "the new root (tmpfs)",
        Some(Path::new("rtv-vmm-root")),
        at,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0700,size=64k,nr_inodes=256"),
    )?;
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (dir, source) in binds.iter().zip(&sources) {
        let inside = at.join(dir.strip_prefix("/").unwrap_or(dir));
        std::fs::create_dir_all(&inside).map_err(io("a directory of the new root", &inside))?;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", source.as_raw_fd()));
        // Not recursive: the directory alone, without the mounts under it,
        // among which may be the new root's own tmpfs (a directory the VMM
        // uses can be /tmp itself, where the root is built).
        mount(
            "binding a directory the VMM uses into its root",
            Some(&by_fd),
            &inside,
            None,
            libc::MS_BIND,
            None,
        )?;
        mount(
            "making a bound directory nosuid, nodev, noexec",
            None,
            &inside,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | nodev,
            None,
        )?;
    }
    std::env::set_current_dir(at).map_err(io("entering the new root", at))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one
    // at "/", and is detached right after (runc's way, no directory for
    // the old root needed).
    let dot = c".";
    // SAFETY: both pointers are a static NUL-terminated string.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(io("pivot_root into the new root", at)(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a static NUL-terminated string and integer flags.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io("detaching the old root", Path::new("/"))(
            std::io::Error::last_os_error(),
        ));
    }
    std::env::set_current_dir("/").map_err(io("entering the new root", Path::new("/")))?;
    mount(
        "making the new root read-only",
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nodev,
        None,
    )
}

/// The ranges of descriptors from 3 up that are not in `keep`, inclusive.
fn close_ranges(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd >= 3)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut ranges = Vec::new();
    let mut from = 3u32;
    for fd in keep {
        if fd > from {
            ranges.push((from, fd - 1));
        }
        from = fd + 1;
    }
    ranges.push((from, u32::MAX));
    ranges
}

fn close_other_fds(keep: &[RawFd]) -> std::io::Result<()> {
    for (first, last) in close_ranges(keep) {
        // SAFETY: close_range takes integers; the descriptors it closes are
        // not used by anything in this single-threaded process (std's own
        // handles are 0-2, and every descriptor rtv-vmm opens comes later).
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn limits() -> Result<(), JailError> {
    let set = |what: &'static str, resource, value: Option<u64>| {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `cur`, which we own.
        if unsafe { libc::getrlimit(resource, &mut cur) } != 0 {
            return Err(JailError::Rlimit {
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        // A value, or the soft limit raised to the hard one.
        let new = libc::rlimit {
            rlim_cur: value.unwrap_or(cur.rlim_max),
            rlim_max: value.unwrap_or(cur.rlim_max),
        };
        // SAFETY: setrlimit reads one rlimit from `new`, which we own.
        if unsafe { libc::setrlimit(resource, &new) } != 0 {
            return Err(JailError::Rlimit {
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    set("RLIMIT_CORE to 0", libc::RLIMIT_CORE, Some(0))?;
    // The share's open files are descriptors: as many as the host allows.
    set("RLIMIT_NOFILE to its hard limit", libc::RLIMIT_NOFILE, None)
}

fn reduce_caps() -> Result<(), JailError> {
    let caps_err = |what| move |source| JailError::Caps { what, source };
    let kept: CapsHashSet = KEPT_CAPS.iter().copied().collect();
    // The bounding set first, while CAP_SETPCAP is still held. Without it
    // (a VMM not started as root) the bounding set cannot shrink; then
    // no_new_privs keeps exec from granting anything.
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err("reading"))?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        let bounding = caps::read(None, CapSet::Bounding).map_err(caps_err("reading"))?;
        for cap in bounding.difference(&kept) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(caps_err("bounding set"))?;
        }
    }
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient set"))?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("inheritable set"))?;
    let keep: HashSet<Capability> = permitted.intersection(&kept).copied().collect();
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("permitted set"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keeper_is_named_as_documented() {
        assert_eq!(KEEPER_COMM.to_str(), Ok(KEEPER_NAME));
        assert!(
            KEEPER_COMM.to_bytes_with_nul().len() <= 16,
            "comm holds 15 bytes"
        );
    }

    #[test]
    fn the_switch_is_read_in_both_spellings() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(jail_off(&args(&["rtv-vmm", "--jail", "off"])));
        assert!(jail_off(&args(&["rtv-vmm", "--jail=off", "--kernel", "k"])));
        assert!(!jail_off(&args(&["rtv-vmm", "--jail", "on"])));
        assert!(!jail_off(&args(&["rtv-vmm", "--kernel", "off"])));
    }

    #[test]
    fn the_root_binds_the_nearest_existing_directories_once() {
        let tmp = std::env::temp_dir().join(format!("rtv-jail-binds-{}", std::process::id()));
        let state = tmp.join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("console"), "").unwrap();
        let binds = root_binds(&[
            &state.join("vsock.sock"),
            &state.join("console"),
            &tmp.join("templates/abc/snapshot"),
            Path::new("relative/ignored"),
            Path::new("/"),
        ]);
        // templates/abc does not exist: its nearest existing ancestor is
        // tmp itself, which holds state: tmp alone.
        assert_eq!(binds, vec![tmp.clone()]);
        std::fs::create_dir_all(tmp.join("templates")).unwrap();
        let binds = root_binds(&[&state.join("vsock.sock"), &tmp.join("templates/abc")]);
        assert_eq!(binds, vec![state.clone(), tmp.join("templates")]);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// A socket straight in /tmp binds /tmp, not recursively: a snapshot
    /// directory on another mount under /tmp would be hidden (the VMM would
    /// write into the directory under that mount). It is found; the same
    /// directories without that mount are not.
    #[test]
    fn a_mount_a_bind_would_hide_is_found() {
        let tmp = std::env::temp_dir().join(format!("rtv-jail-hidden-{}", std::process::id()));
        let making = tmp.join("cache/.making-1");
        std::fs::create_dir_all(&making).unwrap();
        let sock = std::env::temp_dir().join("rtv-x.vsock");
        let snapshot = making.join("snapshot");
        let paths = [sock.as_path(), snapshot.as_path()];
        let binds = root_binds(&paths);
        assert_eq!(binds, vec![std::env::temp_dir()]);
        let cache_mounted = [PathBuf::from("/"), tmp.join("cache")];
        assert_eq!(
            hidden_by_a_bind(&paths, &binds, &cache_mounted),
            Some((making.clone(), std::env::temp_dir()))
        );
        assert_eq!(
            hidden_by_a_bind(&paths, &binds, &[PathBuf::from("/")]),
            None
        );
        // Each in its own directory: nothing nested, nothing hidden.
        let own = [making.join("vsock.sock"), snapshot.clone()];
        let own: Vec<&Path> = own.iter().map(PathBuf::as_path).collect();
        let binds = root_binds(&own);
        assert_eq!(binds, vec![making.clone()]);
        assert_eq!(hidden_by_a_bind(&own, &binds, &cache_mounted), None);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn ranges_skip_the_kept_descriptors() {
        assert_eq!(close_ranges(&[]), vec![(3, u32::MAX)]);
        assert_eq!(close_ranges(&[3]), vec![(4, u32::MAX)]);
        assert_eq!(
            close_ranges(&[9, 5, 5, 2, -1]),
            vec![(3, 4), (6, 8), (10, u32::MAX)]
        );
        assert_eq!(close_ranges(&[4, 5]), vec![(3, 3), (6, u32::MAX)]);
    }

    #[test]
    fn the_kept_set_has_no_administrative_capability() {
        let m = kept_mask();
        for cap in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SETPCAP,
            Capability::CAP_SETFCAP,
        ] {
            assert_eq!(m & cap.bitmask(), 0, "{cap}");
        }
        assert_eq!(m.count_ones(), 7);
    }
}
