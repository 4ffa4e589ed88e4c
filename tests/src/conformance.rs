//! An OCI runtime conformance suite of our own, generic over the runtime
//! binary: every scenario drives a runtime through runc's command line
//! (`--root R create|start|state|kill|delete|run|exec|ps|list|pause|resume|
//! spec|features`) and asserts what the OCI runtime spec (runtime.md: the
//! lifecycle, the state, the operations; config.md: hooks) and runc's
//! observable behaviour say should happen.
//!
//! The suite is validated against Debian's runc (`tests/tests/conformance_runc.rs`);
//! where runc 1.1 departs from the spec the suite follows runc (rtv must be
//! a drop-in for it) and says so in a comment.
//!
//! Two things make the suite work with runc and with a VM runtime alike:
//!
//! - The test process is a child subreaper (`PR_SET_CHILD_SUBREAPER`), as
//!   containerd's shim is. The process whose pid a runtime writes to
//!   `--pid-file` (runc: the container's init; rtv: a host process that
//!   lives exactly as long as the container) ends up our child, so we wait
//!   for it and check that its exit status is the container's (128+N for a
//!   container killed by signal N).
//! - Container output is read from the stdout and stderr files (or pipes)
//!   the runtime was started with: with `process.terminal` false a runtime
//!   passes its stdio to the container unmodified. Scenarios that must not
//!   race a container's start wait for it to print `ready`.
//!
//! Every command runs with a timeout, every scenario has a deadline, and
//! every container a scenario names is deleted with `--force` afterwards,
//! whether the scenario passed or not.

use std::cell::{Cell, RefCell};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// Makes a bundle in an empty directory: `config.json` running `args`
/// with `process.terminal` false, and the root file system it names. The
/// rootfs needs busybox's `sh`, `cat`, `echo` and `sleep`.
pub type BundleMaker<'a> = &'a dyn Fn(&Path, &[&str]) -> Result<()>;

/// How long one runtime command may take by default.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a scenario waits for a container to change state by default.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one scenario may take by default, all commands included.
pub const SCENARIO_DEADLINE: Duration = Duration::from_secs(180);

/// The container's statuses the OCI spec defines, plus runc's `paused`.
const STATUSES: &[&str] = &["creating", "created", "running", "stopped", "paused"];

/// The busybox bundle the suite uses by default: a root file system from
/// [`crate::containers::busybox_rootfs`] and `rtv_runtime::spec::DEFAULT_SPEC`
/// with `args`, no terminal, `PATH=/bin` and a writable tmpfs on /tmp.
pub fn busybox_bundle(dir: &Path, args: &[&str]) -> Result<()> {
    crate::containers::busybox_rootfs(&dir.join("rootfs"))?;
    let mut config: Value = serde_json::from_str(rtv_runtime::spec::DEFAULT_SPEC)
        .context("parsing rtv_runtime::spec::DEFAULT_SPEC")?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = json!(args);
    config["process"]["env"] = json!(["PATH=/bin", "HOME=/"]);
    config["root"]["path"] = "rootfs".into();
    if let Some(mounts) = config["mounts"].as_array_mut() {
        mounts.push(
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777"]}),
        );
    }
    fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// What the runtime's stdin is for one command.
pub enum Input {
    /// `/dev/null`.
    Null,
    /// A pipe fed these bytes, then closed.
    Bytes(Vec<u8>),
    /// This file descriptor (e.g. the read end of a pipe the scenario keeps
    /// writing to after the runtime exits).
    Fd(OwnedFd),
}

/// How one runtime command ended, with its output.
#[derive(Debug)]
pub struct Output {
    /// The arguments after `--root R`.
    pub args: Vec<String>,
    /// The runtime's exit status.
    pub status: ExitStatus,
    /// What was on its stdout when it exited.
    pub stdout: String,
    /// What was on its stderr when it exited.
    pub stderr: String,
    /// The file its stdout went to: a container created by this command
    /// keeps writing there.
    pub stdout_path: PathBuf,
    /// The file its stderr went to.
    pub stderr_path: PathBuf,
    /// How long it took.
    pub elapsed: Duration,
}

impl Output {
    /// The exit code, if the runtime exited (rather than died of a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The stdout file as it is now (with what a container wrote since).
    pub fn stdout_now(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// The stderr file as it is now.
    pub fn stderr_now(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// One line for failure messages: the command, how it ended, its output.
    pub fn describe(&self) -> String {
        format!(
            "`{}` ended {} after {:?}; stdout {:?}; stderr {:?}",
            self.args.join(" "),
            self.status,
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A runtime command started with piped stdout and stderr, read by
/// threads until EOF (when the runtime and every container process that
/// inherited the pipes have closed them).
pub struct Piped {
    args: Vec<String>,
    child: Child,
    stdout: mpsc::Receiver<Vec<u8>>,
    stderr: mpsc::Receiver<Vec<u8>>,
}

impl Piped {
    /// Waits for the runtime process to exit; kills it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let args = self.args.join(" ");
        wait_child(&mut self.child, timeout).with_context(|| format!("`{args}`"))
    }

    /// Waits for EOF on both pipes and returns (stdout, stderr).
    pub fn output(&self, timeout: Duration) -> Result<(String, String)> {
        let deadline = Instant::now() + timeout;
        let take = |rx: &mpsc::Receiver<Vec<u8>>, name: &str| -> Result<String> {
            let left = deadline.saturating_duration_since(Instant::now());
            let bytes = rx.recv_timeout(left).with_context(|| {
                format!(
                    "no EOF on the {name} pipe of `{}` within {timeout:?}",
                    self.args.join(" ")
                )
            })?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        let out = take(&self.stdout, "stdout")?;
        let err = take(&self.stderr, "stderr")?;
        Ok((out, err))
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for `child`, polling; after `timeout` kills its process group
/// (runtime commands are started in their own) and reaps it.
fn wait_child(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let started = Instant::now();
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() >= timeout {
            if let Ok(pgid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the process group we made for this
                // command (its leader is our unreaped child).
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not exit within {timeout:?}: killed");
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// Makes the calling process a child subreaper, so that orphaned
/// descendants (a container's init once `create` exits, an `exec
/// --detach`ed process) become its children and can be waited for.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no
    // memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    ensure!(
        r == 0,
        "prctl(PR_SET_CHILD_SUBREAPER): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Whether a process `pid` exists (zombies included): `kill(pid, 0)`.
pub fn pid_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be
    // signalled; nothing is delivered.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), if the
/// process exists.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Whether `pid` is a live process (it exists and is not a zombie).
pub fn pid_running(pid: i32) -> bool {
    pid_exists(pid) && !matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// Reads a pid file: a positive decimal number, maybe with a newline.
pub fn read_pid_file(path: &Path) -> Result<i32> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading the pid file {}", path.display()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("the pid file {} holds {text:?}", path.display()))?;
    ensure!(pid > 0, "the pid file {} holds {pid}", path.display());
    Ok(pid)
}

/// Checks a `state` document against the OCI runtime spec's state schema
/// (runtime.md "State", schema/state-schema.json): `ociVersion` string,
/// `id` string (equal to `id`), `status` one of the spec's statuses (runc
/// adds `paused`), `pid` a positive integer while created, running or
/// paused, `bundle` an absolute path, `annotations` (optional) an object of
/// strings.
///
/// runc 1.1 reports `"pid": 0` for a stopped container (the spec leaves pid
/// out then); an integer >= 0 is accepted when stopped.
pub fn check_state(state: &Value, id: &str) -> Result<()> {
    let obj = state
        .as_object()
        .with_context(|| format!("state is not a JSON object: {state}"))?;
    let version = obj.get("ociVersion").and_then(Value::as_str);
    ensure!(
        version.is_some_and(|v| !v.is_empty()),
        "state.ociVersion must be a non-empty string: {state}"
    );
    ensure!(
        obj.get("id").and_then(Value::as_str) == Some(id),
        "state.id must be {id:?}: {state}"
    );
    let status = obj
        .get("status")
        .and_then(Value::as_str)
        .with_context(|| format!("state.status must be a string: {state}"))?;
    ensure!(
        STATUSES.contains(&status),
        "state.status {status:?} is not one of {STATUSES:?}"
    );
    match (status, obj.get("pid")) {
        ("created" | "running" | "paused", Some(pid)) => ensure!(
            pid.as_i64().is_some_and(|p| p > 0 && p <= i32::MAX as i64),
            "state.pid must be a positive integer while {status}: {state}"
        ),
        ("created" | "running" | "paused", None) => {
            bail!("state.pid is required while {status}: {state}")
        }
        (_, Some(pid)) => ensure!(
            pid.as_i64().is_some_and(|p| p >= 0),
            "state.pid must be an integer: {state}"
        ),
        (_, None) => {}
    }
    let bundle = obj
        .get("bundle")
        .and_then(Value::as_str)
        .with_context(|| format!("state.bundle must be a string: {state}"))?;
    ensure!(
        Path::new(bundle).is_absolute(),
        "state.bundle must be an absolute path: {bundle:?}"
    );
    if let Some(a) = obj.get("annotations") {
        let a = a
            .as_object()
            .with_context(|| format!("state.annotations must be an object: {state}"))?;
        ensure!(
            a.values().all(Value::is_string),
            "state.annotations' values must be strings: {state}"
        );
    }
    Ok(())
}

/// A runtime binary with its own `--root` directory, and the scratch
/// space, ids and processes of the scenario being run.
pub struct Runtime<'a> {
    binary: PathBuf,
    root: PathBuf,
    work: PathBuf,
    bundle_maker: BundleMaker<'a>,
    /// How long one command may take.
    pub command_timeout: Duration,
    /// How long to wait for a container to change state.
    pub wait_timeout: Duration,
    /// How long one scenario may take.
    pub scenario_deadline: Duration,
    /// Global options given before `--root` (`--config FILE`, `--log FILE`).
    pub global_args: Vec<String>,
    deadline: Cell<Option<Instant>>,
    seq: Cell<u32>,
    ids: RefCell<Vec<String>>,
    pids: RefCell<Vec<i32>>,
}

impl<'a> Runtime<'a> {
    /// Wraps `binary`, run with `--root root` (created if missing); bundles
    /// come from `bundle_maker`. Makes the calling process a child
    /// subreaper (see the module docs).
    pub fn new(binary: &Path, root: &Path, bundle_maker: BundleMaker<'a>) -> Result<Self> {
        ensure!(
            binary.exists(),
            "the runtime binary {} does not exist",
            binary.display()
        );
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let root = root.canonicalize()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let work =
            std::env::temp_dir().join(format!("rtv-conformance-{}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&work)?;
        let work = work.canonicalize()?;
        become_subreaper()?;
        Ok(Self {
            binary: binary.to_path_buf(),
            root,
            work,
            bundle_maker,
            command_timeout: COMMAND_TIMEOUT,
            wait_timeout: WAIT_TIMEOUT,
            scenario_deadline: SCENARIO_DEADLINE,
            global_args: Vec::new(),
            deadline: Cell::new(None),
            seq: Cell::new(0),
            ids: RefCell::new(Vec::new()),
            pids: RefCell::new(Vec::new()),
        })
    }

    /// The runtime binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The `--root` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the runtime under test is runc (the suite's reference, whose
    /// own races some scenarios must tolerate and clean up after).
    pub fn is_runc(&self) -> bool {
        self.binary
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("runc"))
    }

    /// Reaps `pid` (a child or adopted process) if it ends within `budget`;
    /// says whether it did.
    pub fn reaped_within(&self, pid: i32, budget: Duration) -> bool {
        let deadline = Instant::now() + budget;
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status to a live local integer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid || r < 0 {
                self.pids.borrow_mut().retain(|p| *p != pid);
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn next(&self) -> u32 {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        n
    }

    /// A fresh path in the scratch directory (not created).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.work.join(format!("{}-{name}", self.next()))
    }

    /// A fresh, empty scratch directory.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.scratch(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A container id unique to this run, deleted (`--force`) when the
    /// scenario ends.
    pub fn id(&self, tag: &str) -> String {
        let id = format!("cf{}-{}-{tag}", std::process::id(), self.next());
        self.ids.borrow_mut().push(id.clone());
        id
    }

    /// Adopts `pid` (a pid-file's process, our child as a subreaper): it is
    /// reaped when the scenario ends if the scenario did not wait for it.
    pub fn adopt(&self, pid: i32) {
        self.pids.borrow_mut().push(pid);
    }

    /// A new bundle running `args`, from the bundle maker.
    pub fn bundle(&self, args: &[&str]) -> Result<PathBuf> {
        let dir = self.scratch_dir("bundle")?;
        (self.bundle_maker)(&dir, args)
            .with_context(|| format!("making a bundle in {}", dir.display()))?;
        Ok(dir)
    }

    /// Reads, edits and writes back `bundle/config.json`.
    pub fn edit_config(&self, bundle: &Path, edit: impl FnOnce(&mut Value)) -> Result<()> {
        let path = bundle.join("config.json");
        let mut config: Value = serde_json::from_slice(&fs::read(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        edit(&mut config);
        fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }

    /// The time left for this command: the command timeout, cut short by
    /// the scenario's deadline.
    fn budget(&self) -> Duration {
        match self.deadline.get() {
            Some(d) => self
                .command_timeout
                .min(d.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(500)),
            None => self.command_timeout,
        }
    }

    fn wait_budget(&self) -> Duration {
        match self.deadline.get() {
            Some(d) => self
                .wait_timeout
                .min(d.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(500)),
            None => self.wait_timeout,
        }
    }

    /// Runs the runtime with `--config config --log log` from now on.
    pub fn use_config_and_log(&mut self, config: &Path, log: &Path) {
        self.global_args = vec![
            "--config".into(),
            config.display().to_string(),
            "--log".into(),
            log.display().to_string(),
        ];
    }

    /// The command `binary --root R args...` in a process group of its own.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.global_args)
            .arg("--root")
            .arg(&self.root)
            .args(args);
        // Its own process group, so a hung command and its helpers can be
        // killed together.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// Runs the runtime with `args`, stdin from `input`, in `cwd` (or
    /// ours); stdout and stderr go to scratch files. Fails only if it could
    /// not be started or outlived its timeout (it is then killed).
    pub fn run_with(&self, args: &[&str], input: Input, cwd: Option<&Path>) -> Result<Output> {
        let n = self.next();
        let stdout_path = self.work.join(format!("{n}-stdout"));
        let stderr_path = self.work.join(format!("{n}-stderr"));
        let mut cmd = self.command(args);
        cmd.stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let mut feed = None;
        match input {
            Input::Null => {
                cmd.stdin(Stdio::null());
            }
            Input::Bytes(bytes) => {
                cmd.stdin(Stdio::piped());
                feed = Some(bytes);
            }
            Input::Fd(fd) => {
                cmd.stdin(Stdio::from(fd));
            }
        }
        let shown: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} {}", self.binary.display(), shown.join(" ")))?;
        // Our copies of the runtime's stdio (a pipe's read end) close here.
        drop(cmd);
        if let (Some(bytes), Some(mut stdin)) = (feed, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        let timeout = self.budget();
        let status = wait_child(&mut child, timeout).with_context(|| {
            format!(
                "`{}`; stdout {:?}; stderr {:?}",
                shown.join(" "),
                read_lossy(&stdout_path),
                read_lossy(&stderr_path)
            )
        })?;
        Ok(Output {
            args: shown,
            status,
            stdout: read_lossy(&stdout_path),
            stderr: read_lossy(&stderr_path),
            stdout_path,
            stderr_path,
            elapsed: started.elapsed(),
        })
    }

    /// Runs the runtime with `args` and stdin from /dev/null.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.run_with(args, Input::Null, None)
    }

    /// Runs the runtime with `args`; it must exit 0.
    pub fn ok(&self, args: &[&str]) -> Result<Output> {
        let out = self.run(args)?;
        ensure!(out.success(), "expected success: {}", out.describe());
        Ok(out)
    }

    /// Runs the runtime with `args`; it must exit non-zero (not die of a
    /// signal) and say something on stderr.
    pub fn fails(&self, args: &[&str]) -> Result<Output> {
        let out = self.run(args)?;
        check_failed(&out)?;
        Ok(out)
    }

    /// Starts the runtime with `args`, stdin from `input`, stdout and
    /// stderr piped to reader threads.
    pub fn spawn_piped(&self, args: &[&str], input: Input) -> Result<Piped> {
        let mut cmd = self.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        match input {
            Input::Null => cmd.stdin(Stdio::null()),
            Input::Fd(fd) => cmd.stdin(Stdio::from(fd)),
            Input::Bytes(_) => bail!("spawn_piped takes Input::Null or Input::Fd"),
        };
        let mut child = cmd.spawn().context("starting the runtime")?;
        drop(cmd);
        let reader = |mut r: Box<dyn Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
            rx
        };
        let stdout = reader(Box::new(child.stdout.take().context("no stdout pipe")?));
        let stderr = reader(Box::new(child.stderr.take().context("no stderr pipe")?));
        Ok(Piped {
            args: args.iter().map(|a| a.to_string()).collect(),
            child,
            stdout,
            stderr,
        })
    }

    /// `state id`, which must succeed and pass [`check_state`].
    pub fn state(&self, id: &str) -> Result<Value> {
        let out = self.ok(&["state", id])?;
        let state: Value = serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("`state {id}` printed no JSON: {:?}", out.stdout))?;
        check_state(&state, id)?;
        Ok(state)
    }

    /// The container's status from `state`.
    pub fn status(&self, id: &str) -> Result<String> {
        let state = self.state(id)?;
        Ok(state["status"].as_str().unwrap_or_default().to_owned())
    }

    /// Polls `state` until the status is `want`.
    pub fn wait_for_status(&self, id: &str, want: &str) -> Result<Value> {
        let timeout = self.wait_budget();
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(id)?;
            if state["status"] == want {
                return Ok(state);
            }
            ensure!(
                Instant::now() < deadline,
                "{id} is still {} after {timeout:?}, not {want}",
                state["status"]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the file `path` until it contains `needle`; returns its text.
    pub fn wait_for_text(&self, path: &Path, needle: &str) -> Result<String> {
        let timeout = self.wait_budget();
        let deadline = Instant::now() + timeout;
        loop {
            let text = read_lossy(path);
            if text.contains(needle) {
                return Ok(text);
            }
            ensure!(
                Instant::now() < deadline,
                "no {needle:?} in {} after {timeout:?}: {text:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `create --bundle B --pid-file P id`, which must succeed; returns
    /// the output (its stdout file keeps the container's output) and the
    /// pid-file's pid, adopted.
    pub fn create(&self, id: &str, bundle: &Path) -> Result<(Output, i32)> {
        self.create_with(id, bundle, Input::Null)
    }

    /// [`Runtime::create`] with the runtime's (and so the container's)
    /// stdin from `input`.
    pub fn create_with(&self, id: &str, bundle: &Path, input: Input) -> Result<(Output, i32)> {
        let pid_file = self.scratch("pid");
        let out = self.run_with(
            &[
                "create",
                "--bundle",
                &path_str(bundle)?,
                "--pid-file",
                &path_str(&pid_file)?,
                id,
            ],
            input,
            None,
        )?;
        ensure!(out.success(), "create failed: {}", out.describe());
        let pid = read_pid_file(&pid_file)?;
        self.adopt(pid);
        Ok((out, pid))
    }

    /// A new container running `args`, created and started; returns its
    /// id, the create's output and its pid-file pid.
    pub fn started(&self, tag: &str, args: &[&str]) -> Result<(String, Output, i32)> {
        let id = self.id(tag);
        let bundle = self.bundle(args)?;
        let (out, pid) = self.create(&id, &bundle)?;
        self.ok(&["start", &id])?;
        Ok((id, out, pid))
    }

    /// Waits for our child `pid` to exit (reaping it) and returns its exit
    /// status, 128+N for death by signal N.
    pub fn wait_pid(&self, pid: i32) -> Result<i32> {
        let timeout = self.wait_budget();
        let deadline = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status to a live local integer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                if libc::WIFEXITED(status) {
                    self.pids.borrow_mut().retain(|p| *p != pid);
                    return Ok(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    self.pids.borrow_mut().retain(|p| *p != pid);
                    return Ok(128 + libc::WTERMSIG(status));
                }
            } else if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    bail!(
                        "waitpid({pid}): {e}: the pid-file's process must become a child \
                         of the runtime's caller (a subreaper) when the runtime exits"
                    );
                }
            }
            ensure!(
                Instant::now() < deadline,
                "pid {pid} has not exited after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every path under `--root`, sorted (a few levels deep).
    pub fn root_entries(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let path = e.path();
                out.push(path.clone());
                if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, depth - 1, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, 3, &mut out);
        out.sort();
        out
    }

    /// Container `id` is gone: `state` fails saying so, and nothing under
    /// `--root` is named after it.
    pub fn assert_gone(&self, id: &str) -> Result<()> {
        let out = self.fails(&["state", id])?;
        // The brief wants the error to name the id; runc 1.1 says only
        // "container does not exist", which is accepted too.
        ensure!(
            out.stderr.contains(id) || out.stderr.contains("does not exist"),
            "`state` of a deleted container should say it does not exist: {}",
            out.describe()
        );
        let left: Vec<_> = self
            .root_entries()
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(id))
            .collect();
        ensure!(left.is_empty(), "{id} left {left:?} under --root");
        Ok(())
    }

    /// Deletes (`--force`) every container the scenario named and reaps
    /// every process it adopted (killing any still alive after that: a
    /// runtime that leaves a container's process behind fails anyway).
    pub fn cleanup(&self) {
        let ids: Vec<String> = self.ids.borrow_mut().drain(..).collect();
        let saved = self.deadline.get();
        for id in &ids {
            // A hung runtime gets 20 s per container here, not the full
            // command timeout.
            self.deadline
                .set(Some(Instant::now() + Duration::from_secs(20)));
            let _ = self.run(&["delete", "--force", id]);
        }
        self.deadline.set(saved);
        let pids: Vec<i32> = self.pids.borrow_mut().drain(..).collect();
        for pid in pids {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut status = 0;
                // SAFETY: waitpid writes the status to a live local integer.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r == pid || r < 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    // SAFETY: `pid` is our own (adopted) child, not yet
                    // reaped, so the number cannot have been reused.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    // Bounded: a process in a frozen cgroup does not die
                    // until it is thawed.
                    if !self.reaped_within(pid, Duration::from_secs(5)) {
                        eprintln!("cleanup: pid {pid} survived SIGKILL (a frozen cgroup?)");
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Runtime<'_> {
    fn drop(&mut self) {
        self.cleanup();
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The runtime exited non-zero (not by a signal) and said why on stderr.
fn check_failed(out: &Output) -> Result<()> {
    ensure!(
        out.code().is_some_and(|c| c != 0),
        "expected a non-zero exit: {}",
        out.describe()
    );
    ensure!(
        !out.stderr.trim().is_empty(),
        "a failing command should say why on stderr: {}",
        out.describe()
    );
    Ok(())
}

/// `sh -c script`.
fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

/// A container script that prints `ready` once its TERM trap is set and
/// then waits in a `sleep 1` loop (`wait` returns at once on a trapped
/// signal, so the trap runs without waiting out the sleep).
const TRAP_TERM_42: &str = "trap 'exit 42' TERM; echo ready; while :; do sleep 1 & wait $!; done";

/// Something a runtime may lack: scenarios that need it are skipped when
/// the suite is told to skip what the runtime does not have (the runc
/// test only; rtv must have everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// The `features` command (runc 1.1.0 and later).
    Features,
    /// Commands on one container id at once keep its state whole: rtv
    /// locks each id across processes. runc 1.1 does not (measured on
    /// Debian's 1.1.5: two of ten racing creates both "won", a winner's
    /// state removed by a loser's cleanup with its init leaked, a forced
    /// delete racing an exec leaving the container frozen, "container init
    /// still running"), so these scenarios are rtv's guarantees beyond
    /// runc's and are not run against it.
    IdLocking,
}

impl Capability {
    /// Whether the runtime has it.
    pub fn probe(self, rt: &Runtime<'_>) -> bool {
        match self {
            Capability::Features => rt.run(&["features"]).is_ok_and(|o| o.success()),
            Capability::IdLocking => !rt.is_runc(),
        }
    }
}

/// One scenario of the suite.
pub struct Scenario {
    /// Its name.
    pub name: &'static str,
    /// What it checks, in a line.
    pub about: &'static str,
    /// The scenario: an error is a failure.
    pub run: fn(&Runtime<'_>) -> Result<()>,
    /// What it needs that a runtime may lack.
    pub needs: Option<Capability>,
}

macro_rules! scenario {
    ($name:ident, $about:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: $name,
            needs: None,
        }
    };
    ($name:ident, $about:expr, $needs:expr) => {
        Scenario {
            name: stringify!($name),
            about: $about,
            run: $name,
            needs: Some($needs),
        }
    };
}

/// Every scenario, in the order they run.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(
            lifecycle,
            "create/state/start/kill/delete with --pid-file; state at each step"
        ),
        scenario!(
            state_schema,
            "state JSON's fields and types while created, running, stopped"
        ),
        scenario!(
            start_twice,
            "start of a running or stopped container fails, changes nothing"
        ),
        scenario!(
            delete_running,
            "delete of a running container fails; --force deletes it"
        ),
        scenario!(
            operations_on_stopped,
            "kill/pause/exec of a stopped container fail"
        ),
        scenario!(
            unknown_id,
            "every command on an unknown or missing id fails"
        ),
        scenario!(
            create_existing_id,
            "create of an existing id fails, the container unchanged"
        ),
        scenario!(
            create_same_id_at_once,
            "ten creates of one id at once: one wins, the rest fail cleanly",
            Capability::IdLocking
        ),
        scenario!(
            exec_kill_delete_at_once,
            "execs, a kill and a forced delete of one container at once all end, the container goes",
            Capability::IdLocking
        ),
        scenario!(
            bad_ids,
            "a/b, .., ., empty ids fail and leave nothing under --root"
        ),
        scenario!(
            config_edit_after_create,
            "edits to config.json after create have no effect"
        ),
        scenario!(
            run_exit_code,
            "run exits with the container's code and deletes it"
        ),
        scenario!(
            run_detach,
            "run --detach returns 0 with the container running"
        ),
        scenario!(
            stdio_pipes_run,
            "run passes its stdout/stderr pipes to the container"
        ),
        scenario!(
            stdio_pipes_create,
            "create passes its stdout/stderr pipes to the container"
        ),
        scenario!(
            stdin_passthrough,
            "run and exec pass their stdin to the process"
        ),
        scenario!(
            pid_file,
            "pid-file process alive while running, exits with the status"
        ),
        scenario!(kill_forms_kill, "kill KILL, SIGKILL, 9: exit status 137"),
        scenario!(
            kill_forms_term,
            "kill TERM, SIGTERM, 15 and no signal reach a TERM trap"
        ),
        scenario!(kill_all, "kill --all reaches every process, not only init"),
        scenario!(ps, "ps and ps --format json list the container's processes"),
        scenario!(
            list,
            "list, list -q and list --format json show the container"
        ),
        scenario!(
            spec,
            "spec writes a config.json that parses, refuses to overwrite"
        ),
        scenario!(
            features,
            "features prints JSON with ociVersionMin/Max",
            Capability::Features
        ),
        scenario!(
            hooks,
            "prestart/createRuntime/poststart/poststop get the state on stdin"
        ),
        scenario!(
            hook_failure,
            "a failing prestart hook fails create and leaves nothing"
        ),
        scenario!(
            log_json,
            "--log F --log-format json writes errors as JSON lines"
        ),
        scenario!(
            exec,
            "exec prints, exits with the process's code, fails when stopped"
        ),
        scenario!(exec_process_file, "exec --process process.json"),
        scenario!(
            exec_detach,
            "exec --detach --pid-file: the pid exits with the status"
        ),
        scenario!(pause_resume, "pause/resume: paused, then running"),
    ]
}

/// How a scenario ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// It failed, with why.
    Failed(String),
    /// It was not run, with why.
    Skipped(String),
}

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// The scenario.
    pub name: &'static str,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took (cleanup included).
    pub elapsed: Duration,
}

/// The suite's results.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One per scenario, in order.
    pub results: Vec<ScenarioResult>,
}

impl Report {
    /// "name: why" for every failed scenario.
    pub fn failures(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Failed(why) => Some(format!("{}: {why}", r.name)),
                _ => None,
            })
            .collect()
    }

    /// The skipped scenarios' names.
    pub fn skipped(&self) -> Vec<&'static str> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Skipped(_)))
            .map(|r| r.name)
            .collect()
    }

    /// A table: scenario, outcome, time.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let total: Duration = self.results.iter().map(|r| r.elapsed).sum();
        for r in &self.results {
            let what = match &r.outcome {
                Outcome::Passed => "ok".to_owned(),
                Outcome::Failed(_) => "FAILED".to_owned(),
                Outcome::Skipped(why) => format!("skipped ({why})"),
            };
            s.push_str(&format!(
                "{:<26} {:>9.3}s  {what}\n",
                r.name,
                r.elapsed.as_secs_f64()
            ));
        }
        s.push_str(&format!("{:<26} {:>9.3}s\n", "total", total.as_secs_f64()));
        s
    }
}

/// How to run the suite.
#[derive(Debug, Clone, Default)]
pub struct SuiteOptions {
    /// Skip scenarios whose [`Capability`] the runtime lacks (reported as
    /// "not a guarantee of this runc"); otherwise they run, and fail.
    pub skip_unsupported: bool,
    /// Run only these scenarios (all when empty).
    pub only: Vec<String>,
}

/// Runs the scenarios (one at a time, each with its deadline and cleanup).
pub fn run_suite(rt: &Runtime<'_>, options: &SuiteOptions) -> Report {
    let mut report = Report::default();
    for s in scenarios() {
        if !options.only.is_empty() && !options.only.iter().any(|o| o == s.name) {
            continue;
        }
        let started = Instant::now();
        rt.deadline.set(Some(started + rt.scenario_deadline));
        let outcome = match s.needs {
            Some(cap) if options.skip_unsupported && !cap.probe(rt) => {
                Outcome::Skipped(format!("not a guarantee of this runc: {cap:?}"))
            }
            _ => {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (s.run)(rt)));
                match result {
                    Ok(Ok(())) => Outcome::Passed,
                    Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
                    Err(panic) => Outcome::Failed(format!(
                        "panicked: {}",
                        panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("?")
                    )),
                }
            }
        };
        rt.deadline.set(None);
        rt.cleanup();
        report.results.push(ScenarioResult {
            name: s.name,
            outcome,
            elapsed: started.elapsed(),
        });
    }
    report
}

/// Runs every scenario against `runtime` with `--root root` and bundles
/// from `bundle_maker`, skipping nothing; returns the failures ("scenario:
/// why"), empty when the runtime conforms.
pub fn run_all(runtime: &Path, root: &Path, bundle_maker: BundleMaker<'_>) -> Vec<String> {
    match Runtime::new(runtime, root, bundle_maker) {
        Ok(rt) => run_suite(&rt, &SuiteOptions::default()).failures(),
        Err(e) => vec![format!("setup: {e:#}")],
    }
}

// ---------------------------------------------------------------------
// The scenarios.

/// create → created (pid = pid file, bundle, annotations) → start →
/// running → kill KILL → the pid exits 137 → stopped → delete → gone.
pub fn lifecycle(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("lifecycle");
    let bundle = rt.bundle(&["sleep", "1000"])?;
    rt.edit_config(&bundle, |c| {
        c["annotations"] = json!({"org.rtv.conformance": "lifecycle", "empty": ""})
    })?;
    let (_, pid) = rt.create(&id, &bundle)?;
    let state = rt.state(&id)?;
    ensure!(state["status"] == "created", "after create: {state}");
    ensure!(
        state["pid"] == pid,
        "state.pid should be the pid file's {pid}: {state}"
    );
    ensure!(
        state["bundle"] == path_str(&bundle)?,
        "state.bundle should be {}: {state}",
        bundle.display()
    );
    ensure!(
        state["annotations"] == json!({"org.rtv.conformance": "lifecycle", "empty": ""}),
        "state.annotations should be config.json's: {state}"
    );
    ensure!(
        pid_running(pid),
        "the pid-file process {pid} is not running"
    );

    rt.ok(&["start", &id])?;
    let state = rt.state(&id)?;
    ensure!(state["status"] == "running", "after start: {state}");
    ensure!(state["pid"] == pid, "the pid changed on start: {state}");

    rt.ok(&["kill", &id, "KILL"])?;
    let status = rt.wait_pid(pid)?;
    ensure!(
        status == 137,
        "killed by KILL, the pid exited {status}, not 137"
    );
    let state = rt.wait_for_status(&id, "stopped")?;
    ensure!(
        state["bundle"] == path_str(&bundle)?,
        "stopped state lost the bundle: {state}"
    );
    rt.ok(&["delete", &id])?;
    rt.assert_gone(&id)
}

/// The state document passes the schema checks at each status, with and
/// without annotations, and `state` prints nothing but the document.
pub fn state_schema(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("schema");
    let bundle = rt.bundle(&sh("echo ready; read x; exit 0"))?;
    let (write_end, read_end) = pipe()?;
    let (out, pid) = rt.create_with(&id, &bundle, Input::Fd(read_end))?;
    let state = rt.state(&id)?;
    ensure!(state["status"] == "created", "{state}");
    ensure!(
        state.get("annotations").is_none_or(|a| a.is_object()),
        "{state}"
    );
    // `state` prints one JSON object and nothing else.
    let raw = rt.ok(&["state", &id])?;
    let doc: Value = serde_json::from_str(raw.stdout.trim())?;
    ensure!(doc.is_object(), "state printed {:?}", raw.stdout);
    rt.ok(&["start", &id])?;
    rt.wait_for_text(&out.stdout_path, "ready")?;
    let state = rt.state(&id)?;
    ensure!(state["status"] == "running", "{state}");
    drop(write_end);
    ensure!(rt.wait_pid(pid)? == 0, "the container should exit 0");
    let state = rt.wait_for_status(&id, "stopped")?;
    check_state(&state, &id)?;
    rt.ok(&["delete", &id])?;
    Ok(())
}

/// `start` on a running, then a stopped container fails and changes
/// nothing (runc: "cannot start an already running container", "cannot
/// start a container that has stopped", exit 1).
pub fn start_twice(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, pid) = rt.started("start-twice", &["sleep", "1000"])?;
    ensure!(rt.status(&id)? == "running");
    rt.fails(&["start", &id])?;
    let state = rt.state(&id)?;
    ensure!(
        state["status"] == "running" && state["pid"] == pid,
        "changed by a failed start: {state}"
    );
    ensure!(pid_running(pid), "a failed start stopped the container");
    rt.ok(&["kill", &id, "KILL"])?;
    ensure!(rt.wait_pid(pid)? == 137);
    rt.wait_for_status(&id, "stopped")?;
    rt.fails(&["start", &id])?;
    ensure!(
        rt.status(&id)? == "stopped",
        "a failed start changed a stopped container"
    );
    rt.ok(&["delete", &id])?;
    rt.assert_gone(&id)
}

/// `delete` of a running container fails and it keeps running (runc:
/// "cannot delete container ID that is not stopped: running"); `delete
/// --force` kills and deletes it, running or just created.
pub fn delete_running(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, pid) = rt.started("delete-running", &["sleep", "1000"])?;
    rt.fails(&["delete", &id])?;
    let state = rt.state(&id)?;
    ensure!(
        state["status"] == "running" && state["pid"] == pid,
        "changed by a failed delete: {state}"
    );
    ensure!(pid_running(pid), "a failed delete stopped the container");
    rt.ok(&["delete", "--force", &id])?;
    ensure!(
        rt.wait_pid(pid)? == 137,
        "delete --force should SIGKILL the container"
    );
    rt.assert_gone(&id)?;

    // A created (never started) container, deleted with --force.
    let id = rt.id("delete-created");
    let bundle = rt.bundle(&["sleep", "1000"])?;
    let (_, pid) = rt.create(&id, &bundle)?;
    rt.ok(&["delete", "--force", &id])?;
    let status = rt.wait_pid(pid)?;
    ensure!(
        status == 137,
        "the created container's pid exited {status}, not 137"
    );
    rt.assert_gone(&id)
}

/// On a stopped container, `kill` fails (runc: "container not running"),
/// so do `pause` and `exec` (runc: "cannot exec in a stopped container",
/// exit 255), and the status stays stopped.
pub fn operations_on_stopped(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, pid) = rt.started("stopped-ops", &sh("exit 3"))?;
    ensure!(rt.wait_pid(pid)? == 3, "the container should exit 3");
    rt.wait_for_status(&id, "stopped")?;
    rt.fails(&["kill", &id, "KILL"])?;
    rt.fails(&["kill", &id, "TERM"])?;
    rt.fails(&["pause", &id])?;
    rt.fails(&["exec", &id, "true"])?;
    ensure!(rt.status(&id)? == "stopped");
    rt.ok(&["delete", &id])?;
    rt.assert_gone(&id)
}

/// Every command on an id that was never created fails (runc: "container
/// does not exist", exit 1), and so does each with no id at all (runc:
/// "Incorrect Usage."). Except `delete --force`: runc 1.1 exits 0 for an
/// unknown id (containerd's cleanup relies on it).
pub fn unknown_id(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("never-created");
    let before = rt.root_entries();
    for args in [
        vec!["state", &id],
        vec!["start", &id],
        vec!["kill", &id, "KILL"],
        vec!["kill", &id],
        vec!["delete", &id],
        vec!["pause", &id],
        vec!["resume", &id],
        vec!["exec", &id, "true"],
        vec!["ps", &id],
        vec!["state"],
        vec!["start"],
        vec!["kill"],
        vec!["delete"],
    ] {
        rt.fails(&args)?;
    }
    rt.ok(&["delete", "--force", &id])?;
    ensure!(
        rt.root_entries() == before,
        "commands on an unknown id changed --root"
    );
    Ok(())
}

/// `create` of an id in use fails (runc: "container with given ID already
/// exists") and the existing container is untouched.
pub fn create_existing_id(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("existing");
    let first = rt.bundle(&["sleep", "1000"])?;
    let (_, pid) = rt.create(&id, &first)?;
    let second = rt.bundle(&["sleep", "2000"])?;
    let pid_file = rt.scratch("second.pid");
    let out = rt.run(&[
        "create",
        "--bundle",
        &path_str(&second)?,
        "--pid-file",
        &path_str(&pid_file)?,
        &id,
    ])?;
    check_failed(&out)?;
    let state = rt.state(&id)?;
    ensure!(
        state["status"] == "created" && state["pid"] == pid && state["bundle"] == path_str(&first)?,
        "a failed create changed the container: {state}"
    );
    ensure!(pid_running(pid), "a failed create killed the container");
    ensure!(
        !pid_file.exists() || read_pid_file(&pid_file).ok() == Some(pid),
        "a failed create wrote another pid"
    );
    rt.ok(&["delete", "--force", &id])?;
    rt.assert_gone(&id)
}

/// Runs every command of `ops` at once (each `binary --root R args`) and
/// waits for all, up to 300 s: each one's exit status and stderr, in order.
fn run_at_once(
    rt: &Runtime<'_>,
    tag: &str,
    ops: &[Vec<&str>],
) -> Result<Vec<(std::process::ExitStatus, String)>> {
    let mut children = Vec::new();
    for (i, args) in ops.iter().enumerate() {
        let err = rt.scratch(&format!("{tag}-{i}.err"));
        let mut cmd = rt.command(args);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err)?);
        children.push((cmd.spawn().context("starting the runtime")?, err));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut ended = Vec::new();
    for ((mut child, err), args) in children.into_iter().zip(ops) {
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!("`{}` did not end within 300 s", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ended.push((status, std::fs::read_to_string(&err).unwrap_or_default()));
    }
    Ok(ended)
}

/// Ten `create`s of one id at once: exactly one wins; the others fail with
/// a reason on stderr, and neither they nor their failure touch the
/// winner, which then deletes cleanly.
pub fn create_same_id_at_once(rt: &Runtime<'_>) -> Result<()> {
    const N: usize = 10;
    let id = rt.id("race");
    let bundle = rt.bundle(&["sleep", "1000"])?;
    let b = path_str(&bundle)?;
    let create = ["create", "--bundle", b.as_str(), id.as_str()];
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for (status, stderr) in run_at_once(rt, "race", &vec![create.to_vec(); N])? {
        if status.success() {
            won.push(stderr);
        } else {
            lost.push((status, stderr));
        }
    }
    let result = (|| {
        ensure!(
            won.len() == 1,
            "{} of {N} creates of one id succeeded; failures: {lost:?}",
            won.len()
        );
        for (status, stderr) in &lost {
            ensure!(
                !stderr.trim().is_empty(),
                "a losing create ({status}) gave no reason"
            );
        }
        let state = rt.state(&id)?;
        ensure!(
            state["status"] == "created" && state["bundle"] == b,
            "the winner after the race: {state}"
        );
        let pid = state["pid"].as_i64().unwrap_or(0) as i32;
        ensure!(pid > 0 && pid_running(pid), "the winner's process: {state}");
        Ok(())
    })();
    let deleted = rt.ok(&["delete", "--force", &id]).map(|_| ());
    result?;
    deleted?;
    rt.assert_gone(&id)
}

/// Three execs, a `kill -9` and a `delete --force` of one running
/// container, all at once: every command ends (none hangs); each either
/// succeeds, ends as its process was killed with the container (137), or
/// fails with a reason on stderr; none panics; the container is gone
/// afterwards, with nothing left under `--root`.
pub fn exec_kill_delete_at_once(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, pid) = rt.started("race-ops", &["sleep", "1000"])?;
    let mut ops: Vec<Vec<&str>> = (0..3)
        .map(|_| vec!["exec", id.as_str(), "sh", "-c", "echo ran"])
        .collect();
    ops.push(vec!["kill", &id, "KILL"]);
    ops.push(vec!["delete", "--force", &id]);
    let mut problems = Vec::new();
    for (args, (status, stderr)) in ops.iter().zip(run_at_once(rt, "ops", &ops)?) {
        let what = args.join(" ");
        if stderr.contains("panicked") {
            problems.push(format!("`{what}` panicked: {stderr}"));
        }
        let killed = matches!(status.code(), Some(137) | Some(143));
        if !status.success() && !killed && stderr.trim().is_empty() {
            problems.push(format!("`{what}` failed ({status}) without a reason"));
        }
    }
    // The forced delete may have lost a race to the kill, or (runc) an exec
    // may have left the container's directory without its state: a second
    // forced delete, as containerd's shim does, must clean up either way
    // and succeed even when the first one already did.
    let second = rt.run(&["delete", "--force", &id])?;
    if !second.success() {
        problems.push(format!("the second forced delete: {}", second.describe()));
    }
    if !rt.reaped_within(pid, Duration::from_secs(20)) {
        problems.push(format!(
            "the container's process {pid} outlived kill -9 and two forced deletes"
        ));
    }
    ensure!(problems.is_empty(), "{problems:#?}");
    rt.assert_gone(&id)
}

/// Ids that are not names fail before anything is made (runc: "invalid
/// container ID format", "container id cannot be empty").
pub fn bad_ids(rt: &Runtime<'_>) -> Result<()> {
    let bundle = rt.bundle(&["true"])?;
    let b = path_str(&bundle)?;
    let before = rt.root_entries();
    for id in ["a/b", "..", ".", "", "../escape", "a/../b"] {
        let out = rt.run(&["create", "--bundle", &b, id])?;
        check_failed(&out).with_context(|| format!("create with id {id:?}"))?;
        ensure!(
            rt.root_entries() == before,
            "create with id {id:?} left {:?} under --root",
            rt.root_entries()
        );
    }
    // "../escape" must not have made a container next to --root.
    if let Some(parent) = rt.root().parent() {
        ensure!(
            !parent.join("escape").exists(),
            "create with id \"../escape\" made {}",
            parent.join("escape").display()
        );
    }
    Ok(())
}

/// The args config.json had at create are the ones that run, whatever it
/// says at start.
pub fn config_edit_after_create(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("edit-after-create");
    let bundle = rt.bundle(&sh("echo original-args"))?;
    let (out, pid) = rt.create(&id, &bundle)?;
    rt.edit_config(&bundle, |c| {
        c["process"]["args"] = json!(["sh", "-c", "echo edited-args"]);
        c["process"]["env"] = json!(["PATH=/nonexistent"]);
    })?;
    rt.ok(&["start", &id])?;
    ensure!(rt.wait_pid(pid)? == 0, "the container should exit 0");
    let text = rt.wait_for_text(&out.stdout_path, "args")?;
    ensure!(
        text == "original-args\n",
        "the container printed {text:?}: config.json edited after create took effect"
    );
    rt.wait_for_status(&id, "stopped")?;
    rt.ok(&["delete", &id])?;
    Ok(())
}

/// `run` exits with the container's exit code and deletes the container
/// when it exits.
pub fn run_exit_code(rt: &Runtime<'_>) -> Result<()> {
    for code in [7, 0] {
        let id = rt.id("run-exit");
        let script = format!("exit {code}");
        let bundle = rt.bundle(&sh(&script))?;
        let out = rt.run(&["run", "--bundle", &path_str(&bundle)?, &id])?;
        ensure!(
            out.code() == Some(code),
            "run should exit {code}: {}",
            out.describe()
        );
        rt.assert_gone(&id)?;
    }
    Ok(())
}

/// `run --detach --pid-file` returns 0 with the container running.
pub fn run_detach(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("run-detach");
    let bundle = rt.bundle(&["sleep", "1000"])?;
    let pid_file = rt.scratch("run.pid");
    rt.ok(&[
        "run",
        "--detach",
        "--bundle",
        &path_str(&bundle)?,
        "--pid-file",
        &path_str(&pid_file)?,
        &id,
    ])?;
    let pid = read_pid_file(&pid_file)?;
    rt.adopt(pid);
    let state = rt.state(&id)?;
    ensure!(
        state["status"] == "running" && state["pid"] == pid,
        "after run --detach: {state}"
    );
    ensure!(
        pid_running(pid),
        "the pid-file process {pid} is not running"
    );
    rt.ok(&["kill", &id, "KILL"])?;
    ensure!(rt.wait_pid(pid)? == 137);
    rt.wait_for_status(&id, "stopped")?;
    rt.ok(&["delete", &id])?;
    rt.assert_gone(&id)
}

/// The container's stdout and stderr are `run`'s pipes.
pub fn stdio_pipes_run(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("pipes-run");
    let bundle = rt.bundle(&sh("echo to-stdout; echo to-stderr >&2; exit 3"))?;
    let mut p = rt.spawn_piped(&["run", "--bundle", &path_str(&bundle)?, &id], Input::Null)?;
    let status = p.wait(rt.budget())?;
    let (out, err) = p.output(rt.wait_budget())?;
    ensure!(
        status.code() == Some(3),
        "run ended {status}; stdout {out:?}; stderr {err:?}"
    );
    ensure!(out == "to-stdout\n", "run's stdout was {out:?}");
    ensure!(err.contains("to-stderr\n"), "run's stderr was {err:?}");
    Ok(())
}

/// The container's stdout and stderr are `create`'s pipes (not `start`'s):
/// they reach EOF when the container exits.
pub fn stdio_pipes_create(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("pipes-create");
    let bundle = rt.bundle(&sh("echo created-out; echo created-err >&2"))?;
    let pid_file = rt.scratch("pid");
    let mut p = rt.spawn_piped(
        &[
            "create",
            "--bundle",
            &path_str(&bundle)?,
            "--pid-file",
            &path_str(&pid_file)?,
            &id,
        ],
        Input::Null,
    )?;
    let status = p.wait(rt.budget())?;
    ensure!(status.success(), "create ended {status}");
    let pid = read_pid_file(&pid_file)?;
    rt.adopt(pid);
    let start = rt.ok(&["start", &id])?;
    let (out, err) = p.output(rt.wait_budget())?;
    ensure!(out == "created-out\n", "create's stdout was {out:?}");
    ensure!(err.contains("created-err\n"), "create's stderr was {err:?}");
    ensure!(
        !start.stdout_now().contains("created") && !start.stderr_now().contains("created"),
        "the container wrote to start's stdio: {}",
        start.describe()
    );
    ensure!(rt.wait_pid(pid)? == 0);
    rt.wait_for_status(&id, "stopped")?;
    rt.ok(&["delete", &id])?;
    Ok(())
}

/// `run`'s stdin is the container's (`cat` echoes it), and `exec`'s is
/// the exec'd process's.
pub fn stdin_passthrough(rt: &Runtime<'_>) -> Result<()> {
    let text = "hello stdin\nsecond line\n";
    let id = rt.id("stdin-run");
    let bundle = rt.bundle(&["cat"])?;
    let out = rt.run_with(
        &["run", "--bundle", &path_str(&bundle)?, &id],
        Input::Bytes(text.as_bytes().to_vec()),
        None,
    )?;
    ensure!(
        out.success() && out.stdout == text,
        "cat under run: {}",
        out.describe()
    );

    let (id, _, _) = rt.started("stdin-exec", &["sleep", "1000"])?;
    let out = rt.run_with(
        &["exec", &id, "cat"],
        Input::Bytes(b"through exec\n".to_vec()),
        None,
    )?;
    ensure!(
        out.success() && out.stdout == "through exec\n",
        "cat under exec: {}",
        out.describe()
    );
    rt.ok(&["delete", "--force", &id])?;
    Ok(())
}

/// The pid-file's process is alive from create until the container exits,
/// then exits with the container's status (3 here) and is gone.
pub fn pid_file(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("pid-file");
    let bundle = rt.bundle(&sh("echo ready; read line; exit 3"))?;
    let (write_end, read_end) = pipe()?;
    let (out, pid) = rt.create_with(&id, &bundle, Input::Fd(read_end))?;
    ensure!(pid_exists(pid), "kill({pid}, 0) fails after create");
    ensure!(
        Path::new(&format!("/proc/{pid}")).exists() && pid_running(pid),
        "pid {pid} is not a live process after create (state {:?})",
        proc_state(pid)
    );
    rt.ok(&["start", &id])?;
    rt.wait_for_text(&out.stdout_path, "ready")?;
    ensure!(
        pid_running(pid),
        "pid {pid} is not running while the container runs"
    );
    ensure!(rt.status(&id)? == "running");
    let mut w = File::from(write_end);
    w.write_all(b"go\n")?;
    drop(w);
    let status = rt.wait_pid(pid)?;
    ensure!(
        status == 3,
        "the pid-file process exited {status}; the container exited 3"
    );
    ensure!(
        !pid_exists(pid),
        "kill({pid}, 0) still succeeds after it was reaped"
    );
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "/proc/{pid} still exists"
    );
    rt.wait_for_status(&id, "stopped")?;
    rt.ok(&["delete", &id])?;
    rt.assert_gone(&id)
}

/// `kill ID KILL`, `SIGKILL` and `9` kill the container: the pid-file's
/// process exits 137.
pub fn kill_forms_kill(rt: &Runtime<'_>) -> Result<()> {
    for form in ["KILL", "SIGKILL", "9"] {
        let (id, _, pid) = rt.started("kill-form", &["sleep", "1000"])?;
        rt.ok(&["kill", &id, form])?;
        let status = rt.wait_pid(pid)?;
        ensure!(status == 137, "kill {form}: exit status {status}, not 137");
        rt.wait_for_status(&id, "stopped")?;
        rt.ok(&["delete", &id])?;
    }
    Ok(())
}

/// `kill ID TERM`, `SIGTERM`, `15` and `kill ID` (runc's default is
/// SIGTERM) reach a shell's TERM trap, which exits 42.
pub fn kill_forms_term(rt: &Runtime<'_>) -> Result<()> {
    for form in [Some("TERM"), Some("SIGTERM"), Some("15"), None] {
        let (id, out, pid) = rt.started("term-form", &sh(TRAP_TERM_42))?;
        rt.wait_for_text(&out.stdout_path, "ready")?;
        let mut args = vec!["kill", id.as_str()];
        args.extend(form);
        rt.ok(&args)?;
        let status = rt
            .wait_pid(pid)
            .with_context(|| format!("after `kill {}`", args[1..].join(" ")))?;
        ensure!(
            status == 42,
            "kill {form:?}: exit status {status}, not 42 (the trap's)"
        );
        rt.wait_for_status(&id, "stopped")?;
        rt.ok(&["delete", &id])?;
    }
    Ok(())
}

/// `kill --all ID TERM` reaches the container's other processes too: the
/// init shell (which, as its PID namespace's init, does not get a TERM it
/// has no handler for) sees its `sleep` die and exits 9.
pub fn kill_all(rt: &Runtime<'_>) -> Result<()> {
    let (id, out, pid) = rt.started("kill-all", &sh("sleep 1000 & echo ready; wait; exit 9"))?;
    rt.wait_for_text(&out.stdout_path, "ready")?;
    rt.ok(&["kill", "--all", &id, "TERM"])?;
    let status = rt.wait_pid(pid)?;
    ensure!(
        status == 9,
        "after kill --all TERM the container exited {status}, not 9"
    );
    rt.wait_for_status(&id, "stopped")?;
    rt.ok(&["delete", &id])?;
    Ok(())
}

/// `ps --format json` prints a JSON array of the container's pids (two
/// here: the shell and its sleep); `ps` prints a table.
pub fn ps(rt: &Runtime<'_>) -> Result<()> {
    let (id, out, _) = rt.started("ps", &sh("sleep 1000 & echo ready; wait"))?;
    rt.wait_for_text(&out.stdout_path, "ready")?;
    let json_out = rt.ok(&["ps", "--format", "json", &id])?;
    let pids: Value = serde_json::from_str(json_out.stdout.trim())
        .with_context(|| format!("ps --format json printed {:?}", json_out.stdout))?;
    let list = pids
        .as_array()
        .with_context(|| format!("not an array: {pids}"))?;
    ensure!(
        list.iter().all(|p| p.as_i64().is_some_and(|p| p > 0)),
        "not an array of pids: {pids}"
    );
    ensure!(
        list.len() >= 2,
        "the shell and its sleep should be listed: {pids}"
    );
    let table = rt.ok(&["ps", &id])?;
    ensure!(
        table
            .stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains("PID")),
        "ps should print a table with a PID column: {:?}",
        table.stdout
    );
    rt.ok(&["delete", "--force", &id])?;
    Ok(())
}

/// `list` (table with an ID column), `list -q` (ids, one a line) and
/// `list --format json` (an array of states) show a running container.
pub fn list(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, pid) = rt.started("list", &["sleep", "1000"])?;
    let table = rt.ok(&["list"])?;
    ensure!(
        table
            .stdout
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("ID")),
        "list's header: {:?}",
        table.stdout
    );
    ensure!(
        table
            .stdout
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&id)),
        "list does not show {id}: {:?}",
        table.stdout
    );
    let quiet = rt.ok(&["list", "-q"])?;
    ensure!(
        quiet.stdout.lines().any(|l| l == id),
        "list -q does not print {id}: {:?}",
        quiet.stdout
    );
    let json_out = rt.ok(&["list", "--format", "json"])?;
    let all: Value = serde_json::from_str(json_out.stdout.trim())
        .with_context(|| format!("list --format json printed {:?}", json_out.stdout))?;
    let entry = all
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id.as_str()))
        .with_context(|| format!("{id} is not in list --format json: {all}"))?;
    ensure!(
        entry["status"] == "running" && entry["pid"] == pid && entry["bundle"].is_string(),
        "list's entry for {id}: {entry}"
    );
    rt.ok(&["delete", "--force", &id])?;
    Ok(())
}

/// `spec` writes config.json in the working directory (or `--bundle`),
/// a spec that parses; it refuses to overwrite one (runc: "File
/// config.json exists. Remove it first").
pub fn spec(rt: &Runtime<'_>) -> Result<()> {
    let dir = rt.scratch_dir("spec")?;
    let out = rt.run_with(&["spec"], Input::Null, Some(&dir))?;
    ensure!(out.success(), "{}", out.describe());
    let path = dir.join("config.json");
    let text = fs::read(&path).context("spec wrote no config.json in its working directory")?;
    let check = |text: &[u8]| -> Result<()> {
        let config: Value = serde_json::from_slice(text).context("config.json is not JSON")?;
        ensure!(config["ociVersion"].is_string(), "no ociVersion: {config}");
        ensure!(
            config["process"]["args"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "no process.args: {config}"
        );
        ensure!(config["root"]["path"].is_string(), "no root.path: {config}");
        ensure!(config["linux"].is_object(), "no linux section: {config}");
        Ok(())
    };
    check(&text)?;
    let again = rt.run_with(&["spec"], Input::Null, Some(&dir))?;
    check_failed(&again).context("a second spec should refuse to overwrite config.json")?;
    ensure!(
        fs::read(&path)? == text,
        "a refused spec changed config.json"
    );

    let bundle = rt.scratch_dir("spec-bundle")?;
    rt.ok(&["spec", "--bundle", &path_str(&bundle)?])?;
    check(&fs::read(bundle.join("config.json")).context("spec --bundle wrote nothing")?)
}

/// `features` prints a JSON object with ociVersionMin and ociVersionMax
/// (and, if present, hooks as an array of names).
pub fn features(rt: &Runtime<'_>) -> Result<()> {
    let out = rt.ok(&["features"])?;
    let f: Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("features printed {:?}", out.stdout))?;
    for key in ["ociVersionMin", "ociVersionMax"] {
        ensure!(
            f[key].as_str().is_some_and(|v| v.starts_with("1.")),
            "{key}: {f}"
        );
    }
    if let Some(h) = f.get("hooks") {
        ensure!(
            h.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            "hooks: {h}"
        );
    }
    Ok(())
}

/// A hook that writes its stdin to `file` (on the host).
fn capture_hook(file: &Path) -> Value {
    json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("cat > {}", file.display())],
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "timeout": 30
    })
}

/// prestart, createRuntime (at create), poststart (at start) and poststop
/// (at delete) run on the host with the state JSON on stdin.
///
/// runc 1.1 passes status "creating" to prestart and createRuntime, runs
/// poststart already during `create` with status "created" (the spec runs
/// it after the user process starts, state "running"; runc 1.2 does), and
/// poststop gets "stopped" and no pid.
pub fn hooks(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("hooks");
    let bundle = rt.bundle(&["sleep", "1000"])?;
    let dir = rt.scratch_dir("hooks")?;
    let names = ["prestart", "createRuntime", "poststart", "poststop"];
    rt.edit_config(&bundle, |c| {
        c["annotations"] = json!({"org.rtv.hook": "yes"});
        c["hooks"] = names
            .iter()
            .map(|n| (n.to_string(), json!([capture_hook(&dir.join(n))])))
            .collect::<serde_json::Map<_, _>>()
            .into();
    })?;
    let read = |name: &str| -> Result<Value> {
        let path = dir.join(name);
        let deadline = Instant::now() + rt.wait_budget();
        loop {
            if let Ok(v) = serde_json::from_slice::<Value>(&fs::read(&path).unwrap_or_default()) {
                ensure!(
                    v["id"] == id.as_str(),
                    "{name} got state for another id: {v}"
                );
                ensure!(v["bundle"] == path_str(&bundle)?, "{name}: bundle: {v}");
                ensure!(
                    v["annotations"]["org.rtv.hook"] == "yes",
                    "{name}: annotations: {v}"
                );
                ensure!(v["ociVersion"].is_string(), "{name}: ociVersion: {v}");
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "the {name} hook wrote no state JSON to {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (_, pid) = rt.create(&id, &bundle)?;
    for name in ["prestart", "createRuntime"] {
        let v = read(name)?;
        ensure!(
            v["status"] == "creating" || v["status"] == "created",
            "{name}: status {}",
            v["status"]
        );
        ensure!(v["pid"].as_i64().is_some_and(|p| p > 0), "{name}: pid: {v}");
    }
    // runc 1.1 runs poststart hooks at the end of `create` (its start of
    // the init process), not after `start`: fixed in runc 1.2. So the
    // poststart file is only required once `start` has returned.
    rt.ok(&["start", &id])?;
    let v = read("poststart")?;
    ensure!(
        v["status"] == "created" || v["status"] == "running",
        "poststart: status {}",
        v["status"]
    );
    ensure!(!dir.join("poststop").exists(), "poststop ran before delete");
    rt.ok(&["kill", &id, "KILL"])?;
    ensure!(rt.wait_pid(pid)? == 137);
    rt.wait_for_status(&id, "stopped")?;
    rt.ok(&["delete", &id])?;
    let v = read("poststop")?;
    ensure!(v["status"] == "stopped", "poststop: status {}", v["status"]);
    rt.assert_gone(&id)
}

/// A prestart hook that exits 1 fails `create` (runc: "error running hook
/// #0: error running hook: exit status 1, ...") and leaves no container.
pub fn hook_failure(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("hook-fails");
    let bundle = rt.bundle(&["sleep", "1000"])?;
    let marker = rt.scratch("hook-ran");
    rt.edit_config(&bundle, |c| {
        c["hooks"] = json!({"prestart": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {}; exit 1", marker.display())],
        }]});
    })?;
    let before = rt.root_entries();
    let pid_file = rt.scratch("pid");
    let out = rt.run(&[
        "create",
        "--bundle",
        &path_str(&bundle)?,
        "--pid-file",
        &path_str(&pid_file)?,
        &id,
    ])?;
    check_failed(&out).context("create with a failing prestart hook")?;
    ensure!(marker.exists(), "the prestart hook did not run");
    if let Ok(pid) = read_pid_file(&pid_file) {
        rt.adopt(pid);
        ensure!(
            !pid_running(pid),
            "the failed create left its process {pid} running"
        );
    }
    rt.assert_gone(&id)?;
    ensure!(
        rt.root_entries() == before,
        "a failed create changed --root"
    );
    Ok(())
}

/// With `--log F --log-format json`, an error (start of an unknown id) is
/// a JSON line in F with "level":"error", a "msg" and a "time"; the exit is
/// non-zero (runc: 1).
pub fn log_json(rt: &Runtime<'_>) -> Result<()> {
    let id = rt.id("log-unknown");
    let log = rt.scratch("log.json");
    let out = rt.run(&[
        "--log",
        &path_str(&log)?,
        "--log-format",
        "json",
        "start",
        &id,
    ])?;
    ensure!(out.code().is_some_and(|c| c != 0), "{}", out.describe());
    let text = fs::read_to_string(&log).context("no log file")?;
    let mut errors = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("a log line is not JSON: {line:?}"))?;
        ensure!(v.is_object(), "a log line is not an object: {line:?}");
        if v["level"] == "error" {
            errors.push(v);
        }
    }
    let e = errors
        .first()
        .with_context(|| format!("no \"level\":\"error\" line in the log: {text:?}"))?;
    ensure!(
        e["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "the error line has no msg: {e}"
    );
    ensure!(e["time"].is_string(), "the error line has no time: {e}");
    Ok(())
}

/// `exec ID echo hi` prints hi; exec's exit code and stderr are the
/// process's; exec in a stopped container fails (runc exits 255 then).
pub fn exec(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, pid) = rt.started("exec", &["sleep", "1000"])?;
    let out = rt.ok(&["exec", &id, "echo", "hi"])?;
    ensure!(
        out.stdout == "hi\n",
        "exec echo hi printed {:?}",
        out.stdout
    );
    let out = rt.run(&["exec", &id, "sh", "-c", "echo oops >&2; exit 3"])?;
    ensure!(
        out.code() == Some(3),
        "exec should exit 3: {}",
        out.describe()
    );
    ensure!(
        out.stderr.contains("oops\n"),
        "exec's stderr: {}",
        out.describe()
    );
    ensure!(
        rt.status(&id)? == "running",
        "an exec's exit stopped the container"
    );
    rt.ok(&["kill", &id, "KILL"])?;
    ensure!(rt.wait_pid(pid)? == 137);
    rt.wait_for_status(&id, "stopped")?;
    rt.fails(&["exec", &id, "echo", "hi"])?;
    rt.ok(&["delete", &id])?;
    Ok(())
}

/// `exec --process F` runs the process.json F (args, env, cwd).
pub fn exec_process_file(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, _) = rt.started("exec-process", &["sleep", "1000"])?;
    let process = rt.scratch("process.json");
    fs::write(
        &process,
        serde_json::to_vec(&json!({
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", "echo from-process $FOO $(pwd); exit 4"],
            "env": ["PATH=/bin", "FOO=bar"],
            "cwd": "/tmp"
        }))?,
    )?;
    let out = rt.run(&["exec", "--process", &path_str(&process)?, &id])?;
    ensure!(
        out.code() == Some(4),
        "exec --process should exit 4: {}",
        out.describe()
    );
    ensure!(
        out.stdout == "from-process bar /tmp\n",
        "exec --process printed {:?}",
        out.stdout
    );
    rt.ok(&["delete", "--force", &id])?;
    Ok(())
}

/// `exec --detach --pid-file P` returns while the process runs; P's
/// process lives until it exits, then exits with its status (5).
pub fn exec_detach(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, _) = rt.started("exec-detach", &["sleep", "1000"])?;
    let pid_file = rt.scratch("exec.pid");
    rt.ok(&[
        "exec",
        "--detach",
        "--pid-file",
        &path_str(&pid_file)?,
        &id,
        "sh",
        "-c",
        "until test -e /tmp/go; do sleep 0.05; done; exit 5",
    ])?;
    let pid = read_pid_file(&pid_file)?;
    rt.adopt(pid);
    ensure!(pid_running(pid), "the exec's pid {pid} is not running");
    rt.ok(&["exec", &id, "touch", "/tmp/go"])?;
    let status = rt.wait_pid(pid)?;
    ensure!(status == 5, "the exec's pid exited {status}, not 5");
    ensure!(
        rt.status(&id)? == "running",
        "the exec's exit stopped the container"
    );
    rt.ok(&["delete", "--force", &id])?;
    Ok(())
}

/// `pause` → "paused" (start fails), `resume` → "running"; resume of a
/// running container and pause of a stopped one fail (runc: "container not
/// paused", "container not running").
pub fn pause_resume(rt: &Runtime<'_>) -> Result<()> {
    let (id, _, pid) = rt.started("pause", &["sleep", "1000"])?;
    rt.ok(&["pause", &id])?;
    let state = rt.state(&id)?;
    ensure!(
        state["status"] == "paused" && state["pid"] == pid,
        "after pause: {state}"
    );
    rt.fails(&["start", &id])?;
    ensure!(
        rt.status(&id)? == "paused",
        "a failed start changed a paused container"
    );
    rt.ok(&["resume", &id])?;
    ensure!(rt.status(&id)? == "running", "after resume");
    rt.fails(&["resume", &id])?;
    ensure!(pid_running(pid), "pause/resume stopped the container");
    rt.ok(&["kill", &id, "KILL"])?;
    ensure!(rt.wait_pid(pid)? == 137);
    rt.wait_for_status(&id, "stopped")?;
    rt.fails(&["pause", &id])?;
    rt.ok(&["delete", &id])?;
    Ok(())
}

/// A pipe: (write end, read end), both close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((w.into(), r.into()))
}
