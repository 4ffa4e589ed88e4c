//! From an OCI spec to a plan: everything a forked child needs, checked and
//! prepared in the parent (C strings, flags, descriptors), so that the child
//! only makes system calls. Every spec field the agent cannot honour is a
//! [`SpecError`] naming it.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, LinuxNamespaceType, Mount, Process, Spec};

use super::caps::{self, CapSets};
use super::rlimit::{self, Rlimit};
use super::seccomp::{self, Filter};
use super::user::{self, Identity};
use super::SpecError;

/// Where programs are looked up when the process's environment has no PATH.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A string for a system call; `field` names where it came from.
pub fn cstring(field: &str, s: &str) -> Result<CString, SpecError> {
    CString::new(s).map_err(|_| SpecError::new(field, "contains a NUL byte"))
}

/// A path below a root, prepared for creating it component by component:
/// each entry is (the path so far relative to the root, its last component).
#[derive(Debug, Clone)]
pub struct RelPath {
    /// The whole relative path ("." for the root itself).
    pub rel: CString,
    /// (prefix, component) for each component, outermost first.
    pub steps: Vec<(CString, CString)>,
}

impl RelPath {
    /// `path` (absolute, inside the container) relative to the root; `..`
    /// components are refused (a resolver confined to the root would clamp
    /// them anyway; refusing is clearer).
    pub fn new(field: &str, path: &Path) -> Result<Self, SpecError> {
        if !path.is_absolute() {
            return Err(SpecError::new(
                field,
                format!("{} is not an absolute path", path.display()),
            ));
        }
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(SpecError::new(
                        field,
                        format!("{} has a `..` component", path.display()),
                    ))
                }
            }
        }
        let mut steps = Vec::with_capacity(parts.len());
        let mut prefix = String::new();
        for p in &parts {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(p);
            steps.push((cstring(field, &prefix)?, cstring(field, p)?));
        }
        let rel = if prefix.is_empty() { "." } else { &prefix };
        Ok(Self {
            rel: cstring(field, rel)?,
            steps,
        })
    }
}

/// What kind of node a mount target must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A directory.
    Dir,
    /// A regular file (a bind mount of a file).
    File,
}

/// One of the spec's mounts.
#[derive(Debug)]
pub struct MountPlan {
    /// Its index in `mounts`.
    pub index: usize,
    /// Where, relative to the root file system.
    pub target: RelPath,
    /// What the target must be.
    pub kind: TargetKind,
    /// mount(2) source.
    pub source: CString,
    /// mount(2) file system type (empty for a bind).
    pub fstype: CString,
    /// mount(2) flags for the mount itself.
    pub flags: libc::c_ulong,
    /// mount(2) data.
    pub data: CString,
    /// A bind mount whose flags (ro, nosuid, ...) need a remount.
    pub remount_flags: Option<libc::c_ulong>,
    /// Propagation changes (MS_SHARED, MS_PRIVATE, ... with MS_REC).
    pub propagation: Vec<libc::c_ulong>,
}

/// A device node to create in the container's /dev.
#[derive(Debug)]
pub struct DevicePlan {
    /// Its index in `linux.devices` (None for the standard nodes and the
    /// kernel's own given to a container that may use every device).
    pub index: Option<usize>,
    /// Its path relative to the root.
    pub path: RelPath,
    /// Its directory, made when missing (`/dev/cpu/0` of `/dev/cpu/0/cpuid`).
    pub dir: RelPath,
    /// Type and permission bits for mknod(2).
    pub mode: libc::mode_t,
    /// Device number.
    pub dev: libc::dev_t,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// How the container's pid namespace is chosen.
#[derive(Debug)]
pub enum PidNs {
    /// A new one (the init process is its PID 1).
    New,
    /// An existing one (linux.namespaces[].path).
    Join(OwnedFd),
    /// The agent's own.
    Shared,
}

/// A process to start (a container's init, or an exec in it).
#[derive(Debug)]
pub struct ProcessPlan {
    /// argv.
    pub argv: Vec<CString>,
    /// The environment.
    pub env: Vec<CString>,
    /// Paths to try for argv[0], in order.
    pub candidates: Vec<CString>,
    /// argv[0] as given (for messages).
    pub program: String,
    /// Working directory.
    pub cwd: CString,
    /// Who it runs as.
    pub identity: Identity,
    /// Its capabilities.
    pub caps: CapSets,
    /// The kernel's highest capability number.
    pub cap_last_cap: u32,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// PR_SET_NO_NEW_PRIVS.
    pub no_new_privs: bool,
    /// The container's seccomp filter.
    pub seccomp: Option<Filter>,
}

/// Everything needed to create a container's init process.
#[derive(Debug)]
pub struct CreatePlan {
    /// The root file system.
    pub rootfs: CString,
    /// Namespaces to unshare (CLONE_NEW* flags, without CLONE_NEWPID).
    pub unshare: libc::c_int,
    /// Namespaces to join, with their CLONE_NEW* type.
    pub join: Vec<(libc::c_int, OwnedFd)>,
    /// The pid namespace.
    pub pid_ns: PidNs,
    /// Propagation of the container's mount tree (MS_SLAVE etc., MS_REC).
    pub root_propagation: libc::c_ulong,
    /// The spec's mounts, in order.
    pub mounts: Vec<MountPlan>,
    /// Device nodes (the standard ones when /dev is a tmpfs, then
    /// linux.devices, then, for a container allowed every device, the
    /// kernel's other nodes).
    pub devices: Vec<DevicePlan>,
    /// linux.devices entries left out because the kernel has no such
    /// device and the container may use every device (a privileged one,
    /// whose spec lists the host's devices): "path (c major:minor)".
    pub skipped_devices: Vec<String>,
    /// The symlinks of a populated /dev (target, link relative to root).
    pub dev_symlinks: Vec<(CString, RelPath)>,
    /// Bind the terminal onto /dev/console.
    pub console: Option<RelPath>,
    /// linux.maskedPaths (absolute, inside the container).
    pub masked: Vec<CString>,
    /// linux.readonlyPaths.
    pub readonly: Vec<CString>,
    /// root.readonly.
    pub root_readonly: bool,
    /// hostname.
    pub hostname: Option<CString>,
    /// domainname.
    pub domainname: Option<CString>,
    /// linux.sysctl as (file under /proc/sys, value), sorted by key.
    pub sysctl: Vec<(String, CString, CString)>,
    /// process.oomScoreAdj, as text.
    pub oom_score_adj: Option<CString>,
    /// The init process.
    pub process: ProcessPlan,
}

/// The namespace types a spec asks for, checked.
#[derive(Debug, Default)]
pub struct Namespaces {
    /// CLONE_NEW* flags of new namespaces (CLONE_NEWPID included).
    pub new: libc::c_int,
    /// (CLONE_NEW* type, path) of namespaces to join.
    pub join: Vec<(libc::c_int, PathBuf)>,
}

fn ns_flag(t: LinuxNamespaceType) -> libc::c_int {
    match t {
        LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
        LinuxNamespaceType::User => libc::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
        LinuxNamespaceType::Network => libc::CLONE_NEWNET,
        LinuxNamespaceType::Time => libc::CLONE_NEWTIME,
    }
}

/// Checks linux.namespaces.
pub fn namespaces(spec: &Spec) -> Result<Namespaces, SpecError> {
    let mut out = Namespaces::default();
    let mut seen = HashSet::new();
    let list = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for (i, ns) in list.iter().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        let t = ns.typ();
        if !seen.insert(t) {
            return Err(SpecError::new(
                field,
                format!("namespace type {t} appears twice"),
            ));
        }
        match t {
            LinuxNamespaceType::User => {
                return Err(SpecError::new(
                    field,
                    "user namespaces are not supported (the VM is the isolation boundary)",
                ))
            }
            LinuxNamespaceType::Time => {
                return Err(SpecError::new(
                    field,
                    "time namespaces are not supported by the guest kernel",
                ))
            }
            // Containers share the VM's network: the VM is the pod's
            // network boundary, as in Kata Containers.
            LinuxNamespaceType::Network => {
                if let Some(p) = ns.path() {
                    return Err(SpecError::new(
                        format!("{field}.path"),
                        format!(
                            "cannot join network namespace {}: containers share the VM's network",
                            p.display()
                        ),
                    ));
                }
            }
            _ => match ns.path() {
                Some(p) => out.join.push((ns_flag(t), p.clone())),
                None => out.new |= ns_flag(t),
            },
        }
    }
    if out.new & libc::CLONE_NEWNS == 0 {
        return Err(SpecError::new(
            "linux.namespaces",
            "a new mount namespace is required",
        ));
    }
    Ok(out)
}

fn mount_flag(opt: &str) -> Option<(bool, libc::c_ulong)> {
    // (clear?, flag)
    Some(match opt {
        "defaults" => (false, 0),
        "ro" => (false, libc::MS_RDONLY),
        "rw" => (true, libc::MS_RDONLY),
        "suid" => (true, libc::MS_NOSUID),
        "nosuid" => (false, libc::MS_NOSUID),
        "dev" => (true, libc::MS_NODEV),
        "nodev" => (false, libc::MS_NODEV),
        "exec" => (true, libc::MS_NOEXEC),
        "noexec" => (false, libc::MS_NOEXEC),
        "sync" => (false, libc::MS_SYNCHRONOUS),
        "async" => (true, libc::MS_SYNCHRONOUS),
        "dirsync" => (false, libc::MS_DIRSYNC),
        "remount" => (false, libc::MS_REMOUNT),
        "mand" => (false, libc::MS_MANDLOCK),
        "nomand" => (true, libc::MS_MANDLOCK),
        "atime" => (true, libc::MS_NOATIME),
        "noatime" => (false, libc::MS_NOATIME),
        "diratime" => (true, libc::MS_NODIRATIME),
        "nodiratime" => (false, libc::MS_NODIRATIME),
        "relatime" => (false, libc::MS_RELATIME),
        "norelatime" => (true, libc::MS_RELATIME),
        "strictatime" => (false, libc::MS_STRICTATIME),
        "nostrictatime" => (true, libc::MS_STRICTATIME),
        "lazytime" => (false, libc::MS_LAZYTIME),
        "nolazytime" => (true, libc::MS_LAZYTIME),
        "bind" => (false, libc::MS_BIND),
        "rbind" => (false, libc::MS_BIND | libc::MS_REC),
        _ => return None,
    })
}

fn propagation_flag(opt: &str) -> Option<libc::c_ulong> {
    Some(match opt {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => return None,
    })
}

fn mount_plan(index: usize, m: &Mount) -> Result<MountPlan, SpecError> {
    let field = format!("mounts[{index}]");
    let target = RelPath::new(&format!("{field}.destination"), m.destination())?;
    if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
        return Err(SpecError::new(
            format!("{field}.uidMappings"),
            "id-mapped mounts are not supported",
        ));
    }
    let mut flags: libc::c_ulong = 0;
    let mut propagation = Vec::new();
    let mut data = Vec::new();
    for (j, opt) in m.options().iter().flatten().enumerate() {
        if let Some((clear, f)) = mount_flag(opt) {
            if clear {
                flags &= !f;
            } else {
                flags |= f;
            }
        } else if let Some(p) = propagation_flag(opt) {
            propagation.push(p);
        } else if matches!(opt.as_str(), "tmpcopyup" | "idmap" | "ridmap")
            || opt.starts_with("X-mount.")
        {
            return Err(SpecError::new(
                format!("{field}.options[{j}]"),
                format!("mount option {opt:?} is not supported"),
            ));
        } else {
            data.push(opt.as_str());
        }
    }
    let typ = m.typ().as_deref().unwrap_or("");
    let is_bind = flags & libc::MS_BIND != 0 || typ == "bind";
    let source = m
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| typ.to_owned());
    let mut kind = TargetKind::Dir;
    let mut remount_flags = None;
    let fstype;
    if is_bind {
        flags |= libc::MS_BIND;
        let src = Path::new(&source);
        if !src.is_absolute() {
            return Err(SpecError::new(
                format!("{field}.source"),
                format!("bind mount source {source:?} is not an absolute path"),
            ));
        }
        let meta = std::fs::metadata(src).map_err(|e| {
            SpecError::new(
                format!("{field}.source"),
                format!("bind mount source {source}: {e}"),
            )
        })?;
        if !meta.is_dir() {
            kind = TargetKind::File;
        }
        // Flags other than bind/rec only apply on a remount of the bind.
        let extra = flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
        if extra != 0 {
            remount_flags = Some(extra | libc::MS_BIND | libc::MS_REMOUNT);
        }
        flags &= libc::MS_BIND | libc::MS_REC;
        fstype = String::new();
    } else {
        if typ.is_empty() {
            return Err(SpecError::new(
                format!("{field}.type"),
                "a mount that is not a bind mount needs a type",
            ));
        }
        // A "cgroup" mount in a guest with cgroup v2 only is cgroup2, as
        // runc does on cgroup v2 hosts.
        fstype = if typ == "cgroup" {
            "cgroup2".to_owned()
        } else {
            typ.to_owned()
        };
    }
    Ok(MountPlan {
        index,
        target,
        kind,
        source: cstring(&format!("{field}.source"), &source)?,
        fstype: cstring(&format!("{field}.type"), &fstype)?,
        flags,
        data: cstring(&format!("{field}.options"), &data.join(","))?,
        remount_flags,
        propagation,
    })
}

/// The nodes of a fresh /dev, as runc makes them.
const STANDARD_DEVICES: &[(&str, u32, u32)] = &[
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// A device node of the kernel's /dev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelNode {
    /// Its absolute path (`/dev/...`).
    pub path: PathBuf,
    /// Type and permission bits.
    pub mode: libc::mode_t,
    /// Device number.
    pub dev: libc::dev_t,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The devices of the kernel the containers run on (the guest's; the
/// host's when the agent runs on the host in tests).
pub trait Devices {
    /// Whether the kernel has a device of `kind` (`S_IFCHR`, `S_IFBLK`)
    /// numbered `dev`.
    fn has(&self, kind: libc::mode_t, dev: libc::dev_t) -> bool;
    /// Its device nodes.
    fn nodes(&self) -> Vec<KernelNode>;
}

/// The running kernel's devices: `/sys/dev/{char,block}/MAJOR:MINOR` and
/// the nodes of `/dev` (not of the file systems mounted below it, such as
/// devpts, and not `/dev/console`, which is the container's terminal).
pub struct RunningKernel;

impl Devices for RunningKernel {
    fn has(&self, kind: libc::mode_t, dev: libc::dev_t) -> bool {
        let class = if kind == libc::S_IFBLK {
            "block"
        } else {
            "char"
        };
        Path::new(&format!(
            "/sys/dev/{class}/{}:{}",
            libc::major(dev),
            libc::minor(dev)
        ))
        .exists()
    }

    fn nodes(&self) -> Vec<KernelNode> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        let Ok(top) = std::fs::metadata("/dev") else {
            return out;
        };
        let mut dirs = vec![PathBuf::from("/dev")];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let Ok(m) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                let kind = m.mode() & libc::S_IFMT;
                if m.is_dir() {
                    if m.dev() == top.dev() {
                        dirs.push(path);
                    }
                } else if (kind == libc::S_IFCHR || kind == libc::S_IFBLK)
                    && path != Path::new("/dev/console")
                {
                    out.push(KernelNode {
                        path,
                        mode: m.mode(),
                        dev: m.rdev(),
                        uid: m.uid(),
                        gid: m.gid(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

/// Whether `linux.resources.devices` ends up allowing every device: the
/// last rule that matches all devices (no type or `a`, no numbers, access
/// `rwm` or none) allows. Docker's and the CRI plugin's privileged
/// containers have exactly that.
fn all_devices_allowed(linux: &oci_spec::runtime::Linux) -> bool {
    let rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_ref());
    rules
        .into_iter()
        .flatten()
        .rev()
        .find(|r| {
            matches!(r.typ(), None | Some(LinuxDeviceType::A))
                && r.major().is_none()
                && r.minor().is_none()
                && r.access()
                    .as_deref()
                    .is_none_or(|a| a.contains('r') && a.contains('w') && a.contains('m'))
        })
        .is_some_and(|r| r.allow())
}

fn device_plan(index: Option<usize>, d: &LinuxDevice) -> Result<DevicePlan, SpecError> {
    let field = match index {
        Some(i) => format!("linux.devices[{i}]"),
        None => "linux.devices".to_owned(),
    };
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
        LinuxDeviceType::B => libc::S_IFBLK,
        LinuxDeviceType::P => libc::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(SpecError::new(
                format!("{field}.type"),
                "type \"a\" is not a device node type",
            ))
        }
    };
    let path = RelPath::new(&format!("{field}.path"), d.path())?;
    let dir = RelPath::new(
        &format!("{field}.path"),
        d.path().parent().unwrap_or(Path::new("/dev")),
    )?;
    if !d.path().starts_with("/dev/") {
        return Err(SpecError::new(
            format!("{field}.path"),
            format!("{} is not under /dev", d.path().display()),
        ));
    }
    let major = u32::try_from(d.major())
        .map_err(|_| SpecError::new(format!("{field}.major"), "out of range"))?;
    let minor = u32::try_from(d.minor())
        .map_err(|_| SpecError::new(format!("{field}.minor"), "out of range"))?;
    Ok(DevicePlan {
        index,
        path,
        dir,
        mode: kind | (d.file_mode().unwrap_or(0o666) & 0o7777),
        dev: libc::makedev(major, minor),
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// The sysctls that belong to a namespace the container has (or to the
/// VM, which is the pod's), as runc allows them.
fn sysctl_allowed(key: &str, new_ns: libc::c_int) -> Result<(), String> {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        if new_ns & libc::CLONE_NEWIPC == 0 {
            return Err("needs a new ipc namespace".into());
        }
        return Ok(());
    }
    if key == "kernel.hostname" || key == "kernel.domainname" {
        return Err("set the hostname and domainname fields instead".into());
    }
    // The container shares the VM's network namespace: the VM is the pod's.
    if key.starts_with("net.") {
        return Ok(());
    }
    Err("is not a namespaced sysctl".into())
}

/// The fields of a process that are accepted but not applied in the
/// guest, with the reason: the LSM labels of the host's policy.
pub fn process_not_applied(field: &str, p: &Process) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(profile) = p.apparmor_profile() {
        notes.push(format!(
            "{field}.apparmorProfile {profile:?}: the guest has no AppArmor (the VM is the container's boundary)"
        ));
    }
    if let Some(label) = p.selinux_label() {
        notes.push(format!(
            "{field}.selinuxLabel {label:?}: the guest has no SELinux (the VM is the container's boundary)"
        ));
    }
    notes
}

/// The fields of a container's spec that are accepted but not applied in
/// the guest, each with the reason, for the runtime's log: the host's LSM
/// labels, and the cgroup fields that runc on cgroup v2 ignores too.
pub fn not_applied(spec: &Spec) -> Vec<String> {
    let mut notes = spec
        .process()
        .as_ref()
        .map(|p| process_not_applied("process", p))
        .unwrap_or_default();
    if let Some(linux) = spec.linux() {
        if let Some(label) = linux.mount_label() {
            notes.push(format!(
                "linux.mountLabel {label:?}: the guest has no SELinux (the VM is the container's boundary)"
            ));
        }
        if let Some(r) = linux.resources() {
            notes.extend(super::cgroup::not_applied(r));
        }
    }
    notes
}

/// Checks and prepares a process (`field` is where it sits: "process").
pub fn process(
    field: &str,
    p: &Process,
    rootfs: &Path,
    spec: &Spec,
) -> Result<ProcessPlan, SpecError> {
    let args = p.args().clone().unwrap_or_default();
    let program = args
        .first()
        .cloned()
        .ok_or_else(|| SpecError::new(format!("{field}.args"), "is empty"))?;
    if program.is_empty() {
        return Err(SpecError::new(format!("{field}.args[0]"), "is empty"));
    }
    if p.command_line().is_some() {
        return Err(SpecError::new(
            format!("{field}.commandLine"),
            "is for Windows",
        ));
    }
    for (name, set) in [
        ("ioPriority", p.io_priority().is_some()),
        ("scheduler", p.scheduler().is_some()),
        ("execCPUAffinity", p.exec_cpu_affinity().is_some()),
    ] {
        if set {
            return Err(SpecError::new(
                format!("{field}.{name}"),
                "is not supported in the guest",
            ));
        }
    }
    let argv = args
        .iter()
        .enumerate()
        .map(|(i, a)| cstring(&format!("{field}.args[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env_list = p.env().clone().unwrap_or_default();
    for (i, kv) in env_list.iter().enumerate() {
        if kv.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(SpecError::new(
                format!("{field}.env[{i}]"),
                format!("{kv:?} is not KEY=VALUE"),
            ));
        }
    }
    let identity = user::resolve(rootfs, p.user())?;
    if !env_list.iter().any(|e| e.starts_with("HOME=")) {
        env_list.push(format!("HOME={}", identity.home.as_deref().unwrap_or("/")));
    }
    // On PVM hosts the VMM gives init GLIBC_TUNABLES to keep user space off
    // AVX (see rtv_vmm::platform::PVM_GUEST_ENV); containers need it too.
    if !env_list.iter().any(|e| e.starts_with("GLIBC_TUNABLES=")) {
        if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
            env_list.push(format!("GLIBC_TUNABLES={t}"));
        }
    }
    let env = env_list
        .iter()
        .enumerate()
        .map(|(i, e)| cstring(&format!("{field}.env[{i}]"), e))
        .collect::<Result<Vec<_>, _>>()?;
    let path = env_list
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let candidates = if program.contains('/') {
        vec![cstring(&format!("{field}.args[0]"), &program)?]
    } else {
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| cstring(&format!("{field}.env PATH"), &format!("{d}/{program}")))
            .collect::<Result<Vec<_>, _>>()?
    };
    let cwd = p.cwd();
    if !cwd.is_absolute() {
        return Err(SpecError::new(
            format!("{field}.cwd"),
            format!("{} is not an absolute path", cwd.display()),
        ));
    }
    let seccomp = spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().as_ref())
        .map(seccomp::compile)
        .transpose()?;
    let mut caps =
        caps::parse(p.capabilities().as_ref()).map_err(|e| prefix_field(e, "process", field))?;
    // An ambient capability must be permitted and inheritable, or the
    // kernel refuses to raise it. runc warns and goes on (`runc spec`
    // writes ambient capabilities without inheritable ones), so does rtv.
    let unraisable = caps.ambient & !(caps.permitted & caps.inheritable);
    if unraisable != 0 {
        crate::alog!(
            Warn,
            "{field}.capabilities.ambient: not raised, not both permitted and inheritable: {}",
            caps::names(unraisable).join(", ")
        );
        caps.ambient &= !unraisable;
    }
    Ok(ProcessPlan {
        argv,
        env,
        candidates,
        program,
        cwd: cstring(&format!("{field}.cwd"), &cwd.to_string_lossy())?,
        identity,
        caps,
        cap_last_cap: caps::cap_last_cap(),
        rlimits: rlimit::parse(p.rlimits().as_ref())
            .map_err(|e| prefix_field(e, "process", field))?,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        seccomp,
    })
}

/// Errors from helpers that name `process.*` fields, for an exec's process.
fn prefix_field(mut e: SpecError, from: &str, to: &str) -> SpecError {
    if from != to {
        if let Some(rest) = e.field.strip_prefix(from) {
            e.field = format!("{to}{rest}");
        }
    }
    e
}

fn open_ns(field: &str, path: &Path) -> Result<OwnedFd, SpecError> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| SpecError::new(field, format!("{}: {e}", path.display())))
}

/// What a container's init gets of the pod's sharing: its namespaces (new
/// and joined), hostname and domainname, sysctls and OOM score; for every
/// container, and all a built-in pause gets ([`pause`]).
#[derive(Debug)]
pub struct PodPart {
    /// The namespaces the spec asks for.
    pub ns: Namespaces,
    /// Namespaces to join, with their CLONE_NEW* type (not the pid one).
    pub join: Vec<(libc::c_int, OwnedFd)>,
    /// The pid namespace.
    pub pid_ns: PidNs,
    /// hostname.
    pub hostname: Option<CString>,
    /// domainname.
    pub domainname: Option<CString>,
    /// linux.sysctl as (key, file under /proc/sys, value), sorted by key.
    pub sysctl: Vec<(String, CString, CString)>,
    /// process.oomScoreAdj, as text.
    pub oom_score_adj: Option<CString>,
}

fn pod_part(
    spec: &Spec,
    linux: &oci_spec::runtime::Linux,
    p: &oci_spec::runtime::Process,
) -> Result<PodPart, SpecError> {
    let ns = namespaces(spec)?;
    let mut join = Vec::new();
    let mut pid_ns = if ns.new & libc::CLONE_NEWPID != 0 {
        PidNs::New
    } else {
        PidNs::Shared
    };
    for (i, (t, path)) in ns.join.iter().enumerate() {
        let fd = open_ns(&format!("linux.namespaces[{i}].path"), path)?;
        if *t == libc::CLONE_NEWPID {
            pid_ns = PidNs::Join(fd);
        } else {
            join.push((*t, fd));
        }
    }
    let hostname = match spec.hostname() {
        Some(h) if !h.is_empty() => {
            if ns.new & libc::CLONE_NEWUTS == 0 {
                return Err(SpecError::new(
                    "hostname",
                    "needs a new uts namespace in linux.namespaces",
                ));
            }
            Some(cstring("hostname", h)?)
        }
        _ => None,
    };
    let domainname = match spec.domainname() {
        Some(h) if !h.is_empty() => {
            if ns.new & libc::CLONE_NEWUTS == 0 {
                return Err(SpecError::new(
                    "domainname",
                    "needs a new uts namespace in linux.namespaces",
                ));
            }
            Some(cstring("domainname", h)?)
        }
        _ => None,
    };
    let mut sysctl = Vec::new();
    if let Some(map) = linux.sysctl() {
        let mut keys: Vec<_> = map.keys().collect();
        keys.sort();
        for key in keys {
            let field = format!("linux.sysctl.{key}");
            let valid = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                && !key.contains("..");
            if !valid {
                return Err(SpecError::new(field, "is not a sysctl name"));
            }
            sysctl_allowed(key, ns.new).map_err(|m| SpecError::new(&field, m))?;
            let file = format!("/proc/sys/{}", key.replace('.', "/"));
            let value = map.get(key).map(String::as_str).unwrap_or_default();
            sysctl.push((
                key.clone(),
                cstring(&field, &file)?,
                cstring(&field, value)?,
            ));
        }
    }
    let oom_score_adj = match p.oom_score_adj() {
        Some(v) if !(-1000..=1000).contains(&v) => {
            return Err(SpecError::new(
                "process.oomScoreAdj",
                format!("{v} is outside -1000..=1000"),
            ))
        }
        Some(v) => Some(cstring("process.oomScoreAdj", &v.to_string())?),
        None => None,
    };
    Ok(PodPart {
        ns,
        join,
        pid_ns,
        hostname,
        domainname,
        sysctl,
        oom_score_adj,
    })
}

/// The plan of a CRI pod sandbox's built-in pause: [`PodPart`] of its spec,
/// nothing of its root file system, mounts or process.
pub fn pause(spec: &Spec) -> Result<PodPart, SpecError> {
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| SpecError::new("linux", "is missing"))?;
    let p = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::new("process", "is missing"))?;
    pod_part(spec, linux, p)
}

/// Checks a container's spec and prepares its creation.
pub fn create(spec: &Spec, tty: bool, kernel: &dyn Devices) -> Result<CreatePlan, SpecError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| SpecError::new("root", "is missing"))?;
    let rootfs = root.path();
    match std::fs::metadata(rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SpecError::new(
                "root.path",
                format!("{} is not a directory", rootfs.display()),
            ))
        }
        Err(e) => {
            return Err(SpecError::new(
                "root.path",
                format!("{}: {e}", rootfs.display()),
            ))
        }
    }
    if spec.hooks().is_some() {
        return Err(SpecError::new(
            "hooks",
            "hooks run on the host: the runtime must not pass them to the guest",
        ));
    }
    let p = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::new("process", "is missing"))?;
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| SpecError::new("linux", "is missing"))?;
    for (name, set) in [
        (
            "uidMappings",
            linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty()),
        ),
        (
            "gidMappings",
            linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty()),
        ),
        ("intelRdt", linux.intel_rdt().is_some()),
        ("memoryPolicy", linux.memory_policy().is_some()),
        ("personality", linux.personality().is_some()),
        ("timeOffsets", linux.time_offsets().is_some()),
        ("netDevices", linux.net_devices().is_some()),
    ] {
        if set {
            return Err(SpecError::new(
                format!("linux.{name}"),
                "is not supported in the guest",
            ));
        }
    }
    let PodPart {
        ns,
        join,
        pid_ns,
        hostname,
        domainname,
        sysctl,
        oom_score_adj,
    } = pod_part(spec, linux, p)?;
    let root_propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") => libc::MS_SLAVE | libc::MS_REC,
        Some(p) => propagation_flag(p).ok_or_else(|| {
            SpecError::new(
                "linux.rootfsPropagation",
                format!("unknown propagation {p:?}"),
            )
        })?,
    };
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, m)| mount_plan(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let dev_is_tmpfs = mounts
        .iter()
        .any(|m| m.target.rel.as_bytes() == b"dev" && m.fstype.as_bytes() == b"tmpfs");
    let has_devpts = mounts
        .iter()
        .any(|m| m.target.rel.as_bytes() == b"dev/pts" && m.fstype.as_bytes() == b"devpts");
    let mut devices = Vec::new();
    let mut dev_symlinks = Vec::new();
    if dev_is_tmpfs {
        for (path, major, minor) in STANDARD_DEVICES {
            devices.push(DevicePlan {
                index: None,
                path: RelPath::new("linux.devices", Path::new(path))?,
                dir: RelPath::new("linux.devices", Path::new("/dev"))?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(*major, *minor),
                uid: 0,
                gid: 0,
            });
        }
        let mut links = vec![
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
        ];
        if has_devpts {
            links.push(("pts/ptmx", "/dev/ptmx"));
        }
        for (target, link) in links {
            dev_symlinks.push((
                cstring("linux.devices", target)?,
                RelPath::new("linux.devices", Path::new(link))?,
            ));
        }
    }
    let every_device = all_devices_allowed(linux);
    let mut skipped_devices = Vec::new();
    for (i, d) in linux.devices().iter().flatten().enumerate() {
        let plan = device_plan(Some(i), d)?;
        let kind = plan.mode & libc::S_IFMT;
        if kind != libc::S_IFIFO && !kernel.has(kind, plan.dev) {
            let what = format!(
                "{} ({} {}:{})",
                d.path().display(),
                if kind == libc::S_IFBLK { "b" } else { "c" },
                libc::major(plan.dev),
                libc::minor(plan.dev)
            );
            if every_device {
                skipped_devices.push(what);
                continue;
            }
            return Err(SpecError::new(
                format!("linux.devices[{i}]"),
                format!(
                    "{what} is a device of the host that the VM does not have: a container in \
                     rtv's VM gets the guest kernel's devices, which has no such one, and host \
                     devices are not passed into the VM; leave it out of the container's devices"
                ),
            ));
        }
        devices.retain(|existing| existing.path.rel != plan.path.rel);
        devices.push(plan);
    }
    // A container allowed every device (a privileged one) gets the
    // kernel's device nodes, as runc gives it the host's.
    if every_device && dev_is_tmpfs {
        for node in kernel.nodes() {
            let Ok(path) = RelPath::new("linux.devices", &node.path) else {
                continue;
            };
            let taken = devices.iter().any(|d| d.path.rel == path.rel)
                || dev_symlinks.iter().any(|(_, l)| l.rel == path.rel);
            if taken {
                continue;
            }
            devices.push(DevicePlan {
                index: None,
                dir: RelPath::new(
                    "linux.devices",
                    node.path.parent().unwrap_or(Path::new("/dev")),
                )?,
                path,
                mode: node.mode,
                dev: node.dev,
                uid: node.uid,
                gid: node.gid,
            });
        }
    }
    let console = if tty && dev_is_tmpfs {
        Some(RelPath::new("process.terminal", Path::new("/dev/console"))?)
    } else {
        None
    };
    let abs_list = |field: &str, list: &Option<Vec<String>>| {
        list.iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let f = format!("{field}[{i}]");
                if !p.starts_with('/') {
                    return Err(SpecError::new(f, format!("{p:?} is not an absolute path")));
                }
                cstring(&f, p)
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let masked = abs_list("linux.maskedPaths", linux.masked_paths())?;
    let readonly = abs_list("linux.readonlyPaths", linux.readonly_paths())?;
    let process = process("process", p, rootfs, spec)?;
    Ok(CreatePlan {
        rootfs: cstring("root.path", &rootfs.to_string_lossy())?,
        unshare: ns.new & !libc::CLONE_NEWPID,
        join,
        pid_ns,
        root_propagation,
        mounts,
        devices,
        skipped_devices,
        dev_symlinks,
        console,
        masked,
        readonly,
        root_readonly: root.readonly().unwrap_or(false),
        hostname,
        domainname,
        sysctl,
        oom_score_adj,
        process,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn rel_paths_step_by_component() {
        let r = RelPath::new("f", Path::new("/a//b/./c")).unwrap();
        assert_eq!(r.rel.to_str().unwrap(), "a/b/c");
        let steps: Vec<_> = r
            .steps
            .iter()
            .map(|(p, c)| (p.to_str().unwrap(), c.to_str().unwrap()))
            .collect();
        assert_eq!(steps, [("a", "a"), ("a/b", "b"), ("a/b/c", "c")]);
        assert_eq!(
            RelPath::new("f", Path::new("/"))
                .unwrap()
                .rel
                .to_str()
                .unwrap(),
            "."
        );
        let e = RelPath::new("mounts[1].destination", Path::new("/a/../b")).unwrap_err();
        assert_eq!(e.field, "mounts[1].destination");
        let e = RelPath::new("mounts[1].destination", Path::new("rel")).unwrap_err();
        assert!(e.message.contains("absolute"), "{e}");
    }

    #[test]
    fn mount_options_split_into_flags_propagation_and_data() {
        let m: Mount = serde_json::from_str(
            r#"{"destination":"/dev","type":"tmpfs","source":"tmpfs",
                "options":["nosuid","strictatime","mode=755","size=65536k","rprivate"]}"#,
        )
        .unwrap();
        let p = mount_plan(2, &m).unwrap();
        assert_eq!(p.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(p.data.to_str().unwrap(), "mode=755,size=65536k");
        assert_eq!(p.propagation, [libc::MS_PRIVATE | libc::MS_REC]);
        assert_eq!(p.kind, TargetKind::Dir);
        let m: Mount = serde_json::from_str(
            r#"{"destination":"/etc/hostname","type":"bind","source":"/proc/version",
                "options":["rbind","ro","nosuid"]}"#,
        )
        .unwrap();
        let p = mount_plan(0, &m).unwrap();
        assert_eq!(p.flags, libc::MS_BIND | libc::MS_REC);
        assert_eq!(p.kind, TargetKind::File);
        assert_eq!(
            p.remount_flags,
            Some(libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID)
        );
        let m: Mount = serde_json::from_str(
            r#"{"destination":"/data","type":"bind","source":"/nonexistent/rtv","options":["bind"]}"#,
        )
        .unwrap();
        let e = mount_plan(4, &m).unwrap_err();
        assert_eq!(e.field, "mounts[4].source");
        assert!(e.message.contains("/nonexistent/rtv"), "{e}");
        let m: Mount =
            serde_json::from_str(r#"{"destination":"/x","type":"tmpfs","options":["tmpcopyup"]}"#)
                .unwrap();
        assert_eq!(mount_plan(1, &m).unwrap_err().field, "mounts[1].options[0]");
    }

    #[test]
    fn namespaces_are_checked() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},{"type":"mount"},
                {"type":"uts"},{"type":"ipc"},{"type":"network"}]}}"#,
        );
        let ns = namespaces(&s).unwrap();
        assert_eq!(
            ns.new,
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC
        );
        let s = spec(r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"}]}}"#);
        assert_eq!(namespaces(&s).unwrap_err().field, "linux.namespaces");
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"mount"},{"type":"user"}]}}"#,
        );
        assert_eq!(namespaces(&s).unwrap_err().field, "linux.namespaces[1]");
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"mount"},{"type":"mount"}]}}"#,
        );
        assert_eq!(namespaces(&s).unwrap_err().field, "linux.namespaces[1]");
        // An unknown type fails to parse at all (the runtime names the field).
        assert!(serde_json::from_str::<Spec>(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"bogus"}]}}"#
        )
        .is_err());
    }

    #[test]
    fn ambient_capabilities_need_permitted_and_inheritable() {
        // `runc spec`'s process: ambient capabilities, no inheritable set.
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},
                "capabilities":{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL","CAP_CHOWN"],
                "permitted":["CAP_KILL","CAP_CHOWN"],"inheritable":["CAP_CHOWN"],
                "ambient":["CAP_KILL","CAP_CHOWN"]}}}"#,
        );
        let p = s.process().as_ref().unwrap();
        let plan = process("process", p, Path::new("/nonexistent-rootfs"), &s).unwrap();
        assert_eq!(caps::names(plan.caps.ambient), ["CAP_CHOWN"]);
        assert_eq!(caps::names(plan.caps.permitted), ["CAP_CHOWN", "CAP_KILL"]);
    }

    #[test]
    fn sysctls_must_be_namespaced() {
        assert!(sysctl_allowed("kernel.shmmax", libc::CLONE_NEWIPC).is_ok());
        assert!(sysctl_allowed("kernel.shmmax", 0).is_err());
        assert!(sysctl_allowed("net.ipv4.ip_forward", 0).is_ok());
        assert!(sysctl_allowed("vm.overcommit_memory", libc::CLONE_NEWIPC).is_err());
    }

    /// A kernel with the given devices (c or b, major, minor) and nodes.
    struct FakeKernel {
        has: Vec<(libc::mode_t, u32, u32)>,
        nodes: Vec<KernelNode>,
    }

    impl Devices for FakeKernel {
        fn has(&self, kind: libc::mode_t, dev: libc::dev_t) -> bool {
            self.has
                .contains(&(kind, libc::major(dev), libc::minor(dev)))
        }
        fn nodes(&self) -> Vec<KernelNode> {
            self.nodes.clone()
        }
    }

    fn node(path: &str, major: u32, minor: u32) -> KernelNode {
        KernelNode {
            path: path.into(),
            mode: libc::S_IFCHR | 0o600,
            dev: libc::makedev(major, minor),
            uid: 0,
            gid: 5,
        }
    }

    /// A container spec with /dev a tmpfs (and devpts), `devices` as
    /// linux.devices and `rules` as linux.resources.devices.
    fn device_spec(root: &Path, devices: &str, rules: &str) -> Spec {
        spec(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"{}"}},
                "process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                "mounts":[{{"destination":"/dev","type":"tmpfs","source":"tmpfs"}},
                          {{"destination":"/dev/pts","type":"devpts","source":"devpts"}}],
                "linux":{{"namespaces":[{{"type":"mount"}}],"devices":[{devices}],
                          "resources":{{"devices":[{rules}]}}}}}}"#,
            root.display()
        ))
    }

    #[test]
    fn devices_the_kernel_lacks_are_refused_or_left_out_when_every_device_is_allowed() {
        let root = std::env::temp_dir().join(format!("rtv-plan-dev-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let kernel = FakeKernel {
            has: vec![(libc::S_IFCHR, 1, 3), (libc::S_IFCHR, 10, 229)],
            nodes: vec![
                node("/dev/null", 1, 3),
                node("/dev/fuse", 10, 229),
                node("/dev/ptmx", 5, 2),
                node("/dev/virtio-ports/x", 250, 1),
            ],
        };
        let cpuid = r#"{"path":"/dev/cpu/0/cpuid","type":"c","major":203,"minor":0}"#;
        let fuse = r#"{"path":"/dev/fuse","type":"c","major":10,"minor":229}"#;
        let deny_all = r#"{"allow":false,"access":"rwm"}"#;
        let allow_all = r#"{"allow":true,"access":"rwm"}"#;

        // Not privileged: the host's device is refused, named.
        let e = create(
            &device_spec(&root, &format!("{fuse},{cpuid}"), deny_all),
            false,
            &kernel,
        )
        .unwrap_err();
        assert_eq!(e.field, "linux.devices[1]");
        assert!(
            e.message.contains("/dev/cpu/0/cpuid (c 203:0)")
                && e.message
                    .contains("device of the host that the VM does not have"),
            "{e}"
        );
        // A device the kernel has is made, in its directory.
        let p = create(&device_spec(&root, fuse, deny_all), false, &kernel).unwrap();
        let fuse_plan = p
            .devices
            .iter()
            .find(|d| d.path.rel.to_str() == Ok("dev/fuse"))
            .expect("/dev/fuse");
        assert_eq!(fuse_plan.index, Some(0));
        assert_eq!(fuse_plan.dir.rel.to_str(), Ok("dev"));
        assert!(p.skipped_devices.is_empty());
        assert!(!p
            .devices
            .iter()
            .any(|d| d.path.rel.to_str() == Ok("dev/virtio-ports/x")));

        // Every device allowed (a privileged container): the host's device
        // is left out and reported; the kernel's nodes are added once each,
        // not over the spec's or the /dev/ptmx symlink.
        let p = create(
            &device_spec(
                &root,
                &format!("{fuse},{cpuid}"),
                &format!("{deny_all},{allow_all}"),
            ),
            false,
            &kernel,
        )
        .unwrap();
        assert_eq!(p.skipped_devices, ["/dev/cpu/0/cpuid (c 203:0)"]);
        let paths: Vec<&str> = p
            .devices
            .iter()
            .map(|d| d.path.rel.to_str().unwrap())
            .collect();
        for want in ["dev/null", "dev/fuse", "dev/virtio-ports/x"] {
            assert_eq!(
                paths.iter().filter(|p| **p == want).count(),
                1,
                "{want}: {paths:?}"
            );
        }
        assert!(!paths.contains(&"dev/ptmx"), "{paths:?}");
        let x = p
            .devices
            .iter()
            .find(|d| d.path.rel.to_str() == Ok("dev/virtio-ports/x"))
            .unwrap();
        assert_eq!(x.dir.rel.to_str(), Ok("dev/virtio-ports"));
        assert_eq!((x.index, x.gid, x.mode), (None, 5, libc::S_IFCHR | 0o600));

        // A later rule that denies again: not every device.
        let e = create(
            &device_spec(&root, cpuid, &format!("{allow_all},{deny_all}")),
            false,
            &kernel,
        )
        .unwrap_err();
        assert_eq!(e.field, "linux.devices[0]");
        let _ = std::fs::remove_dir_all(&root);
    }
}
