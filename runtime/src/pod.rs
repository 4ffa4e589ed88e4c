//! The pod lifecycle, written once for every front end: `rtv` (runc's
//! command line, one process per command) and `containerd-shim-rtv-v2`
//! (one long-lived process per pod) both call it, and neither holds a
//! lifecycle step of its own.
//!
//! A [`Pod`] is one micro-VM and what the host keeps for it in its state
//! directory: the VMM's vsock socket, console and log, the virtio-fs share
//! (`share/`), and the pod's record (`pod.json`: the VMM's pid, the size,
//! the host cgroups the VMM joined, the member containers). [`Pod::start`]
//! starts it (from the VM template, a cold boot as fallback) and
//! [`Pod::open`] re-opens it from its record in another process;
//! [`Pod::stop`] powers it off and removes everything it made.
//!
//! Containers are operations on their pod: [`Pod::create_container`] (with
//! its own undo, see [`Creating`]), start, exec, signal, pause and resume,
//! update, stats, pids, state, wait, the OOM watch ([`OomWatch`]) and
//! [`Pod::delete_container`], which says whether the pod is then empty.
//! The spec's OCI hooks run here, on the host ([`ContainerHooks`]).
//! Failures are [`PodError`]s, whose [`ErrorClass`] front ends map to
//! their own codes.
//!
//! Which pod a container belongs to is one rule for every front end
//! ([`Role::of`], from containerd's CRI annotations).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oci_spec::runtime::{Hooks, LinuxResources, Process, Spec};
use rtv_protocol::{
    ContainerState, ContainerStats, CreateContainer, ErrorKind, ExecInContainer, ExitStatus, Stdio,
};
use serde::{Deserialize, Serialize};

use crate::agent_client::{AgentClient, ClientError, Endpoint, Watchdog};
use crate::artifacts::{ArtifactError, Artifacts};
use crate::hooks::{self, HookError, Stage};
use crate::host_cgroup::{self, HostCgroupError};
use crate::net::{self, NetError, Netns, NetworkMode, PodInterface};
use crate::sandbox::{Origin, Sandbox, SandboxConfig, SandboxError, VSOCK_FILE};
use crate::share::{Share, ShareError};
use crate::spec::{guest_spec, vm_size, VmSize, VM_MEMORY_OVERHEAD_MIB};
use crate::vmm_process::{alive, Profile};

/// The CRI annotation naming a container's kind (`sandbox` or `container`).
pub const CRI_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI annotation naming the pod sandbox a container belongs to.
pub const CRI_SANDBOX: &str = "io.kubernetes.cri.sandbox-id";

/// The pod's record in its state directory.
pub const RECORD_FILE: &str = "pod.json";
/// The lock taken while the record changes.
const LOCK_FILE: &str = "pod.lock";
/// The share's directory in the state directory.
pub const SHARE_DIR: &str = "share";
/// How long the agent of a pod on the host (tests) may take to answer a
/// new connection; a VM's agent has `agent.answer_timeout_secs`.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VM may take to power off before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The variable that turns the guest profiler on for every pod a front end
/// starts: each pod's profile goes to `$RTV_PROFILE_DIR/<pod id>/`
/// (`RTV_PROFILE_HZ` samples a second, 99 by default).
pub const PROFILE_ENV: &str = "RTV_PROFILE_DIR";
/// How long a profile part may take to be written.
const PROFILE_DUMP_TIMEOUT: Duration = Duration::from_secs(30);
/// The vsock CID of every pod's guest (each VMM has its own socket).
const GUEST_CID: u32 = 3;

/// How a container relates to a pod, from containerd's CRI annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A CRI pod's sandbox (pause) container: it makes the pod's VM.
    Sandbox,
    /// A CRI container of the pod with this sandbox id: it joins the VM.
    Member(String),
    /// No CRI pod: a container with a VM of its own.
    Standalone,
}

impl Role {
    /// The role the annotations give a container. The rule: `container-type
    /// sandbox` makes a pod; `container-type container` with a non-empty
    /// `sandbox-id` joins that pod; anything else (no annotations, or a
    /// `container` that names no sandbox, which has no pod to join) runs
    /// in a VM of its own.
    pub fn of(annotations: &HashMap<String, String>) -> Role {
        match (
            annotations.get(CRI_TYPE).map(String::as_str),
            annotations.get(CRI_SANDBOX).filter(|s| !s.is_empty()),
        ) {
            (Some("sandbox"), _) => Role::Sandbox,
            (Some("container"), Some(sandbox)) => Role::Member(sandbox.clone()),
            (Some("container"), None) => {
                tracing::warn!(
                    "annotation {CRI_TYPE}=container without {CRI_SANDBOX}: \
                     no pod to join, the container gets a VM of its own"
                );
                Role::Standalone
            }
            _ => Role::Standalone,
        }
    }

    /// The id of the pod container `id` belongs to: the sandbox id of a
    /// member, else its own.
    pub fn pod_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::Member(sandbox) => sandbox,
            Role::Sandbox | Role::Standalone => id,
        }
    }
}

/// What kind of failure a [`PodError`] is, for front ends' codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The container, process or pod does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// Its state does not allow the request.
    InvalidState,
    /// The request or the spec is wrong (the message names the field).
    InvalidArgument,
    /// The request waited too long for another on the same container.
    TimedOut,
    /// The pod's VM or its agent cannot be reached.
    Unavailable,
    /// Anything else.
    Internal,
}

/// Why a pod operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A guest artifact is missing.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The configuration file cannot be used (its error names the file,
    /// line and key).
    #[error("configuration: {0}")]
    Config(String),
    /// The spec (or the request) is wrong; the message names the file and
    /// field.
    #[error("{0}")]
    Invalid(String),
    /// The VM could not be started.
    #[error("starting the pod's VM: {0}")]
    Start(#[source] SandboxError),
    /// The agent failed a request, or could not be reached.
    #[error("{}", agent_message(context, source))]
    Agent {
        /// What was being done (or the spec file), if worth saying.
        context: Option<String>,
        /// The client's error.
        source: ClientError,
    },
    /// A hook failed.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// The share could not be used.
    #[error(transparent)]
    Share(#[from] ShareError),
    /// The pod's host cgroup could not be joined.
    #[error("linux.cgroupsPath: {0}")]
    HostCgroup(#[from] HostCgroupError),
    /// The pod's network could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The pod is not in a state for the request (stopping, gone).
    #[error("pod {pod}: {message}")]
    Pod {
        /// The pod.
        pod: String,
        /// What is wrong.
        message: String,
        /// How to classify it.
        class: ErrorClass,
    },
    /// A file of the pod's state could not be used.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn agent_message(context: &Option<String>, source: &ClientError) -> String {
    let what = match source {
        ClientError::Agent { message, .. } => message.clone(),
        other => other.to_string(),
    };
    match context {
        Some(c) => format!("{c}: {what}"),
        None => what,
    }
}

impl PodError {
    /// The error's class.
    pub fn class(&self) -> ErrorClass {
        match self {
            PodError::Artifact(_) => ErrorClass::Unavailable,
            PodError::Invalid(_) | PodError::HostCgroup(_) | PodError::Config(_) => {
                ErrorClass::InvalidArgument
            }
            PodError::Net(NetError::Namespace { .. } | NetError::Unsupported { .. }) => {
                ErrorClass::InvalidArgument
            }
            PodError::Net(_) => ErrorClass::Internal,
            PodError::Share(ShareError::Spec { .. }) => ErrorClass::InvalidArgument,
            PodError::Share(_) | PodError::Io { .. } | PodError::Hook(_) => ErrorClass::Internal,
            PodError::Start(_) => ErrorClass::Internal,
            PodError::Pod { class, .. } => *class,
            PodError::Agent { source, .. } => match source {
                ClientError::Agent { kind, .. } => match kind {
                    ErrorKind::NoSuchContainer | ErrorKind::NoSuchProcess => ErrorClass::NotFound,
                    ErrorKind::AlreadyExists => ErrorClass::AlreadyExists,
                    ErrorKind::InvalidState => ErrorClass::InvalidState,
                    ErrorKind::TimedOut => ErrorClass::TimedOut,
                    ErrorKind::InvalidRequest
                    | ErrorKind::NotFound
                    | ErrorKind::PermissionDenied => ErrorClass::InvalidArgument,
                    ErrorKind::Other => ErrorClass::Internal,
                },
                ClientError::Unreachable { .. }
                | ClientError::Disconnected
                | ClientError::Refused(_) => ErrorClass::Unavailable,
                ClientError::NoAnswer { .. } => ErrorClass::TimedOut,
                _ => ErrorClass::Internal,
            },
        }
    }

    /// The agent's error kind, if the agent answered with an error.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            PodError::Agent {
                source: ClientError::Agent { kind, .. },
                ..
            } => Some(*kind),
            _ => None,
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PodError + '_ {
        move |source| PodError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<ClientError> for PodError {
    fn from(source: ClientError) -> Self {
        PodError::Agent {
            context: None,
            source,
        }
    }
}

/// How to start a pod.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// The pod's id.
    pub id: String,
    /// Its state directory (made; removed when the pod stops).
    pub dir: PathBuf,
    /// The guest kernel, initramfs and VMM.
    pub artifacts: Artifacts,
    /// The template cache ([`crate::artifacts::template_dir`] by default).
    pub template_dir: PathBuf,
    /// Guest memory and vCPUs.
    pub size: VmSize,
    /// The guest's hostname.
    pub hostname: String,
    /// Leave the VMM running when this process ends (see [`Pod::detach`]).
    pub detached: bool,
    /// The host cgroup the VMM joins (the spec's `linux.cgroupsPath`:
    /// containerd and the kubelet account the pod by it).
    pub host_cgroup: Option<String>,
    /// The host CPUs (and memory nodes) the VMM is pinned to, in its host
    /// cgroup: the spec's `linux.resources.cpu.cpus`.
    pub host_cpuset: Option<host_cgroup::Cpuset>,
    /// The spec's per-device blkio weights and throttles (host block
    /// devices), given to the VMM's host cgroup: all of the guest's I/O is
    /// the VMM's.
    pub host_device_io: Option<host_cgroup::DeviceIo>,
    /// Profile the pod's guest (see [`Pod::mark`]).
    pub profile: Option<Profile>,
    /// The pod's network: the spec's network namespace.
    pub network: NetworkMode,
}

impl PodConfig {
    /// A pod for the container with `spec` that makes it (a CRI sandbox,
    /// or a standalone container): sized from the spec, named by its
    /// hostname (else the pod's id), in the spec's host cgroup.
    pub fn for_spec(id: &str, dir: &Path, spec: &Spec) -> Result<PodConfig, PodError> {
        if let Some(e) = crate::config::error() {
            return Err(PodError::Config(e.to_owned()));
        }
        let hostname = spec
            .hostname()
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| id.chars().take(63).collect());
        let artifacts = Artifacts::find()?;
        let size = vm_size(spec, crate::spec::host_cpus());
        crate::spec::check_vm_size(spec, size).map_err(PodError::Invalid)?;
        let profile = std::env::var_os(PROFILE_ENV)
            .filter(|d| !d.is_empty())
            .map(|d| Profile {
                dir: PathBuf::from(d).join(id),
                hz: std::env::var("RTV_PROFILE_HZ")
                    .ok()
                    .and_then(|h| h.parse().ok())
                    .unwrap_or(99),
                system_map: artifacts.system_map_for(size.vcpus),
            });
        Ok(PodConfig {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
            artifacts,
            template_dir: crate::artifacts::template_dir(),
            size,
            hostname,
            detached: false,
            host_cgroup: spec
                .linux()
                .as_ref()
                .and_then(|l| l.cgroups_path().as_ref())
                .map(|p| p.to_string_lossy().into_owned()),
            host_cpuset: host_cgroup::Cpuset::of(spec),
            host_device_io: host_cgroup::DeviceIo::of(spec),
            profile,
            network: NetworkMode::of(spec),
        })
    }
}

/// What a pod's state directory records of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    /// The pod's id.
    pub id: String,
    /// The VMM's pid.
    pub vmm_pid: i32,
    /// Its start time (against pid reuse).
    pub vmm_start: u64,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The host cgroups the VMM joined.
    pub host_cgroups: Vec<PathBuf>,
    /// The containers in the pod.
    pub members: Vec<String>,
    /// The memory limits of the members that set one, MiB: what the VM
    /// has promised them ([`join_members`]).
    #[serde(default)]
    pub member_memory_mib: std::collections::BTreeMap<String, u64>,
    /// The last member left: the pod is being stopped and takes no new one.
    #[serde(default)]
    pub stopping: bool,
    /// Where the guest profiler writes, when the pod is profiled.
    #[serde(default)]
    pub profile: Option<PathBuf>,
    /// The profile's parts cut so far ([`Pod::mark`]).
    #[serde(default)]
    pub profile_parts: u32,
    /// The host CPUs the VMM is pinned to, once a spec named some: the
    /// union of its containers' cpusets.
    #[serde(default)]
    pub vmm_cpus: Option<String>,
    /// The pod's network namespace and interface that rtv wired to the
    /// VM's tap, when the namespace is named by a lasting path (removed
    /// again when the pod stops).
    #[serde(default)]
    pub network: Option<NetRecord>,
}

/// What rtv added to a pod's network namespace (see [`crate::net`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    /// The namespace's path.
    pub netns: PathBuf,
    /// The interface wired to the tap.
    pub interface: String,
}

/// An exclusive flock, released when dropped.
struct RecordLock(File);

impl RecordLock {
    fn take(dir: &Path) -> Result<RecordLock, PodError> {
        let path = dir.join(LOCK_FILE);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(PodError::io(&path))?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(PodError::io(&path)(std::io::Error::last_os_error()));
        }
        Ok(RecordLock(f))
    }
}

impl Drop for RecordLock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Logs, as one warning, the fields of container `id`'s spec that the
/// agent accepted but did not apply (the host's LSM labels, cgroup fields
/// cgroup v2 does not have), each with the reason.
fn log_not_applied(id: &str, notes: &[String]) {
    if !notes.is_empty() {
        tracing::warn!(
            id,
            "accepted, not applied in the guest: {}",
            notes.join("; ")
        );
    }
}

fn read_record(dir: &Path) -> Result<PodRecord, PodError> {
    let path = dir.join(RECORD_FILE);
    let text = std::fs::read(&path).map_err(PodError::io(&path))?;
    serde_json::from_slice(&text).map_err(|e| PodError::io(&path)(std::io::Error::other(e)))
}

fn write_record(dir: &Path, rec: &PodRecord) -> Result<(), PodError> {
    let path = dir.join(RECORD_FILE);
    let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other);
    bytes
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(PodError::io(&path))
}

/// Names part `n` of the profile in `dir`: `<n>.label`, and a line in
/// `parts.txt`.
fn label_part(dir: &Path, n: u32, label: &str) -> Result<(), PodError> {
    use std::io::Write as _;
    let path = dir.join(format!("{n}.label"));
    std::fs::write(&path, format!("{label}\n")).map_err(PodError::io(&path))?;
    let index = dir.join("parts.txt");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&index)
        .and_then(|mut f| writeln!(f, "{n}\t{label}"))
        .map_err(PodError::io(&index))
}

/// Changes the record in `dir` under its lock.
fn change_record<T>(
    dir: &Path,
    f: impl FnOnce(&mut PodRecord) -> Result<T, PodError>,
) -> Result<T, PodError> {
    let _lock = RecordLock::take(dir)?;
    let mut rec = read_record(dir)?;
    let r = f(&mut rec)?;
    write_record(dir, &rec)?;
    Ok(r)
}

/// Adds container `id` to the members of the pod in `dir`; refused while
/// the pod stops, for an id it has, and for a memory limit (`memory_mib`)
/// that does not fit what the VM has left: its memory less the guest's own
/// ([`VM_MEMORY_OVERHEAD_MIB`]) and the limits of the other members. The
/// container that made the pod is not checked: the VM was sized for it (or
/// for the whole pod, from containerd 1.7's annotations).
fn join_members(dir: &Path, id: &str, memory_mib: Option<u64>) -> Result<(), PodError> {
    change_record(dir, |rec| {
        let refuse = |message: String, class| PodError::Pod {
            pod: rec.id.clone(),
            message,
            class,
        };
        if rec.stopping {
            return Err(refuse(
                "it is stopping (its last container was deleted)".into(),
                ErrorClass::InvalidState,
            ));
        }
        if rec.members.iter().any(|m| m == id) {
            return Err(refuse(
                format!("container {id} exists already"),
                ErrorClass::AlreadyExists,
            ));
        }
        if let Some(mib) = memory_mib {
            let promised: u64 = rec.member_memory_mib.values().sum();
            let left = rec
                .mem_mib
                .saturating_sub(VM_MEMORY_OVERHEAD_MIB)
                .saturating_sub(promised);
            if id != rec.id && rec.mem_mib > 0 && mib > left {
                return Err(refuse(
                    format!(
                        "container {id}'s memory limit of {mib} MiB does not fit in the pod's VM of \
                         {} MiB: {VM_MEMORY_OVERHEAD_MIB} MiB are the guest's own and {promised} MiB \
                         the limits of its other containers, {left} MiB are left (size the pod: \
                         vm.default_memory_mib in the configuration file, or containerd 1.7's pod \
                         annotations)",
                        rec.mem_mib
                    ),
                    ErrorClass::InvalidArgument,
                ));
            }
            rec.member_memory_mib.insert(id.to_owned(), mib);
        }
        rec.members.push(id.to_owned());
        Ok(())
    })
}

/// Removes `id` from the members of the pod in `dir`; whether it was the
/// last. A container deleted last marks the pod stopping (the front end
/// stops it); an undone create does not.
fn leave_members(dir: &Path, id: &str, deleted: bool) -> Result<bool, PodError> {
    change_record(dir, |rec| {
        rec.members.retain(|m| m != id);
        rec.member_memory_mib.remove(id);
        let last = rec.members.is_empty();
        rec.stopping |= last && deleted;
        Ok(last)
    })
}

/// The pod's VMM: started by this process, or found from the record.
enum Vmm {
    Owned(Box<Sandbox>),
    Found {
        pid: i32,
        start: u64,
    },
    /// No VM: the agent runs on the host ([`Pod::on_host_agent`]).
    HostAgent,
}

/// The network a starting pod's VM is given (see [`crate::net`]).
#[derive(Default)]
struct StartNet {
    /// The tap for the VM's NIC.
    tap: Option<Arc<std::os::fd::OwnedFd>>,
    /// The interface wired to it, whose configuration the guest gets.
    iface: Option<PodInterface>,
    /// What to undo, for the record.
    record: Option<NetRecord>,
    /// The namespace rtv made.
    own: Option<Arc<Netns>>,
}

impl StartNet {
    /// Opens or makes the pod's namespace, makes the tap, and wires it to
    /// the interface the namespace has. Blocks.
    fn prepare(mode: &NetworkMode) -> Result<StartNet, NetError> {
        match mode {
            NetworkMode::Loopback => Ok(StartNet::default()),
            NetworkMode::New => {
                let ns = Netns::create("being started")?;
                let tap = net::create_tap(&ns)?;
                Ok(StartNet {
                    tap: Some(Arc::new(tap)),
                    own: Some(Arc::new(ns)),
                    ..StartNet::default()
                })
            }
            NetworkMode::Path(path) => {
                let ns = Netns::open(path)?;
                let Some(iface) = net::find_interface(&ns)? else {
                    tracing::info!(
                        "{}: no interface with addresses: the pod's VM has loopback only",
                        path.display()
                    );
                    return Ok(StartNet::default());
                };
                let tap = net::create_tap(&ns)?;
                // A failed wiring undoes itself; the tap goes with `tap`.
                net::wire(&ns, &iface)?;
                let record = net::lasting_path(path).then(|| NetRecord {
                    netns: path.clone(),
                    interface: iface.name.clone(),
                });
                Ok(StartNet {
                    tap: Some(Arc::new(tap)),
                    iface: Some(iface),
                    record,
                    own: None,
                })
            }
        }
    }

    /// Undoes [`Self::prepare`] after a failed start.
    async fn undo(self) {
        drop(self.tap);
        if let Some(r) = self.record {
            let _ = tokio::task::spawn_blocking(move || net::unwire(&r.netns, &r.interface)).await;
        }
    }
}

/// A running pod: its VM, its agent, its share.
pub struct Pod {
    id: String,
    dir: PathBuf,
    client: Arc<AgentClient>,
    share: Share,
    vmm: std::sync::Mutex<Option<Vmm>>,
    host_cgroups: Vec<PathBuf>,
    size: VmSize,
    /// The namespace rtv made for the pod (a spec asking for a new one),
    /// while this process holds it: front ends start processes that must
    /// be in it (the waiter whose pid prestart hooks configure), and the
    /// first container's create looks for an interface in it once its
    /// hooks ran ([`Creating::finish`]).
    own_netns: std::sync::Mutex<Option<Arc<Netns>>>,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("vmm_pid", &self.vmm_pid())
            .finish()
    }
}

/// Stops a hung VM: `client`'s watchdog (`agent.answer_timeout_secs`)
/// kills the pod's VMM when the agent leaves a request unanswered, so
/// everything waiting on the VM (the containers' waiters, the shim's
/// waits) ends and reports its containers killed, instead of hanging.
fn watch_agent(client: &AgentClient, dir: &Path, pod: &str, vmm: (i32, u64)) {
    let (pod, dir) = (pod.to_owned(), dir.to_path_buf());
    let timeout = crate::config::get().agent.answer_timeout();
    client.set_watchdog(Watchdog {
        timeout,
        on_silence: Box::new(move |request| hung(&dir, &pod, vmm, request, timeout)),
    });
}

/// Kills the VMM of a pod whose agent did not answer `what` in `waited`,
/// and leaves the reason where [`crate::sandbox::end_reason`] finds it.
fn hung(dir: &Path, pod: &str, (pid, start): (i32, u64), what: &str, waited: Duration) {
    let reason = format!(
        "the guest agent did not answer {what} within {} s (agent.answer_timeout_secs): \
         the guest was taken as hung and its VMM killed",
        waited.as_secs()
    );
    tracing::error!(pod, vmm_pid = pid, "{reason}");
    if let Err(e) = std::fs::write(dir.join(crate::sandbox::END_REASON_FILE), &reason) {
        tracing::warn!(pod, "noting why the VM ended: {e}");
    }
    crate::vmm_process::stop(pid, start, Duration::ZERO);
}

impl Pod {
    /// Starts a pod: the state directory (anything a dead pod of the same
    /// directory left is removed first), the VM from the template (or a
    /// cold boot), the VMM in the host cgroup, and the record. A failure
    /// leaves nothing.
    pub async fn start(cfg: PodConfig) -> Result<Pod, PodError> {
        crate::remove_tree(&cfg.dir)?;
        let share_dir = cfg.dir.join(SHARE_DIR);
        std::fs::create_dir_all(&share_dir).map_err(PodError::io(&share_dir))?;
        let network = cfg.network.clone();
        let net = match tokio::task::spawn_blocking(move || StartNet::prepare(&network)).await {
            Ok(Ok(net)) => net,
            Ok(Err(e)) => {
                let _ = crate::remove_tree(&cfg.dir);
                return Err(e.into());
            }
            Err(e) => {
                let _ = crate::remove_tree(&cfg.dir);
                return Err(PodError::Invalid(format!(
                    "preparing the pod's network: {e}"
                )));
            }
        };
        let started = Self::start_in(&cfg, &share_dir, &net).await;
        if started.is_err() {
            net.undo().await;
            let _ = crate::remove_tree(&cfg.dir);
        }
        started
    }

    async fn start_in(cfg: &PodConfig, share_dir: &Path, net: &StartNet) -> Result<Pod, PodError> {
        let a = &cfg.artifacts;
        let mut sb = SandboxConfig::new(
            a.kernel_for(cfg.size.vcpus),
            &a.initramfs,
            &a.vmm,
            &cfg.dir,
            &cfg.hostname,
            GUEST_CID,
        );
        sb.mem_mib = cfg.size.mem_mib;
        sb.vcpus = cfg.size.vcpus;
        sb.shared_dir = Some(share_dir.to_path_buf());
        sb.template_dir = Some(cfg.template_dir.clone());
        sb.detached = cfg.detached;
        sb.profile = cfg.profile.clone();
        sb.net_tap = net.tap.clone();
        let sandbox = Sandbox::start(sb).await.map_err(PodError::Start)?;
        tracing::info!(
            pod = %cfg.id,
            vmm_pid = sandbox.pid(),
            mem_mib = cfg.size.mem_mib,
            vcpus = cfg.size.vcpus,
            origin = ?sandbox.origin(),
            ready_after = ?sandbox.ready_after(),
            "VM ready"
        );
        // The sandbox's own connection (it set the guest's identity).
        let client = sandbox.shared_client();
        let vmm_pid = sandbox.pid() as i32;
        let vmm_start = crate::vmm_process::start_time(vmm_pid).unwrap_or(0);
        watch_agent(&client, &cfg.dir, &cfg.id, (vmm_pid, vmm_start));
        let mut pod = Pod {
            id: cfg.id.clone(),
            dir: cfg.dir.clone(),
            client,
            share: Share::new(share_dir)?,
            vmm: std::sync::Mutex::new(Some(Vmm::Owned(Box::new(sandbox)))),
            host_cgroups: Vec::new(),
            size: cfg.size,
            own_netns: std::sync::Mutex::new(net.own.clone()),
        };
        let recorded = (|| {
            if let Some(path) = &cfg.host_cgroup {
                host_cgroup::join(
                    path,
                    &crate::vmm_process::family(vmm_pid),
                    cfg.host_cpuset.as_ref(),
                    cfg.host_device_io.as_ref(),
                    Some(&host_cgroup::VmmLimits::for_vm(
                        cfg.size.mem_mib,
                        cfg.size.vcpus,
                    )),
                    &mut pod.host_cgroups,
                )?;
            }
            write_record(
                &pod.dir,
                &PodRecord {
                    id: pod.id.clone(),
                    vmm_pid,
                    vmm_start,
                    mem_mib: cfg.size.mem_mib,
                    vcpus: cfg.size.vcpus,
                    host_cgroups: pod.host_cgroups.clone(),
                    members: Vec::new(),
                    member_memory_mib: Default::default(),
                    stopping: false,
                    profile: cfg.profile.as_ref().map(|p| p.dir.clone()),
                    profile_parts: 0,
                    vmm_cpus: cfg.host_cpuset.as_ref().map(|c| c.cpus.clone()),
                    network: net.record.clone(),
                },
            )
        })();
        let recorded = match (recorded, &net.iface) {
            (Ok(()), Some(iface)) => pod.configure_guest_network(iface).await,
            (r, _) => r,
        };
        match recorded {
            Ok(()) => {
                pod.mark("the pod's VM starts (restore or boot)").await;
                Ok(pod)
            }
            Err(e) => {
                pod.stop().await;
                Err(e)
            }
        }
    }

    /// Re-opens the pod whose state directory is `dir` (started by another
    /// process): its record, its VMM (which must still run), its agent.
    pub async fn open(dir: &Path) -> Result<Pod, PodError> {
        let rec = read_record(dir)?;
        let gone = |rec: PodRecord| PodError::Pod {
            pod: rec.id,
            message: format!("its VMM (pid {}) is gone", rec.vmm_pid),
            class: ErrorClass::Unavailable,
        };
        if !alive(rec.vmm_pid, rec.vmm_start) {
            return Err(gone(rec));
        }
        let timeout = crate::config::get().agent.answer_timeout();
        let endpoint = Endpoint::vm(dir.join(VSOCK_FILE));
        // Connecting retries until the timeout: stop as soon as the VMM is
        // gone (its keeper outlives it by a moment).
        let connect = AgentClient::connect_answering(endpoint, timeout);
        tokio::pin!(connect);
        let connected = loop {
            tokio::select! {
                r = &mut connect => break r,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if !alive(rec.vmm_pid, rec.vmm_start) {
                        return Err(gone(rec));
                    }
                }
            }
        };
        let client = match connected {
            Ok(c) => c,
            Err(source) => {
                // A VMM that runs but whose agent never answers is hung.
                let silent = matches!(source, ClientError::Unreachable { .. })
                    && alive(rec.vmm_pid, rec.vmm_start);
                let mut context = format!("reaching the agent of pod {}", rec.id);
                if silent {
                    let (vmm, id, dir) = ((rec.vmm_pid, rec.vmm_start), rec.id, dir.to_owned());
                    let _ = tokio::task::spawn_blocking(move || {
                        hung(&dir, &id, vmm, "a new connection", timeout)
                    })
                    .await;
                    context.push_str(" (its VM was taken as hung and stopped)");
                }
                return Err(PodError::Agent {
                    context: Some(context),
                    source,
                });
            }
        };
        watch_agent(&client, dir, &rec.id, (rec.vmm_pid, rec.vmm_start));
        Ok(Pod {
            id: rec.id,
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            share: Share::new(dir.join(SHARE_DIR))?,
            vmm: std::sync::Mutex::new(Some(Vmm::Found {
                pid: rec.vmm_pid,
                start: rec.vmm_start,
            })),
            host_cgroups: rec.host_cgroups,
            size: VmSize {
                mem_mib: rec.mem_mib,
                vcpus: rec.vcpus,
            },
            own_netns: std::sync::Mutex::new(None),
        })
    }

    /// A pod without a VM, over an agent that runs on the host
    /// (`rtv-agent --listen unix:PATH`), for tests of the container
    /// operations that need no guest: the share is bind-mounted under
    /// `dir` as for a VM, and the agent sees it at its host path.
    pub async fn on_host_agent(id: &str, dir: &Path, agent: &Path) -> Result<Pod, PodError> {
        crate::remove_tree(dir)?;
        let share_dir = dir.join(SHARE_DIR);
        let share = Share::seen_at(&share_dir, &share_dir)?;
        let client =
            AgentClient::connect(Endpoint::Unix(agent.to_path_buf()), AGENT_TIMEOUT).await?;
        let size = VmSize {
            mem_mib: 0,
            vcpus: 0,
        };
        write_record(
            dir,
            &PodRecord {
                id: id.to_owned(),
                vmm_pid: 0,
                vmm_start: 0,
                mem_mib: 0,
                vcpus: 0,
                host_cgroups: Vec::new(),
                members: Vec::new(),
                member_memory_mib: Default::default(),
                stopping: false,
                profile: None,
                profile_parts: 0,
                vmm_cpus: None,
                network: None,
            },
        )?;
        Ok(Pod {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            share,
            vmm: std::sync::Mutex::new(Some(Vmm::HostAgent)),
            host_cgroups: Vec::new(),
            size,
            own_netns: std::sync::Mutex::new(None),
        })
    }

    /// The pod's record in `dir`, if it has one.
    pub fn record(dir: &Path) -> Result<PodRecord, PodError> {
        read_record(dir)
    }

    /// The pod's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its VM's size.
    pub fn size(&self) -> VmSize {
        self.size
    }

    fn own_netns_lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Netns>>> {
        self.own_netns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The network namespace rtv made for this pod, while the process
    /// that started the pod holds it: a front end starts the process
    /// whose pid the prestart hooks see in it.
    pub fn own_netns(&self) -> Option<Arc<Netns>> {
        self.own_netns_lock().clone()
    }

    /// Gives the guest's NIC the pod interface's MAC, MTU, addresses and
    /// routes.
    async fn configure_guest_network(&self, iface: &PodInterface) -> Result<(), PodError> {
        let config = iface.guest_config(rtv_protocol::PLACEHOLDER_MAC);
        self.client
            .configure_network(config)
            .await
            .map_err(|source| PodError::Agent {
                context: Some(format!(
                    "configuring the guest's NIC as {} ({})",
                    iface.name,
                    iface
                        .addresses
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                source,
            })?;
        tracing::info!(
            pod = %self.id,
            interface = %iface.name,
            addresses = ?iface.addresses,
            "the guest's NIC is configured"
        );
        Ok(())
    }

    /// Once the create hooks ran: if rtv made the pod's namespace, wires
    /// the interface the hooks put there (if any) to the VM's tap and
    /// configures the guest's NIC. Done once per pod; later calls do
    /// nothing.
    async fn network_after_hooks(&self) -> Result<(), PodError> {
        let Some(ns) = self.own_netns_lock().take() else {
            return Ok(());
        };
        let scan = ns.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<_, NetError> {
            let Some(iface) = net::find_interface(&scan)? else {
                return Ok(None);
            };
            net::wire(&scan, &iface)?;
            Ok(Some(iface))
        })
        .await
        .map_err(|e| PodError::Invalid(format!("wiring the pod's network: {e}")))??;
        // The namespace stays held by the processes in it and the VMM's tap.
        match found {
            Some(iface) => self.configure_guest_network(&iface).await,
            None => {
                tracing::debug!(pod = %self.id, "{}: no interface with addresses: loopback only", ns.name());
                Ok(())
            }
        }
    }

    fn vmm(&self) -> std::sync::MutexGuard<'_, Option<Vmm>> {
        self.vmm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VMM's pid (0 once stopped).
    pub fn vmm_pid(&self) -> i32 {
        match &*self.vmm() {
            Some(Vmm::Owned(s)) => s.pid() as i32,
            Some(Vmm::Found { pid, .. }) => *pid,
            Some(Vmm::HostAgent) | None => 0,
        }
    }

    /// How the VM came to be, if this process started it.
    pub fn origin(&self) -> Option<Origin> {
        match &*self.vmm() {
            Some(Vmm::Owned(s)) => Some(s.origin().clone()),
            _ => None,
        }
    }

    /// The agent's control connection (for stdio streams, terminal
    /// resizes, closing stdin: what front ends relay themselves).
    pub fn client(&self) -> &Arc<AgentClient> {
        &self.client
    }

    /// Cuts the guest profile here, when the pod is profiled: the samples
    /// since the previous mark (or the VM's start) become part n of the
    /// profile (`<n>.folded`, `<n>.svg`), `label` says what the part is
    /// (`<n>.label`, and a line `n label` in `parts.txt`). The part after
    /// the last mark runs until the VM stops. Works from any process that
    /// opened the pod (the count is in the record); costs nothing when the
    /// pod is not profiled. Problems are logged.
    pub async fn mark(&self, label: &str) {
        let vmm = self.vmm_pid();
        let dir = &self.dir;
        let cut = async {
            let Some(profile) = read_record(dir)?.profile else {
                return Ok(None);
            };
            let _lock = RecordLock::take(dir)?;
            let mut rec = read_record(dir)?;
            let n = rec.profile_parts + 1;
            // SAFETY: kill(2) of the pod's VMM (rtv-vmm serves SIGUSR1 by
            // writing a profile part; it is never fatal to it).
            if unsafe { libc::kill(vmm, libc::SIGUSR1) } < 0 {
                return Err(PodError::io(&profile)(std::io::Error::last_os_error()));
            }
            let svg = profile.join(format!("{n}.svg"));
            let started = std::time::Instant::now();
            while !svg.exists() {
                if started.elapsed() > PROFILE_DUMP_TIMEOUT || !alive(vmm, rec.vmm_start) {
                    return Err(PodError::io(&svg)(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            rec.profile_parts = n;
            write_record(dir, &rec)?;
            label_part(&profile, n, label)?;
            Ok(Some(svg))
        };
        match cut.await {
            Ok(Some(svg)) => {
                tracing::info!(pod = %self.id, "profile of {label}: {}", svg.display())
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(pod = %self.id, "cutting the profile at {label}: {e}"),
        }
    }

    /// Leaves the VM running when this value is dropped, for a pod started
    /// with [`PodConfig::detached`] (another process stops it later).
    pub fn detach(self) {
        if let Some(Vmm::Owned(s)) = self.vmm().take() {
            s.detach();
        }
    }

    /// Powers the VM off (killing the VMM if it does not stop within
    /// [`STOP_TIMEOUT`]), then removes the state directory, the share's
    /// mounts with it, and the host cgroups. Problems are logged: a pod
    /// is always gone afterwards; a second call does nothing.
    pub async fn stop(&self) {
        let rec = read_record(&self.dir).ok();
        if let Some(rec) = &rec {
            if let Some(profile) = &rec.profile {
                let _ = label_part(profile, rec.profile_parts + 1, "until the VM stopped");
            }
        }
        self.own_netns_lock().take();
        let vmm = self.vmm().take();
        match vmm {
            Some(Vmm::Owned(sandbox)) => match sandbox.stop(STOP_TIMEOUT).await {
                Ok(status) => tracing::info!(pod = %self.id, "VM stopped ({status})"),
                Err(e) => tracing::warn!(pod = %self.id, "stopping the VM: {e}"),
            },
            Some(Vmm::Found { pid, start }) => {
                // The reply may be lost as the guest goes down.
                let _ = tokio::time::timeout(STOP_TIMEOUT, self.client.shutdown()).await;
                let _ = tokio::task::spawn_blocking(move || {
                    crate::vmm_process::stop(pid, start, STOP_TIMEOUT)
                })
                .await;
            }
            Some(Vmm::HostAgent) => {}
            None => return,
        }
        let (id, dir, cgroups) = (self.id.clone(), self.dir.clone(), self.host_cgroups.clone());
        let network = rec.and_then(|r| r.network);
        let _ = tokio::task::spawn_blocking(move || {
            Self::remove_state(&id, &dir, &cgroups, network.as_ref())
        })
        .await;
    }

    /// Cleans up after a pod whose owner died: kills its VMM if the record
    /// says one still runs, removes the state directory and the host
    /// cgroups. Nothing to do is not an error.
    pub fn clean_up(dir: &Path) {
        let rec = read_record(dir).ok();
        if let Some(rec) = &rec {
            if alive(rec.vmm_pid, rec.vmm_start) {
                crate::vmm_process::stop(rec.vmm_pid, rec.vmm_start, Duration::ZERO);
            }
        }
        let (id, cgroups, network) = rec
            .map(|r| (r.id, r.host_cgroups, r.network))
            .unwrap_or_else(|| (dir.display().to_string(), Vec::new(), None));
        Self::remove_state(&id, dir, &cgroups, network.as_ref());
    }

    /// Removes container `id` from the pod in `dir` whose VM is gone (its
    /// share entry and membership); whether it was the last member, in
    /// which case the caller cleans the pod up ([`Pod::clean_up`]).
    pub fn remove_from_dead(dir: &Path, id: &str) -> Result<bool, PodError> {
        if let Ok(share) = Share::new(dir.join(SHARE_DIR)) {
            share.remove_container(id);
        }
        leave_members(dir, id, true)
    }

    fn remove_state(id: &str, dir: &Path, host_cgroups: &[PathBuf], network: Option<&NetRecord>) {
        // After the VMM, which held the tap, has gone.
        if let Some(n) = network {
            if let Err(e) = net::unwire(&n.netns, &n.interface) {
                tracing::warn!(pod = %id, "{e}");
            }
        }
        if let Err(e) = crate::remove_tree(dir) {
            tracing::warn!(pod = %id, "{e}");
        }
        // After the VMM, which was in them, has gone.
        host_cgroup::remove(host_cgroups);
    }

    /// The containers of the pod.
    pub fn member_ids(&self) -> Result<Vec<String>, PodError> {
        Ok(read_record(&self.dir)?.members)
    }

    fn join(&self, id: &str, memory_mib: Option<u64>) -> Result<(), PodError> {
        join_members(&self.dir, id, memory_mib)
    }

    fn leave(&self, id: &str, deleted: bool) -> Result<bool, PodError> {
        leave_members(&self.dir, id, deleted)
    }

    /// Creates a container in the pod: joins it to the members, places its
    /// root file system and bind mounts in the share, maps the spec for the
    /// guest and creates it there (its init waits for start). The front
    /// end then attaches its stdio and finishes the create with
    /// [`Creating::finish`], which runs the create hooks. A failure here
    /// leaves nothing.
    pub async fn create_container(&self, c: NewContainer<'_>) -> Result<Creating<'_>, PodError> {
        self.join(c.id, crate::spec::memory_limit_mib(c.spec))?;
        let mut creating = Creating {
            pod: self,
            id: c.id.to_owned(),
            exec_id: 0,
            guest_pid: 0,
            in_share: false,
            in_guest: false,
        };
        match self.create_in_guest(&c, &mut creating).await {
            Ok(()) => Ok(creating),
            Err(e) => {
                creating.abort().await;
                Err(e)
            }
        }
    }

    async fn create_in_guest(
        &self,
        c: &NewContainer<'_>,
        creating: &mut Creating<'_>,
    ) -> Result<(), PodError> {
        let config = c.bundle.join("config.json");
        let in_file =
            |e: &dyn std::fmt::Display| PodError::Invalid(format!("{}: {e}", config.display()));
        // Per-device blkio limits are the VMM's (its host cgroup got those
        // of the container that made the pod); another container's would
        // limit the whole pod's I/O.
        if c.id != self.id {
            if let Some(w) =
                host_cgroup::DeviceIo::of(c.spec).and_then(|d| d.writes.first().cloned())
            {
                return Err(in_file(&format_args!(
                    "linux.resources.blockIO.{}: per-device limits apply to the pod's VMM, which does the I/O of all its containers: set them on the pod's sandbox container",
                    w.field
                )));
            }
        }
        // A member's cpuset (kubelet's static CPU manager sets them on the
        // app containers, not the sandbox) pins the VMM too: to the union
        // of its containers' cpusets.
        if c.id != self.id {
            if let Some(set) = host_cgroup::Cpuset::of(c.spec) {
                self.pin_vmm(&set).map_err(|e| in_file(&e))?;
            }
        }
        let shared = match self.share.add_container(c.id, c.rootfs, c.spec) {
            Ok(s) => s,
            Err(e @ ShareError::Spec { .. }) => return Err(in_file(&e)),
            Err(e) => return Err(e.into()),
        };
        creating.in_share = true;
        let spec =
            guest_spec(shared, c.id, c.guest_pid, self.size.vcpus).map_err(|e| in_file(&e))?;
        let started = self
            .client
            .create_container(CreateContainer {
                container_id: c.id.to_owned(),
                spec,
                stdio: c.stdio,
                // A CRI pod's sandbox only holds the pod's namespaces.
                builtin_pause: Role::of(&c.spec.annotations().clone().unwrap_or_default())
                    == Role::Sandbox,
            })
            .await
            .map_err(|source| PodError::Agent {
                context: Some(config.display().to_string()),
                source,
            })?;
        creating.in_guest = true;
        creating.exec_id = started.exec_id;
        creating.guest_pid = started.pid;
        log_not_applied(c.id, &started.not_applied);
        self.mark(&format!("create {}", c.id)).await;
        Ok(())
    }

    /// Pins the VMM to `set`'s host CPUs as well as those it was pinned to
    /// (the first cpuset named pins it; later ones widen it). The pod's
    /// record keeps the union.
    fn pin_vmm(&self, set: &host_cgroup::Cpuset) -> Result<(), PodError> {
        change_record(&self.dir, |rec| {
            if rec.vmm_pid == 0 {
                return Ok(()); // the agent on the host: no VMM
            }
            let cpus = match &rec.vmm_cpus {
                Some(old) => host_cgroup::cpu_list_union(old, &set.cpus).ok_or_else(|| {
                    PodError::Invalid(format!(
                        "linux.resources.cpu.cpus: {:?} is not a list of CPUs",
                        set.cpus
                    ))
                })?,
                None => set.cpus.clone(),
            };
            host_cgroup::set_cpus(&rec.host_cgroups, &cpus)?;
            rec.vmm_cpus = Some(cpus);
            Ok(())
        })
    }

    /// Removes container `id` from the guest (killing it) and the share.
    async fn remove_container(&self, id: &str) {
        match self.client.delete_container(id, true).await {
            Ok(()) => {}
            Err(ClientError::Agent {
                kind: ErrorKind::NoSuchContainer,
                ..
            }) => {}
            Err(e) => {
                tracing::warn!(pod = %self.id, id, "deleting the container in the guest: {e}")
            }
        }
        self.share.remove_container(id);
    }

    /// Starts a created container: its startContainer hooks (a failure
    /// fails the start), the start in the guest, its poststart hooks
    /// (failures logged). `pid` is the pid the front end reports for it.
    pub async fn start_container(&self, hooks: &ContainerHooks, pid: i32) -> Result<(), PodError> {
        hooks.run(Stage::StartContainer, "created", pid).await?;
        self.client.start_container(&hooks.id).await?;
        self.mark(&format!("start {}", hooks.id)).await;
        hooks.run_logged(Stage::Poststart, "running", pid).await;
        Ok(())
    }

    /// Deletes container `id` (killing it if it still runs): from the
    /// guest, the share and the members, then its poststop hooks (failures
    /// logged). Returns whether it was the pod's last container: the front
    /// end then stops the pod.
    pub async fn delete_container(
        &self,
        id: &str,
        hooks: Option<&ContainerHooks>,
    ) -> Result<bool, PodError> {
        self.remove_container(id).await;
        self.mark(&format!("delete {id}")).await;
        let last = self.leave(id, true)?;
        if let Some(h) = hooks {
            h.run_logged(Stage::Poststop, "stopped", 0).await;
        }
        Ok(last)
    }

    /// Runs `process` in running container `id`: its exec id and guest pid.
    pub async fn exec(
        &self,
        id: &str,
        process: Process,
        stdio: Stdio,
    ) -> Result<(u64, i32), PodError> {
        let started = self
            .client
            .exec_in_container(ExecInContainer {
                container_id: id.to_owned(),
                process,
                stdio,
            })
            .await?;
        self.mark(&format!("exec in {id}")).await;
        log_not_applied(id, &started.not_applied);
        Ok((started.exec_id, started.pid))
    }

    /// Sends `signal` to container `id`'s init, or to all its processes.
    pub async fn signal(&self, id: &str, signal: i32, all: bool) -> Result<(), PodError> {
        Ok(self.client.signal_container(id, signal, all).await?)
    }

    /// Sends `signal` to the process with exec id `exec_id`.
    pub async fn signal_process(&self, exec_id: u64, signal: i32) -> Result<(), PodError> {
        Ok(self.client.signal(exec_id, signal).await?)
    }

    /// Freezes (`true`) or thaws container `id`.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<(), PodError> {
        Ok(self.client.pause_container(id, pause).await?)
    }

    /// Changes container `id`'s limits in the guest.
    pub async fn update(&self, id: &str, resources: LinuxResources) -> Result<(), PodError> {
        Ok(self.client.update_container(id, resources).await?)
    }

    /// Container `id`'s resource usage.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats, PodError> {
        Ok(self.client.container_stats(id).await?)
    }

    /// The guest pids of container `id`'s processes.
    pub async fn pids(&self, id: &str) -> Result<Vec<i32>, PodError> {
        Ok(self.client.container_pids(id).await?)
    }

    /// Container `id`'s state in the guest.
    pub async fn state(&self, id: &str) -> Result<ContainerState, PodError> {
        Ok(self.client.container_state(id).await?)
    }

    /// Waits for the process with exec id `exec_id` to end.
    pub async fn wait(&self, exec_id: u64) -> Result<ExitStatus, PodError> {
        Ok(self.client.wait(exec_id).await?)
    }

    /// A watch on container `id`'s OOM kills.
    pub fn oom_watch(&self, id: &str) -> OomWatch {
        OomWatch {
            client: self.client.clone(),
            id: id.to_owned(),
            seen: 0,
        }
    }
}

/// A container to create ([`Pod::create_container`]).
pub struct NewContainer<'a> {
    /// Its id.
    pub id: &'a str,
    /// Its bundle (errors name `<bundle>/config.json`).
    pub bundle: &'a Path,
    /// Its spec, as the bundle has it.
    pub spec: &'a Spec,
    /// Its root file system on the host.
    pub rootfs: &'a Path,
    /// Its init's stdio.
    pub stdio: Stdio,
    /// Maps a pid in the spec's namespace paths (`/proc/<pid>/ns/...`, a
    /// pid the front end reported for a container of this pod) to its
    /// guest pid.
    pub guest_pid: &'a (dyn Fn(i32) -> Option<i32> + Sync),
}

/// A container created in the guest whose create has not finished: its
/// create hooks have not run. [`Creating::finish`] runs them;
/// [`Creating::abort`] undoes the create. Dropped unfinished, it is undone
/// as far as can be without waiting (the share and the members; the guest
/// container is deleted in the background).
pub struct Creating<'p> {
    pod: &'p Pod,
    id: String,
    /// The init's exec id, for its stdio streams and `wait`.
    pub exec_id: u64,
    /// The init's guest pid.
    pub guest_pid: i32,
    in_share: bool,
    in_guest: bool,
}

impl Creating<'_> {
    /// Runs the create hooks (prestart, createRuntime, createContainer)
    /// with `pid`, the pid the front end reports; a failure undoes the
    /// create.
    pub async fn finish(mut self, hooks: &ContainerHooks, pid: i32) -> Result<(), PodError> {
        for stage in Stage::CREATE {
            if let Err(e) = hooks.run(stage, "created", pid).await {
                self.undo().await;
                return Err(e);
            }
        }
        // The hooks may have configured the namespace rtv made for the
        // pod (Docker's libnetwork-setkey moves the container's veth in):
        // the guest gets it before the container starts.
        if let Err(e) = self.pod.network_after_hooks().await {
            self.undo().await;
            return Err(e);
        }
        self.in_guest = false;
        self.in_share = false;
        self.id.clear();
        Ok(())
    }

    /// Undoes the create.
    pub async fn abort(mut self) {
        self.undo().await;
    }

    async fn undo(&mut self) {
        if self.id.is_empty() {
            return;
        }
        if self.in_guest {
            self.pod.remove_container(&self.id).await;
        } else if self.in_share {
            self.pod.share.remove_container(&self.id);
        }
        if let Err(e) = self.pod.leave(&self.id, false) {
            tracing::warn!(pod = %self.pod.id, id = %self.id, "undoing a create: {e}");
        }
        self.id.clear();
    }
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        tracing::warn!(id = %self.id, "a create was dropped unfinished: undoing it");
        if self.in_guest {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (client, id) = (self.pod.client.clone(), self.id.clone());
                rt.spawn(async move {
                    let _ = client.delete_container(&id, true).await;
                });
            }
        }
        if self.in_share || self.in_guest {
            self.pod.share.remove_container(&self.id);
        }
        let _ = self.pod.leave(&self.id, false);
    }
}

/// A container's OCI hooks and what their state JSON says of it. They run
/// on the host (the container's namespaces are the guest's).
#[derive(Debug, Clone)]
pub struct ContainerHooks {
    /// The container's id.
    pub id: String,
    /// Its bundle.
    pub bundle: PathBuf,
    /// Its annotations.
    pub annotations: HashMap<String, String>,
    /// Its hooks.
    pub hooks: Option<Hooks>,
}

impl ContainerHooks {
    /// The hooks of container `id` with `spec` in `bundle`.
    pub fn of(id: &str, bundle: &Path, spec: &Spec) -> Self {
        Self {
            id: id.to_owned(),
            bundle: bundle.to_path_buf(),
            annotations: spec.annotations().clone().unwrap_or_default(),
            hooks: spec.hooks().clone(),
        }
    }

    /// The OCI state JSON with `status` and `pid`.
    pub fn state(&self, status: &str, pid: i32) -> serde_json::Value {
        hooks::state(&self.id, status, pid, &self.bundle, &self.annotations)
    }

    /// Runs the hooks of `stage` on a blocking thread (a hook may run
    /// until its timeout).
    pub async fn run(&self, stage: Stage, status: &str, pid: i32) -> Result<(), PodError> {
        let Some(hooks) = self
            .hooks
            .clone()
            .filter(|h| stage.of(h).is_some_and(|l| !l.is_empty()))
        else {
            return Ok(());
        };
        let state = self.state(status, pid).to_string().into_bytes();
        tokio::task::spawn_blocking(move || hooks::run(stage, Some(&hooks), &state))
            .await
            .map_err(|e| PodError::Invalid(format!("hooks.{stage}: {e}")))??;
        Ok(())
    }

    /// Runs the hooks of `stage`; a failure is only logged.
    pub async fn run_logged(&self, stage: Stage, status: &str, pid: i32) {
        if let Err(e) = self.run(stage, status, pid).await {
            tracing::warn!(id = %self.id, "{e}");
        }
    }
}

/// OOM kills in one container, as the agent reports them (it sleeps in the
/// guest until the kernel reports a kill; nothing is polled).
pub struct OomWatch {
    client: Arc<AgentClient>,
    id: String,
    seen: u64,
}

impl OomWatch {
    /// Waits for the next OOM kill: the container's kill count then, or
    /// `None` once its processes are gone (or it is).
    pub async fn next(&mut self) -> Option<u64> {
        match self.client.wait_oom(&self.id, self.seen).await {
            Ok(state) if state.oom_kills > self.seen => {
                self.seen = state.oom_kills;
                Some(state.oom_kills)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(id = %self.id, "no more OOM reports: {e}");
                None
            }
        }
    }

    /// The kills reported so far, plus any the container's final state
    /// shows (a last look when it has ended, so a kill that ended it is
    /// counted before its exit is reported).
    pub async fn last_count(&mut self) -> u64 {
        if let Ok(state) = self.client.container_state(&self.id).await {
            self.seen = self.seen.max(state.oom_kills);
        }
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_rule_for_pods() {
        let sb = annotations(&[(CRI_TYPE, "sandbox"), (CRI_SANDBOX, "pod1")]);
        assert_eq!(Role::of(&sb), Role::Sandbox);
        assert_eq!(Role::of(&sb).pod_id("pod1"), "pod1");
        let member = annotations(&[(CRI_TYPE, "container"), (CRI_SANDBOX, "pod1")]);
        assert_eq!(Role::of(&member), Role::Member("pod1".into()));
        assert_eq!(Role::of(&member).pod_id("c1"), "pod1");
        assert_eq!(Role::of(&HashMap::new()), Role::Standalone);
        assert_eq!(Role::of(&HashMap::new()).pod_id("c2"), "c2");
        for no_pod in [
            annotations(&[(CRI_TYPE, "container")]),
            annotations(&[(CRI_TYPE, "container"), (CRI_SANDBOX, "")]),
        ] {
            assert_eq!(Role::of(&no_pod), Role::Standalone);
        }
    }

    #[test]
    fn agent_errors_are_classified() {
        let agent = |kind| {
            PodError::from(ClientError::Agent {
                kind,
                message: "m".into(),
            })
        };
        assert_eq!(
            agent(ErrorKind::NoSuchContainer).class(),
            ErrorClass::NotFound
        );
        assert_eq!(
            agent(ErrorKind::InvalidState).class(),
            ErrorClass::InvalidState
        );
        assert_eq!(agent(ErrorKind::TimedOut).class(), ErrorClass::TimedOut);
        assert_eq!(
            agent(ErrorKind::InvalidRequest).class(),
            ErrorClass::InvalidArgument
        );
        assert_eq!(
            PodError::from(ClientError::Disconnected).class(),
            ErrorClass::Unavailable
        );
        let e = PodError::Agent {
            context: Some("/b/config.json".into()),
            source: ClientError::Agent {
                kind: ErrorKind::InvalidRequest,
                message: "process.cwd: bad".into(),
            },
        };
        assert_eq!(e.to_string(), "/b/config.json: process.cwd: bad");
    }

    #[tokio::test]
    async fn a_failing_hook_is_an_error_naming_it() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "hooks": {"startContainer": [
                {"path": "/bin/sh", "args": ["sh", "-c", "cat >/dev/null; echo nope >&2; exit 3"]}
            ]}
        }))
        .unwrap();
        let hooks = ContainerHooks::of("c1", Path::new("/b"), &spec);
        let e = hooks
            .run(Stage::StartContainer, "created", 1)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "hooks.startContainer[0] (/bin/sh) failed: exit status: 3: nope"
        );
        assert_eq!(e.class(), ErrorClass::Internal);
        // Other lists, and no hooks at all, run nothing.
        hooks.run(Stage::Poststart, "running", 1).await.unwrap();
        let none = ContainerHooks::of("c1", Path::new("/b"), &Spec::default());
        none.run(Stage::Prestart, "created", 1).await.unwrap();
    }

    /// A pod's record with no members yet.
    fn record(id: &str, mem_mib: u64) -> PodRecord {
        PodRecord {
            id: id.into(),
            vmm_pid: 1,
            vmm_start: 0,
            mem_mib,
            vcpus: 1,
            host_cgroups: Vec::new(),
            members: Vec::new(),
            member_memory_mib: Default::default(),
            stopping: false,
            profile: None,
            profile_parts: 0,
            vmm_cpus: None,
            network: None,
        }
    }

    #[test]
    fn members_are_recorded_under_a_lock() {
        let dir = std::env::temp_dir().join(format!("rtv-pod-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_record(&dir, &record("p", 128)).unwrap();
        join_members(&dir, "a", None).unwrap();
        join_members(&dir, "b", None).unwrap();
        let dup = join_members(&dir, "a", None).unwrap_err();
        assert_eq!(dup.class(), ErrorClass::AlreadyExists, "{dup}");
        assert_eq!(read_record(&dir).unwrap().members, ["a", "b"]);
        assert!(!leave_members(&dir, "a", true).unwrap());
        // An undone create leaves the pod open.
        assert!(leave_members(&dir, "b", false).unwrap());
        assert!(!read_record(&dir).unwrap().stopping);
        join_members(&dir, "b", None).unwrap();
        assert!(leave_members(&dir, "b", true).unwrap());
        let late = join_members(&dir, "c", None).unwrap_err();
        assert_eq!(late.class(), ErrorClass::InvalidState, "{late}");
        assert!(read_record(&dir).unwrap().stopping);
        assert!(matches!(
            read_record(Path::new("/nonexistent")),
            Err(PodError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_members_memory_limit_must_fit_what_the_vm_has_left() {
        let dir = std::env::temp_dir().join(format!("rtv-pod-fit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_record(&dir, &record("p", 664)).unwrap();
        // The pod's own container is what the VM was sized for.
        join_members(&dir, "p", None).unwrap();
        join_members(&dir, "a", Some(300)).unwrap();
        join_members(&dir, "b", Some(300)).unwrap();
        let e = join_members(&dir, "c", Some(1)).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidArgument, "{e}");
        let text = e.to_string();
        for part in [
            "container c's memory limit of 1 MiB",
            "pod's VM of 664 MiB",
            "600 MiB the limits of its other containers, 0 MiB are left",
        ] {
            assert!(text.contains(part), "want {part:?} in: {text}");
        }
        assert_eq!(read_record(&dir).unwrap().members, ["p", "a", "b"]);
        // A container without a limit joins; one that leaves gives its room
        // back.
        join_members(&dir, "unlimited", None).unwrap();
        assert!(!leave_members(&dir, "a", true).unwrap());
        join_members(&dir, "c", Some(300)).unwrap();
        let e = join_members(&dir, "d", Some(4096)).unwrap_err();
        assert!(e.to_string().contains("4096 MiB"), "{e}");
        // A pod made by the container itself is never refused it.
        let qdir = dir.join("q");
        std::fs::create_dir_all(&qdir).unwrap();
        write_record(&qdir, &record("q", 128)).unwrap();
        join_members(&qdir, "q", Some(1000)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
