//! Containers inside the guest: an OCI runtime spec becomes a process in its
//! own mount, pid, uts and ipc namespaces, on a root file system from the
//! sandbox's share, in its own cgroup.

pub mod caps;
pub mod cgroup;
mod child;
mod plan;
pub mod rlimit;
pub mod seccomp;
pub mod stub;
mod table;
pub mod user;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_spec::runtime::{LinuxResources, Spec};
use rtv_protocol::{
    ContainerState, ContainerStats, ContainerStatus, CreateContainer, ErrorKind, ExecInContainer,
    Stdio, PAUSE_ARGV0, SHARE_MOUNTPOINT, SHARE_TAG,
};

use crate::alog;
use crate::process::{pipe, prepare_stdio, Failure, Processes};
use cgroup::{ArmedWatch, Cgroup, CgroupError};
use child::{ChildFds, Report, Step, REPORT_FAILED, REPORT_READY};
use plan::{CreatePlan, PidNs, ProcessPlan};
pub use table::Deadline;

/// A spec field the agent cannot honour, named by its JSON path
/// (`process.capabilities.bounding`, `mounts[3].source`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The field's path in config.json.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SpecError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The errno of a failed system call, for code that runs in a freshly
/// forked child and may not allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's errno.
    pub fn last() -> Self {
        Self(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::io::Error::from_raw_os_error(self.0).fmt(f)
    }
}

impl From<SpecError> for Failure {
    fn from(e: SpecError) -> Self {
        Failure::new(ErrorKind::InvalidRequest, e.to_string())
    }
}

impl From<CgroupError> for Failure {
    fn from(e: CgroupError) -> Self {
        let kind = match e {
            CgroupError::Spec(_) => ErrorKind::InvalidRequest,
            _ => ErrorKind::Other,
        };
        Failure::new(kind, e.to_string())
    }
}

/// How often [`Containers::wait_oom`] looks again without a change in the
/// cgroup (a safety net: the kernel's notifications wake it otherwise).
const WAIT_OOM_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Checks a container id ([`rtv_protocol::valid_container_id`]).
pub fn check_id(id: &str) -> Result<(), Failure> {
    if rtv_protocol::valid_container_id(id) {
        Ok(())
    } else {
        Err(Failure::new(
            ErrorKind::InvalidRequest,
            format!("container id {id:?} is invalid (letters, digits, _ - . + only)"),
        ))
    }
}

/// What a failed step means, with the spec fields it came from.
struct Context {
    mounts: Vec<String>,
    devices: Vec<String>,
    sysctl: Vec<String>,
    masked: Vec<String>,
    readonly: Vec<String>,
    program: String,
    cwd: String,
    field: &'static str,
}

impl Context {
    fn of_process(p: &ProcessPlan, field: &'static str) -> Self {
        Self {
            mounts: Vec::new(),
            devices: Vec::new(),
            sysctl: Vec::new(),
            masked: Vec::new(),
            readonly: Vec::new(),
            program: p.program.clone(),
            cwd: p.cwd.to_string_lossy().into_owned(),
            field,
        }
    }

    fn of_pause(part: &plan::PodPart) -> Self {
        Self {
            mounts: Vec::new(),
            devices: Vec::new(),
            sysctl: part
                .sysctl
                .iter()
                .map(|(k, _, _)| format!("linux.sysctl.{k}"))
                .collect(),
            masked: Vec::new(),
            readonly: Vec::new(),
            program: PAUSE_ARGV0.into(),
            cwd: "/".into(),
            field: "process",
        }
    }

    fn of_create(plan: &CreatePlan, spec: &Spec) -> Self {
        let mut c = Self::of_process(&plan.process, "process");
        c.mounts = spec
            .mounts()
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, m)| {
                format!(
                    "mounts[{i}] ({} on {})",
                    m.typ().as_deref().unwrap_or("bind"),
                    m.destination().display()
                )
            })
            .collect();
        c.devices = plan
            .devices
            .iter()
            .map(|d| match d.index {
                Some(i) => format!("linux.devices[{i}] ({})", d.path.rel.to_string_lossy()),
                None => format!("linux.devices (/{})", d.path.rel.to_string_lossy()),
            })
            .collect();
        c.sysctl = plan
            .sysctl
            .iter()
            .map(|(k, _, _)| format!("linux.sysctl.{k}"))
            .collect();
        c.masked = plan
            .masked
            .iter()
            .enumerate()
            .map(|(i, p)| format!("linux.maskedPaths[{i}] ({})", p.to_string_lossy()))
            .collect();
        c.readonly = plan
            .readonly
            .iter()
            .enumerate()
            .map(|(i, p)| format!("linux.readonlyPaths[{i}] ({})", p.to_string_lossy()))
            .collect();
        c
    }

    fn item(list: &[String], index: u32, fallback: &str) -> String {
        list.get(index as usize)
            .cloned()
            .unwrap_or_else(|| format!("{fallback}[{index}]"))
    }

    /// The failure a child's report describes.
    fn failure(&self, r: &Report) -> Failure {
        let err = Errno(r.errno);
        let f = self.field;
        let what = match Step::from_u32(r.step) {
            Some(Step::MountTarget) => {
                format!(
                    "{}: cannot create the mount point: {err}",
                    Self::item(&self.mounts, r.index, "mounts")
                )
            }
            Some(Step::Mount) => format!("{}: {err}", Self::item(&self.mounts, r.index, "mounts")),
            Some(Step::MountRemount) | Some(Step::MountPropagation) => format!(
                "{}: applying the options: {err}",
                Self::item(&self.mounts, r.index, "mounts")
            ),
            Some(Step::Device) => format!(
                "{}: {err}",
                Self::item(&self.devices, r.index, "linux.devices")
            ),
            Some(Step::Sysctl) => format!(
                "{}: {err}",
                Self::item(&self.sysctl, r.index, "linux.sysctl")
            ),
            Some(Step::MaskPath) => format!(
                "{}: {err}",
                Self::item(&self.masked, r.index, "linux.maskedPaths")
            ),
            Some(Step::ReadonlyPath) => {
                format!(
                    "{}: {err}",
                    Self::item(&self.readonly, r.index, "linux.readonlyPaths")
                )
            }
            Some(Step::RootBind) => format!("root.path: cannot bind-mount it for the root: {err}"),
            Some(Step::OpenRoot) => format!("root.path: cannot open it: {err}"),
            Some(Step::PivotRoot) => {
                let what = match r.index {
                    0 => "entering it",
                    1 => "pivot_root into it",
                    2 => "making the old root a slave",
                    3 => "detaching the old root",
                    _ => "entering the new root",
                };
                format!("root.path: cannot make it the root ({what}): {err}")
            }
            Some(Step::RootReadonly) => format!("root.readonly: {err}"),
            Some(Step::RootPropagation) => format!("linux.rootfsPropagation: {err}"),
            Some(Step::Hostname) => format!("hostname: {err}"),
            Some(Step::Domainname) => format!("domainname: {err}"),
            Some(Step::Unshare) => format!("linux.namespaces: {err}"),
            Some(Step::Setns) => format!("linux.namespaces: joining a namespace: {err}"),
            Some(Step::Cgroup) => format!("linux.cgroupsPath: joining the cgroup: {err}"),
            Some(Step::OomScoreAdj) => format!("process.oomScoreAdj: {err}"),
            Some(Step::Rlimit) => format!("{f}.rlimits[{}]: {err}", r.index),
            Some(
                s @ (Step::IdentityKeepCaps
                | Step::IdentityDropBounding
                | Step::IdentitySetGroups
                | Step::IdentitySetGid
                | Step::IdentitySetUid
                | Step::IdentitySetCaps
                | Step::IdentityAmbient),
            ) => format!("{f}.user / {f}.capabilities: {s:?}: {err}"),
            Some(Step::Cwd) => format!("{f}.cwd: {}: {err}", self.cwd),
            // Docker turns runc's "executable file not found" into exit
            // code 127 and "permission denied" into 126 by these words.
            Some(Step::ExecNotFound) => {
                return Failure::new(
                    ErrorKind::NotFound,
                    format!(
                        "{f}.args[0]: {:?}: executable file not found in the container (PATH of {f}.env)",
                        self.program
                    ),
                )
            }
            Some(Step::NoNewPrivs) => format!("{f}.noNewPrivileges: {err}"),
            Some(Step::Seccomp) => format!("linux.seccomp: installing the filter: {err}"),
            Some(Step::Exec) => {
                let kind = if r.errno == libc::EACCES {
                    ErrorKind::PermissionDenied
                } else {
                    ErrorKind::Other
                };
                let why = if r.errno == libc::EACCES {
                    "permission denied".to_owned()
                } else {
                    err.to_string()
                };
                return Failure::new(
                    kind,
                    format!("{f}.args[0]: cannot execute {:?}: {why}", self.program),
                );
            }
            Some(
                s @ (Step::Fds
                | Step::Signals
                | Step::Session
                | Step::Terminal
                | Step::DevSymlink
                | Step::Console
                | Step::StartWait),
            ) => {
                format!("setting up the process ({s:?}): {err}")
            }
            None => format!("setting up the process (step {}): {err}", r.step),
        };
        Failure::new(ErrorKind::InvalidRequest, what)
    }
}

/// Reads the child's next report: `None` at end of file (the child
/// exec'd, or died).
fn read_report(f: &mut File) -> Result<Option<Report>, Failure> {
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::io("reading the container's report", &e)),
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got < buf.len() {
        return Err(Failure::new(
            ErrorKind::Other,
            "truncated report from a container's process",
        ));
    }
    Ok(Some(Report::from_bytes(&buf)))
}

fn pointers(strings: &[std::ffi::CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A new eventfd.
fn eventfd() -> Result<OwnedFd, Failure> {
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(Failure::io("eventfd", &std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the child of a create needs to exec the init stub (stub.rs): the
/// agent's binary (O_PATH), the handover memfd, and for each candidate
/// path of the program the stub's arguments (`rtv-init`, the index).
type StubLaunch = (
    OwnedFd,
    OwnedFd,
    Vec<(std::ffi::CString, std::ffi::CString)>,
);

fn stub_launch(p: &ProcessPlan) -> Result<StubLaunch, Failure> {
    let bytes = |v: &[std::ffi::CString]| v.iter().map(|s| s.as_bytes().to_vec()).collect();
    let handover = stub::Handover {
        argv: bytes(&p.argv),
        env: bytes(&p.env),
        candidates: bytes(&p.candidates),
        seccomp: child::seccomp_at_exec(p).map(seccomp::Filter::parts),
    }
    .memfd()
    .map_err(|e| Failure::io("the init stub's handover", &e))?;
    // SAFETY: open(2) of our own binary as O_PATH; checked.
    let exe = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if exe < 0 {
        return Err(Failure::io(
            "/proc/self/exe",
            &std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor we own.
    let exe = unsafe { OwnedFd::from_raw_fd(exe) };
    let name = std::ffi::CString::new(stub::INIT_ARGV0)
        .map_err(|_| Failure::new(ErrorKind::Other, "the stub's name"))?;
    let args = (0..p.candidates.len().max(1))
        .map(|i| {
            let index = std::ffi::CString::new(i.to_string()).unwrap_or_default();
            (name.clone(), index)
        })
        .collect();
    Ok((exe, handover, args))
}

/// Writes process `pid`'s oom_score_adj from the agent (a child that
/// shares the agent's memory must not: the kernel applies it to every
/// process of the mm, the agent included).
fn set_oom_score_adj(pid: i32, adj: Option<&std::ffi::CStr>) -> Result<(), Failure> {
    let Some(adj) = adj else { return Ok(()) };
    let path = format!("/proc/{pid}/oom_score_adj");
    std::fs::write(&path, adj.to_bytes()).map_err(|e| {
        Failure::new(
            ErrorKind::InvalidRequest,
            format!("process.oomScoreAdj: {path}: {e}"),
        )
    })
}

/// The child's stack size for [`vfork_in`].
const VFORK_STACK: usize = 256 * 1024;

/// The agent's own pid namespace, to return a thread to after it joined a
/// container's for a spawn.
fn own_pid_ns() -> std::io::Result<&'static OwnedFd> {
    static NS: std::sync::OnceLock<Result<OwnedFd, i32>> = std::sync::OnceLock::new();
    NS.get_or_init(|| {
        File::open("/proc/self/ns/pid")
            .map(OwnedFd::from)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    })
    .as_ref()
    .map_err(|e| std::io::Error::from_raw_os_error(*e))
}

extern "C" fn vfork_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `&mut &mut dyn FnMut()` that vfork_in passed to
    // clone(2); vfork_in's frame, and so the closure, outlives this child
    // (CLONE_VFORK suspends it until the child execs or exits).
    let f = unsafe { &mut *arg.cast::<&mut dyn FnMut()>() };
    f();
    // SAFETY: _exit(2) if the child ever returned.
    unsafe { libc::_exit(127) }
}

/// Starts `child` in a new process, in the pid namespace `pid_ns`, that
/// shares the agent's memory until it execs (CLONE_VM | CLONE_VFORK, as
/// posix_spawn does: no page tables are copied, and the agent takes no
/// copy-on-write faults afterwards, each an emulated page fault on PVM
/// hosts). The calling thread waits until the child has exec'd or exited.
/// The child runs on a stack of its own with every signal blocked (it
/// resets the dispositions before it unblocks them) and must only make
/// system calls on prepared data (see child.rs). Joining a pid namespace
/// goes through this thread, which returns to the agent's own afterwards
/// (a worker that cannot is retired). Returns the child's pid.
fn vfork_in(pid_ns: &PidNs, child: &mut dyn FnMut()) -> std::io::Result<i32> {
    let mut flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    match pid_ns {
        PidNs::New => flags |= libc::CLONE_NEWPID,
        PidNs::Join(fd) => {
            own_pid_ns()?;
            // SAFETY: setns on a pid namespace descriptor we hold; it only
            // sets where this thread's children go, undone below.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        PidNs::Shared => {}
    }
    let mut stack = vec![0u8; VFORK_STACK];
    // The stack grows down from its 16-byte aligned top.
    let top = (stack.as_mut_ptr() as usize + VFORK_STACK) & !15;
    let mut child = child;
    // SAFETY: an all-zero sigset_t is valid; sigfillset fills it, and
    // pthread_sigmask reads it and writes the old mask to `old`.
    let (all, mut old) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        (all, std::mem::zeroed::<libc::sigset_t>())
    };
    // SAFETY: blocks every signal in this thread (no handler may run on
    // the child's stack before it resets them); restored below.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    // SAFETY: clone(2) with CLONE_VM | CLONE_VFORK: the child runs
    // `vfork_child` on `stack`, which stays allocated until clone returns
    // (the child has exec'd or exited by then), with `child` borrowed
    // from this frame for the same time.
    let pid = unsafe {
        libc::clone(
            vfork_child,
            top as *mut libc::c_void,
            flags,
            (&mut child as *mut &mut dyn FnMut()).cast(),
        )
    };
    let spawned = if pid < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(pid)
    };
    // SAFETY: restores this thread's signal mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if let PidNs::Join(_) = pid_ns {
        let back = own_pid_ns().and_then(|own| {
            // SAFETY: setns back to the agent's own pid namespace.
            if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        if let Err(e) = back {
            alog!(
                Error,
                "a worker cannot return to the agent's pid namespace: {e}"
            );
            crate::pool::retire_current();
        }
    }
    spawned
}

/// What never changes once a container exists.
struct Fixed {
    exec_id: u64,
    pid: i32,
    /// Readable once the container is deleted: wakes its `WaitOom`s (the
    /// kernel's notification of the emptied cgroup may be lost when the
    /// delete removes the cgroup right after).
    deleted: OwnedFd,
    /// The built-in pause of a pod sandbox.
    pause: bool,
    cgroup: Option<Cgroup>,
    spec: Spec,
    rootfs: PathBuf,
}

/// A container's changing state (see table.rs for who may touch it when).
struct Life {
    started: bool,
    paused: bool,
    /// Write end of the start pipe, until started.
    start: Option<File>,
    /// Read end of the report pipe, until started.
    report: Option<File>,
}

type Container = table::Entry<Fixed, Life>;

/// A `WaitOom` armed on its container, or to be armed once the container's
/// create ends ([`Containers::arm_oom`]).
pub struct OomWatch {
    id: String,
    container: Option<Arc<Container>>,
    armed: Option<ArmedWatch>,
}

/// Every container of the sandbox.
pub struct Containers {
    procs: Arc<Processes>,
    table: table::Table<Fixed, Life>,
    cgroup_root: Option<PathBuf>,
    /// In a guest: mount the share on first use.
    guest: bool,
    share: Mutex<bool>,
}

fn invalid_state(message: String) -> Failure {
    Failure::new(ErrorKind::InvalidState, message)
}

impl Containers {
    /// Containers over the agent's process table; `cgroup_root` is the
    /// cgroup2 mount (None: specs with resources are refused), `guest`
    /// whether the agent is PID 1 of a VM (it then mounts the share).
    pub fn new(procs: Arc<Processes>, cgroup_root: Option<PathBuf>, guest: bool) -> Self {
        Self {
            procs,
            table: table::Table::default(),
            cgroup_root,
            guest,
            share: Mutex::new(false),
        }
    }

    fn status(&self, fixed: &Fixed, life: &Life) -> ContainerStatus {
        if self.procs.status(fixed.exec_id).is_some() {
            ContainerStatus::Stopped
        } else if !life.started {
            ContainerStatus::Created
        } else if life.paused {
            ContainerStatus::Paused
        } else {
            ContainerStatus::Running
        }
    }

    fn state_of(&self, id: &str, fixed: &Fixed, life: &Life) -> ContainerState {
        let exit = self.procs.status(fixed.exec_id);
        ContainerState {
            container_id: id.to_owned(),
            status: self.status(fixed, life),
            pid: if exit.is_some() { 0 } else { fixed.pid },
            exec_id: fixed.exec_id,
            exit,
            oom_kills: fixed.cgroup.as_ref().map(Cgroup::oom_kills).unwrap_or(0),
        }
    }

    /// Runs `f` on container `id`'s state once no change is under way.
    fn shared<T>(
        &self,
        id: &str,
        deadline: Deadline,
        f: impl FnOnce(&Fixed, &mut Life) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let c = self.table.get(id, deadline)?;
        let mut life = c.shared(deadline)?;
        f(&c.fixed, &mut life)
    }

    /// Runs `f` with container `id` to itself (a change described by
    /// `doing`).
    fn change<T>(
        &self,
        id: &str,
        doing: &'static str,
        deadline: Deadline,
        f: impl FnOnce(&Container, &mut table::Change<'_, Fixed, Life>) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let c = self.table.get(id, deadline)?;
        let mut change = c.change(doing, deadline)?;
        f(&c, &mut change)
    }

    /// Mounts the sandbox's share (once) when a guest's rootfs is on it.
    fn ensure_share(&self, rootfs: &Path) -> Result<(), Failure> {
        if !self.guest || !rootfs.starts_with(SHARE_MOUNTPOINT) {
            return Ok(());
        }
        let mut mounted = self.share.lock().unwrap_or_else(|p| p.into_inner());
        if *mounted {
            return Ok(());
        }
        std::fs::create_dir_all(SHARE_MOUNTPOINT)
            .map_err(|e| Failure::io(&format!("creating {SHARE_MOUNTPOINT}"), &e))?;
        let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
        let (src, dst, fstype) = (c(SHARE_TAG), c(SHARE_MOUNTPOINT), c("virtiofs"));
        // SAFETY: valid NUL-terminated strings; mount(2) does not keep them.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NODEV,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Failure::io(
                &format!("mounting the share ({SHARE_TAG}) on {SHARE_MOUNTPOINT}"),
                &e,
            ));
        }
        alog!(Info, "share mounted on {SHARE_MOUNTPOINT}");
        *mounted = true;
        Ok(())
    }

    /// Creates a container: its init process is set up and waits for start.
    /// Requests on the id meanwhile wait for the create to end. Returns the
    /// init's exec id and pid, and the spec's fields that were accepted
    /// but not applied (see [`plan::not_applied`]).
    pub fn create(&self, req: &CreateContainer) -> Result<(u64, i32, Vec<String>), Failure> {
        let id = req.container_id.as_str();
        check_id(id)?;
        self.table.reserve(id)?;
        match self.create_inner(req) {
            Ok((fixed, life)) => {
                let notes = plan::not_applied(&req.spec);
                for n in &notes {
                    alog!(Warn, "container {id}: not applied: {n}");
                }
                let r = (fixed.exec_id, fixed.pid, notes);
                self.table
                    .created(id, Some(Arc::new(table::Entry::new(id, fixed, life))));
                Ok(r)
            }
            Err(e) => {
                self.table.created(id, None);
                Err(e)
            }
        }
    }

    /// The container's cgroup (with the spec's limits), if the agent has
    /// a cgroup2 hierarchy.
    fn make_cgroup(&self, req: &CreateContainer) -> Result<Option<Cgroup>, Failure> {
        let linux = req.spec.linux().as_ref();
        let resources = linux.and_then(|l| l.resources().as_ref());
        match &self.cgroup_root {
            Some(root) => {
                let rel = linux
                    .and_then(|l| l.cgroups_path().as_ref())
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("rtv/{}", req.container_id));
                Ok(Some(Cgroup::create(root, &rel, resources)?))
            }
            None => {
                if resources.is_some_and(has_limits) {
                    return Err(SpecError::new(
                        "linux.resources",
                        "no cgroup v2 hierarchy with controllers is available",
                    )
                    .into());
                }
                Ok(None)
            }
        }
    }

    /// Starts a pod sandbox's built-in pause (see
    /// `CreateContainer::builtin_pause`): the agent's own binary as
    /// `rtv-pause` in the pod's namespaces and the container's cgroup,
    /// without a root file system of its own.
    fn create_pause(&self, req: &CreateContainer) -> Result<(Fixed, Life), Failure> {
        let spec = &req.spec;
        let part = plan::pause(spec)?;
        let deleted = eventfd()?;
        let cgroup = self.make_cgroup(req)?;
        let ctx = Context::of_pause(&part);
        let launched = (|| {
            // The pause needs no terminal.
            let stdio = prepare_stdio(&Stdio {
                tty: None,
                ..req.stdio
            })?;
            let (report_r, report_w) = pipe()?;
            let procs_file = cgroup.as_ref().map(Cgroup::procs_file);
            let name = std::ffi::CString::new(PAUSE_ARGV0)
                .map_err(|_| Failure::new(ErrorKind::Other, "the pause's name"))?;
            let argv = pointers(std::slice::from_ref(&name));
            let envp = pointers(&[]);
            let (exec_id, pid) = self.procs.fork_registered(stdio, |stdio| {
                let fds = ChildFds {
                    stdio: stdio.child_fds(),
                    tty: false,
                    report: report_w.as_raw_fd(),
                    start: None,
                };
                vfork_in(&part.pid_ns, &mut || {
                    child::pause(
                        &part,
                        procs_file.as_ref(),
                        &fds,
                        c"/proc/self/exe",
                        &argv,
                        &envp,
                    )
                })
            })?;
            drop(report_w);
            let mut report_r = report_r;
            match read_report(&mut report_r).and_then(|r| {
                if r.is_none() {
                    set_oom_score_adj(pid, part.oom_score_adj.as_deref())?;
                }
                Ok(r)
            }) {
                Ok(None) => Ok((exec_id, pid)),
                other => {
                    let failure = match other {
                        Ok(Some(r)) => ctx.failure(&r),
                        Err(e) => e,
                        Ok(None) => Failure::new(ErrorKind::Other, "the pause did not start"),
                    };
                    let _ = self.procs.wait(exec_id);
                    self.procs.forget(exec_id);
                    Err(failure)
                }
            }
        })();
        match launched {
            Ok((exec_id, pid)) => Ok((
                Fixed {
                    exec_id,
                    pid,
                    deleted,
                    pause: true,
                    cgroup,
                    spec: spec.clone(),
                    rootfs: PathBuf::new(),
                },
                Life {
                    started: false,
                    paused: false,
                    start: None,
                    report: None,
                },
            )),
            Err(e) => {
                if let Some(cg) = cgroup {
                    if let Err(ce) = cg.remove() {
                        alog!(Warn, "removing the cgroup of a failed pause: {ce}");
                    }
                }
                Err(e)
            }
        }
    }

    fn create_inner(&self, req: &CreateContainer) -> Result<(Fixed, Life), Failure> {
        if req.builtin_pause {
            return self.create_pause(req);
        }
        let spec = &req.spec;
        let rootfs = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| SpecError::new("root", "is missing"))?;
        self.ensure_share(&rootfs)?;
        let plan = plan::create(spec, req.stdio.tty.is_some(), &plan::RunningKernel)?;
        if !plan.skipped_devices.is_empty() {
            crate::alog!(
                Info,
                "container {}: every device is allowed (a privileged container): it gets the \
                 guest's devices; the spec's host devices the guest does not have are left out: {}",
                req.container_id,
                plan.skipped_devices.join(", ")
            );
        }
        let deleted = eventfd()?;
        let cgroup = self.make_cgroup(req)?;
        let ctx = Context::of_create(&plan, spec);
        let launched = self.launch_init(&plan, cgroup.as_ref(), &req.stdio, &ctx);
        match launched {
            Ok((exec_id, pid, start, report)) => Ok((
                Fixed {
                    exec_id,
                    pid,
                    deleted,
                    pause: false,
                    cgroup,
                    spec: spec.clone(),
                    rootfs,
                },
                Life {
                    started: false,
                    paused: false,
                    start: Some(start),
                    report: Some(report),
                },
            )),
            Err(e) => {
                if let Some(cg) = cgroup {
                    if let Err(ce) = cg.remove() {
                        alog!(Warn, "removing the cgroup of a failed container: {ce}");
                    }
                }
                Err(e)
            }
        }
    }

    /// Forks the init process and waits until it is set up.
    fn launch_init(
        &self,
        plan: &CreatePlan,
        cgroup: Option<&Cgroup>,
        stdio: &Stdio,
        ctx: &Context,
    ) -> Result<(u64, i32, File, File), Failure> {
        let stdio = prepare_stdio(stdio)?;
        let (start_r, start_w) = pipe()?;
        let (report_r, report_w) = pipe()?;
        let procs_file = cgroup.map(Cgroup::procs_file);
        let (exe, handover, stub_args) = stub_launch(&plan.process)?;
        let stub_argv: Vec<[*const libc::c_char; 3]> = stub_args
            .iter()
            .map(|i| [stub_args[0].0.as_ptr(), i.1.as_ptr(), std::ptr::null()])
            .collect();
        let (exec_id, pid) = self.procs.fork_registered(stdio, |stdio| {
            let fds = ChildFds {
                stdio: stdio.child_fds(),
                tty: stdio.is_tty(),
                report: report_w.as_raw_fd(),
                start: Some(start_r.as_raw_fd()),
            };
            let stub = child::StubFds {
                exe: exe.as_raw_fd(),
                handover: handover.as_raw_fd(),
            };
            vfork_in(&plan.pid_ns, &mut || {
                child::create(plan, procs_file.as_ref(), &fds, stub, &stub_argv)
            })
        })?;
        drop((report_w, start_r, exe, handover));
        let mut report_r = report_r;
        let ready = read_report(&mut report_r).and_then(|r| match r {
            Some(r) if r.kind == REPORT_READY => {
                set_oom_score_adj(pid, plan.oom_score_adj.as_deref())?;
                Ok(Some(r))
            }
            other => Ok(other),
        });
        match ready {
            Ok(Some(r)) if r.kind == REPORT_READY => Ok((exec_id, pid, start_w, report_r)),
            other => {
                let failure = match other {
                    Ok(Some(r)) if r.kind == REPORT_FAILED => ctx.failure(&r),
                    Ok(_) => Failure::new(
                        ErrorKind::Other,
                        "the container's process ended while being set up",
                    ),
                    Err(e) => e,
                };
                // SAFETY: kill(2) of our child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = self.procs.wait(exec_id);
                self.procs.forget(exec_id);
                Err(failure)
            }
        }
    }

    /// Lets a created container's init run its program.
    pub fn start(&self, id: &str, deadline: Deadline) -> Result<(), Failure> {
        self.change(id, "being started", deadline, |c, change| {
            let (mut start, mut report) = {
                let mut life = change.state();
                if life.started || self.procs.status(c.fixed.exec_id).is_some() {
                    return Err(invalid_state(format!(
                        "container {id:?} is not in the created state"
                    )));
                }
                if c.fixed.pause {
                    // It runs already.
                    life.started = true;
                    return Ok(());
                }
                let (Some(start), Some(report)) = (life.start.take(), life.report.take()) else {
                    return Err(invalid_state(format!("container {id:?} has no start pipe")));
                };
                life.started = true;
                (start, report)
            };
            start
                .write_all(&[1])
                .map_err(|e| Failure::io("starting the container", &e))?;
            drop(start);
            match read_report(&mut report)? {
                None => Ok(()),
                Some(r) => {
                    let spec = &c.fixed.spec;
                    let process = spec
                        .process()
                        .as_ref()
                        .ok_or_else(|| SpecError::new("process", "is missing"))?;
                    let plan = plan::process("process", process, &c.fixed.rootfs, spec)?;
                    Err(Context::of_process(&plan, "process").failure(&r))
                }
            }
        })
    }

    /// Runs another process in a running container. Changes to the
    /// container wait until the process has been set up (or has failed).
    /// Returns its exec id and pid, and the process's fields that were
    /// accepted but not applied.
    pub fn exec(
        &self,
        req: &ExecInContainer,
        deadline: Deadline,
    ) -> Result<(u64, i32, Vec<String>), Failure> {
        let id = req.container_id.as_str();
        let c = self.table.get(id, deadline)?;
        let fixed = &c.fixed;
        if fixed.pause {
            return Err(Failure::new(
                ErrorKind::InvalidRequest,
                format!("container {id:?} is a pod sandbox running rtv's built-in pause: nothing can be exec'd in it"),
            ));
        }
        let (_turn, ()) = c.share(deadline, |life| {
            if self.status(fixed, life) != ContainerStatus::Running {
                return Err(invalid_state(format!("container {id:?} is not running")));
            }
            Ok(())
        })?;
        let pid = fixed.pid;
        let procs_file = fixed.cgroup.as_ref().map(Cgroup::procs_file);
        let plan = plan::process("process", &req.process, &fixed.rootfs, &fixed.spec)?;
        let ctx = Context::of_process(&plan, "process");
        let open = |name: &str| {
            File::open(format!("/proc/{pid}/ns/{name}"))
                .map(OwnedFd::from)
                .map_err(|e| Failure::io(&format!("/proc/{pid}/ns/{name}"), &e))
        };
        let pid_ns = PidNs::Join(open("pid")?);
        let ns: Vec<(libc::c_int, OwnedFd)> = vec![
            (libc::CLONE_NEWIPC, open("ipc")?),
            (libc::CLONE_NEWUTS, open("uts")?),
            (libc::CLONE_NEWCGROUP, open("cgroup")?),
            (libc::CLONE_NEWNS, open("mnt")?),
        ];
        let raw_ns: Vec<(libc::c_int, RawFd)> =
            ns.iter().map(|(t, fd)| (*t, fd.as_raw_fd())).collect();
        let stdio = prepare_stdio(&req.stdio)?;
        let (report_r, report_w) = pipe()?;
        let argv = pointers(&plan.argv);
        let envp = pointers(&plan.env);
        let (exec_id, child_pid) = self.procs.fork_registered(stdio, |stdio| {
            let fds = ChildFds {
                stdio: stdio.child_fds(),
                tty: stdio.is_tty(),
                report: report_w.as_raw_fd(),
                start: None,
            };
            vfork_in(&pid_ns, &mut || {
                child::exec_in(&plan, &raw_ns, procs_file.as_ref(), &fds, &argv, &envp)
            })
        })?;
        drop(report_w);
        drop(ns);
        let mut report_r = report_r;
        match read_report(&mut report_r)? {
            None => Ok((
                exec_id,
                child_pid,
                plan::process_not_applied("process", &req.process),
            )),
            Some(r) => {
                let _ = self.procs.wait(exec_id);
                self.procs.forget(exec_id);
                Err(ctx.failure(&r))
            }
        }
    }

    /// Sends `signal` to a container's init, or to all its processes.
    pub fn signal(
        &self,
        id: &str,
        signal: i32,
        all: bool,
        deadline: Deadline,
    ) -> Result<(), Failure> {
        self.shared(id, deadline, |fixed, life| {
            if self.status(fixed, life) == ContainerStatus::Stopped {
                return Err(invalid_state(format!("container {id:?} is stopped")));
            }
            match (&fixed.cgroup, all) {
                (Some(cg), true) => cg.kill_all(signal).map_err(Failure::from),
                _ => self.procs.signal(fixed.exec_id, signal),
            }
        })
    }

    /// A container's state.
    pub fn state(&self, id: &str, deadline: Deadline) -> Result<ContainerState, Failure> {
        self.shared(id, deadline, |fixed, life| {
            Ok(self.state_of(id, fixed, life))
        })
    }

    /// Arms a `WaitOom` on container `id` without waiting for any other
    /// request: its cgroup's event files are read, so a kill after this
    /// call is never missed. A container being created (or whose cgroup
    /// cannot be watched) is armed by [`Containers::wait_oom`].
    pub fn arm_oom(&self, id: &str) -> Result<OomWatch, Failure> {
        let container = self.table.try_get(id)?;
        let armed = match &container {
            Some(c) => Self::cgroup_of(id, &c.fixed)?.watch().arm().ok(),
            None => None,
        };
        Ok(OomWatch {
            id: id.to_owned(),
            container,
            armed,
        })
    }

    /// Blocks until the OOM killer has killed more than `seen` processes
    /// in the container of `watch`, or it has stopped or has no process
    /// left; then its state (see [`RequestBody::WaitOom`]). Waits for no
    /// other request, except a create in progress, or a delete that is
    /// removing the cgroup as the watch is armed.
    ///
    /// [`RequestBody::WaitOom`]: rtv_protocol::RequestBody::WaitOom
    pub fn wait_oom(
        &self,
        watch: OomWatch,
        seen: u64,
        deadline: Deadline,
    ) -> Result<ContainerState, Failure> {
        let id = watch.id.as_str();
        let c = match watch.container {
            Some(c) => c,
            None => self.table.get(id, deadline)?,
        };
        let mut armed = match watch.armed {
            Some(a) => a,
            None => match Self::cgroup_of(id, &c.fixed)?.watch().arm() {
                Ok(a) => a,
                Err(e) => {
                    // Its cgroup is going: the delete in progress decides.
                    drop(c.shared(deadline)?);
                    return Err(e.into());
                }
            },
        };
        loop {
            let e = armed.events();
            let state = {
                let life = c.peek()?;
                self.state_of(id, &c.fixed, &life)
            };
            if e.oom_kills > seen || !e.populated || state.status == ContainerStatus::Stopped {
                return Ok(ContainerState {
                    oom_kills: state.oom_kills.max(e.oom_kills),
                    ..state
                });
            }
            armed.wait(WAIT_OOM_RECHECK, Some(c.fixed.deleted.as_fd()))?;
        }
    }

    /// The pids of a container's processes.
    pub fn pids(&self, id: &str, deadline: Deadline) -> Result<Vec<i32>, Failure> {
        self.shared(id, deadline, |fixed, _| match &fixed.cgroup {
            Some(cg) => cg.pids().map_err(Failure::from),
            None if self.procs.status(fixed.exec_id).is_none() => Ok(vec![fixed.pid]),
            None => Ok(Vec::new()),
        })
    }

    fn cgroup_of<'a>(id: &str, fixed: &'a Fixed) -> Result<&'a Cgroup, Failure> {
        fixed.cgroup.as_ref().ok_or_else(|| {
            Failure::new(
                ErrorKind::InvalidRequest,
                format!("container {id:?} has no cgroup (no cgroup v2 hierarchy)"),
            )
        })
    }

    /// Freezes or thaws a container.
    pub fn set_paused(&self, id: &str, paused: bool, deadline: Deadline) -> Result<(), Failure> {
        let doing = if paused {
            "being paused"
        } else {
            "being resumed"
        };
        self.change(id, doing, deadline, |c, change| {
            let (want, what) = if paused {
                (ContainerStatus::Running, "running")
            } else {
                (ContainerStatus::Paused, "paused")
            };
            if self.status(&c.fixed, &change.state()) != want {
                return Err(invalid_state(format!("container {id:?} is not {what}")));
            }
            Self::cgroup_of(id, &c.fixed)?.freeze(paused)?;
            change.state().paused = paused;
            Ok(())
        })
    }

    /// Changes a container's limits.
    pub fn update(
        &self,
        id: &str,
        resources: &LinuxResources,
        deadline: Deadline,
    ) -> Result<(), Failure> {
        self.change(id, "being updated", deadline, |c, change| {
            if self.status(&c.fixed, &change.state()) == ContainerStatus::Stopped {
                return Err(invalid_state(format!("container {id:?} is stopped")));
            }
            Ok(Self::cgroup_of(id, &c.fixed)?.update(resources)?)
        })
    }

    /// A container's resource usage.
    pub fn stats(&self, id: &str, deadline: Deadline) -> Result<ContainerStats, Failure> {
        self.shared(id, deadline, |fixed, _| {
            Ok(Self::cgroup_of(id, fixed)?.stats()?)
        })
    }

    /// Removes a container (killing it first with `force`). Requests that
    /// waited for the delete then find no container.
    pub fn delete(&self, id: &str, force: bool, deadline: Deadline) -> Result<(), Failure> {
        let c = self.table.get(id, deadline)?;
        let mut change = c.change("being deleted", deadline)?;
        let fixed = &c.fixed;
        let start = {
            let mut life = change.state();
            let status = self.status(fixed, &life);
            if matches!(status, ContainerStatus::Running | ContainerStatus::Paused) && !force {
                return Err(invalid_state(format!(
                    "container {id:?} is running: stop it first or delete with force"
                )));
            }
            if status != ContainerStatus::Stopped {
                if let Some(cg) = &fixed.cgroup {
                    // A frozen cgroup holds SIGKILL until thawed.
                    let _ = cg.freeze(false);
                }
                // SAFETY: kill(2) of our child, not yet reaped (its status is
                // unknown, and the reaper only records statuses of registered
                // processes, which keeps the pid ours).
                unsafe { libc::kill(fixed.pid, libc::SIGKILL) };
            }
            life.report = None;
            life.start.take()
        };
        // Closing the start pipe of a created container ends its init too.
        drop(start);
        let _ = self.procs.wait(fixed.exec_id);
        if let Some(cg) = &fixed.cgroup {
            if let Err(e) = cg.remove() {
                alog!(Warn, "container {id}: removing its cgroup: {e}");
            }
        }
        self.procs.forget(fixed.exec_id);
        change.delete();
        drop(change);
        self.table.remove(&c);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our eventfd (it never blocks: it is
        // written once).
        unsafe { libc::write(fixed.deleted.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        Ok(())
    }
}

/// Whether `r` asks for any cgroup limit (devices rules are not enforced
/// in the guest; see cgroup.rs).
fn has_limits(r: &LinuxResources) -> bool {
    r.memory().is_some()
        || r.cpu().is_some()
        || r.pids().is_some()
        || r.block_io().is_some()
        || r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty())
        || r.network().is_some()
        || r.rdma().as_ref().is_some_and(|h| !h.is_empty())
        || r.unified().as_ref().is_some_and(|h| !h.is_empty())
}
