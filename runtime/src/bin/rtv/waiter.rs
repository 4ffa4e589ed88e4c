//! `rtv waiter`: the host process that stands for a container's process
//! (its init, or an exec). It holds the process's stdio, relays it to and
//! from the guest, and exits with the process's status (128+N for a
//! signal) when it ends: the pid runc's callers wait for.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio as ProcStdio};

use anyhow::{bail, Context, Result};
use clap::Args;
use oci_spec::runtime::Process;
use rtv_protocol::{ExitStatus, Stdio, StreamKind, WindowSize};
use rtv_runtime::Pod;

use crate::cli::Cli;
use crate::console;
use crate::logging::LogFormat;
use crate::store::Store;

#[derive(Args, Debug)]
pub struct WaiterArgs {
    /// The sandbox directory (its vsock socket).
    #[arg(long)]
    pub sandbox_dir: PathBuf,
    /// The process's exec id (a container's init).
    #[arg(long)]
    pub exec_id: Option<u64>,
    /// A process.json to run in the container (an exec).
    #[arg(long)]
    pub exec_process: Option<PathBuf>,
    /// The process has a terminal.
    #[arg(long)]
    pub tty: bool,
    /// Record the exit status in the container's state.
    #[arg(long)]
    pub record_exit: bool,
    /// Where to note which guest pid this waiter stands for (execs).
    #[arg(long)]
    pub stand_in_dir: Option<PathBuf>,
    /// The container.
    pub id: String,
}

/// Starts `rtv waiter` with this process's stdio (or `tty`, the slave of
/// the terminal sent to the console socket) and waits until it has
/// attached to the process's streams.
///
/// With `netns`, the waiter is started in that network namespace (the one
/// rtv made for the pod): the pid hooks get in the state is then a process
/// in the pod's namespace, never one in the caller's.
pub fn spawn_waiter(
    cli: &Cli,
    w: &WaiterArgs,
    tty: Option<File>,
    netns: Option<&std::os::fd::OwnedFd>,
) -> Result<std::process::Child> {
    // /proc/self/exe runs this very binary even if it was replaced since.
    let (mut sync_r, sync_w) = pipe()?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("rtv");
    cmd.arg("--root").arg(&cli.root);
    if let Some(config) = &cli.config {
        cmd.arg("--config").arg(config);
    }
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
    let netns_fd = netns.map(|n| n.as_raw_fd());
    // SAFETY: the closure only calls async-signal-safe functions (setns,
    // dup2, setsid, ioctl) on descriptors it was given.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(ns) = netns_fd {
                if libc::setns(ns, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
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
pub fn waiter(cli: &Cli, w: &WaiterArgs) -> ExitCode {
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
    let pod = Pod::open(&w.sandbox_dir).await?;
    let client = pod.client();
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
            let (id, guest_pid) = pod.exec(&w.id, process, stdio).await?;
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
    // The streams' connections are made at once: each is a round trip
    // through the guest's vsock.
    let (stdin, stdout, stderr) = tokio::try_join!(
        client.attach(exec_id, StreamKind::Stdin),
        client.attach(exec_id, StreamKind::Stdout),
        async {
            match w.tty {
                true => Ok(None),
                false => client.attach(exec_id, StreamKind::Stderr).await.map(Some),
            }
        },
    )?;
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
                s = client.wait(exec_id) => break killed_with_vm(s, &w.sandbox_dir)?,
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
    let status = killed_with_vm(client.wait(exec_id).await, &w.sandbox_dir)?;
    let _ = tokio::task::spawn_blocking(move || {
        let _ = out.join();
        if let Some(e) = err {
            let _ = e.join();
        }
    })
    .await;
    Ok(status)
}

/// The process's status: its own, or SIGKILL's when its VM ended under it
/// (the agent's connection closed: the VMM exited or was killed), as a
/// container killed together with its host is reported (137); the log
/// says why the VM ended (`sandbox_dir`'s console and VMM log).
fn killed_with_vm(
    status: Result<ExitStatus, rtv_runtime::ClientError>,
    sandbox_dir: &std::path::Path,
) -> Result<ExitStatus> {
    match status {
        Err(rtv_runtime::ClientError::Disconnected) => {
            tracing::error!(
                "the container's VM ended under it: {}; reported as killed (137)",
                rtv_runtime::sandbox::end_reason(sandbox_dir)
            );
            Ok(ExitStatus::Signal(libc::SIGKILL))
        }
        other => Ok(other?),
    }
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
