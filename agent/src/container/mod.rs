//! Containers inside the guest: an OCI runtime spec becomes a process in its
//! own mount, pid, uts and ipc namespaces, on a root file system from the
//! sandbox's share, in its own cgroup.

pub mod caps;
pub mod cgroup;
mod child;
mod plan;
pub mod rlimit;
pub mod seccomp;
pub mod user;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use oci_spec::runtime::{LinuxResources, Spec};
use rtv_agent::protocol::{
    ContainerState, ContainerStats, ContainerStatus, CreateContainer, ErrorKind, ExecInContainer,
    Stdio, SHARE_MOUNTPOINT, SHARE_TAG,
};

use crate::alog;
use crate::process::{pipe, prepare_stdio, Failure, Processes};
use cgroup::{Cgroup, CgroupError};
use child::{ChildFds, Report, Step, REPORT_FAILED, REPORT_READY};
use plan::{CreatePlan, PidNs, ProcessPlan};

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

/// Longest container id.
const MAX_ID: usize = 1024;

/// How often [`Containers::wait_oom`] looks again without a change in the
/// cgroup (a safety net: the kernel's notifications wake it otherwise).
const WAIT_OOM_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Checks a container id: what runc accepts (letters, digits, `_`, `-`,
/// `.`, `+`, not `.` or `..`), so it is safe in paths.
pub fn check_id(id: &str) -> Result<(), Failure> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'));
    if ok {
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
            Some(Step::RootBind) | Some(Step::OpenRoot) | Some(Step::PivotRoot) => {
                format!("root.path: cannot make it the root: {err}")
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
            Some(Step::ExecNotFound) => {
                return Failure::new(
                    ErrorKind::NotFound,
                    format!(
                        "{f}.args[0]: executable {:?} not found in the container (PATH of {f}.env)",
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
                return Failure::new(
                    kind,
                    format!("{f}.args[0]: cannot execute {:?}: {err}", self.program),
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

/// Forks in the calling thread (after it entered `pid_ns`) and runs `child`
/// in the child. Returns the child's pid.
fn fork_in(pid_ns: &PidNs, child: impl FnOnce()) -> std::io::Result<i32> {
    match pid_ns {
        PidNs::New => {
            // SAFETY: unshare(CLONE_NEWPID) only changes the namespace of
            // this thread's future children; the thread ends after the fork.
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        PidNs::Join(fd) => {
            // SAFETY: setns on a pid namespace descriptor we hold; it only
            // affects this thread's future children.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        PidNs::Shared => {}
    }
    // SAFETY: fork(2). In the child only `child` runs, which makes system
    // calls on prepared data and never returns (see child.rs).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            child();
            // SAFETY: _exit(2) in the child if `child` ever returned.
            unsafe { libc::_exit(127) }
        }
        pid => Ok(pid),
    }
}

/// Runs `f` on a thread of its own: namespaces entered for a fork must not
/// stick to a thread that serves other requests.
fn on_own_thread<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, Failure> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("fork".into())
            .spawn_scoped(s, f)
            .map_err(|e| Failure::io("starting a thread", &e))?
            .join()
            .map_err(|_| Failure::new(ErrorKind::Other, "the fork thread panicked"))
    })
}

struct Container {
    exec_id: u64,
    pid: i32,
    started: bool,
    paused: bool,
    /// Write end of the start pipe, until started.
    start: Option<File>,
    /// Read end of the report pipe, until started.
    report: Option<File>,
    cgroup: Option<Cgroup>,
    spec: Spec,
    rootfs: PathBuf,
}

enum Entry {
    /// Being created (the id is taken).
    Creating,
    /// Being started, deleted or otherwise changed by a request that
    /// blocks; other requests see it as busy.
    Busy,
    Ready(Box<Container>),
}

/// Every container of the sandbox.
pub struct Containers {
    procs: Arc<Processes>,
    table: Mutex<HashMap<String, Entry>>,
    cgroup_root: Option<PathBuf>,
    /// In a guest: mount the share on first use.
    guest: bool,
    share: Mutex<bool>,
}

fn no_such(id: &str) -> Failure {
    Failure::new(
        ErrorKind::NoSuchContainer,
        format!("container {id:?} does not exist"),
    )
}

fn busy(id: &str) -> Failure {
    Failure::new(
        ErrorKind::InvalidState,
        format!("container {id:?} is busy with another request"),
    )
}

impl Containers {
    /// Containers over the agent's process table; `cgroup_root` is the
    /// cgroup2 mount (None: specs with resources are refused), `guest`
    /// whether the agent is PID 1 of a VM (it then mounts the share).
    pub fn new(procs: Arc<Processes>, cgroup_root: Option<PathBuf>, guest: bool) -> Self {
        Self {
            procs,
            table: Mutex::new(HashMap::new()),
            cgroup_root,
            guest,
            share: Mutex::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a ready container out of the table for a blocking change.
    fn take(&self, id: &str) -> Result<Container, Failure> {
        let mut table = self.lock();
        match table.get_mut(id) {
            None => Err(no_such(id)),
            Some(Entry::Ready(_)) => match table.insert(id.to_owned(), Entry::Busy) {
                Some(Entry::Ready(c)) => Ok(*c),
                _ => Err(busy(id)),
            },
            Some(_) => Err(busy(id)),
        }
    }

    fn put(&self, id: &str, c: Container) {
        self.lock().insert(id.to_owned(), Entry::Ready(Box::new(c)));
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        match self.lock().get_mut(id) {
            None => Err(no_such(id)),
            Some(Entry::Ready(c)) => f(c),
            Some(_) => Err(busy(id)),
        }
    }

    fn status(&self, c: &Container) -> ContainerStatus {
        if self.procs.status(c.exec_id).is_some() {
            ContainerStatus::Stopped
        } else if !c.started {
            ContainerStatus::Created
        } else if c.paused {
            ContainerStatus::Paused
        } else {
            ContainerStatus::Running
        }
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
    pub fn create(&self, req: &CreateContainer) -> Result<(u64, i32), Failure> {
        let id = req.container_id.as_str();
        check_id(id)?;
        {
            let mut table = self.lock();
            if table.contains_key(id) {
                return Err(Failure::new(
                    ErrorKind::AlreadyExists,
                    format!("container {id:?} already exists"),
                ));
            }
            table.insert(id.to_owned(), Entry::Creating);
        }
        let result = self.create_inner(req);
        let mut table = self.lock();
        match result {
            Ok(c) => {
                let r = (c.exec_id, c.pid);
                table.insert(id.to_owned(), Entry::Ready(Box::new(c)));
                Ok(r)
            }
            Err(e) => {
                table.remove(id);
                Err(e)
            }
        }
    }

    fn create_inner(&self, req: &CreateContainer) -> Result<Container, Failure> {
        let spec = &req.spec;
        let rootfs = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| SpecError::new("root", "is missing"))?;
        self.ensure_share(&rootfs)?;
        let plan = plan::create(spec, req.stdio.tty.is_some())?;
        let linux = spec.linux().as_ref();
        let resources = linux.and_then(|l| l.resources().as_ref());
        let cgroup = match &self.cgroup_root {
            Some(root) => {
                let rel = linux
                    .and_then(|l| l.cgroups_path().as_ref())
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("rtv/{}", req.container_id));
                Some(Cgroup::create(root, &rel, resources)?)
            }
            None => {
                if resources.is_some_and(has_limits) {
                    return Err(SpecError::new(
                        "linux.resources",
                        "no cgroup v2 hierarchy with controllers is available",
                    )
                    .into());
                }
                None
            }
        };
        let ctx = Context::of_create(&plan, spec);
        let launched = self.launch_init(&plan, cgroup.as_ref(), &req.stdio, &ctx);
        match launched {
            Ok((exec_id, pid, start, report)) => Ok(Container {
                exec_id,
                pid,
                started: false,
                paused: false,
                start: Some(start),
                report: Some(report),
                cgroup,
                spec: spec.clone(),
                rootfs,
            }),
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
        let (exec_id, pid) = on_own_thread(|| {
            let argv = pointers(&plan.process.argv);
            let envp = pointers(&plan.process.env);
            self.procs.fork_registered(stdio, |stdio| {
                let fds = ChildFds {
                    stdio: stdio.child_fds(),
                    tty: stdio.is_tty(),
                    report: report_w.as_raw_fd(),
                    start: Some(start_r.as_raw_fd()),
                };
                fork_in(&plan.pid_ns, || {
                    child::create(plan, procs_file.as_ref(), &fds, &argv, &envp)
                })
            })
        })??;
        drop(report_w);
        drop(start_r);
        let mut report_r = report_r;
        match read_report(&mut report_r) {
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
    pub fn start(&self, id: &str) -> Result<(), Failure> {
        let mut c = self.take(id)?;
        let result = (|| {
            if c.started || self.procs.status(c.exec_id).is_some() {
                return Err(Failure::new(
                    ErrorKind::InvalidState,
                    format!("container {id:?} is not in the created state"),
                ));
            }
            let (Some(mut start), Some(mut report)) = (c.start.take(), c.report.take()) else {
                return Err(Failure::new(
                    ErrorKind::InvalidState,
                    "container has no start pipe",
                ));
            };
            c.started = true;
            start
                .write_all(&[1])
                .map_err(|e| Failure::io("starting the container", &e))?;
            drop(start);
            match read_report(&mut report)? {
                None => Ok(()),
                Some(r) => {
                    let ctx = Context::of_process(
                        &plan::process(
                            "process",
                            c.spec
                                .process()
                                .as_ref()
                                .ok_or_else(|| SpecError::new("process", "is missing"))?,
                            &c.rootfs,
                            &c.spec,
                        )?,
                        "process",
                    );
                    Err(ctx.failure(&r))
                }
            }
        })();
        self.put(id, c);
        result
    }

    /// Runs another process in a running container.
    pub fn exec(&self, req: &ExecInContainer) -> Result<(u64, i32), Failure> {
        let id = req.container_id.as_str();
        let (pid, rootfs, spec, procs_file) = self.with(id, |c| {
            if self.status(c) != ContainerStatus::Running {
                return Err(Failure::new(
                    ErrorKind::InvalidState,
                    format!("container {id:?} is not running"),
                ));
            }
            Ok((
                c.pid,
                c.rootfs.clone(),
                c.spec.clone(),
                c.cgroup.as_ref().map(Cgroup::procs_file),
            ))
        })?;
        let plan = plan::process("process", &req.process, &rootfs, &spec)?;
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
        let (exec_id, child_pid) = on_own_thread(|| {
            let argv = pointers(&plan.argv);
            let envp = pointers(&plan.env);
            self.procs.fork_registered(stdio, |stdio| {
                let fds = ChildFds {
                    stdio: stdio.child_fds(),
                    tty: stdio.is_tty(),
                    report: report_w.as_raw_fd(),
                    start: None,
                };
                fork_in(&pid_ns, || {
                    child::exec_in(&plan, &raw_ns, procs_file.as_ref(), &fds, &argv, &envp)
                })
            })
        })??;
        drop(report_w);
        drop(ns);
        let mut report_r = report_r;
        match read_report(&mut report_r)? {
            None => Ok((exec_id, child_pid)),
            Some(r) => {
                let _ = self.procs.wait(exec_id);
                self.procs.forget(exec_id);
                Err(ctx.failure(&r))
            }
        }
    }

    /// Sends `signal` to a container's init, or to all its processes.
    pub fn signal(&self, id: &str, signal: i32, all: bool) -> Result<(), Failure> {
        self.with(id, |c| {
            if self.status(c) == ContainerStatus::Stopped {
                return Err(Failure::new(
                    ErrorKind::InvalidState,
                    format!("container {id:?} is stopped"),
                ));
            }
            match (&c.cgroup, all) {
                (Some(cg), true) => cg.kill_all(signal).map_err(Failure::from),
                _ => self.procs.signal(c.exec_id, signal),
            }
        })
    }

    /// A container's state.
    pub fn state(&self, id: &str) -> Result<ContainerState, Failure> {
        self.with(id, |c| {
            let exit = self.procs.status(c.exec_id);
            Ok(ContainerState {
                container_id: id.to_owned(),
                status: self.status(c),
                pid: if exit.is_some() { 0 } else { c.pid },
                exec_id: c.exec_id,
                exit,
                oom_kills: c.cgroup.as_ref().map(Cgroup::oom_kills).unwrap_or(0),
            })
        })
    }

    /// Blocks until the OOM killer has killed more than `seen` processes
    /// in container `id`, or the container has stopped or has no process
    /// left; then its state (see [`RequestBody::WaitOom`]).
    ///
    /// [`RequestBody::WaitOom`]: rtv_agent::protocol::RequestBody::WaitOom
    pub fn wait_oom(&self, id: &str, seen: u64) -> Result<ContainerState, Failure> {
        let watch = self.with(id, |c| Ok(Self::cgroup_of(id, c)?.watch()))?;
        loop {
            let mut stopped = false;
            let events = watch.wait(WAIT_OOM_RECHECK, |e| {
                // Checked after the files are read (which arms the wait),
                // so a stop in between is seen on the next round at worst.
                stopped = self
                    .with(id, |c| Ok(self.status(c) == ContainerStatus::Stopped))
                    .unwrap_or(true);
                e.oom_kills > seen || !e.populated || stopped
            });
            match events {
                Ok(e) if e.oom_kills > seen || !e.populated || stopped => {
                    let mut st = self.state(id)?;
                    st.oom_kills = st.oom_kills.max(e.oom_kills);
                    return Ok(st);
                }
                Ok(_) => {}
                // The cgroup went (the container is being deleted).
                Err(e) => {
                    self.state(id)?;
                    return Err(e.into());
                }
            }
        }
    }

    /// The pids of a container's processes.
    pub fn pids(&self, id: &str) -> Result<Vec<i32>, Failure> {
        self.with(id, |c| match &c.cgroup {
            Some(cg) => cg.pids().map_err(Failure::from),
            None if self.procs.status(c.exec_id).is_none() => Ok(vec![c.pid]),
            None => Ok(Vec::new()),
        })
    }

    fn cgroup_of<'a>(id: &str, c: &'a Container) -> Result<&'a Cgroup, Failure> {
        c.cgroup.as_ref().ok_or_else(|| {
            Failure::new(
                ErrorKind::InvalidRequest,
                format!("container {id:?} has no cgroup (no cgroup v2 hierarchy)"),
            )
        })
    }

    /// Freezes or thaws a container.
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<(), Failure> {
        let mut c = self.take(id)?;
        let result = (|| {
            let want = if paused {
                ContainerStatus::Running
            } else {
                ContainerStatus::Paused
            };
            if self.status(&c) != want {
                return Err(Failure::new(
                    ErrorKind::InvalidState,
                    format!(
                        "container {id:?} is not {}",
                        if paused { "running" } else { "paused" }
                    ),
                ));
            }
            Self::cgroup_of(id, &c)?.freeze(paused)?;
            c.paused = paused;
            Ok(())
        })();
        self.put(id, c);
        result
    }

    /// Changes a container's limits.
    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), Failure> {
        self.with(id, |c| {
            if self.status(c) == ContainerStatus::Stopped {
                return Err(Failure::new(
                    ErrorKind::InvalidState,
                    format!("container {id:?} is stopped"),
                ));
            }
            Ok(Self::cgroup_of(id, c)?.update(resources)?)
        })
    }

    /// A container's resource usage.
    pub fn stats(&self, id: &str) -> Result<ContainerStats, Failure> {
        self.with(id, |c| Ok(Self::cgroup_of(id, c)?.stats()?))
    }

    /// Removes a container (killing it first with `force`).
    pub fn delete(&self, id: &str, force: bool) -> Result<(), Failure> {
        let c = self.take(id)?;
        let status = self.status(&c);
        if matches!(status, ContainerStatus::Running | ContainerStatus::Paused) && !force {
            self.put(id, c);
            return Err(Failure::new(
                ErrorKind::InvalidState,
                format!("container {id:?} is running: stop it first or delete with force"),
            ));
        }
        if status != ContainerStatus::Stopped {
            if let Some(cg) = &c.cgroup {
                // A frozen cgroup holds SIGKILL until thawed.
                let _ = cg.freeze(false);
            }
            // SAFETY: kill(2) of our child, not yet reaped (its status is
            // unknown, and the reaper only records statuses of registered
            // processes, which keeps the pid ours).
            unsafe { libc::kill(c.pid, libc::SIGKILL) };
        }
        // Closing the start pipe of a created container ends its init too.
        drop(c.start);
        let _ = self.procs.wait(c.exec_id);
        if let Some(cg) = c.cgroup {
            if let Err(e) = cg.remove() {
                alog!(Warn, "container {id}: removing its cgroup: {e}");
            }
        }
        self.procs.forget(c.exec_id);
        self.lock().remove(id);
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
