//! What the shim keeps of a pod's containers for containerd: each
//! container's processes by exec id (its init is ""), their stdio, states
//! and exits, and the pod they run in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use oci_spec::runtime::Process;
use rtv_runtime::pod::{ContainerHooks, Pod};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::service::{internal, not_found, precondition, Result};
use crate::stdio::{StdinRelay, StdioPaths};

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exit {
    pub(crate) status: u32,
    pub(crate) at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcState {
    Created,
    Running,
    Stopped,
}

/// A container's init (exec id "") or one of its execs.
pub(crate) struct Proc {
    /// Its guest pid (0 until an exec starts).
    pub(crate) pid: u32,
    /// The agent's handle, once it exists.
    pub(crate) agent_id: Option<u64>,
    pub(crate) stdio: StdioPaths,
    /// An exec's process, until it starts.
    pub(crate) spec: Option<Process>,
    pub(crate) state: ProcState,
    pub(crate) exit: watch::Sender<Option<Exit>>,
    pub(crate) stdin: Option<StdinRelay>,
    /// Output relays, until the process's watcher takes them.
    pub(crate) outputs: Vec<JoinHandle<()>>,
}

impl Proc {
    pub(crate) fn new(stdio: StdioPaths) -> Proc {
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

    pub(crate) fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

pub(crate) struct Container {
    pub(crate) bundle: String,
    /// Its hooks and what their state says of it.
    pub(crate) hooks: ContainerHooks,
    /// The root file system, if the shim mounted it.
    pub(crate) mounted_rootfs: Option<PathBuf>,
    pub(crate) init_pid: i32,
    pub(crate) paused: bool,
    pub(crate) oom_kills: u64,
    pub(crate) procs: HashMap<String, Proc>,
}

impl Container {
    pub(crate) fn init(&self) -> Result<&Proc> {
        self.procs
            .get("")
            .ok_or_else(|| internal("the container has no init process"))
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) pod: Option<Arc<Pod>>,
    pub(crate) containers: HashMap<String, Container>,
    /// Containers being created, and whether containerd has meanwhile been
    /// told one does not exist (see `Inner::create`).
    pub(crate) creating: HashMap<String, bool>,
    /// Containers created after containerd was told they did not exist,
    /// being undone: they go on not existing for containerd.
    pub(crate) forgotten: std::collections::HashSet<String>,
}

impl State {
    pub(crate) fn container(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    pub(crate) fn container_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    pub(crate) fn proc(&self, id: &str, exec_id: &str) -> Result<&Proc> {
        self.container(id)?
            .procs
            .get(exec_id)
            .ok_or_else(|| not_found(format!("process {exec_id:?} of container {id}")))
    }

    pub(crate) fn proc_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc> {
        self.container_mut(id)?
            .procs
            .get_mut(exec_id)
            .ok_or_else(|| not_found(format!("process {exec_id:?} of container {id}")))
    }

    pub(crate) fn pod(&self) -> Result<Arc<Pod>> {
        self.pod
            .clone()
            .ok_or_else(|| precondition("the pod's VM is not running"))
    }
}
