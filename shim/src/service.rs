//! containerd's task service (`containerd.task.v2.Task`) over one pod.
//!
//! The pod lifecycle is the runtime library's ([`rtv_runtime::pod`]): the
//! first container a shim creates starts the pod's VM (sized from its
//! spec) in the pod's state directory, the pod's other containers join it,
//! and deleting the last one stops it. What stays here is containerd's
//! side: the task API over ttrpc, its events, the stdio FIFOs, the root
//! file system mounts containerd hands over, and the bookkeeping of
//! processes by exec id that containerd expects. Every call runs on the
//! shim's tokio runtime (the VMM is started from one of its worker
//! threads, which live as long as the shim: the VMM gets SIGTERM when the
//! thread that started it ends, so a shim that dies takes its VM along).
//!
//! Pids reported to containerd are guest pids (the init's is the task's
//! pid, `ctr task ps` lists the container's processes in the guest), so a
//! CRI container's namespace paths `/proc/<sandbox pid>/ns/<type>` are the
//! guest paths of the pod sandbox's namespaces.

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
use oci_spec::runtime::{LinuxResources, Process};
use rtv_protocol::{ErrorKind, WindowSize};
use rtv_runtime::pod::{ContainerHooks, ErrorClass, NewContainer, Pod, PodConfig, PodError, Role};
use rtv_runtime::ClientError;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::events::{timestamp, Event, Events};
use crate::guest;
use crate::mount;
use crate::stdio::{self, Relays, StdioPaths};
use crate::tasks::{Container, Exit, Proc, ProcState, State};

/// How long a process's output may stay open after it ended.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
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

/// Reads the configuration file for this shim's pod, once, when the pod is
/// created: the handler's runtime options' `ConfigPath` (containerd's CRI
/// `[...runtimes.<name>.options] ConfigPath`), else `$RTV_CONFIG`, else
/// /etc/rtv/config.toml. A file that cannot be used fails the pod with its
/// error (PodConfig::for_spec), naming the file, line and key.
fn load_config(req: &CreateTaskRequest) -> Result<()> {
    static LOADED: std::sync::Once = std::sync::Once::new();
    let explicit = match req.options.as_ref() {
        Some(any) => crate::options::config_path(&any.type_url, &any.value)
            .map_err(|e| invalid(format!("runtime options ({}): {e}", any.type_url)))?,
        None => None,
    };
    LOADED.call_once(|| {
        if let Some(path) = &explicit {
            tracing::info!(config = %path.display(), "configuration file from the runtime options (ConfigPath)");
        }
        if let Err(e) = rtv_runtime::config::init_from_file(explicit.as_deref()) {
            tracing::error!("{e}");
        }
        crate::apply_config_log_level();
    });
    Ok(())
}

pub(crate) fn not_found(m: impl Display) -> Error {
    Error::new(Code::NOT_FOUND, m)
}
pub(crate) fn precondition(m: impl Display) -> Error {
    Error::new(Code::FAILED_PRECONDITION, m)
}
fn invalid(m: impl Display) -> Error {
    Error::new(Code::INVALID_ARGUMENT, m)
}
pub(crate) fn internal(m: impl Display) -> Error {
    Error::new(Code::INTERNAL, m)
}

impl From<PodError> for Error {
    fn from(e: PodError) -> Self {
        let code = match e.class() {
            ErrorClass::NotFound => Code::NOT_FOUND,
            ErrorClass::AlreadyExists => Code::ALREADY_EXISTS,
            ErrorClass::InvalidState => Code::FAILED_PRECONDITION,
            ErrorClass::InvalidArgument => Code::INVALID_ARGUMENT,
            ErrorClass::TimedOut => Code::DEADLINE_EXCEEDED,
            ErrorClass::Unavailable => Code::UNAVAILABLE,
            ErrorClass::Internal if matches!(e, PodError::Hook(_)) => Code::UNKNOWN,
            ErrorClass::Internal => Code::INTERNAL,
        };
        Error::new(code, e)
    }
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        PodError::from(e).into()
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

pub(crate) type Result<T> = std::result::Result<T, Error>;

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
    /// Creates asked for so far (see [`Inner::exit_if_orphaned`]).
    creates: std::sync::atomic::AtomicU64,
}

/// How long a shim left with no container (after a failed create, or a
/// delete) waits for containerd's Shutdown (or a Create) before it ends by
/// itself.
const ORPHAN_GRACE: Duration = Duration::from_secs(10);

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
        let inner = Arc::new(Inner {
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
            creates: std::sync::atomic::AtomicU64::new(0),
        });
        // A shim that containerd started but never asks for a container
        // (containerd restarted in between) ends by itself too.
        rt.spawn(inner.clone().exit_if_orphaned(0));
        Ok(Service { rt, inner })
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

    async fn create(self: Arc<Self>, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        let _lifecycle = self.lifecycle.lock().await;
        let id = req.id.clone();
        if self.state().containers.contains_key(&id) {
            return Err(Error::new(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        let n = self
            .creates
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let mut mounted = None;
        self.state().creating.insert(id.clone(), false);
        let created = self.create_inner(&req, &mut mounted).await;
        let denied = {
            let mut st = self.state();
            let denied = st.creating.remove(&id).unwrap_or(false);
            if denied && created.is_ok() {
                st.forgotten.insert(id.clone());
            }
            denied
        };
        if created.is_err() {
            if let Some(rootfs) = mounted {
                mount::unmount_all(&rootfs);
            }
            if self.state().containers.is_empty() {
                tokio::spawn(self.clone().exit_if_orphaned(n));
            }
            return created;
        }
        drop(_lifecycle);
        if denied {
            // containerd restarted while this create ran and, asking for
            // the container's state, was told it does not exist: it will
            // never start or delete it, so the create is undone here (and
            // the shim, left empty, ends by itself).
            tracing::warn!(
                id = %id,
                "containerd was told this container did not exist while it was \
                 being created (containerd restarted): the create is undone"
            );
            let undo = DeleteRequest {
                id: id.clone(),
                ..Default::default()
            };
            if let Err(e) = self.clone().delete(undo).await {
                tracing::debug!(id = %id, "undoing the create: {}", e.message);
            }
            self.state().forgotten.remove(&id);
            return Err(Error::new(
                Code::ABORTED,
                format!("container {id}: containerd restarted while it was being created"),
            ));
        }
        created
    }

    /// After the failed create number `n`, or a delete, left the shim
    /// without a container (or, with `n` 0, after the shim started):
    /// containerd normally sends Delete and Shutdown at once (or a Create);
    /// if it does not within [`ORPHAN_GRACE`] and nothing was created since
    /// (containerd restarted while the pod was starting and has forgotten
    /// it), the shim ends by itself instead of staying for ever.
    async fn exit_if_orphaned(self: Arc<Self>, n: u64) {
        tokio::time::sleep(ORPHAN_GRACE).await;
        let idle = {
            let _lifecycle = self.lifecycle.lock().await;
            self.creates.load(std::sync::atomic::Ordering::SeqCst) == n
                && self.state().containers.is_empty()
        };
        if idle {
            tracing::warn!(
                "no container for {} s and no word from containerd: the shim ends",
                ORPHAN_GRACE.as_secs()
            );
            let _ = self.shutdown().await;
        }
    }

    async fn create_inner(
        self: &Arc<Self>,
        req: &CreateTaskRequest,
        mounted: &mut Option<PathBuf>,
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
            *mounted = Some(rootfs.clone());
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
        let existing = self.state().pod.clone();
        let (pod, new_pod) = match existing {
            Some(pod) => {
                if role != Role::Member(pod.id().to_owned()) {
                    return Err(precondition(format!(
                        "this shim serves pod {}; container {id} is not one of its containers",
                        pod.id()
                    )));
                }
                (pod, false)
            }
            None => {
                if let Role::Member(sandbox) = &role {
                    return Err(not_found(format!(
                        "annotation {}: pod sandbox {sandbox} is not served by this shim",
                        rtv_runtime::pod::CRI_SANDBOX
                    )));
                }
                load_config(req)?;
                let dir = guest::state_dir(Path::new(guest::STATE_ROOT), &self.namespace, id);
                let pod = Arc::new(Pod::start(PodConfig::for_spec(id, &dir, &spec)?).await?);
                self.state().pod = Some(pod.clone());
                (pod, true)
            }
        };
        let created = self.create_in(req, &pod, &spec, &bundle, &rootfs).await;
        match created {
            Ok(r) => {
                if let Some(c) = self.state().containers.get_mut(id) {
                    c.mounted_rootfs = mounted.take();
                }
                Ok(r)
            }
            Err(e) => {
                if new_pod {
                    self.state().pod = None;
                    pod.stop().await;
                }
                Err(e)
            }
        }
    }

    async fn create_in(
        self: &Arc<Self>,
        req: &CreateTaskRequest,
        pod: &Pod,
        spec: &oci_spec::runtime::Spec,
        bundle: &Path,
        rootfs: &Path,
    ) -> Result<CreateTaskResponse> {
        let id = &req.id;
        let pod_pids: Vec<i32> = self
            .state()
            .containers
            .values()
            .map(|c| c.init_pid)
            .collect();
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // The shim reports guest pids: a pod's namespace paths name them.
        let guest_pid = |pid: i32| pod_pids.contains(&pid).then_some(pid);
        let creating = pod
            .create_container(NewContainer {
                id,
                bundle,
                spec,
                rootfs,
                stdio: paths.agent(),
                guest_pid: &guest_pid,
            })
            .await?;
        let (agent_id, pid) = (creating.exec_id, creating.guest_pid);
        let Relays { stdin, outputs } = match stdio::attach(pod.client(), agent_id, &paths).await {
            Ok(r) => r,
            Err(e) => {
                creating.abort().await;
                return Err(e.into());
            }
        };
        let hooks = ContainerHooks::of(id, bundle, spec);
        if let Err(e) = creating.finish(&hooks, pid).await {
            // The container is gone from the guest, which ended its
            // streams; the relays go now.
            drop(stdin);
            for o in &outputs {
                o.abort();
            }
            return Err(e.into());
        }
        let mut init = Proc::new(paths.clone());
        init.pid = u32::try_from(pid).unwrap_or(0);
        init.agent_id = Some(agent_id);
        init.stdin = stdin;
        init.outputs = outputs;
        let mut st = self.state();
        st.containers.insert(
            id.clone(),
            Container {
                bundle: req.bundle.clone(),
                hooks,
                mounted_rootfs: None,
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
        tracing::info!(id = %id, pid, "created");
        Ok(CreateTaskResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn start(self: Arc<Self>, req: StartRequest) -> Result<StartResponse> {
        let (id, exec_id) = (req.id, req.exec_id);
        let (pod, agent_id, spec, paths) = {
            let mut st = self.state();
            let pod = st.pod()?;
            let p = st.proc_mut(&id, &exec_id)?;
            if p.state != ProcState::Created {
                return Err(precondition(format!(
                    "process {exec_id:?} of container {id} was started already"
                )));
            }
            (pod, p.agent_id, p.spec.take(), p.stdio.clone())
        };
        if exec_id.is_empty() {
            let agent_id = agent_id.ok_or_else(|| internal("the init has no agent handle"))?;
            let (hooks, pid) = {
                let st = self.state();
                let c = st.container(&id)?;
                (c.hooks.clone(), c.init_pid)
            };
            pod.start_container(&hooks, pid).await?;
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
            tokio::spawn(watch_oom(Arc::downgrade(&self), pod.clone(), id.clone()));
            tokio::spawn(watch_process(
                self.clone(),
                pod,
                id.clone(),
                String::new(),
                agent_id,
                outputs,
            ));
            tracing::info!(id = %id, pid, "started");
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        let Some(process) = spec else {
            return Err(internal("the exec has no process"));
        };
        let (agent_id, pid) = match pod.exec(&id, process.clone(), paths.agent()).await {
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
        let relays = match stdio::attach(pod.client(), agent_id, &paths).await {
            Ok(r) => r,
            Err(e) => {
                let _ = pod.signal_process(agent_id, libc::SIGKILL).await;
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
            pod,
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
        let (pod, state, exit, pid, hooks) = {
            let st = self.state();
            let c = st.container(&id)?;
            let init = c.init()?;
            if init.state == ProcState::Running {
                return Err(precondition(format!(
                    "cannot delete container {id}: it is running"
                )));
            }
            (
                st.pod.clone(),
                init.state,
                init.exited(),
                init.pid,
                c.hooks.clone(),
            )
        };
        let last = match &pod {
            Some(pod) => pod.delete_container(&id, Some(&hooks)).await?,
            None => true,
        };
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        if let Some(c) = self.state().containers.remove(&id) {
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
                tracing::info!(pod = %pod.id(), "last container deleted: stopping the VM");
                pod.stop().await;
            }
        }
        if self.state().containers.is_empty() {
            // containerd sends Shutdown next; one that restarted meanwhile
            // may never do so.
            let n = self.creates.load(std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(self.clone().exit_if_orphaned(n));
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
        let (pod, agent_id) = {
            let st = self.state();
            let p = st.proc(&id, &exec_id)?;
            if p.state == ProcState::Stopped {
                return Err(not_found(format!(
                    "process {exec_id:?} of container {id} already finished"
                )));
            }
            (st.pod()?, p.agent_id)
        };
        let sent = if exec_id.is_empty() {
            pod.signal(&id, signal, req.all).await
        } else {
            let agent_id =
                agent_id.ok_or_else(|| precondition(format!("exec {exec_id} has not started")))?;
            pod.signal_process(agent_id, signal).await
        };
        match sent {
            Ok(()) => Ok(Empty::new()),
            Err(e)
                if matches!(
                    e.agent_kind(),
                    Some(ErrorKind::InvalidState | ErrorKind::NoSuchProcess)
                ) =>
            {
                Err(not_found(format!("process already finished: {e}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn state_of(self: Arc<Self>, req: StateRequest) -> Result<StateResponse> {
        let mut st = self.state();
        // What containerd was told once (that a container being created
        // does not exist) stays so until the create is undone.
        let exists = st.containers.contains_key(&req.id);
        let told_missing = match st.creating.get_mut(&req.id) {
            Some(denied) => {
                *denied |= !exists;
                *denied
            }
            None => st.forgotten.contains(&req.id),
        };
        if told_missing {
            return Err(not_found(format!("container {}", req.id)));
        }
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
        let (pod, stopped) = {
            let st = self.state();
            let init = st.container(&req.id)?.init()?;
            (st.pod()?, init.state == ProcState::Stopped)
        };
        if stopped {
            return Ok(PidsResponse::new());
        }
        let pids = pod.pids(&req.id).await?;
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
        let pod = {
            let st = self.state();
            let c = st.container(&id)?;
            if c.init()?.state != ProcState::Running || c.paused == pause {
                return Err(precondition(format!(
                    "container {id} is not {}",
                    if pause { "running" } else { "paused" }
                )));
            }
            st.pod()?
        };
        pod.pause(&id, pause).await?;
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
        let (pod, agent_id) = {
            let st = self.state();
            let p = st.proc(&req.id, &req.exec_id)?;
            if !p.stdio.terminal {
                return Err(precondition("the process has no terminal"));
            }
            (st.pod()?, p.agent_id)
        };
        let agent_id = agent_id.ok_or_else(|| precondition("the process has not started"))?;
        let size = WindowSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        pod.client().resize(agent_id, size).await?;
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
        let pod = {
            let st = self.state();
            st.container(&req.id)?;
            st.pod()?
        };
        pod.update(&req.id, resources).await?;
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
        let pod = {
            let st = self.state();
            st.container(&req.id)?;
            st.pod()?
        };
        let s = pod.stats(&req.id).await?;
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
            pod.stop().await;
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

/// Waits for a process to end, lets its output drain, records its exit
/// and tells containerd.
async fn watch_process(
    inner: Arc<Inner>,
    pod: Arc<Pod>,
    id: String,
    exec_id: String,
    agent_id: u64,
    outputs: Vec<JoinHandle<()>>,
) {
    let status = match pod.wait(agent_id).await {
        Ok(s) => u32::try_from(s.code()).unwrap_or(LOST_STATUS),
        Err(e) => {
            tracing::error!(
                id = %id,
                exec_id = %exec_id,
                "waiting in the guest: {e}; the VM ended: {}",
                rtv_runtime::sandbox::end_reason(pod.dir())
            );
            LOST_STATUS
        }
    };
    stdio::drain(outputs, OUTPUT_DRAIN).await;
    if exec_id.is_empty() {
        // TaskOOM before TaskExit, as containerd's CRI wants to tell an
        // OOM kill from an ordinary exit.
        let kills = pod.oom_watch(&id).last_count().await;
        inner.note_oom_kills(&id, kills);
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

/// Reports OOM kills in container `id` as they happen ([`Pod::oom_watch`]),
/// until its processes are gone.
async fn watch_oom(inner: Weak<Inner>, pod: Arc<Pod>, id: String) {
    let mut watch = pod.oom_watch(&id);
    drop(pod);
    while let Some(kills) = watch.next().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.note_oom_kills(&id, kills);
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
