//! Processes the agent starts: spawning (pipes or a terminal), the reaper
//! that collects every exit status as PID 1 must, signals and stdio.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use std::os::fd::RawFd;

use rtv_protocol::{
    ErrorKind, ExecRequest, ExitStatus, Stdio as StdioRequest, StreamKind, WindowSize,
};

/// Where programs are looked up when the request's environment has no PATH.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A failed request: its kind and a message naming the thing.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A failed I/O operation on `what`.
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::Other,
        };
        Self::new(kind, format!("{what}: {e}"))
    }
}

/// A process's stdin: closed by `CloseStdin` even while a stream copies into it.
pub type SharedStdin = Arc<Mutex<Option<File>>>;

struct Proc {
    pid: i32,
    status: Option<ExitStatus>,
    stdin: Option<SharedStdin>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// The terminal's master side, for resizes and stdio.
    tty: Option<Arc<File>>,
}

#[derive(Default)]
struct Table {
    procs: HashMap<u64, Proc>,
    by_pid: HashMap<i32, u64>,
    next_id: u64,
    spawned: u64,
    /// Spawns under way (see [`Processes::spawn`]).
    spawning: usize,
}

/// Every process the agent started, by exec id.
#[derive(Default)]
pub struct Processes {
    table: Mutex<Table>,
    changed: Condvar,
}

fn no_such(id: u64) -> Failure {
    Failure::new(
        ErrorKind::NoSuchProcess,
        format!("no process with exec id {id}"),
    )
}

fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Finds `program` the way execvp would, in `path`.
fn resolve(program: &str, path: &str) -> Result<PathBuf, Failure> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Failure::new(
                ErrorKind::NotFound,
                format!("executable {program:?} not found in PATH {path}"),
            )
        })
}

fn open_pty(size: WindowSize) -> Result<(File, File), Failure> {
    let mut master = -1;
    let mut slave = -1;
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the out-pointers are valid for the call; name and termios may
    // be null; `ws` is a valid winsize.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(Failure::io(
            "opening a pseudo-terminal",
            &std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: openpty returned two new descriptors that we now own.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    for f in [&master, &slave] {
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

fn set_window_size(tty: &File, size: WindowSize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn decode_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

impl Processes {
    /// Starts a process; returns its exec id and pid.
    pub fn spawn(&self, req: &ExecRequest) -> Result<(u64, i32), Failure> {
        let program = req
            .argv
            .first()
            .ok_or_else(|| Failure::new(ErrorKind::InvalidRequest, "argv is empty"))?;
        let path = req
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        let resolved = resolve(program, path)?;
        let cwd = req.cwd.as_deref().unwrap_or("/");
        if !Path::new(cwd).is_dir() {
            return Err(Failure::new(
                ErrorKind::NotFound,
                format!("working directory {cwd:?} does not exist"),
            ));
        }
        let mut cmd = Command::new(&resolved);
        cmd.arg0(program)
            .args(&req.argv[1..])
            .env_clear()
            .current_dir(cwd);
        // Only change identity when asked to: without it std starts the
        // process with posix_spawn (vfork), which spares the guest kernel
        // copying the agent's page tables.
        // SAFETY: geteuid and getegid cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if req.uid != euid || req.gid != egid {
            cmd.uid(req.uid).gid(req.gid);
        }
        for kv in &req.env {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    cmd.env(k, v);
                }
                _ => {
                    return Err(Failure::new(
                        ErrorKind::InvalidRequest,
                        format!("environment entry {kv:?} is not KEY=VALUE"),
                    ))
                }
            }
        }

        // On PVM hosts the VMM gives init GLIBC_TUNABLES to keep user space
        // off AVX (see rtv_vmm::platform::PVM_GUEST_ENV); pass it on.
        if !req.env.iter().any(|e| e.starts_with("GLIBC_TUNABLES=")) {
            if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
                cmd.env("GLIBC_TUNABLES", t);
            }
        }
        let mut proc = Proc {
            pid: 0,
            status: None,
            stdin: None,
            stdout: None,
            stderr: None,
            tty: None,
        };
        if let Some(size) = req.tty {
            let (master, slave) = open_pty(size)?;
            let dup = |f: &File| {
                f.try_clone()
                    .map_err(|e| Failure::io("duplicating the terminal", &e))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            // SAFETY: setsid and ioctl are async-signal-safe; the closure
            // touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            proc.tty = Some(Arc::new(master));
        } else {
            let pipe_or_null = |wanted: bool| {
                if wanted {
                    Stdio::piped()
                } else {
                    Stdio::null()
                }
            };
            cmd.stdin(pipe_or_null(req.stdin))
                .stdout(pipe_or_null(req.stdout))
                .stderr(pipe_or_null(req.stderr));
        }

        // While a spawn is under way the reaper leaves unknown children
        // alone: std reaps a child whose exec failed itself, and this child
        // is registered only once spawn() returns. The table is not held
        // during the fork and exec (seconds in an emulated guest kernel).
        lock(&self.table).spawning += 1;
        let spawned = cmd.spawn();
        let mut table = lock(&self.table);
        table.spawning -= 1;
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                drop(table);
                self.changed.notify_all();
                return Err(Failure::io(&format!("starting {}", resolved.display()), &e));
            }
        };
        proc.pid = child.id() as i32;
        if proc.tty.is_none() {
            proc.stdin = child
                .stdin
                .take()
                .map(|s| Arc::new(Mutex::new(Some(File::from(OwnedFd::from(s))))));
            proc.stdout = child.stdout.take().map(|s| File::from(OwnedFd::from(s)));
            proc.stderr = child.stderr.take().map(|s| File::from(OwnedFd::from(s)));
        }
        table.next_id += 1;
        table.spawned += 1;
        let id = table.next_id;
        let pid = proc.pid;
        table.by_pid.insert(pid, id);
        table.procs.insert(id, proc);
        drop(table);
        self.changed.notify_all();
        // The reaper collects the status; the Child handle is not waited on.
        drop(child);
        Ok((id, pid))
    }

    /// Blocks until process `id` has ended.
    pub fn wait(&self, id: u64) -> Result<ExitStatus, Failure> {
        let mut table = lock(&self.table);
        loop {
            let proc = table.procs.get(&id).ok_or_else(|| no_such(id))?;
            if let Some(status) = proc.status {
                return Ok(status);
            }
            table = self.changed.wait(table).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Sends `signal` to process `id` if it has not been reaped.
    pub fn signal(&self, id: u64, signal: i32) -> Result<(), Failure> {
        let table = lock(&self.table);
        let proc = table.procs.get(&id).ok_or_else(|| no_such(id))?;
        if proc.status.is_some() {
            return Err(Failure::new(
                ErrorKind::NoSuchProcess,
                format!("process {id} has already exited"),
            ));
        }
        // SAFETY: kill(2) with a pid that is still ours (not reaped, so not reused).
        if unsafe { libc::kill(proc.pid, signal) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Failure::new(
                ErrorKind::InvalidRequest,
                format!("signal {signal}: {e}"),
            ));
        }
        Ok(())
    }

    /// Resizes process `id`'s terminal.
    pub fn resize(&self, id: u64, size: WindowSize) -> Result<(), Failure> {
        let table = lock(&self.table);
        let proc = table.procs.get(&id).ok_or_else(|| no_such(id))?;
        let tty = proc.tty.as_ref().ok_or_else(|| {
            Failure::new(
                ErrorKind::InvalidRequest,
                format!("process {id} has no terminal"),
            )
        })?;
        set_window_size(tty, size).map_err(|e| Failure::io("resizing the terminal", &e))
    }

    /// Closes process `id`'s stdin (sends end-of-file to a terminal).
    pub fn close_stdin(&self, id: u64) -> Result<(), Failure> {
        let table = lock(&self.table);
        let proc = table.procs.get(&id).ok_or_else(|| no_such(id))?;
        if let Some(tty) = &proc.tty {
            use std::io::Write;
            // VEOF (^D) at the start of a line ends the terminal's input.
            let _ = (&**tty).write_all(b"\x04");
        } else if let Some(stdin) = &proc.stdin {
            stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        Ok(())
    }

    /// Hands out one of process `id`'s streams, once.
    pub fn take_stream(&self, id: u64, kind: StreamKind) -> Result<StreamEnd, Failure> {
        let mut table = lock(&self.table);
        let proc = table.procs.get_mut(&id).ok_or_else(|| no_such(id))?;
        let taken = match (&proc.tty, kind) {
            (Some(tty), StreamKind::Stdin) => Some(StreamEnd::Input(Arc::new(Mutex::new(Some(
                tty.try_clone()
                    .map_err(|e| Failure::io("duplicating the terminal", &e))?,
            ))))),
            (Some(tty), StreamKind::Stdout) => Some(StreamEnd::Output(
                tty.try_clone()
                    .map_err(|e| Failure::io("duplicating the terminal", &e))?,
            )),
            (Some(_), StreamKind::Stderr) => None,
            (None, StreamKind::Stdin) => proc.stdin.clone().map(StreamEnd::Input),
            (None, StreamKind::Stdout) => proc.stdout.take().map(StreamEnd::Output),
            (None, StreamKind::Stderr) => proc.stderr.take().map(StreamEnd::Output),
        };
        taken.ok_or_else(|| {
            Failure::new(
                ErrorKind::InvalidRequest,
                format!(
                    "process {id} has no {kind:?} to attach (not requested, or already attached)"
                ),
            )
        })
    }

    /// Collects exit statuses forever: those of processes the agent started
    /// are recorded, orphans' are discarded.
    pub fn reap_forever(&self) -> ! {
        loop {
            // SAFETY: an all-zero siginfo_t is a valid value to be filled in.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // Look without reaping, so a spawn that reaps its own failed
            // child (std does) is never raced.
            // SAFETY: `info` is a valid out-pointer.
            let rc =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc < 0 {
                let table = lock(&self.table);
                let spawned = table.spawned;
                // No children: sleep until a spawn (or a timeout, for orphans
                // adopted later).
                let _ = self
                    .changed
                    .wait_timeout_while(table, Duration::from_secs(1), |t| t.spawned == spawned);
                continue;
            }
            // SAFETY: waitid filled `info` for a WEXITED event.
            let pid = unsafe { info.si_pid() };
            let mut table = lock(&self.table);
            // A child that is not ours yet may be one a spawn under way is
            // about to register, or reap itself: wait for the spawns.
            while !table.by_pid.contains_key(&pid) && table.spawning > 0 {
                table = self.changed.wait(table).unwrap_or_else(|p| p.into_inner());
            }
            let mut status = 0;
            // SAFETY: waitpid on a specific pid with a valid out-pointer;
            // WNOHANG because a spawn may have reaped it meanwhile.
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if reaped == pid {
                if let Some(id) = table.by_pid.remove(&pid) {
                    if let Some(proc) = table.procs.get_mut(&id) {
                        proc.status = Some(decode_status(status));
                    }
                    drop(table);
                    self.changed.notify_all();
                }
            }
        }
    }
}

/// A process's stdio made before a fork: the child's ends (to become its
/// fds 0-2) and the agent's (kept in the process table).
pub struct PreparedStdio {
    child: [OwnedFd; 3],
    tty: Option<Arc<File>>,
    stdin: Option<SharedStdin>,
    stdout: Option<File>,
    stderr: Option<File>,
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> Result<(File, File), Failure> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Failure::io(
            "making a pipe",
            &std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 returned two new descriptors that we now own.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn dev_null() -> Result<File, Failure> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Failure::io("/dev/null", &e))
}

/// Makes the pipes or terminal for `stdio`.
pub fn prepare_stdio(stdio: &StdioRequest) -> Result<PreparedStdio, Failure> {
    if let Some(size) = stdio.tty {
        let (master, slave) = open_pty(size)?;
        let dup = |f: &File| {
            f.try_clone()
                .map(OwnedFd::from)
                .map_err(|e| Failure::io("duplicating the terminal", &e))
        };
        return Ok(PreparedStdio {
            child: [dup(&slave)?, dup(&slave)?, OwnedFd::from(slave)],
            tty: Some(Arc::new(master)),
            stdin: None,
            stdout: None,
            stderr: None,
        });
    }
    let (stdin_child, stdin) = if stdio.stdin {
        let (r, w) = pipe()?;
        (r, Some(Arc::new(Mutex::new(Some(w)))))
    } else {
        (dev_null()?, None)
    };
    let output = |wanted: bool| -> Result<(File, Option<File>), Failure> {
        if wanted {
            let (r, w) = pipe()?;
            Ok((w, Some(r)))
        } else {
            Ok((dev_null()?, None))
        }
    };
    let (stdout_child, stdout) = output(stdio.stdout)?;
    let (stderr_child, stderr) = output(stdio.stderr)?;
    Ok(PreparedStdio {
        child: [stdin_child.into(), stdout_child.into(), stderr_child.into()],
        tty: None,
        stdin,
        stdout,
        stderr,
    })
}

impl PreparedStdio {
    /// The child's descriptors for 0, 1 and 2.
    pub fn child_fds(&self) -> [RawFd; 3] {
        [
            self.child[0].as_raw_fd(),
            self.child[1].as_raw_fd(),
            self.child[2].as_raw_fd(),
        ]
    }

    /// Whether the child's stdio is a terminal.
    pub fn is_tty(&self) -> bool {
        self.tty.is_some()
    }
}

impl Processes {
    /// Starts a process with `fork`, which forks and returns the child's
    /// pid (the child never returns from it), and registers it with its
    /// stdio. The reaper leaves the child alone until it is registered.
    pub fn fork_registered(
        &self,
        stdio: PreparedStdio,
        fork: impl FnOnce(&PreparedStdio) -> std::io::Result<i32>,
    ) -> Result<(u64, i32), Failure> {
        lock(&self.table).spawning += 1;
        let forked = fork(&stdio);
        let mut table = lock(&self.table);
        table.spawning -= 1;
        let pid = match forked {
            Ok(pid) => pid,
            Err(e) => {
                drop(table);
                self.changed.notify_all();
                return Err(Failure::io("fork", &e));
            }
        };
        let proc = Proc {
            pid,
            status: None,
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            tty: stdio.tty,
        };
        table.next_id += 1;
        table.spawned += 1;
        let id = table.next_id;
        table.by_pid.insert(pid, id);
        table.procs.insert(id, proc);
        drop(table);
        self.changed.notify_all();
        // The child's ends close here: only the child holds them now.
        drop(stdio.child);
        Ok((id, pid))
    }

    /// How process `id` ended, if it has.
    pub fn status(&self, id: u64) -> Option<ExitStatus> {
        lock(&self.table).procs.get(&id).and_then(|p| p.status)
    }

    /// Forgets process `id` (it must have ended): its streams close.
    pub fn forget(&self, id: u64) {
        let mut table = lock(&self.table);
        if table.procs.get(&id).is_some_and(|p| p.status.is_some()) {
            table.procs.remove(&id);
        }
    }
}

/// One end of a process's stdio, handed to a stream connection.
pub enum StreamEnd {
    /// Bytes from the connection go here (stdin).
    Input(SharedStdin),
    /// Bytes from here go to the connection (stdout, stderr, terminal output).
    Output(File),
}
