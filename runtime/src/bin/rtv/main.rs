//! `rtv`: an OCI runtime with runc's command line whose containers run in
//! micro-VMs. containerd's runc shim drives it with `--runc-binary`.
//!
//! A front end of the runtime library's pod layer ([`rtv_runtime::pod`]),
//! which holds every lifecycle step; what is rtv's own is runc's command
//! line and output formats, the state store under `--root`, and the
//! *waiter* (`rtv waiter`, the pid in `--pid-file`), the host process that
//! stands for a container's process: it holds its stdio, relays it to and
//! from the guest, and exits with its status. `create` starts the pod's VM
//! (a CRI container joins its sandbox's) and leaves it running after rtv
//! exits; the last container's `delete` stops it.

mod cli;
mod console;
mod logging;
mod store;
mod waiter;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use rtv_protocol::{ContainerStatus, ErrorKind, Stdio, WindowSize};
use rtv_runtime::hooks::{self, OCI_VERSION};
use rtv_runtime::pod::{ContainerHooks, NewContainer, Pod, PodConfig, Role, CRI_SANDBOX};
use rtv_runtime::spec::vm_size;
use rtv_runtime::vmm_process::alive;
use rtv_runtime::{Artifacts, SandboxConfig};
use serde_json::json;

use cli::{Cli, Cmd, CreateArgs, ExecArgs, UpdateArgs};
use store::{ContainerRecord, Store};
use waiter::{spawn_waiter, WaiterArgs};

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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The pod container `rec` runs in.
async fn pod_of(store: &Store, rec: &ContainerRecord) -> Result<Pod> {
    Pod::open(&store.sandbox_dir(&rec.sandbox_id))
        .await
        .with_context(|| format!("container {}", rec.id))
}

/// Whether the container has ended, as the host alone knows it: its
/// waiter recorded the exit, or is gone.
fn ended(store: &Store, rec: &ContainerRecord) -> bool {
    store.exit(&rec.id).is_some() || !alive(rec.waiter_pid, rec.waiter_start)
}

/// A container's status through its (opened) pod.
async fn status_in(pod: &Pod, store: &Store, rec: &ContainerRecord) -> ContainerStatus {
    if ended(store, rec) {
        return ContainerStatus::Stopped;
    }
    match pod.state(&rec.id).await {
        Ok(s) => s.status,
        Err(_) => ContainerStatus::Stopped,
    }
}

/// A container's status: from its waiter's record once it ended, else
/// from the agent.
async fn status(store: &Store, rec: &ContainerRecord) -> ContainerStatus {
    if ended(store, rec) {
        return ContainerStatus::Stopped;
    }
    match pod_of(store, rec).await {
        Ok(pod) => status_in(&pod, store, rec).await,
        Err(_) => ContainerStatus::Stopped,
    }
}

/// The container's hooks, from the spec as created.
fn hooks_of(store: &Store, rec: &ContainerRecord) -> Option<ContainerHooks> {
    let spec = saved_spec(store, &rec.id).ok()?;
    Some(ContainerHooks::of(&rec.id, &rec.bundle, &spec))
}

/// The guest pid standing behind host pid `pid` in `pod`: CRI names a
/// pod's namespaces by `/proc/<pid>` of its sandbox task, our waiter, whose
/// container's init has a guest pid.
fn pod_guest_pid(store: &Store, pod: &Pod, pid: i32) -> Option<i32> {
    pod.member_ids()
        .ok()?
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
    let created = rt.block_on(create_pod(cli, a, &store, &dir));
    if created.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    created
}

/// The bundle's parts that create reads.
struct Bundle {
    dir: PathBuf,
    config: PathBuf,
    spec: Spec,
    rootfs: PathBuf,
    terminal: bool,
}

fn read_bundle(a: &CreateArgs, dir: &Path) -> Result<Bundle> {
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
    let terminal = spec
        .process()
        .as_ref()
        .ok_or_else(|| anyhow!("{}: process: missing", config.display()))?
        .terminal()
        .unwrap_or(false);
    Ok(Bundle {
        dir: bundle,
        config,
        spec,
        rootfs,
        terminal,
    })
}

/// Finds or starts the container's pod, then creates the container in it;
/// a pod this create started is stopped again if the create fails, and
/// left running (detached from this process) if it succeeds.
async fn create_pod(cli: &Cli, a: &CreateArgs, store: &Store, dir: &Path) -> Result<Created> {
    let t0 = Instant::now();
    let b = read_bundle(a, dir)?;
    // The console socket first: one that refuses fails the create before
    // anything exists.
    let console = match (b.terminal, &a.console_socket) {
        (true, Some(sock)) => {
            let (master, slave) = console::open_pty()?;
            console::send_master(sock, &master)?;
            Some(slave)
        }
        (true, None) => None,
        (false, Some(_)) => bail!("--console-socket given, but process.terminal is false"),
        (false, None) => None,
    };
    let role = Role::of(&b.spec.annotations().clone().unwrap_or_default());
    let sandbox_id = role.pod_id(&a.id).to_owned();
    let pod_dir = store.sandbox_dir(&sandbox_id);
    let (pod, new_pod) = match &role {
        Role::Member(sandbox) => (
            Pod::open(&pod_dir)
                .await
                .with_context(|| format!("annotation {CRI_SANDBOX}: sandbox {sandbox}"))?,
            false,
        ),
        Role::Sandbox | Role::Standalone => {
            let mut cfg = PodConfig::for_spec(&sandbox_id, &pod_dir, &b.spec)?;
            cfg.detached = true;
            let pod = Pod::start(cfg).await?;
            tracing::debug!(id = %a.id, origin = ?pod.origin(), "pod ready {:?} into create", t0.elapsed());
            (pod, true)
        }
    };
    match create_in(cli, a, store, &b, &pod, &sandbox_id, console).await {
        Ok(c) => {
            tracing::info!(id = %a.id, pid = c.waiter.id(), "created in {:?}", t0.elapsed());
            pod.detach();
            Ok(c)
        }
        Err(e) => {
            if new_pod {
                pod.stop().await;
            }
            Err(e)
        }
    }
}

async fn create_in(
    cli: &Cli,
    a: &CreateArgs,
    store: &Store,
    b: &Bundle,
    pod: &Pod,
    sandbox_id: &str,
    console: Option<File>,
) -> Result<Created> {
    let stdio = Stdio {
        tty: b.terminal.then_some(WindowSize { rows: 24, cols: 80 }),
        stdin: true,
        stdout: true,
        stderr: !b.terminal,
    };
    let guest_pid = |pid: i32| pod_guest_pid(store, pod, pid);
    let creating = pod
        .create_container(NewContainer {
            id: &a.id,
            bundle: &b.dir,
            spec: &b.spec,
            rootfs: &b.rootfs,
            stdio,
            guest_pid: &guest_pid,
        })
        .await?;
    let waiter_args = WaiterArgs {
        sandbox_dir: pod.dir().to_path_buf(),
        exec_id: Some(creating.exec_id),
        exec_process: None,
        tty: b.terminal,
        record_exit: true,
        stand_in_dir: None,
        id: a.id.clone(),
    };
    let netns = pod.own_netns();
    let mut waiter = match spawn_waiter(cli, &waiter_args, console, netns.as_ref().map(|n| n.fd()))
    {
        Ok(w) => w,
        Err(e) => {
            creating.abort().await;
            return Err(e);
        }
    };
    let waiter_pid = waiter.id() as i32;
    let (exec_id, guest_pid) = (creating.exec_id, creating.guest_pid);
    let finished = async {
        // The waiter goes in the cgroup the spec names (containerd and the
        // kubelet account the container by it); the pod's VMM joined the
        // pod's.
        let mut host_cgroups = Vec::new();
        if let Some(path) = b
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
        {
            if let Err(e) = rtv_runtime::host_cgroup::join(
                &path.to_string_lossy(),
                &[waiter_pid],
                None,
                None,
                None,
                &mut host_cgroups,
            ) {
                rtv_runtime::host_cgroup::remove(&host_cgroups);
                return Err(e).with_context(|| format!("{}", b.config.display()));
            }
        }
        let rec = ContainerRecord {
            id: a.id.clone(),
            bundle: b.dir.clone(),
            rootfs: b.rootfs.clone(),
            created: logging::rfc3339_now(),
            annotations: b.spec.annotations().clone().unwrap_or_default(),
            sandbox_id: sandbox_id.to_owned(),
            exec_id,
            guest_pid,
            waiter_pid,
            waiter_start: rtv_runtime::vmm_process::start_time(waiter_pid).unwrap_or(0),
            owner: owner(),
            host_cgroups,
        };
        store.save(&rec)?;
        let hooks = ContainerHooks::of(&a.id, &b.dir, &b.spec);
        creating.finish(&hooks, waiter_pid).await?;
        if let Some(p) = &a.pid_file {
            write_pid_file(p, waiter_pid)?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = finished {
        let _ = waiter.kill();
        let _ = waiter.wait();
        return Err(e);
    }
    Ok(Created { waiter })
}

fn cmd_start(cli: &Cli, id: &str, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    rt.block_on(async {
        if ended(&store, &rec) {
            bail!("cannot start a container that has stopped");
        }
        let pod = pod_of(&store, &rec).await?;
        match status_in(&pod, &store, &rec).await {
            ContainerStatus::Created => {}
            ContainerStatus::Stopped => bail!("cannot start a container that has stopped"),
            other => bail!("cannot start an already {} container", status_name(other)),
        }
        let hooks = hooks_of(&store, &rec).ok_or_else(|| anyhow!("container {id}: no spec"))?;
        Ok(pod.start_container(&hooks, rec.waiter_pid).await?)
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
        if ended(&store, &rec) {
            bail!("container not running");
        }
        let pod = pod_of(&store, &rec).await?;
        match pod.signal(id, sig, all).await {
            Err(e) if e.agent_kind() == Some(ErrorKind::InvalidState) => {
                bail!("container not running")
            }
            r => Ok(r?),
        }
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
    let hooks = hooks_of(&store, &rec);
    let pod_dir = store.sandbox_dir(&rec.sandbox_id);
    rt.block_on(async {
        match Pod::open(&pod_dir).await {
            Ok(pod) => {
                let st = status_in(&pod, &store, &rec).await;
                if matches!(st, ContainerStatus::Running | ContainerStatus::Paused) && !force {
                    bail!(
                        "cannot delete container {id} that is not stopped: {}",
                        status_name(st)
                    );
                }
                if pod.delete_container(id, hooks.as_ref()).await? {
                    // The last container of the pod: the VM ends.
                    pod.stop().await;
                }
            }
            // The VM is gone: what is left of the container goes.
            Err(e) => {
                tracing::info!(id, "{e}");
                if Pod::remove_from_dead(&pod_dir, id).unwrap_or(true) {
                    Pod::clean_up(&pod_dir);
                }
                if let Some(h) = &hooks {
                    h.run_logged(hooks::Stage::Poststop, "stopped", 0).await;
                }
            }
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
    rtv_runtime::host_cgroup::remove(&rec.host_cgroups);
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

fn cmd_exec(cli: &Cli, a: &ExecArgs) -> Result<i32> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(&a.id)?;
    let process = exec_process(&store, a)?;
    let tty = process.terminal().unwrap_or(false) || a.tty;
    // The agent refuses an exec in a container that does not run; only
    // an end the host knows of is checked here.
    if ended(&store, &rec) {
        bail!("cannot exec in a container that is not running");
    }
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
        None,
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
                if rtv_runtime::vmm_process::start_time(h).is_some() {
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
        if ended(&store, &rec) {
            return Ok(Vec::new());
        }
        Ok::<_, anyhow::Error>(pod_of(&store, &rec).await?.pids(id).await?)
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
        let pod = pod_of(&store, &rec).await?;
        let mut ooms = None;
        loop {
            let s = pod.stats(id).await?;
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
            if status_in(&pod, &store, &rec).await == ContainerStatus::Stopped {
                return Ok(());
            }
        }
    })
}

fn cmd_pause(cli: &Cli, id: &str, pause: bool, rt: &tokio::runtime::Runtime) -> Result<()> {
    let store = Store::open(&cli.root)?;
    let rec = store.load(id)?;
    rt.block_on(async {
        let want = if pause {
            ContainerStatus::Running
        } else {
            ContainerStatus::Paused
        };
        if ended(&store, &rec) {
            bail!("container not {}", status_name(want));
        }
        let pod = pod_of(&store, &rec).await?;
        if status_in(&pod, &store, &rec).await != want {
            bail!("container not {}", status_name(want));
        }
        Ok(pod.pause(id, pause).await?)
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
    rt.block_on(async { Ok(pod_of(&store, &rec).await?.update(&u.id, resources).await?) })
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
    let config = rtv_runtime::config::get();
    line(
        "configuration",
        true,
        match &config.path {
            Some(p) => p.display().to_string(),
            None => format!(
                "none ({} does not exist, $RTV_CONFIG unset): the defaults",
                rtv_runtime::config::DEFAULT_PATH
            ),
        },
    );
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
    match Artifacts::find() {
        Ok(a) => {
            line("guest kernel", true, a.kernel.display().to_string());
            line(
                "guest kernel, 1 vCPU",
                true,
                match &a.kernel_up {
                    Some(up) => up.display().to_string(),
                    None => "none (the SMP kernel boots every VM)".into(),
                },
            );
            line("initramfs", true, a.initramfs.display().to_string());
            line("rtv-vmm", true, a.vmm.display().to_string());
            let size = vm_size(
                &rtv_runtime::spec::default_spec(),
                rtv_runtime::spec::host_cpus(),
            );
            line(
                "default VM",
                true,
                format!(
                    "{} MiB, {} vCPU(s) for a spec without limits; VMM hardening {}; VMM seccomp filters {}",
                    size.mem_mib,
                    size.vcpus,
                    if config.vmm.jail {
                        "on"
                    } else {
                        "off (vmm.jail = false)"
                    },
                    match config.vmm.seccomp {
                        rtv_runtime::config::Seccomp::On => "on",
                        rtv_runtime::config::Seccomp::Log => "log only (vmm.seccomp = \"log\")",
                        rtv_runtime::config::Seccomp::Off => "off (vmm.seccomp = \"off\")",
                    }
                ),
            );
            line(
                "VM limits and guest",
                true,
                format!(
                    "at most {} and {}; kernel arguments added: {}; PVM accommodations: {}; log level: {}; \
                     a guest silent for {} s is stopped (agent.answer_timeout_secs)",
                    config
                        .vm
                        .max_memory_mib
                        .map_or("the host's memory".to_owned(), |m| format!(
                            "{m} MiB (vm.max_memory_mib)"
                        )),
                    config
                        .vm
                        .max_vcpus
                        .map_or("the host's CPUs".to_owned(), |m| format!(
                            "{m} vCPU(s) (vm.max_vcpus)"
                        )),
                    config.vm.kernel_args.as_deref().unwrap_or("none"),
                    config.vm.pvm.as_str(),
                    config.log.level.map_or("info", |l| l.as_str()),
                    config.agent.answer_timeout().as_secs(),
                ),
            );
            let mut cfg = SandboxConfig::new(
                a.kernel_for(size.vcpus),
                &a.initramfs,
                &a.vmm,
                "/nonexistent",
                "check",
                3,
            );
            cfg.mem_mib = size.mem_mib;
            cfg.vcpus = size.vcpus;
            cfg.shared_dir = Some(PathBuf::from("/"));
            cfg.template_dir = Some(rtv_runtime::template_dir());
            if let Ok(cache) = cfg.template_cache() {
                let (count, bytes, budget) = cache.usage();
                line(
                    "template cache",
                    true,
                    format!(
                        "{count} templates, {} MiB of its {} MiB budget (templates.max_size_mib), in {}",
                        bytes >> 20,
                        budget >> 20,
                        cache.root().display()
                    ),
                );
            }
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
                        rtv_runtime::template_dir().display()
                    ),
                ),
            }
        }
        Err(e) => line("artifacts", false, format!("{e:#}")),
    }
    for (what, good, detail) in jail_support() {
        line(what, good, detail);
    }
    Ok(ok)
}

/// What this host and user give the VMM's hardening (rtv-vmm's `--jail`).
fn jail_support() -> Vec<(&'static str, bool, String)> {
    // SAFETY: close_range over descriptors that cannot exist closes
    // nothing; it only tells whether the call is there (Linux 5.9+).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, u32::MAX - 1, u32::MAX, 0u32) };
    let close_range = if rc == 0 {
        (true, "close_range available".to_owned())
    } else {
        (
            false,
            format!(
                "close_range: {} (Linux 5.9 or later needed)",
                std::io::Error::last_os_error()
            ),
        )
    };
    // CapPrm's bit 8 (CAP_SETPCAP): without it the bounding set cannot
    // shrink (no_new_privs still holds).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let prm = status
        .lines()
        .find_map(|l| l.strip_prefix("CapPrm:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SETPCAP: u32 = 8;
    let setpcap = prm & (1 << CAP_SETPCAP) != 0;
    // SAFETY: PR_GET_NO_NEW_PRIVS takes integer arguments only.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } >= 0;
    // seccomp filters (CONFIG_SECCOMP_FILTER) and the trap action the
    // filters end forbidden calls with.
    // SAFETY: PR_GET_SECCOMP takes integer arguments only.
    let seccomp_mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    let actions =
        std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    let seccomp = match (seccomp_mode >= 0, actions.split_whitespace().any(|a| a == "trap")) {
        (true, true) => (true, "filters with the trap action available".to_owned()),
        (false, _) => (
            false,
            format!(
                "the kernel has no seccomp ({}): rtv-vmm needs --seccomp off (vmm.seccomp = \"off\")",
                std::io::Error::last_os_error()
            ),
        ),
        (true, false) => (
            false,
            "no seccomp filters (/proc/sys/kernel/seccomp/actions_avail lacks trap): rtv-vmm needs --seccomp off".to_owned(),
        ),
    };
    // Namespaces (CAP_SYS_ADMIN, bit 21, and the kernel's kinds) and a
    // procfs with only process directories (`subset=pid`, Linux 5.8).
    const CAP_SYS_ADMIN: u32 = 21;
    let missing: Vec<&str> = ["ipc", "uts", "net", "pid", "mnt"]
        .into_iter()
        .filter(|ns| !Path::new("/proc/self/ns").join(ns).exists())
        .collect();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut version = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|v| v.parse::<u32>().ok());
    let subset_pid = (version.next().unwrap_or(0), version.next().unwrap_or(0)) >= (5, 8);
    let namespaces = if prm & (1 << CAP_SYS_ADMIN) == 0 {
        (
            true,
            "not root (no CAP_SYS_ADMIN): the VMM keeps the host's namespaces and root".to_owned(),
        )
    } else if !missing.is_empty() {
        (
            false,
            format!(
                "the kernel lacks {} namespaces: rtv-vmm needs --jail off (vmm.jail = false)",
                missing.join(", ")
            ),
        )
    } else if !subset_pid {
        (
            false,
            format!(
                "Linux {} cannot mount a procfs with subset=pid (5.8 or later): rtv-vmm needs --jail off",
                release.trim()
            ),
        )
    } else {
        (
            true,
            "own IPC, UTS, network, pid and mount namespaces, a read-only root and a procfs of its own processes".to_owned(),
        )
    };
    vec![
        ("VMM hardening: descriptors", close_range.0, close_range.1),
        ("VMM hardening: namespaces", namespaces.0, namespaces.1),
        ("VMM hardening: seccomp", seccomp.0, seccomp.1),
        (
            "VMM hardening: capabilities",
            true,
            if setpcap {
                "bounding, permitted and effective sets cut to virtio-fs's seven".into()
            } else {
                "not root (no CAP_SETPCAP): the bounding set stays; no_new_privs keeps exec from using it".into()
            },
        ),
        (
            "VMM hardening: no_new_privs",
            nnp,
            if nnp {
                "available".into()
            } else {
                "prctl refused".into()
            },
        ),
    ]
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
        Cmd::Exec(a) => cmd_exec(cli, a),
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
    // The configuration first: its `log.level` sets the log's.
    if let Err(e) = rtv_runtime::config::init_from_file(cli.config.as_deref()) {
        eprintln!("rtv: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = logging::init(
        cli.log.as_deref(),
        cli.log_format,
        cli.debug,
        rtv_runtime::config::get().log.level,
    ) {
        eprintln!(
            "rtv: --log {}: {e}",
            cli.log.as_deref().unwrap_or(Path::new("")).display()
        );
        return ExitCode::from(1);
    }
    if let Some(path) = &cli.config {
        // Every rtv this one starts (the waiter) reads the same file
        // (still single-threaded here).
        std::env::set_var(rtv_runtime::config::ENV, path);
    }
    if let Cmd::Waiter(w) = &cli.command {
        return waiter::waiter(&cli, w);
    }
    if cli.debug && std::env::var_os(rtv_runtime::pod::PROFILE_ENV).is_none() {
        // --debug profiles the guest of every pod this rtv starts, into
        // <root>/profiles/<pod>/ (still single-threaded here).
        std::env::set_var(rtv_runtime::pod::PROFILE_ENV, cli.root.join("profiles"));
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
