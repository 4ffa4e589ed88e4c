//! containerd's task service (`containerd.task.v2.Task`) over one pod's VM.
//!
//! The first container a shim creates makes the VM (a [`Sandbox`] from a
//! template, sized from that container's spec), with the virtio-fs share
//! in the pod's state directory; the pod's other containers join it. Every
//! call runs on the shim's tokio runtime (the VMM is started from one of
//! its worker threads, which live as long as the shim: the VMM gets
//! SIGTERM when the thread that started it ends). The shim process owns
//! the VM: deleting the last container stops it, and a shim that dies
//! takes it along.
//!
//! Pids reported to containerd are guest pids (the init's is the task's
//! pid, `ctr task ps` lists the container's processes in the guest), so a
//! CRI container's namespace paths `/proc/<sandbox pid>/ns/<type>` are the
//! guest paths of the pod sandbox's namespaces.
//!
//! The spec's OCI hooks run on the host, as `rtv` runs them (the
//! container's namespaces are the guest's): prestart, createRuntime and
//! createContainer at the init's Create, once the container exists in the
//! guest (a failure undoes the create); startContainer before the init
//! starts (a failure fails Start), poststart after it started, poststop
//! once its Delete removed it (failures of these two are only logged).

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim::protos::shim::shim::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest,
    WaitResponse,
};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::empty::Empty;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use oci_spec::runtime::{Hooks, LinuxResources, Process, Spec};
use rtv_protocol::{CreateContainer, ErrorKind, ExecInContainer, WindowSize};
use rtv_runtime::hooks::{self, Stage};
use rtv_runtime::sandbox::{Sandbox, SandboxConfig, VSOCK_FILE};
use rtv_runtime::{AgentClient, ClientError, Endpoint, Share};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::events::{timestamp, Event, Events};
use crate::guest::{self, Role};
use crate::mount;
use crate::stdio::{self, Relays, StdinRelay, StdioPaths};

/// How long the agent may take to answer a new connection.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process's output may stay open after it ended.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// How long the VM may take to power off before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The exit status reported for processes whose VM went away.
const LOST_STATUS: u32 = 128 + 9;

/// An error for containerd: a gRPC code and a message.
#[derive(Debug)]
pub struct Error {
    code: Code,
    message: String,
}

impl Error {
    fn new(code: Code, message: impl Display) -> Self {
        Error {
            code,
            message: message.to_string(),
        }
    }
}

fn not_found(m: impl Display) -> Error {
    Error::new(Code::NOT_FOUND, m)
}
fn precondition(m: impl Display) -> Error {
    Error::new(Code::FAILED_PRECONDITION, m)
}
fn invalid(m: impl Display) -> Error {
    Error::new(Code::INVALID_ARGUMENT, m)
}
fn internal(m: impl Display) -> Error {
    Error::new(Code::INTERNAL, m)
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Agent { kind, .. } => match kind {
                ErrorKind::NoSuchContainer | ErrorKind::NoSuchProcess => Code::NOT_FOUND,
                ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorKind::InvalidState => Code::FAILED_PRECONDITION,
                ErrorKind::TimedOut => Code::DEADLINE_EXCEEDED,
                ErrorKind::InvalidRequest | ErrorKind::NotFound | ErrorKind::PermissionDenied => {
                    Code::INVALID_ARGUMENT
                }
                ErrorKind::Other => Code::UNKNOWN,
            },
            ClientError::Unreachable { .. } | ClientError::Disconnected => Code::UNAVAILABLE,
            _ => Code::INTERNAL,
        };
        let message = match e {
            ClientError::Agent { message, .. } => message,
            e => e.to_string(),
        };
        Error { code, message }
    }
}

impl From<stdio::StdioError> for Error {
    fn from(e: stdio::StdioError) -> Self {
        match e {
            stdio::StdioError::Unsupported { .. } => Error::new(Code::UNIMPLEMENTED, e),
            e => internal(e),
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code, e.message))
    }
}

type Result<T> = std::result::Result<T, Error>;

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    status: u32,
    at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Created,
    Running,
    Stopped,
}

/// A container's init (exec id "") or one of its execs.
struct Proc {
    /// Its guest pid (0 until an exec starts).
    pid: u32,
    /// The agent's handle, once it exists.
    agent_id: Option<u64>,
    stdio: StdioPaths,
    /// An exec's process, until it starts.
    spec: Option<Process>,
    state: ProcState,
    exit: watch::Sender<Option<Exit>>,
    stdin: Option<StdinRelay>,
    /// Output relays, until the process's watcher takes them.
    outputs: Vec<JoinHandle<()>>,
}

impl Proc {
    fn new(stdio: StdioPaths) -> Proc {
        Proc {
            pid: 0,
            agent_id: None,
            stdio,
            spec: None,
            state: ProcState::Created,
            exit: watch::channel(None).0,
            stdin: None,
            outputs: Vec::new(),
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

struct Container {
    bundle: String,
    /// The spec's hooks and annotations, for the hooks of Start and Delete.
    hooks: Option<Hooks>,
    annotations: HashMap<String, String>,
    /// The root file system, if the shim mounted it.
    mounted_rootfs: Option<PathBuf>,
    init_pid: i32,
    paused: bool,
    oom_kills: u64,
    procs: HashMap<String, Proc>,
}

impl Container {
    fn init(&self) -> Result<&Proc> {
        self.procs
            .get("")
            .ok_or_else(|| internal("the container has no init process"))
    }

    /// What its hooks of `stage` need: the hooks and the state JSON with
    /// `status` and `pid`.
    fn hook_call(&self, id: &str, stage: Stage, status: &str, pid: u32) -> HookCall {
        HookCall {
            stage,
            hooks: self.hooks.clone(),
            state: hooks::state(
                id,
                status,
                i32::try_from(pid).unwrap_or(0),
                Path::new(&self.bundle),
                &self.annotations,
            ),
        }
    }
}

/// One hook list to run, with the state it gets.
struct HookCall {
    stage: Stage,
    hooks: Option<Hooks>,
    state: serde_json::Value,
}

impl HookCall {
    /// Runs the hooks on the host, on a blocking thread (a hook may run
    /// until its timeout).
    async fn run(self) -> Result<()> {
        let HookCall {
            stage,
            hooks,
            state,
        } = self;
        let Some(hooks) = hooks.filter(|h| stage.of(h).is_some_and(|l| !l.is_empty())) else {
            return Ok(());
        };
        let state = state.to_string().into_bytes();
        let ran =
            tokio::task::spawn_blocking(move || hooks::run(stage, Some(&hooks), &state)).await;
        match ran {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::new(Code::UNKNOWN, e)),
            Err(e) => Err(internal(format!("hooks.{stage}: {e}"))),
        }
    }

    /// Runs the hooks; a failure is only logged.
    async fn run_logged(self, id: &str) {
        if let Err(e) = self.run().await {
            tracing::warn!(id = %id, "{}", e.message);
        }
    }
}

/// The pod's VM.
struct Pod {
    id: String,
    dir: PathBuf,
    sandbox: Option<Sandbox>,
    client: Arc<AgentClient>,
    share: Share,
    host_cgroups: Vec<PathBuf>,
}

#[derive(Default)]
struct State {
    pod: Option<Pod>,
    containers: HashMap<String, Container>,
}

impl State {
    fn container(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    fn container_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    fn proc(&self, id: &str, exec_id: &str) -> Result<&Proc> {
        self.container(id)?
            .procs
            .get(exec_id)
            .ok_or_else(|| not_found(format!("process {exec_id:?} of container {id}")))
    }

    fn proc_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc> {
        self.container_mut(id)?
            .procs
            .get_mut(exec_id)
            .ok_or_else(|| not_found(format!("process {exec_id:?} of container {id}")))
    }

    fn client(&self) -> Result<Arc<AgentClient>> {
        self.pod
            .as_ref()
            .map(|p| p.client.clone())
            .ok_or_else(|| precondition("the pod's VM is not running"))
    }
}

/// What the service shares with its background tasks.
struct Inner {
    namespace: String,
    events: Events,
    exit: Arc<ExitSignal>,
    /// The shim's own socket, removed when it shuts down.
    socket: String,
    state: Mutex<State>,
    /// Serialises creating and deleting containers (and so the VM).
    lifecycle: tokio::sync::Mutex<()>,
}

/// The task service.
pub struct Service {
    rt: Runtime,
    inner: Arc<Inner>,
}

impl Service {
    /// A service publishing to containerd through `publisher`, ending the
    /// shim through `exit`; `socket` is the shim's ttrpc socket.
    pub fn new(
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        socket: String,
    ) -> std::io::Result<Service> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rtv-shim")
            .enable_all()
            .build()?;
        Ok(Service {
            rt,
            inner: Arc::new(Inner {
                events: Events::start(
                    publisher,
                    namespace.clone(),
                    std::env::var("TTRPC_ADDRESS").ok(),
                ),
                namespace,
                exit,
                socket,
                state: Mutex::new(State::default()),
                lifecycle: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Runs a request on a worker thread of the runtime and waits for it.
    fn run<T, Fut>(&self, what: &str, f: impl FnOnce(Arc<Inner>) -> Fut) -> TtrpcResult<T>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let handle = self.rt.spawn(f(self.inner.clone()));
        let result = match self.rt.block_on(handle) {
            Ok(r) => r,
            Err(e) => Err(internal(format!("{what}: {e}"))),
        };
        if let Err(e) = &result {
            tracing::warn!("{what}: {:?}: {}", e.code, e.message);
        }
        result.map_err(Into::into)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client(&self) -> Result<Arc<AgentClient>> {
        self.state().client()
    }

    async fn create(self: Arc<Self>, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        let _lifecycle = self.lifecycle.lock().await;
        let id = req.id.clone();
        if self.state().containers.contains_key(&id) {
            return Err(Error::new(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        let mut undo = Undo::default();
        match self.create_inner(&req, &mut undo).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.undo(&id, undo).await;
                Err(e)
            }
        }
    }

    async fn create_inner(
        self: &Arc<Self>,
        req: &CreateTaskRequest,
        undo: &mut Undo,
    ) -> Result<CreateTaskResponse> {
        let id = &req.id;
        let bundle = PathBuf::from(&req.bundle);
        let config = bundle.join("config.json");
        let spec = rtv_runtime::spec::load(&config).map_err(invalid)?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| invalid(format!("{}: root: missing", config.display())))?;
        let rootfs = bundle.join(root.path());
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| internal(format!("creating {}: {e}", rootfs.display())))?;
            undo.mounted_rootfs = Some(rootfs.clone());
            for m in &req.rootfs {
                mount::mount(&m.type_, &m.source, &m.options, &rootfs).map_err(internal)?;
            }
        }
        if !rootfs.is_dir() {
            return Err(invalid(format!(
                "{}: root.path: {} is not a directory",
                config.display(),
                rootfs.display()
            )));
        }

        let role = Role::of(&spec.annotations().clone().unwrap_or_default());
        let has_pod = self.state().pod.is_some();
        if has_pod {
            let pod_id = self.state().pod.as_ref().map(|p| p.id.clone());
            match (&role, pod_id) {
                (Role::Member(sandbox), Some(pod)) if *sandbox == pod => {}
                (_, pod) => {
                    return Err(precondition(format!(
                        "this shim serves pod {}; container {id} is not one of its containers",
                        pod.unwrap_or_default()
                    )))
                }
            }
        } else {
            if let Role::Member(sandbox) = &role {
                return Err(not_found(format!(
                    "annotation {}: pod sandbox {sandbox} is not served by this shim",
                    guest::CRI_SANDBOX
                )));
            }
            let pod = self.start_pod(id, &spec).await?;
            self.state().pod = Some(pod);
            undo.new_pod = true;
        }

        let (client, share, pod_pids) = {
            let st = self.state();
            let pod = st
                .pod
                .as_ref()
                .ok_or_else(|| internal("the pod's VM went away"))?;
            let pids: Vec<i32> = st.containers.values().map(|c| c.init_pid).collect();
            (pod.client.clone(), pod.share.clone(), pids)
        };
        let shared = share
            .add_container(id, &rootfs, &spec)
            .map_err(|e| invalid(format!("{}: {e}", config.display())))?;
        undo.share = Some(share);
        let guest_spec = guest::guest_spec(shared, id, &pod_pids)
            .map_err(|e| invalid(format!("{}: {e}", config.display())))?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let (agent_id, pid) = client
            .create_container(CreateContainer {
                container_id: id.clone(),
                spec: guest_spec,
                stdio: paths.agent(),
            })
            .await
            .map_err(|e| {
                let mut e = Error::from(e);
                e.message = format!("{}: {}", config.display(), e.message);
                e
            })?;
        undo.agent_container = true;
        let relays = stdio::attach(&client, agent_id, &paths).await?;
        let Relays { stdin, outputs } = relays;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let state = hooks::state(id, "created", pid, &bundle, &annotations);
        for stage in Stage::CREATE {
            let call = HookCall {
                stage,
                hooks: spec.hooks().clone(),
                state: state.clone(),
            };
            if let Err(e) = call.run().await {
                // The undo deletes the container in the guest, which ends
                // its streams; the relays go now.
                drop(stdin);
                for o in &outputs {
                    o.abort();
                }
                return Err(e);
            }
        }
        let mut init = Proc::new(paths.clone());
        init.pid = u32::try_from(pid).unwrap_or(0);
        init.agent_id = Some(agent_id);
        init.stdin = stdin;
        init.outputs = outputs;
        {
            let mut st = self.state();
            st.containers.insert(
                id.clone(),
                Container {
                    bundle: req.bundle.clone(),
                    hooks: spec.hooks().clone(),
                    annotations,
                    mounted_rootfs: undo.mounted_rootfs.take(),
                    init_pid: pid,
                    paused: false,
                    oom_kills: 0,
                    procs: HashMap::from([(String::new(), init)]),
                },
            );
            self.events.send(Event::Create(TaskCreate {
                container_id: id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: paths.stdin,
                    stdout: paths.stdout,
                    stderr: paths.stderr,
                    terminal: paths.terminal,
                    ..Default::default()
                }),
                pid: u32::try_from(pid).unwrap_or(0),
                ..Default::default()
            }));
        }
        *undo = Undo::default();
        tracing::info!(id = %id, pid, "created");
        Ok(CreateTaskResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    /// Starts the pod's VM, sized from `spec` (the pod's sandbox container's,
    /// or a lone container's).
    async fn start_pod(&self, id: &str, spec: &Spec) -> Result<Pod> {
        let arts = guest::artifacts().map_err(precondition)?;
        let size = rtv_runtime::spec::vm_size(spec, rtv_runtime::spec::host_cpus());
        let dir = guest::state_dir(Path::new(guest::STATE_ROOT), &self.namespace, id);
        // What a dead shim of the same pod left.
        rtv_runtime::remove_tree(&dir).map_err(internal)?;
        let share_dir = dir.join("share");
        std::fs::create_dir_all(&share_dir)
            .map_err(|e| internal(format!("creating {}: {e}", share_dir.display())))?;
        let hostname = spec
            .hostname()
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| id.chars().take(63).collect());
        let mut cfg = SandboxConfig::new(arts.kernel, arts.initramfs, arts.vmm, &dir, hostname, 3);
        cfg.mem_mib = size.mem_mib;
        cfg.vcpus = size.vcpus;
        cfg.shared_dir = Some(share_dir.clone());
        cfg.template_dir = Some(guest::template_dir());
        let started = match Sandbox::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                let _ = rtv_runtime::remove_tree(&dir);
                return Err(internal(format!("starting the pod's VM: {e}")));
            }
        };
        tracing::info!(
            pod = %id,
            vmm_pid = started.pid(),
            mem_mib = size.mem_mib,
            vcpus = size.vcpus,
            origin = ?started.origin(),
            ready_after = ?started.ready_after(),
            "VM ready"
        );
        let mut pod = Pod {
            id: id.to_owned(),
            dir: dir.clone(),
            client: Arc::new(
                match AgentClient::connect(Endpoint::vm(dir.join(VSOCK_FILE)), AGENT_TIMEOUT).await
                {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started.stop(STOP_TIMEOUT).await;
                        let _ = rtv_runtime::remove_tree(&dir);
                        return Err(e.into());
                    }
                },
            ),
            share: Share::new(&share_dir).map_err(internal)?,
            host_cgroups: Vec::new(),
            sandbox: Some(started),
        };
        // The VMM is accounted in the pod's host cgroup.
        if let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
            let vmm = pod.sandbox.as_ref().map_or(0, |s| s.pid() as i32);
            match rtv_runtime::host_cgroup::join(&path.to_string_lossy(), vmm) {
                Ok(dirs) => pod.host_cgroups = dirs,
                Err(e) => {
                    stop_pod(pod).await;
                    return Err(invalid(format!("linux.cgroupsPath: {e}")));
                }
            }
        }
        Ok(pod)
    }

    async fn undo(&self, id: &str, undo: Undo) {
        let client = self.client().ok();
        if undo.agent_container {
            if let Some(c) = &client {
                if let Err(e) = c.delete_container(id, true).await {
                    tracing::warn!(id = %id, "undoing create: {e}");
                }
            }
        }
        if let Some(share) = undo.share {
            share.remove_container(id);
        }
        if let Some(rootfs) = undo.mounted_rootfs {
            mount::unmount_all(&rootfs);
        }
        if undo.new_pod {
            let pod = self.state().pod.take();
            if let Some(pod) = pod {
                stop_pod(pod).await;
            }
        }
    }

    async fn start(self: Arc<Self>, req: StartRequest) -> Result<StartResponse> {
        let (id, exec_id) = (req.id, req.exec_id);
        let (client, agent_id, spec, paths) = {
            let mut st = self.state();
            let client = st.client()?;
            let p = st.proc_mut(&id, &exec_id)?;
            if p.state != ProcState::Created {
                return Err(precondition(format!(
                    "process {exec_id:?} of container {id} was started already"
                )));
            }
            (client, p.agent_id, p.spec.take(), p.stdio.clone())
        };
        if exec_id.is_empty() {
            let agent_id = agent_id.ok_or_else(|| internal("the init has no agent handle"))?;
            let (start_hooks, poststart) = {
                let st = self.state();
                let c = st.container(&id)?;
                let pid = c.init()?.pid;
                (
                    c.hook_call(&id, Stage::StartContainer, "created", pid),
                    c.hook_call(&id, Stage::Poststart, "running", pid),
                )
            };
            start_hooks.run().await?;
            client.start_container(&id).await?;
            let (pid, outputs) = {
                let mut st = self.state();
                let p = st.proc_mut(&id, "")?;
                p.state = ProcState::Running;
                let r = (p.pid, std::mem::take(&mut p.outputs));
                self.events.send(Event::Start(TaskStart {
                    container_id: id.clone(),
                    pid: r.0,
                    ..Default::default()
                }));
                r
            };
            tokio::spawn(watch_oom(Arc::downgrade(&self), client.clone(), id.clone()));
            tokio::spawn(watch_process(
                self.clone(),
                client,
                id.clone(),
                String::new(),
                agent_id,
                outputs,
            ));
            poststart.run_logged(&id).await;
            tracing::info!(id = %id, pid, "started");
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        let Some(process) = spec else {
            return Err(internal("the exec has no process"));
        };
        let started = client
            .exec_in_container(ExecInContainer {
                container_id: id.clone(),
                process: process.clone(),
                stdio: paths.agent(),
            })
            .await;
        let (agent_id, pid) = match started {
            Ok(s) => s,
            Err(e) => {
                // The exec may be started again.
                if let Ok(p) = self.state().proc_mut(&id, &exec_id) {
                    p.spec = Some(process);
                }
                return Err(e.into());
            }
        };
        let pid = u32::try_from(pid).unwrap_or(0);
        let relays = match stdio::attach(&client, agent_id, &paths).await {
            Ok(r) => r,
            Err(e) => {
                let _ = client.signal(agent_id, libc::SIGKILL).await;
                return Err(e.into());
            }
        };
        {
            let mut st = self.state();
            let p = st.proc_mut(&id, &exec_id)?;
            p.agent_id = Some(agent_id);
            p.pid = pid;
            p.state = ProcState::Running;
            p.stdin = relays.stdin;
            self.events.send(Event::ExecStarted(TaskExecStarted {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                pid,
                ..Default::default()
            }));
        }
        tokio::spawn(watch_process(
            self.clone(),
            client,
            id.clone(),
            exec_id.clone(),
            agent_id,
            relays.outputs,
        ));
        tracing::info!(id = %id, exec_id = %exec_id, pid, "exec started");
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// Reports a new OOM kill in container `id`, if there was one.
    async fn check_oom(&self, client: &AgentClient, id: &str) {
        if let Ok(state) = client.container_state(id).await {
            self.note_oom_kills(id, state.oom_kills);
        }
    }

    /// Publishes `TaskOOM` for container `id` if `kills` is more OOM kills
    /// than it has reported so far.
    fn note_oom_kills(&self, id: &str, kills: u64) {
        let mut st = self.state();
        if let Ok(c) = st.container_mut(id) {
            if kills > c.oom_kills {
                c.oom_kills = kills;
                tracing::info!(id = %id, kills, "OOM kill");
                self.events.send(Event::Oom(TaskOOM {
                    container_id: id.to_owned(),
                    ..Default::default()
                }));
            }
        }
    }

    async fn delete(self: Arc<Self>, req: DeleteRequest) -> Result<DeleteResponse> {
        let (id, exec_id) = (req.id, req.exec_id);
        if !exec_id.is_empty() {
            let mut st = self.state();
            let c = st.container_mut(&id)?;
            let p = c
                .procs
                .get(&exec_id)
                .ok_or_else(|| not_found(format!("process {exec_id:?} of container {id}")))?;
            if p.state == ProcState::Running {
                return Err(precondition(format!(
                    "cannot delete process {exec_id:?}: it is running"
                )));
            }
            let exit = p.exited();
            let pid = p.pid;
            c.procs.remove(&exec_id);
            return Ok(delete_response(pid, exit));
        }
        let _lifecycle = self.lifecycle.lock().await;
        let (client, state, exit, pid) = {
            let st = self.state();
            let init = st.container(&id)?.init()?;
            if init.state == ProcState::Running {
                return Err(precondition(format!(
                    "cannot delete container {id}: it is running"
                )));
            }
            (st.client().ok(), init.state, init.exited(), init.pid)
        };
        if let Some(client) = &client {
            if let Err(e) = client.delete_container(&id, true).await {
                tracing::warn!(id = %id, "deleting in the guest: {e}");
            }
        }
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        let (container, last) = {
            let mut st = self.state();
            let c = st.containers.remove(&id);
            if let Some(pod) = &st.pod {
                pod.share.remove_container(&id);
            }
            let last = st.containers.is_empty();
            (c, last)
        };
        let poststop = container
            .as_ref()
            .map(|c| c.hook_call(&id, Stage::Poststop, "stopped", 0));
        if let Some(c) = container {
            if let Some(rootfs) = &c.mounted_rootfs {
                mount::unmount_all(rootfs);
            }
            // A created container that never ran: its waiters learn it ended.
            if state == ProcState::Created {
                for p in c.procs.values() {
                    p.exit.send_replace(Some(exit));
                }
            }
        }
        self.events.send(Event::Delete(TaskDelete {
            container_id: id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        }));
        if last {
            let pod = self.state().pod.take();
            if let Some(pod) = pod {
                tracing::info!(pod = %pod.id, "last container deleted: stopping the VM");
                stop_pod(pod).await;
            }
        }
        if let Some(poststop) = poststop {
            poststop.run_logged(&id).await;
        }
        tracing::info!(id = %id, "deleted");
        Ok(delete_response(pid, Some(exit)))
    }

    async fn exec(self: Arc<Self>, req: ExecProcessRequest) -> Result<Empty> {
        let (id, exec_id) = (req.id, req.exec_id);
        if exec_id.is_empty() {
            return Err(invalid("an exec needs an exec id"));
        }
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| invalid("the exec has no process spec"))?;
        let de = &mut serde_json::Deserializer::from_slice(&any.value);
        let process: Process = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(format!("the exec's process: {}: {}", e.path(), e.inner())))?;
        let mut st = self.state();
        let c = st.container_mut(&id)?;
        if c.init()?.state != ProcState::Running {
            return Err(precondition(format!(
                "cannot exec in container {id}: it is not running"
            )));
        }
        if c.procs.contains_key(&exec_id) {
            return Err(Error::new(
                Code::ALREADY_EXISTS,
                format!("exec {exec_id} of container {id} exists already"),
            ));
        }
        let mut p = Proc::new(StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        });
        p.spec = Some(process);
        c.procs.insert(exec_id.clone(), p);
        self.events.send(Event::ExecAdded(TaskExecAdded {
            container_id: id,
            exec_id,
            ..Default::default()
        }));
        Ok(Empty::new())
    }

    async fn kill(self: Arc<Self>, req: KillRequest) -> Result<Empty> {
        let (id, exec_id) = (req.id, req.exec_id);
        let signal =
            i32::try_from(req.signal).map_err(|_| invalid(format!("signal {}", req.signal)))?;
        let (client, agent_id) = {
            let st = self.state();
            let p = st.proc(&id, &exec_id)?;
            if p.state == ProcState::Stopped {
                return Err(not_found(format!(
                    "process {exec_id:?} of container {id} already finished"
                )));
            }
            (st.client()?, p.agent_id)
        };
        let sent = if exec_id.is_empty() {
            client.signal_container(&id, signal, req.all).await
        } else {
            let agent_id =
                agent_id.ok_or_else(|| precondition(format!("exec {exec_id} has not started")))?;
            client.signal(agent_id, signal).await
        };
        match sent {
            Ok(()) => Ok(Empty::new()),
            Err(ClientError::Agent {
                kind: ErrorKind::InvalidState | ErrorKind::NoSuchProcess,
                message,
            }) => Err(not_found(format!("process already finished: {message}"))),
            Err(e) => Err(e.into()),
        }
    }

    async fn state_of(self: Arc<Self>, req: StateRequest) -> Result<StateResponse> {
        let st = self.state();
        let c = st.container(&req.id)?;
        let p = st.proc(&req.id, &req.exec_id)?;
        let exit = p.exited();
        let status = match p.state {
            ProcState::Created => Status::CREATED,
            ProcState::Running if c.paused => Status::PAUSED,
            ProcState::Running => Status::RUNNING,
            ProcState::Stopped => Status::STOPPED,
        };
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: p.pid,
            status: EnumOrUnknown::new(status),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map_or(MessageField::none(), |e| {
                MessageField::some(timestamp(e.at))
            }),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn pids(self: Arc<Self>, req: PidsRequest) -> Result<PidsResponse> {
        let (client, stopped) = {
            let st = self.state();
            let init = st.container(&req.id)?.init()?;
            (st.client()?, init.state == ProcState::Stopped)
        };
        if stopped {
            return Ok(PidsResponse::new());
        }
        let pids = client.container_pids(&req.id).await?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .filter_map(|p| u32::try_from(p).ok())
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(self: Arc<Self>, id: String, pause: bool) -> Result<Empty> {
        let client = {
            let st = self.state();
            let c = st.container(&id)?;
            if c.init()?.state != ProcState::Running || c.paused == pause {
                return Err(precondition(format!(
                    "container {id} is not {}",
                    if pause { "running" } else { "paused" }
                )));
            }
            st.client()?
        };
        client.pause_container(&id, pause).await?;
        let mut st = self.state();
        st.container_mut(&id)?.paused = pause;
        self.events.send(if pause {
            Event::Paused(TaskPaused {
                container_id: id,
                ..Default::default()
            })
        } else {
            Event::Resumed(TaskResumed {
                container_id: id,
                ..Default::default()
            })
        });
        Ok(Empty::new())
    }

    async fn close_io(self: Arc<Self>, req: CloseIORequest) -> Result<Empty> {
        if req.stdin {
            let mut st = self.state();
            if let Some(s) = st.proc_mut(&req.id, &req.exec_id)?.stdin.as_mut() {
                s.close();
            }
        }
        Ok(Empty::new())
    }

    async fn resize_pty(self: Arc<Self>, req: ResizePtyRequest) -> Result<Empty> {
        let (client, agent_id) = {
            let st = self.state();
            let p = st.proc(&req.id, &req.exec_id)?;
            if !p.stdio.terminal {
                return Err(precondition("the process has no terminal"));
            }
            (st.client()?, p.agent_id)
        };
        let agent_id = agent_id.ok_or_else(|| precondition("the process has not started"))?;
        let size = WindowSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        client.resize(agent_id, size).await?;
        Ok(Empty::new())
    }

    async fn update(self: Arc<Self>, req: UpdateTaskRequest) -> Result<Empty> {
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| invalid("no resources given"))?;
        let de = &mut serde_json::Deserializer::from_slice(&any.value);
        let resources: LinuxResources = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(format!("resources: {}: {}", e.path(), e.inner())))?;
        let client = {
            let st = self.state();
            st.container(&req.id)?;
            st.client()?
        };
        client.update_container(&req.id, resources).await?;
        Ok(Empty::new())
    }

    async fn wait(self: Arc<Self>, req: WaitRequest) -> Result<WaitResponse> {
        let mut rx = self.state().proc(&req.id, &req.exec_id)?.exit.subscribe();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => *e,
            Err(_) => None,
        };
        let exit = exit.ok_or_else(|| {
            not_found(format!(
                "process {:?} of container {} was deleted",
                req.exec_id, req.id
            ))
        })?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(self: Arc<Self>, req: StatsRequest) -> Result<StatsResponse> {
        let client = {
            let st = self.state();
            st.container(&req.id)?;
            st.client()?
        };
        let s = client.container_stats(&req.id).await?;
        let metrics = Metrics {
            pids: MessageField::some(PidsStat {
                current: s.pids,
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: s.memory_bytes,
                usage_limit: s.memory_limit_bytes.unwrap_or(u64::MAX),
                ..Default::default()
            }),
            memory_events: MessageField::some(MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics)).map_err(internal)?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(self: Arc<Self>, req: ConnectRequest) -> Result<ConnectResponse> {
        let task_pid = self
            .state()
            .containers
            .get(&req.id)
            .map_or(0, |c| u32::try_from(c.init_pid).unwrap_or(0));
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(self: Arc<Self>) -> Result<Empty> {
        let _lifecycle = self.lifecycle.lock().await;
        let left = self.state().containers.len();
        if left > 0 {
            tracing::debug!(left, "shutdown: containers remain, the shim stays");
            return Ok(Empty::new());
        }
        let pod = self.state().pod.take();
        if let Some(pod) = pod {
            stop_pod(pod).await;
        }
        let socket = self
            .socket
            .strip_prefix("unix://")
            .unwrap_or(&self.socket)
            .to_owned();
        if !socket.is_empty() {
            let _ = std::fs::remove_file(&socket);
        }
        self.events.flush(Duration::from_secs(5));
        tracing::info!("shutting down");
        self.exit.signal();
        Ok(Empty::new())
    }
}

fn delete_response(pid: u32, exit: Option<Exit>) -> DeleteResponse {
    DeleteResponse {
        pid,
        exit_status: exit.map_or(0, |e| e.status),
        exited_at: MessageField::some(timestamp(exit.map_or_else(SystemTime::now, |e| e.at))),
        ..Default::default()
    }
}

/// What a failed create undoes.
#[derive(Default)]
struct Undo {
    mounted_rootfs: Option<PathBuf>,
    new_pod: bool,
    share: Option<Share>,
    agent_container: bool,
}

/// Powers the pod's VM off (killing it if it does not stop) and removes
/// its state directory and host cgroups.
async fn stop_pod(mut pod: Pod) {
    if let Some(sandbox) = pod.sandbox.take() {
        match sandbox.stop(STOP_TIMEOUT).await {
            Ok(status) => tracing::info!(pod = %pod.id, "VM stopped ({status})"),
            Err(e) => tracing::warn!(pod = %pod.id, "stopping the VM: {e}"),
        }
    }
    drop(pod.client);
    if let Err(e) = rtv_runtime::remove_tree(&pod.dir) {
        tracing::warn!(pod = %pod.id, "{e}");
    }
    rtv_runtime::host_cgroup::remove(&pod.host_cgroups);
}

/// Waits for a process to end, lets its output drain, records its exit
/// and tells containerd.
async fn watch_process(
    inner: Arc<Inner>,
    client: Arc<AgentClient>,
    id: String,
    exec_id: String,
    agent_id: u64,
    outputs: Vec<JoinHandle<()>>,
) {
    let status = match client.wait(agent_id).await {
        Ok(s) => u32::try_from(s.code()).unwrap_or(LOST_STATUS),
        Err(e) => {
            tracing::warn!(id = %id, exec_id = %exec_id, "waiting in the guest: {e}");
            LOST_STATUS
        }
    };
    stdio::drain(outputs, OUTPUT_DRAIN).await;
    if exec_id.is_empty() {
        // TaskOOM before TaskExit, as containerd's CRI wants to tell an
        // OOM kill from an ordinary exit.
        inner.check_oom(&client, &id).await;
    }
    let exit = Exit {
        status,
        at: SystemTime::now(),
    };
    let mut st = inner.state();
    let Ok(p) = st.proc_mut(&id, &exec_id) else {
        return;
    };
    p.state = ProcState::Stopped;
    // The exit event goes out before Wait returns (and so before any
    // delete that follows it).
    inner.events.send(Event::Exit(TaskExit {
        container_id: id.clone(),
        id: if exec_id.is_empty() {
            id.clone()
        } else {
            exec_id.clone()
        },
        pid: p.pid,
        exit_status: status,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    }));
    p.exit.send_replace(Some(exit));
    tracing::info!(id = %id, exec_id = %exec_id, status, "exited");
}

/// Reports OOM kills in container `id` as they happen: the agent answers
/// `WaitOom` when the kernel reports a kill in the container's cgroup (it
/// sleeps in the guest meanwhile, nothing is polled), or when the
/// container's processes are gone, which ends the watch.
async fn watch_oom(inner: Weak<Inner>, client: Arc<AgentClient>, id: String) {
    let mut seen = 0;
    loop {
        match client.wait_oom(&id, seen).await {
            Ok(state) => {
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                inner.note_oom_kills(&id, state.oom_kills);
                if state.oom_kills <= seen {
                    return;
                }
                seen = state.oom_kills;
            }
            Err(e) => {
                tracing::debug!(id = %id, "no more OOM reports: {e}");
                return;
            }
        }
    }
}

impl Task for Service {
    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.run("state", |i| i.state_of(req))
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, terminal = req.terminal, "create");
        self.run("create", |i| i.create(req))
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::debug!(id = %req.id, exec_id = %req.exec_id, "start");
        self.run("start", |i| i.start(req))
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::debug!(id = %req.id, exec_id = %req.exec_id, "delete");
        self.run("delete", |i| i.delete(req))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        self.run("pids", |i| i.pids(req))
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.run("pause", |i| i.pause(req.id, true))
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.run("resume", |i| i.pause(req.id, false))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::debug!(id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        self.run("kill", |i| i.kill(req))
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::debug!(id = %req.id, exec_id = %req.exec_id, "exec");
        self.run("exec", |i| i.exec(req))
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.run("resize_pty", |i| i.resize_pty(req))
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.run("close_io", |i| i.close_io(req))
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.run("update", |i| i.update(req))
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        self.run("wait", |i| i.wait(req))
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        self.run("stats", |i| i.stats(req))
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        self.run("connect", |i| i.connect(req))
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.run("shutdown", |i| i.shutdown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(stage: Stage, hooks: serde_json::Value) -> HookCall {
        HookCall {
            stage,
            hooks: Some(serde_json::from_value(hooks).expect("a hooks object")),
            state: serde_json::json!({"id": "c1"}),
        }
    }

    #[test]
    fn a_failing_hook_is_an_error_naming_it() {
        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        let hooks = serde_json::json!({"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "cat >/dev/null; echo nope >&2; exit 3"]}
        ]});
        let e = rt
            .block_on(call(Stage::StartContainer, hooks.clone()).run())
            .expect_err("the hook fails");
        assert_eq!(e.code, Code::UNKNOWN);
        assert_eq!(
            e.message,
            "hooks.startContainer[0] (/bin/sh) failed: exit status: 3: nope"
        );
        // Other lists, and no hooks at all, run nothing.
        rt.block_on(call(Stage::Poststart, hooks).run())
            .expect("no poststart hooks");
        let none = HookCall {
            stage: Stage::Prestart,
            hooks: None,
            state: serde_json::Value::Null,
        };
        rt.block_on(none.run()).expect("no hooks");
    }
}
