//! `rtv`: an OCI runtime with runc's command line whose containers run in
//! micro-VMs. containerd's runc shim drives it with `--runc-binary`.
//!
//! Host process model: `create` starts (or joins) the sandbox's VM, creates
//! the container in the guest through the agent, and leaves a *waiter*
//! process (`rtv waiter`, the pid in `--pid-file`) that holds the
//! container's stdio, relays it to and from the guest, and exits with the
//! container's status (128+N for a signal) when the container's init ends.

mod console;
mod logging;
mod store;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio as ProcStdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use oci_spec::runtime::{LinuxResources, Process, Spec};
use rtv_protocol::{
    ContainerStatus, CreateContainer, ErrorKind, ExecInContainer, ExitStatus, Stdio, StreamKind,
    WindowSize,
};
use rtv_runtime::hooks::{self, Stage, OCI_VERSION};
use rtv_runtime::sandbox::{Sandbox, SandboxConfig, VSOCK_FILE};
use rtv_runtime::spec::vm_size;
use rtv_runtime::{AgentClient, ClientError, Endpoint, Share};
use serde_json::json;

use logging::LogFormat;
use store::{alive, ContainerRecord, SandboxRecord, Store};

/// How long to wait for an agent connection.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// CRI annotations naming a container's kind and its pod sandbox.
const CRI_TYPE: &str = "io.kubernetes.cri.container-type";
const CRI_SANDBOX: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Parser, Debug)]
#[command(
    name = "rtv",
    version,
    about = "An OCI runtime whose containers run in micro-VMs (runc's command line)"
)]
struct Cli {
    /// Where container state is kept.
    #[arg(long, global = true, default_value = "/run/rtv")]
    root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility (the guest's cgroups are rtv's own).
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug, Clone)]
struct CreateArgs {
    /// The bundle directory (default: the current directory).
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Write the pid of the container's host process here.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master (process.terminal).
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long = "no-pivot")]
    no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-keyring")]
    no_new_keyring: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    /// The container's id.
    id: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a container (its process waits for `start`).
    Create(CreateArgs),
    /// Start a created container.
    Start {
        /// The container.
        id: String,
    },
    /// Print a container's state as OCI state JSON.
    State {
        /// The container.
        id: String,
    },
    /// Send a signal to a container (default SIGTERM).
    Kill {
        /// Send it to every process of the container.
        #[arg(long, short = 'a')]
        all: bool,
        /// The container.
        id: String,
        /// Signal name (with or without SIG) or number.
        signal: Option<String>,
    },
    /// Delete a container.
    Delete {
        /// Kill it first if it runs.
        #[arg(long, short = 'f')]
        force: bool,
        /// The container.
        id: String,
    },
    /// Create and start a container, and wait for it.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Return once started.
        #[arg(long, short = 'd')]
        detach: bool,
        /// Keep the container after it exits (runc's --keep).
        #[arg(long)]
        keep: bool,
    },
    /// Run a process in a running container.
    Exec(ExecArgs),
    /// List containers.
    List {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// Ids only.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List a container's processes (pids in the guest).
    Ps {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// The container.
        id: String,
        /// Ignored (ps options).
        #[arg(trailing_var_arg = true)]
        ps_args: Vec<String>,
    },
    /// Write a default config.json.
    Spec {
        /// Where (default: the current directory).
        #[arg(long, short = 'b')]
        bundle: Option<PathBuf>,
        /// Accepted for runc compatibility (rootless specs are not made).
        #[arg(long)]
        rootless: bool,
    },
    /// Print a container's events (stats, OOM).
    Events {
        /// Print stats once and exit.
        #[arg(long)]
        stats: bool,
        /// Interval between stats.
        #[arg(long, default_value = "5s")]
        interval: String,
        /// The container.
        id: String,
    },
    /// Freeze a container.
    Pause {
        /// The container.
        id: String,
    },
    /// Thaw a paused container.
    Resume {
        /// The container.
        id: String,
    },
    /// Change a container's resource limits.
    Update(UpdateArgs),
    /// What this runtime supports, as JSON.
    Features,
    /// Check this host (like kata-runtime check).
    Check,
    /// (internal) The host process standing for a container's process.
    #[command(hide = true)]
    Waiter(WaiterArgs),
}

#[derive(Args, Debug)]
struct ExecArgs {
    /// A process.json (the spec's process) instead of arguments.
    #[arg(long, short = 'p')]
    process: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// Return once started.
    #[arg(long, short = 'd')]
    detach: bool,
    /// Write the pid of the process's host stand-in here.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master.
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variables (KEY=VALUE).
    #[arg(long, short = 'e')]
    env: Vec<String>,
    /// uid[:gid].
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Additional gids.
    #[arg(long = "additional-gids", short = 'g')]
    additional_gids: Vec<u32>,
    /// Capabilities to add.
    #[arg(long = "cap", short = 'c')]
    caps: Vec<String>,
    /// Set no_new_privs.
    #[arg(long = "no-new-privs")]
    no_new_privs: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    /// The container.
    id: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct UpdateArgs {
    /// A JSON file (or `-` for stdin) with linux.resources.
    #[arg(long, short = 'r')]
    resources: Option<String>,
    /// Memory limit in bytes.
    #[arg(long)]
    memory: Option<i64>,
    /// CPU quota (microseconds per period).
    #[arg(long = "cpu-quota")]
    cpu_quota: Option<i64>,
    /// CPU period (microseconds).
    #[arg(long = "cpu-period")]
    cpu_period: Option<u64>,
    /// CPU shares.
    #[arg(long = "cpu-share")]
    cpu_share: Option<u64>,
    /// Maximum number of processes.
    #[arg(long = "pids-limit")]
    pids_limit: Option<i64>,
    /// The container.
    id: String,
}

#[derive(Args, Debug)]
struct WaiterArgs {
    /// The sandbox directory (its vsock socket).
    #[arg(long)]
    sandbox_dir: PathBuf,
    /// The process's exec id (a container's init).
    #[arg(long)]
    exec_id: Option<u64>,
    /// A process.json to run in the container (an exec).
    #[arg(long)]
    exec_process: Option<PathBuf>,
    /// The process has a terminal.
    #[arg(long)]
    tty: bool,
    /// Record the exit status in the container's state.
    #[arg(long)]
    record_exit: bool,
    /// Where to note which guest pid this waiter stands for (execs).
    #[arg(long)]
    stand_in_dir: Option<PathBuf>,
    /// The container.
    id: String,
}

/// The guest kernel, initramfs and VMM binary.
struct Artifacts {
    kernel: PathBuf,
    initramfs: PathBuf,
    vmm: PathBuf,
}

fn artifacts() -> Result<Artifacts> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let find = |env: &str, name: &str| -> Result<PathBuf> {
        let p = std::env::var_os(env)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| exe_dir.join(name));
        if !p.exists() {
            bail!(
                "{} not found (set ${env}, or run scripts/build.sh, which puts {name} next to rtv)",
                p.display()
            );
        }
        Ok(p)
    };
    Ok(Artifacts {
        kernel: find("RTV_KERNEL", "rtv-vmlinux")?,
        initramfs: find("RTV_INITRAMFS", "rtv-initramfs.cpio")?,
        vmm: find("RTV_VMM", "rtv-vmm")?,
    })
}

fn template_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RTV_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("templates");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache/rtv/templates");
    }
    PathBuf::from("/var/cache/rtv/templates")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn agent(store: &Store, sandbox_id: &str) -> Result<AgentClient> {
    let uds = store.sandbox_dir(sandbox_id).join(VSOCK_FILE);
    AgentClient::connect(Endpoint::vm(&uds), AGENT_TIMEOUT)
        .await
        .with_context(|| format!("reaching the agent of sandbox {sandbox_id}"))
}

/// A container's status: from its waiter's record once it ended, else
/// from the agent.
async fn status(store: &Store, rec: &ContainerRecord) -> ContainerStatus {
    if store.exit(&rec.id).is_some() || !alive(rec.waiter_pid, rec.waiter_start) {
        return ContainerStatus::Stopped;
    }
    match agent(store, &rec.sandbox_id).await {
        Ok(c) => match c.container_state(&rec.id).await {
            Ok(s) => s.status,
            Err(_) => ContainerStatus::Stopped,
        },
        Err(_) => ContainerStatus::Stopped,
    }
}

fn status_name(s: ContainerStatus) -> &'static str {
    match s {
        ContainerStatus::Created => "created",
        ContainerStatus::Running => "running",
        ContainerStatus::Paused => "paused",
        ContainerStatus::Stopped => "stopped",
    }
}

fn state_json(rec: &ContainerRecord, st: ContainerStatus) -> serde_json::Value {
    let pid = if st == ContainerStatus::Stopped {
        0
    } else {
        rec.waiter_pid
    };
    let mut state = hooks::state(&rec.id, status_name(st), pid, &rec.bundle, &rec.annotations);
    state["rootfs"] = json!(rec.rootfs);
    state["created"] = json!(rec.created);
    state["owner"] = json!(rec.owner);
    state
}

/// The spec as created (edits to the bundle's config.json after create
/// have no effect).
fn saved_spec(store: &Store, id: &str) -> Result<Spec> {
    rtv_runtime::spec::load(&store.dir(id).join("config.json")).map_err(Into::into)
}

fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal: {s}");
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => bail!("unknown signal {s:?}"),
    };
    Ok(n)
}

fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let tmp = path.with_extension("rtv-tmp");
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing the pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing the pid file {}", path.display()))
}

fn owner() -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        "root".into()
    } else {
        uid.to_string()
    }
}

/// Undoes a half-made create, in reverse order.
#[derive(Default)]
struct Undo {
    container_dir: Option<PathBuf>,
    waiter: Option<std::process::Child>,
    agent_container: Option<(String, String)>,
    share: Option<(Share, String)>,
    new_sandbox: Option<(String, i32)>,
    joined_sandbox: Option<(String, String)>,
}

impl Undo {
    fn run(mut self, store: &Store, rt: &tokio::runtime::Runtime) {
        if let Some(mut w) = self.waiter.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Some((sandbox, id)) = self.agent_container.take() {
            rt.block_on(async {
                if let Ok(c) = agent(store, &sandbox).await {
                    let _ = c.delete_container(&id, true).await;
                }
            });
        }
        if let Some((share, id)) = self.share.take() {
            share.remove_container(&id);
        }
        if let Some((sandbox, pid)) = self.new_sandbox.take() {
            stop_vmm(pid);
            remove_sandbox_dir(store, &sandbox);
        }
        if let Some((sandbox, id)) = self.joined_sandbox.take() {
            let _lock = store.lock();
            if let Ok(mut rec) = store.load_sandbox(&sandbox) {
                rec.members.retain(|m| m != &id);
                let _ = store.save_sandbox(&rec);
            }
        }
        if let Some(dir) = self.container_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn stop_vmm(pid: i32) {
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) of the VMM we started (recorded with its start time
    // by the callers that can check it).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while store::start_time(pid).is_some() && Instant::now() < deadline {
        // Reap it if it is our child.
        // SAFETY: waitpid with WNOHANG on a specific pid.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(20));
    }
    if store::start_time(pid).is_some() {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn remove_sandbox_dir(store: &Store, sandbox: &str) {
    let dir = store.sandbox_dir(sandbox);
    if let Err(e) = rtv_runtime::remove_tree(&dir) {
        tracing::error!("sandbox {sandbox}: {e}");
    }
}

/// The guest pid standing behind host pid `pid` in sandbox `sandbox_id`:
/// CRI names a pod's namespaces by `/proc/<pid>` of its sandbox task, our
/// waiter, whose container's init has a guest pid.
fn pod_guest_pid(store: &Store, sandbox_id: &str, pid: i32) -> Option<i32> {
    store
        .load_sandbox(sandbox_id)
        .ok()?
        .members
        .into_iter()
        .filter_map(|m| store.load(&m).ok())
        .find(|r| r.waiter_pid == pid)
        .map(|r| r.guest_pid)
}

/// What `create` leaves: the waiter (a child of this process).
struct Created {
    waiter: std::process::Child,
}

fn create(cli: &Cli, a: &CreateArgs, rt: &tokio::runtime::Runtime) -> Result<Created> {
    let store = Store::open(&cli.root)?;
    let dir = store.reserve(&a.id)?;
    let mut undo = Undo {
        container_dir: Some(dir.clone()),
        ..Default::default()
    };
    match create_inner(cli, a, rt, &store, &dir, &mut undo) {
        Ok(c) => Ok(c),
        Err(e) => {
            undo.run(&store, rt);
            Err(e)
        }
    }
}

fn create_inner(
    cli: &Cli,
    a: &CreateArgs,
    rt: &tokio::runtime::Runtime,
    store: &Store,
    dir: &Path,
    undo: &mut Undo,
) -> Result<Created> {
    let t0 = Instant::now();
    let bundle = std::fs::canonicalize(&a.bundle)
        .with_context(|| format!("bundle {}", a.bundle.display()))?;
    let config = bundle.join("config.json");
    let spec = rtv_runtime::spec::load(&config)?;
    std::fs::copy(&config, dir.join("config.json"))
        .with_context(|| format!("copying {}", config.display()))?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| anyhow!("{}: root: missing", config.display()))?;
    let rootfs = bundle.join(root.path());
    if !rootfs.is_dir() {
        bail!(
            "{}: root.path: {} is not a directory",
            config.display(),
            rootfs.display()
        );
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| anyhow!("{}: process: missing", config.display()))?;
    let terminal = process.terminal().unwrap_or(false);
    // The console socket first: one that refuses fails the create before
    // anything exists.
    let console = match (terminal, &a.console_socket) {
        (true, Some(sock)) => {
            let (master, slave) = console::open_pty()?;
            console::send_master(sock, &master)?;
            Some(slave)
        }
        (true, None) => None,
        (false, Some(_)) => bail!("--console-socket given, but process.terminal is false"),
        (false, None) => None,
    };
    let annotations = spec.annotations().clone().unwrap_or_default();
    let joins = annotations.get(CRI_TYPE).map(String::as_str) == Some("container");
    let sandbox_id = match annotations.get(CRI_SANDBOX) {
        Some(s) if joins || annotations.get(CRI_TYPE).map(String::as_str) == Some("sandbox") => {
            s.clone()
        }
        _ => a.id.clone(),
    };
    let sandbox_dir = store.sandbox_dir(&sandbox_id);
    if joins {
        let _lock = store.lock()?;
        let mut rec = store.load_sandbox(&sandbox_id).with_context(|| {
            format!("annotation {CRI_SANDBOX}: sandbox {sandbox_id} does not exist")
        })?;
        rec.members.push(a.id.clone());
        store.save_sandbox(&rec)?;
        undo.joined_sandbox = Some((sandbox_id.clone(), a.id.clone()));
    } else {
        let size = vm_size(&spec, rtv_runtime::spec::host_cpus());
        let arts = artifacts()?;
        let hostname = spec
            .hostname()
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| a.id.chars().take(63).collect());
        std::fs::create_dir_all(sandbox_dir.join("share"))
            .with_context(|| format!("creating {}", sandbox_dir.display()))?;
        let mut cfg = SandboxConfig::new(
            arts.kernel,
            arts.initramfs,
            arts.vmm,
            &sandbox_dir,
            hostname,
            3,
        );
        cfg.mem_mib = size.mem_mib;
        cfg.vcpus = size.vcpus;
        cfg.shared_dir = Some(sandbox_dir.join("share"));
        cfg.template_dir = Some(template_dir());
        cfg.detached = true;
        let sandbox = rt
            .block_on(Sandbox::start(cfg))
            .context("starting the sandbox VM")?;
        let vmm_pid = sandbox.pid() as i32;
        tracing::debug!(
            id = %a.id,
            origin = ?sandbox.origin(),
            "sandbox ready after {:?} ({:?} into create)",
            sandbox.ready_after(),
            t0.elapsed()
        );
        sandbox.detach();
        undo.new_sandbox = Some((sandbox_id.clone(), vmm_pid));
        store.save_sandbox(&SandboxRecord {
            id: sandbox_id.clone(),
            vmm_pid,
            vmm_start: store::start_time(vmm_pid).unwrap_or(0),
            members: vec![a.id.clone()],
            mem_mib: size.mem_mib,
            vcpus: size.vcpus,
        })?;
    }
    let share = Share::new(sandbox_dir.join("share"))?;
    let guest_spec = share.add_container(&a.id, &rootfs, &spec)?;
    undo.share = Some((share, a.id.clone()));
    let guest_spec = rtv_runtime::spec::guest_spec(guest_spec, &a.id, |pid| {
        pod_guest_pid(store, &sandbox_id, pid)
    })?;
    let stdio = if terminal {
        Stdio {
            tty: Some(WindowSize { rows: 24, cols: 80 }),
            stdin: true,
            stdout: true,
            stderr: false,
        }
    } else {
        Stdio {
            tty: None,
            stdin: true,
            stdout: true,
            stderr: true,
        }
    };
    let (exec_id, guest_pid) = rt.block_on(async {
        let c = agent(store, &sandbox_id).await?;
        c.create_container(CreateContainer {
            container_id: a.id.clone(),
            spec: guest_spec,
            stdio,
        })
        .await
        .map_err(|e| match e {
            ClientError::Agent { message, .. } => anyhow!("{}: {message}", config.display()),
            e => e.into(),
        })
    })?;
    undo.agent_container = Some((sandbox_id.clone(), a.id.clone()));
    tracing::debug!(id = %a.id, "container created in the guest {:?} into create", t0.elapsed());
    let waiter = spawn_waiter(
        cli,
        &WaiterArgs {
            sandbox_dir: sandbox_dir.clone(),
            exec_id: Some(exec_id),
            exec_process: None,
            tty: terminal,
            record_exit: true,
            stand_in_dir: None,
            id: a.id.clone(),
        },
        console,
    )?;
    let waiter_pid = waiter.id() as i32;
    undo.waiter = Some(waiter);
    // The host processes go in the cgroup the spec names (containerd and
    // the kubelet account the container by it).
    let mut host_cgroups = Vec::new();
    if let Some(path) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
    {
        let path = path.to_string_lossy();
        host_cgroups = rtv_runtime::host_cgroup::join(&path, waiter_pid)
            .with_context(|| format!("{}", config.display()))?;
        if let Some((_, vmm_pid)) = &undo.new_sandbox {
            rtv_runtime::host_cgroup::join(&path, *vmm_pid)?;
        }
    }
    let rec = ContainerRecord {
        id: a.id.clone(),
        bundle: bundle.clone(),
        rootfs: rootfs.clone(),
        created: logging::rfc3339_now(),
        annotations: annotations.clone(),
        sandbox_id,
        exec_id,
        guest_pid,
        waiter_pid,
        waiter_start: store::start_time(waiter_pid).unwrap_or(0),
        owner: owner(),
        host_cgroups,
    };
    store.save(&rec)?;
    let state = serde_json::to_vec(&state_json(&rec, ContainerStatus::Created))?;
    for stage in Stage::CREATE {
        hooks::run(stage, spec.hooks().as_ref(), &state)?;
    }
    if let Some(p) = &a.pid_file {
        write_pid_file(p, waiter_pid)?;
    }
    let waiter = undo.waiter.take().ok_or_else(|| anyhow!("waiter lost"))?;
    tracing::info!(id = %a.id, pid = waiter_pid, "created in {:?}", t0.elapsed());
    *undo = Undo::default();
    Ok(Created { waiter })
}

/// Starts `rtv waiter` with this process's stdio (or `tty`, the slave of
/// the terminal sent to the console socket) and waits until it has
/// attached to the process's streams.
fn spawn_waiter(cli: &Cli, w: &WaiterArgs, tty: Option<File>) -> Result<std::process::Child> {
    // /proc/self/exe runs this very binary even if it was replaced since.
    let (mut sync_r, sync_w) = pipe()?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("rtv");
    cmd.arg("--root").arg(&cli.root);
    if let Some(log) = &cli.log {
        cmd.arg("--log").arg(log);
    }
    cmd.arg("--log-format").arg(match cli.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    });
    if cli.debug {
        cmd.arg("--debug");
    }
    cmd.arg("waiter").arg("--sandbox-dir").arg(&w.sandbox_dir);
    if let Some(id) = w.exec_id {
        cmd.arg("--exec-id").arg(id.to_string());
    }
    if let Some(p) = &w.exec_process {
        cmd.arg("--exec-process").arg(p);
    }
    if w.tty {
        cmd.arg("--tty");
    }
    if w.record_exit {
        cmd.arg("--record-exit");
    }
    if let Some(d) = &w.stand_in_dir {
        cmd.arg("--stand-in-dir").arg(d);
    }
    cmd.arg(&w.id);
    if let Some(t) = &tty {
        cmd.stdin(ProcStdio::from(t.try_clone()?))
            .stdout(ProcStdio::from(t.try_clone()?))
            .stderr(ProcStdio::from(t.try_clone()?));
    }
    let sync_fd = sync_w.as_raw_fd();
    let make_ctty = tty.is_some();
    // SAFETY: the closure only calls async-signal-safe functions (dup2,
    // setsid, ioctl) on descriptors it was given.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(sync_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A session of its own: the caller's terminal signals (^C to
            // `rtv run`'s process group) do not reach it.
            libc::setsid();
            if make_ctty {
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the waiter")?;
    drop(sync_w);
    drop(tty);
    // One line: "ok", or "error: ..." (or nothing if the waiter died).
    let mut msg = String::new();
    {
        use std::io::BufRead;
        let _ = std::io::BufReader::new(&mut sync_r).read_line(&mut msg);
    }
    if msg.trim() != "ok" {
        let _ = child.kill();
        let _ = child.wait();
        let msg = msg
            .trim()
            .strip_prefix("error: ")
            .unwrap_or(msg.trim())
            .to_owned();
        if msg.is_empty() {
            bail!("the waiter ended before attaching to the container");
        }
        bail!("{msg}");
    }
    Ok(child)
}

fn pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("making a pipe");
    }
    // SAFETY: two new descriptors that we own.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// `rtv waiter`: attach to the process's streams, relay them, wait for it,
/// exit with its status.
fn waiter(cli: &Cli, w: &WaiterArgs) -> ExitCode {
    // SAFETY: fd 3 is the sync pipe `spawn_waiter` put there.
    let mut sync = unsafe { File::from_raw_fd(3) };
    // SAFETY: F_SETFD on our own descriptor.
    unsafe { libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC) };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(sync, "error: {e}");
            return ExitCode::from(1);
        }
    };
    let store = match Store::open(&cli.root) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(sync, "error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let mut sync = Some(sync);
    let result = rt.block_on(waiter_run(w, &mut sync));
    if let Some(dir) = &w.stand_in_dir {
        let _ = std::fs::remove_file(dir.join(std::process::id().to_string()));
    }
    match result {
        Ok(status) => {
            if w.record_exit {
                if let Err(e) = store.save_exit(&w.id, status) {
                    tracing::error!("{e:#}");
                }
            }
            ExitCode::from(status.code().clamp(0, 255) as u8)
        }
        Err(e) => {
            if let Some(mut s) = sync {
                let _ = writeln!(s, "error: {e:#}");
            }
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

async fn waiter_run(w: &WaiterArgs, sync: &mut Option<File>) -> Result<ExitStatus> {
    let uds = w.sandbox_dir.join(VSOCK_FILE);
    let client = AgentClient::connect(Endpoint::vm(&uds), AGENT_TIMEOUT)
        .await
        .context("reaching the agent")?;
    let exec_id = match (w.exec_id, &w.exec_process) {
        (Some(id), _) => id,
        (None, Some(p)) => {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let process: Process = serde_json::from_slice(&text)
                .with_context(|| format!("parsing {}", p.display()))?;
            let stdio = Stdio {
                tty: w.tty.then_some(WindowSize { rows: 24, cols: 80 }),
                stdin: true,
                stdout: true,
                stderr: !w.tty,
            };
            let (id, guest_pid) = client
                .exec_in_container(ExecInContainer {
                    container_id: w.id.clone(),
                    process,
                    stdio,
                })
                .await
                .map_err(|e| match e {
                    ClientError::Agent { message, .. } => anyhow!("{message}"),
                    e => e.into(),
                })?;
            // For `ps`: this process stands for that guest process.
            if let Some(dir) = &w.stand_in_dir {
                let _ = std::fs::create_dir_all(dir);
                let _ = std::fs::write(
                    dir.join(std::process::id().to_string()),
                    guest_pid.to_string(),
                );
            }
            id
        }
        (None, None) => bail!("the waiter needs --exec-id or --exec-process"),
    };
    let stdin = client.attach(exec_id, StreamKind::Stdin).await?;
    let stdout = client.attach(exec_id, StreamKind::Stdout).await?;
    let stderr = if w.tty {
        None
    } else {
        Some(client.attach(exec_id, StreamKind::Stderr).await?)
    };
    if let Some(mut s) = sync.take() {
        writeln!(s, "ok").context("reporting to rtv")?;
    }
    // Relays on plain threads with blocking I/O on our stdio.
    let to_std = |s: tokio::net::UnixStream| -> Result<std::os::unix::net::UnixStream> {
        let s = s.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s)
    };
    let stdin = to_std(stdin)?;
    let stdout = to_std(stdout)?;
    let stderr = stderr.map(to_std).transpose()?;
    let dup = |fd: i32| -> Result<File> {
        // SAFETY: fds 0-2 are this process's stdio; dup gives us our own.
        let n = unsafe { libc::dup(fd) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("dup");
        }
        // SAFETY: a new descriptor we own.
        Ok(unsafe { File::from(OwnedFd::from_raw_fd(n)) })
    };
    let mut input = dup(0)?;
    std::thread::spawn(move || {
        let mut stdin = stdin;
        relay(&mut input, &mut stdin);
        let _ = stdin.shutdown(std::net::Shutdown::Write);
    });
    let mut out_file = dup(1)?;
    let out = std::thread::spawn(move || {
        let mut stdout = stdout;
        relay(&mut stdout, &mut out_file);
    });
    let err = match stderr {
        Some(s) => {
            let mut err_file = dup(2)?;
            Some(std::thread::spawn(move || {
                let mut s = s;
                relay(&mut s, &mut err_file);
            }))
        }
        None => None,
    };
    if w.tty {
        let tty = dup(0)?;
        if let Some((rows, cols)) = console::window_size(&tty) {
            if rows > 0 && cols > 0 {
                let _ = client.resize(exec_id, WindowSize { rows, cols }).await;
            }
        }
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        let status = loop {
            tokio::select! {
                s = client.wait(exec_id) => break s?,
                _ = winch.recv() => {
                    if let Some((rows, cols)) = console::window_size(&tty) {
                        let _ = client.resize(exec_id, WindowSize { rows, cols }).await;
                    }
                }
            }
        };
        let _ = tokio::task::spawn_blocking(move || out.join()).await;
        return Ok(status);
    }
    let status = client.wait(exec_id).await?;
    let _ = tokio::task::spawn_blocking(move || {
        let _ = out.join();
        if let Some(e) = err {
            let _ = e.join();
        }
    })
    .await;
    Ok(status)
}

/// Copies `from` to `to` until end of file, each read passed on at once
/// (plain reads and writes: std's copy splices pipes into sockets, and a
/// splice into the agent's stream held interactive input back until more
/// arrived).
fn relay(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn cmd_start(cli: &Cli, id: &str, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    let spec = saved_spec(&store, id)?;
    rt.block_on(async {
        let st = status(&store, &rec).await;
        match st {
            ContainerStatus::Created => {}
            ContainerStatus::Stopped => bail!("cannot start a container that has stopped"),
            other => bail!("cannot start an already {} container", status_name(other)),
        }
        let state = serde_json::to_vec(&state_json(&rec, ContainerStatus::Created))?;
        let hooks = spec.hooks().as_ref();
        hooks::run(Stage::StartContainer, hooks, &state)?;
        let c = agent(&store, &rec.sandbox_id).await?;
        c.start_container(id).await.map_err(|e| match e {
            ClientError::Agent { message, .. } => anyhow!("{message}"),
            e => e.into(),
        })?;
        let state = serde_json::to_vec(&state_json(&rec, ContainerStatus::Running))?;
        if let Err(e) = hooks::run(Stage::Poststart, hooks, &state) {
            tracing::warn!("{e:#}");
        }
        Ok(())
    })
}

fn cmd_kill(
    cli: &Cli,
    id: &str,
    signal: Option<&str>,
    all: bool,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    let sig = parse_signal(signal.unwrap_or("SIGTERM"))?;
    rt.block_on(async {
        if status(&store, &rec).await == ContainerStatus::Stopped {
            bail!("container not running");
        }
        let c = agent(&store, &rec.sandbox_id).await?;
        c.signal_container(id, sig, all).await.map_err(|e| match e {
            ClientError::Agent {
                kind: ErrorKind::InvalidState,
                ..
            } => anyhow!("container not running"),
            e => e.into(),
        })
    })
}

fn cmd_delete(cli: &Cli, id: &str, force: bool, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    store::check_id(id)?;
    let rec = match store.load(id) {
        Ok(r) => r,
        Err(e) => {
            // A directory without a record is a create that died half-way.
            let dir = store.dir(id);
            if dir.is_dir() && !dir.join("state.json").exists() {
                let _ = std::fs::remove_dir_all(dir);
                return Ok(());
            }
            // runc: deleting an unknown container with --force succeeds
            // (containerd's shim deletes twice).
            if force && !dir.exists() {
                return Ok(());
            }
            return Err(e);
        }
    };
    let spec = saved_spec(&store, id).ok();
    rt.block_on(async {
        let st = status(&store, &rec).await;
        if matches!(st, ContainerStatus::Running | ContainerStatus::Paused) && !force {
            bail!(
                "cannot delete container {id} that is not stopped: {}",
                status_name(st)
            );
        }
        if let Ok(c) = agent(&store, &rec.sandbox_id).await {
            if st != ContainerStatus::Stopped {
                let _ = c.signal_container(id, libc::SIGKILL, true).await;
            }
            let _ = c.delete_container(id, true).await;
        }
        Ok(())
    })?;
    // The waiter ends with the container's process.
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(rec.waiter_pid, rec.waiter_start) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive(rec.waiter_pid, rec.waiter_start) {
        // SAFETY: kill(2) of the waiter we started (checked by start time).
        unsafe { libc::kill(rec.waiter_pid, libc::SIGKILL) };
    }
    if let Ok(share) = Share::new(store.sandbox_dir(&rec.sandbox_id).join("share")) {
        share.remove_container(id);
    }
    {
        let _lock = store.lock()?;
        if let Ok(mut sb) = store.load_sandbox(&rec.sandbox_id) {
            sb.members.retain(|m| m != id);
            if sb.members.is_empty() {
                // The last container of the sandbox: the VM ends.
                rt.block_on(async {
                    if let Ok(c) = agent(&store, &rec.sandbox_id).await {
                        let _ = tokio::time::timeout(Duration::from_secs(5), c.shutdown()).await;
                    }
                });
                if alive(sb.vmm_pid, sb.vmm_start) {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while alive(sb.vmm_pid, sb.vmm_start) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if alive(sb.vmm_pid, sb.vmm_start) {
                        stop_vmm(sb.vmm_pid);
                    }
                }
                remove_sandbox_dir(&store, &rec.sandbox_id);
            } else {
                store.save_sandbox(&sb)?;
            }
        }
    }
    // After the VMM (which may be in them) has gone.
    rtv_runtime::host_cgroup::remove(&rec.host_cgroups);
    if let Some(spec) = spec {
        let state = serde_json::to_vec(&state_json(&rec, ContainerStatus::Stopped))?;
        if let Err(e) = hooks::run(Stage::Poststop, spec.hooks().as_ref(), &state) {
            tracing::warn!("{e:#}");
        }
    }
    std::fs::remove_dir_all(store.dir(id))
        .with_context(|| format!("removing {}", store.dir(id).display()))?;
    Ok(())
}

fn wait_child(mut child: std::process::Child) -> Result<i32> {
    let status = child.wait().context("waiting for the container")?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn exec_process(store: &Store, a: &ExecArgs) -> Result<Process> {
    if let Some(p) = &a.process {
        let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let de = &mut serde_json::Deserializer::from_slice(&text);
        return serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow!("{}: {}: {}", p.display(), e.path(), e.inner()));
    }
    if a.command.is_empty() {
        bail!("exec: no command given (arguments or --process)");
    }
    let spec = saved_spec(store, &a.id)?;
    let base = spec.process().clone().unwrap_or_default();
    let mut v = serde_json::to_value(&base)?;
    v["args"] = json!(a.command);
    v["terminal"] = json!(a.tty);
    if let Some(cwd) = &a.cwd {
        v["cwd"] = json!(cwd);
    }
    if !a.env.is_empty() {
        let mut env: Vec<String> = base.env().clone().unwrap_or_default();
        for e in &a.env {
            let key = e.split('=').next().unwrap_or_default();
            env.retain(|x| x.split('=').next() != Some(key));
            env.push(e.clone());
        }
        v["env"] = json!(env);
    }
    if let Some(u) = &a.user {
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (u.as_str(), None),
        };
        match uid.parse::<u32>() {
            Ok(n) => v["user"]["uid"] = json!(n),
            Err(_) => v["user"]["username"] = json!(uid),
        }
        if let Some(g) = gid {
            v["user"]["gid"] = json!(g
                .parse::<u32>()
                .with_context(|| format!("--user: gid {g}"))?);
        }
    }
    if !a.additional_gids.is_empty() {
        v["user"]["additionalGids"] = json!(a.additional_gids);
    }
    if a.no_new_privs {
        v["noNewPrivileges"] = json!(true);
    }
    if !a.caps.is_empty() {
        for set in ["bounding", "effective", "permitted"] {
            let list = v["capabilities"][set]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut list: Vec<serde_json::Value> = list;
            for c in &a.caps {
                list.push(json!(c));
            }
            v["capabilities"][set] = json!(list);
        }
    }
    serde_json::from_value(v).context("the exec's process")
}

fn cmd_exec(cli: &Cli, a: &ExecArgs, rt: &tokio::runtime::Runtime) -> Result<i32> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(&a.id)?;
    let process = exec_process(&store, a)?;
    let tty = process.terminal().unwrap_or(false) || a.tty;
    rt.block_on(async {
        if status(&store, &rec).await != ContainerStatus::Running {
            bail!("cannot exec in a container that is not running");
        }
        Ok(())
    })?;
    let console = match (tty, &a.console_socket) {
        (true, Some(sock)) => {
            let (master, slave) = console::open_pty()?;
            console::send_master(sock, &master)?;
            Some(slave)
        }
        _ => None,
    };
    let pfile = store.dir(&a.id).join(format!(
        "exec-{}-{}.json",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::write(&pfile, serde_json::to_vec(&process)?)
        .with_context(|| format!("writing {}", pfile.display()))?;
    let spawned = spawn_waiter(
        cli,
        &WaiterArgs {
            sandbox_dir: store.sandbox_dir(&rec.sandbox_id),
            exec_id: None,
            exec_process: Some(pfile.clone()),
            tty,
            record_exit: false,
            stand_in_dir: Some(store.dir(&a.id).join("execs")),
            id: a.id.clone(),
        },
        console,
    );
    let _ = std::fs::remove_file(&pfile);
    let child = spawned?;
    if let Some(p) = &a.pid_file {
        write_pid_file(p, child.id() as i32)?;
    }
    if a.detach {
        return Ok(0);
    }
    wait_child(child)
}

fn cmd_state(cli: &Cli, id: &str, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    let st = rt.block_on(status(&store, &rec));
    println!("{}", serde_json::to_string_pretty(&state_json(&rec, st))?);
    Ok(())
}

fn cmd_list(cli: &Cli, format: &str, quiet: bool, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let mut rows = Vec::new();
    for id in store.ids()? {
        if let Ok(rec) = store.load(&id) {
            let st = rt.block_on(status(&store, &rec));
            rows.push(state_json(&rec, st));
        }
    }
    if quiet {
        for r in &rows {
            println!("{}", r["id"].as_str().unwrap_or_default());
        }
        return Ok(());
    }
    match format {
        "json" => println!("{}", serde_json::to_string(&rows)?),
        "table" => {
            println!(
                "{:<20} {:<10} {:<10} {:<40} {:<30} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for r in &rows {
                println!(
                    "{:<20} {:<10} {:<10} {:<40} {:<30} {}",
                    r["id"].as_str().unwrap_or_default(),
                    r["pid"],
                    r["status"].as_str().unwrap_or_default(),
                    r["bundle"].as_str().unwrap_or_default(),
                    r["created"].as_str().unwrap_or_default(),
                    r["owner"].as_str().unwrap_or_default()
                );
            }
        }
        other => bail!("invalid format option: {other:?} (table or json)"),
    }
    Ok(())
}

/// Host processes that stand for guest processes: the container's waiter
/// for its init, exec waiters for their processes (guest pid → host pid).
fn stand_ins(store: &Store, rec: &ContainerRecord) -> HashMap<i32, i32> {
    let mut map = HashMap::from([(rec.guest_pid, rec.waiter_pid)]);
    if let Ok(entries) = std::fs::read_dir(store.dir(&rec.id).join("execs")) {
        for e in entries.flatten() {
            let host: Option<i32> = e.file_name().to_str().and_then(|n| n.parse().ok());
            let guest: Option<i32> = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| t.trim().parse().ok());
            if let (Some(h), Some(g)) = (host, guest) {
                if store::start_time(h).is_some() {
                    map.insert(g, h);
                }
            }
        }
    }
    map
}

/// `ps`: the container's processes, each by the pid of its host stand-in
/// (the waiter of the init or of an exec, which containerd knows), or by
/// its guest pid when it has none.
fn cmd_ps(cli: &Cli, id: &str, format: &str, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    let guest = rt.block_on(async {
        if status(&store, &rec).await == ContainerStatus::Stopped {
            return Ok(Vec::new());
        }
        let c = agent(&store, &rec.sandbox_id).await?;
        Ok::<_, anyhow::Error>(c.container_pids(id).await?)
    })?;
    let map = stand_ins(&store, &rec);
    let pids: Vec<i32> = guest.iter().map(|g| *map.get(g).unwrap_or(g)).collect();
    match format {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("{:<10} GUEST PID", "PID");
            for (p, g) in pids.iter().zip(&guest) {
                println!("{p:<10} {g}");
            }
        }
        other => bail!("invalid format option: {other:?} (table or json)"),
    }
    Ok(())
}

fn cmd_spec(bundle: Option<&Path>) -> Result<()> {
    let dir = bundle
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let path = dir.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    std::fs::write(&path, rtv_runtime::spec::DEFAULT_SPEC)
        .with_context(|| format!("writing {}", path.display()))
}

fn parse_duration(s: &str) -> Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid interval {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => bail!("invalid interval {s:?}"),
    };
    if secs <= 0.0 {
        bail!("invalid interval {s:?}");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn cmd_events(
    cli: &Cli,
    id: &str,
    stats: bool,
    interval: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    let interval = parse_duration(interval)?;
    rt.block_on(async {
        let c = agent(&store, &rec.sandbox_id).await?;
        let mut ooms = None;
        loop {
            let s = c.container_stats(id).await?;
            let data = json!({
                "cpu": {"usage": {"total": s.cpu_usage_usec * 1000}},
                "memory": {"usage": {"usage": s.memory_bytes, "limit": s.memory_limit_bytes.unwrap_or(u64::MAX)}},
                "pids": {"current": s.pids},
            });
            println!("{}", json!({"type": "stats", "id": id, "data": data}));
            if let Some(prev) = ooms {
                if s.oom_kills > prev {
                    println!("{}", json!({"type": "oom", "id": id}));
                }
            }
            ooms = Some(s.oom_kills);
            if stats {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
            if status(&store, &rec).await == ContainerStatus::Stopped {
                return Ok(());
            }
        }
    })
}

fn cmd_pause(cli: &Cli, id: &str, pause: bool, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    rt.block_on(async {
        let st = status(&store, &rec).await;
        let want = if pause {
            ContainerStatus::Running
        } else {
            ContainerStatus::Paused
        };
        if st != want {
            bail!("container not {}", status_name(want));
        }
        let c = agent(&store, &rec.sandbox_id).await?;
        c.pause_container(id, pause).await?;
        Ok(())
    })
}

fn cmd_update(cli: &Cli, u: &UpdateArgs, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(&u.id)?;
    let mut v = match &u.resources {
        Some(path) => {
            let mut text = Vec::new();
            if path == "-" {
                std::io::stdin().read_to_end(&mut text)?;
            } else {
                text = std::fs::read(path).with_context(|| format!("reading {path}"))?;
            }
            serde_json::from_slice::<serde_json::Value>(&text)
                .with_context(|| format!("parsing {path}"))?
        }
        None => json!({}),
    };
    if let Some(m) = u.memory {
        v["memory"]["limit"] = json!(m);
    }
    if let Some(q) = u.cpu_quota {
        v["cpu"]["quota"] = json!(q);
    }
    if let Some(p) = u.cpu_period {
        v["cpu"]["period"] = json!(p);
    }
    if let Some(s) = u.cpu_share {
        v["cpu"]["shares"] = json!(s);
    }
    if let Some(p) = u.pids_limit {
        v["pids"]["limit"] = json!(p);
    }
    let text = v.to_string();
    let de = &mut serde_json::Deserializer::from_str(&text);
    let resources: LinuxResources = serde_path_to_error::deserialize(de)
        .map_err(|e| anyhow!("resources: {}: {}", e.path(), e.inner()))?;
    rt.block_on(async {
        let c = agent(&store, &rec.sandbox_id).await?;
        c.update_container(&u.id, resources)
            .await
            .map_err(|e| match e {
                ClientError::Agent { message, .. } => anyhow!("{message}"),
                e => e.into(),
            })
    })
}

fn features() -> serde_json::Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec",
            "lazytime", "mand", "noatime", "nodev", "nodiratime", "noexec", "nolazytime", "nomand",
            "norelatime", "nostrictatime", "nosuid", "private", "rbind", "relatime", "remount",
            "ro", "rprivate", "rshared", "rslave", "runbindable", "rw", "shared", "slave",
            "strictatime", "suid", "sync", "unbindable"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT",
                    "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86_64"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.github.rtv.isolation": "micro-VM per sandbox (KVM)",
            "io.github.rtv.network": "containers share the VM's network"
        }
    })
}

fn cmd_check() -> Result<bool> {
    let mut ok = true;
    let mut line = |what: &str, good: bool, detail: String| {
        println!(
            "{} {what}: {detail}",
            if good { "[ok]  " } else { "[FAIL]" }
        );
        ok &= good;
    };
    match File::open("/dev/kvm") {
        Ok(f) => {
            // SAFETY: KVM_GET_API_VERSION (0xAE00) takes no argument.
            let v = unsafe { libc::ioctl(f.as_raw_fd(), 0xAE00, 0) };
            line("/dev/kvm", v == 12, format!("API version {v}"));
        }
        Err(e) => line("/dev/kvm", false, e.to_string()),
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.contains(" vmx") || cpuinfo.contains(" svm");
    line(
        "virtualization",
        pvm || hw,
        if pvm {
            "PVM (kvm_pvm): the guest kernel runs in PVM's native mode, its code emulated — slow (~10 s cold boot, ~1 s per fork+exec in the guest)".into()
        } else if hw {
            "hardware (vmx/svm)".into()
        } else {
            "neither hardware virtualization nor PVM found".into()
        },
    );
    match artifacts() {
        Ok(a) => {
            line("guest kernel", true, a.kernel.display().to_string());
            line("initramfs", true, a.initramfs.display().to_string());
            line("rtv-vmm", true, a.vmm.display().to_string());
            let size = vm_size(
                &rtv_runtime::spec::default_spec(),
                rtv_runtime::spec::host_cpus(),
            );
            let mut cfg =
                SandboxConfig::new(&a.kernel, &a.initramfs, &a.vmm, "/nonexistent", "check", 3);
            cfg.mem_mib = size.mem_mib;
            cfg.vcpus = size.vcpus;
            cfg.shared_dir = Some(PathBuf::from("/"));
            cfg.template_dir = Some(template_dir());
            let current = cfg
                .template_cache()
                .map_err(|e| e.to_string())
                .and_then(|c| c.check(&cfg.template_spec()).map_err(|e| e.to_string()));
            match current {
                Ok(t) => line(
                    "template",
                    true,
                    format!(
                        "current ({}); a sandbox starts from it in well under a second",
                        t.snapshot_dir().display()
                    ),
                ),
                Err(why) => line(
                    "template",
                    true,
                    format!(
                        "none usable under {} ({why}): the first start cold boots the guest and snapshots it (~10-15 s here), later starts restore it",
                        template_dir().display()
                    ),
                ),
            }
        }
        Err(e) => line("artifacts", false, format!("{e:#}")),
    }
    Ok(ok)
}

fn run(cli: &Cli) -> Result<i32> {
    let rt = runtime()?;
    match &cli.command {
        Cmd::Create(a) => {
            let created = create(cli, a, &rt)?;
            // The waiter outlives us; it is not waited for here.
            std::mem::forget(created.waiter);
            Ok(0)
        }
        Cmd::Start { id } => cmd_start(cli, id, &rt).map(|()| 0),
        Cmd::State { id } => cmd_state(cli, id, &rt).map(|()| 0),
        Cmd::Kill { all, id, signal } => {
            cmd_kill(cli, id, signal.as_deref(), *all, &rt).map(|()| 0)
        }
        Cmd::Delete { force, id } => cmd_delete(cli, id, *force, &rt).map(|()| 0),
        Cmd::Run {
            create: a,
            detach,
            keep,
        } => {
            let created = create(cli, a, &rt)?;
            if let Err(e) = cmd_start(cli, &a.id, &rt) {
                let _ = cmd_delete(cli, &a.id, true, &rt);
                return Err(e);
            }
            if *detach {
                std::mem::forget(created.waiter);
                return Ok(0);
            }
            let code = wait_child(created.waiter)?;
            if !keep {
                cmd_delete(cli, &a.id, true, &rt)?;
            }
            Ok(code)
        }
        Cmd::Exec(a) => cmd_exec(cli, a, &rt),
        Cmd::List { format, quiet } => cmd_list(cli, format, *quiet, &rt).map(|()| 0),
        Cmd::Ps { format, id, .. } => cmd_ps(cli, id, format, &rt).map(|()| 0),
        Cmd::Spec { bundle, .. } => cmd_spec(bundle.as_deref()).map(|()| 0),
        Cmd::Events {
            stats,
            interval,
            id,
        } => cmd_events(cli, id, *stats, interval, &rt).map(|()| 0),
        Cmd::Pause { id } => cmd_pause(cli, id, true, &rt).map(|()| 0),
        Cmd::Resume { id } => cmd_pause(cli, id, false, &rt).map(|()| 0),
        Cmd::Update(u) => cmd_update(cli, u, &rt).map(|()| 0),
        Cmd::Features => {
            println!("{}", serde_json::to_string_pretty(&features())?);
            Ok(0)
        }
        Cmd::Check => Ok(if cmd_check()? { 0 } else { 1 }),
        Cmd::Waiter(_) => Ok(1),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = logging::init(cli.log.as_deref(), cli.log_format, cli.debug) {
        eprintln!(
            "rtv: --log {}: {e}",
            cli.log.as_deref().unwrap_or(Path::new("")).display()
        );
        return ExitCode::from(1);
    }
    if let Cmd::Waiter(w) = &cli.command {
        return waiter(&cli, w);
    }
    match run(&cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let msg = format!("{e:#}");
            if cli.log.is_some() {
                tracing::error!("{msg}");
            }
            eprintln!("rtv: {msg}");
            ExitCode::from(1)
        }
    }
}
