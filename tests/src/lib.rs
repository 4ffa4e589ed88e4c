//! Shared by rtv's end-to-end tests and the `rtv-bench` command: where the
//! guest kernel, initramfs and VMM are, and how to boot a VM as a process and
//! watch its console; and the agent scenarios run both against an agent on
//! the host and in a booted VM.

pub mod conformance;
pub mod containerd;
pub mod containers;
pub mod cri;
pub mod docker;
pub mod pod;
pub mod profile;
pub mod scenarios;
pub mod soak;
pub mod stress;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What the agent prints when the guest is up.
pub use rtv_protocol::READY_LINE;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs one of the repo's build scripts (with arguments after a space);
/// its last stdout line is a path.
fn script_output(script: &str) -> Result<PathBuf> {
    let mut words = script.split(' ');
    let path = repo_root().join(words.next().unwrap_or_default());
    let out = Command::new("bash")
        .arg(&path)
        .args(words)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", path.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("").trim();
    if last.is_empty() {
        bail!("{} printed no path", path.display());
    }
    Ok(PathBuf::from(last))
}

fn from_env_or(var: &str, script: &str) -> Result<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Ok(PathBuf::from(p)),
        None => script_output(script),
    }
}

/// The guest kernel: `$RTV_KERNEL`, or built (or taken from the cache) by
/// guest-kernel/build.sh.
pub fn kernel() -> Result<PathBuf> {
    static K: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    K.get_or_init(|| {
        from_env_or("RTV_KERNEL", "guest-kernel/build.sh").map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The uniprocessor guest kernel, for VMs with one vCPU: `$RTV_KERNEL_UP`,
/// or built (or taken from the cache) by `guest-kernel/build.sh --up`.
pub fn kernel_up() -> Result<PathBuf> {
    static K: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    K.get_or_init(|| {
        from_env_or("RTV_KERNEL_UP", "guest-kernel/build.sh --up").map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Points rtv (its library, the `rtv` binary and the shim, which read
/// them) at the guest kernels of the build: `RTV_KERNEL` and
/// `RTV_KERNEL_UP` in this process's environment.
pub fn export_kernels() -> Result<()> {
    let (smp, up) = (kernel()?, kernel_up()?);
    std::env::set_var("RTV_KERNEL", smp);
    std::env::set_var("RTV_KERNEL_UP", up);
    Ok(())
}

/// rtv's parts as this build has them: both kernels, the production
/// initramfs and the VMM.
pub fn artifacts() -> Result<rtv_runtime::Artifacts> {
    Ok(rtv_runtime::Artifacts {
        kernel: kernel()?,
        kernel_up: Some(kernel_up()?),
        initramfs: initramfs()?,
        vmm: vmm_binary()?,
    })
}

/// The `rtv` binary, built, with the guest kernels, the initramfs and the
/// VMM it runs exported to it (`RTV_KERNEL`, `RTV_KERNEL_UP`,
/// `RTV_INITRAMFS`, `RTV_VMM`), as a deployment would put them next to it.
pub fn rtv_with_artifacts() -> Result<PathBuf> {
    export_kernels()?;
    std::env::set_var("RTV_INITRAMFS", initramfs()?);
    std::env::set_var("RTV_VMM", vmm_binary()?);
    workspace_binary("rtv-runtime", "rtv")
}

/// The initramfs: `$RTV_INITRAMFS`, or built by rootfs-builder/build.sh.
pub fn initramfs() -> Result<PathBuf> {
    static I: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    I.get_or_init(|| {
        from_env_or("RTV_INITRAMFS", "rootfs-builder/build.sh").map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The test initramfs (agent and busybox): `$RTV_TEST_INITRAMFS`, or built
/// by `rootfs-builder/build.sh --test`.
pub fn test_initramfs() -> Result<PathBuf> {
    static I: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    I.get_or_init(|| match std::env::var_os("RTV_TEST_INITRAMFS") {
        Some(p) => Ok(PathBuf::from(p)),
        None => {
            let path = repo_root().join("rootfs-builder/build.sh");
            let out = Command::new("bash")
                .arg(&path)
                .arg("--test")
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running {}: {e}", path.display()))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            match (out.status.success(), stdout.lines().last()) {
                (true, Some(p)) => Ok(PathBuf::from(p.trim())),
                _ => Err(format!("{} --test failed ({})", path.display(), out.status)),
            }
        }
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A binary of this workspace, built (debug) if needed: `$RTV_<NAME>` wins.
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let var = format!("RTV_BIN_{}", bin.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    let root = repo_root();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(&root)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building {bin} failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug").join(bin))
}

/// The guest agent as the guest runs it, for running on the host: the
/// statically linked build the initramfs packs (`rootfs-builder/build.sh`
/// builds it; built here if needed, with the same flags). Static because a
/// container's init is set up by the agent exec'ing its own binary inside
/// the container's root, where no dynamic loader exists. `$RTV_BIN_RTV_AGENT`
/// wins.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RTV_BIN_RTV_AGENT") {
        return Ok(PathBuf::from(p));
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            let triple = "x86_64-unknown-linux-gnu";
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--profile", "agent", "--target", triple])
                .args(["-p", "rtv-agent"])
                .env(
                    "RUSTFLAGS",
                    "-C target-feature=+crt-static -C relocation-model=static",
                )
                .current_dir(&root)
                .status()
                .map_err(|e| format!("running cargo: {e}"))?;
            if !status.success() {
                return Err(format!("building the static rtv-agent failed ({status})"));
            }
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            Ok(target.join(triple).join("agent").join("rtv-agent"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The `rtv-vmm` binary: `$RTV_VMM`, or the workspace's release build.
pub fn vmm_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RTV_VMM") {
        return Ok(PathBuf::from(p));
    }
    static V: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    V.get_or_init(|| {
        let root = repo_root();
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "rtv-vmm",
                "--bin",
                "rtv-vmm",
            ])
            .current_dir(&root)
            .status()
            .map_err(|e| format!("running cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building rtv-vmm failed ({status})"));
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        Ok(target.join("release/rtv-vmm"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A console line and when it arrived, relative to process start.
#[derive(Debug, Clone)]
pub struct Line {
    /// Time since the VMM process was started.
    pub at: Duration,
    /// The text, without the newline.
    pub text: String,
}

/// A VMM process whose console (stdout) is read line by line.
pub struct VmProcess {
    child: Child,
    started: Instant,
    lines: mpsc::Receiver<Line>,
    /// Every line seen so far.
    pub seen: Vec<Line>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl VmProcess {
    /// Starts `cmd` with its stdout as the console.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                if tx
                    .send(Line {
                        at: started.elapsed(),
                        text,
                    })
                    .is_err()
                {
                    break;
                }
                buf.clear();
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Ok(Self {
            child,
            started,
            lines: rx,
            seen: Vec::new(),
            stderr: Some(stderr),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<Line> {
        let deadline = self.started + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.text.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "no {needle:?} on the console within {timeout:?}; saw:\n{}",
                        self.transcript()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "console closed before {needle:?} (exit {status:?}); saw:\n{}\nstderr:\n{}",
                        self.transcript(),
                        self.take_stderr()
                    )
                }
            }
        }
    }

    /// The next console line, if one arrives within `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<Line> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Waits for the process to exit; kills it if it outlives `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                while let Ok(line) = self.lines.try_recv() {
                    self.seen.push(line);
                }
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "the VMM did not exit within {timeout:?}; console:\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the process wrote to stderr (after it ended).
    pub fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// The console so far, one line each.
    pub fn transcript(&self) -> String {
        self.seen
            .iter()
            .map(|l| format!("[{:7.2}s] {}", l.at.as_secs_f64(), l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Memory figures of a live process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemUsage {
    /// Peak resident set size (VmHWM).
    pub peak_rss_kib: u64,
    /// Resident set now (VmRSS).
    pub rss_kib: u64,
    /// Resident memory outside the guest RAM mapping(s).
    pub overhead_kib: u64,
}

/// Reads `pid`'s memory use; mappings of at least `guest_ram_kib` (the
/// guest's RAM) are left out of the overhead.
pub fn mem_usage(pid: u32, guest_ram_kib: u64) -> Result<MemUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut overhead, mut size) = (0u64, 0u64);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) if size < guest_ram_kib => {
                overhead += v.parse::<u64>().unwrap_or(0)
            }
            _ => {}
        }
    }
    Ok(MemUsage {
        peak_rss_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
        overhead_kib: overhead,
    })
}

/// How rtv's VMM is asked to boot in tests and benchmarks.
pub struct BootSpec {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Boot protocol name for `rtv-vmm --boot`.
    pub protocol: &'static str,
    /// Extra kernel arguments.
    pub append: String,
    /// vCPUs.
    pub vcpus: u8,
    /// The uniprocessor kernel instead of the SMP one.
    pub up: bool,
}

impl Default for BootSpec {
    fn default() -> Self {
        Self {
            mem_mib: 128,
            protocol: "auto",
            append: "rtv.poweroff".into(),
            vcpus: 1,
            up: false,
        }
    }
}

/// The `rtv-vmm` command for `spec`, with the production initramfs.
pub fn rtv_vmm_command(spec: &BootSpec) -> Result<Command> {
    rtv_vmm_command_with_initrd(spec, &initramfs()?)
}

/// The `rtv-vmm` command for `spec` with the initramfs `initrd`.
pub fn rtv_vmm_command_with_initrd(spec: &BootSpec, initrd: &Path) -> Result<Command> {
    let mut cmd = Command::new(vmm_binary()?);
    cmd.arg("--kernel")
        .arg(if spec.up { kernel_up()? } else { kernel()? })
        .arg("--initrd")
        .arg(initrd)
        .args(["--mem", &spec.mem_mib.to_string(), "--boot", spec.protocol])
        .args(["--vcpus", &spec.vcpus.to_string()])
        .args(["--append", &spec.append]);
    Ok(cmd)
}

/// The `[vm]` keys of config/tiny.toml (128 MiB, 1 vCPU), for a test's own
/// configuration file: the suite's pods keep that size (scripts/test.sh
/// sets `$RTV_CONFIG` to config/tiny.toml), but a file named by `--config`
/// or a handler's `ConfigPath` replaces `$RTV_CONFIG`'s.
pub const TINY_VM: &str = "[vm]\ndefault_memory_mib = 128\ndefault_vcpus = 1\n";

/// Serialises booted VMs within one test binary: two guests emulating
/// kernel code at once on a 2-core machine would each take twice as long.
pub fn one_vm_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a boot may take here before a test gives up: PVM native mode
/// emulates every guest-kernel instruction, and CI machines may be loaded.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
