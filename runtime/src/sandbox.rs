//! A sandbox: one micro-VM (an `rtv-vmm` process) with its agent connected
//! and its own identity.
//!
//! [`Sandbox::start`] restores the VM from a template ([`crate::template`]),
//! making the template first if there is none; a template the VMM refuses,
//! or whose restored guest does not come up, is discarded and made again
//! once; when templates are off, or the restore
//! path fails anyway, the sandbox cold boots. Either way the host then sets
//! the guest's identity through the agent (`SetIdentity`): its hostname,
//! fresh entropy credited to the guest's RNG (and a CRNG reseed), and the
//! wall clock, none of which may come from the template.
//!
//! Each sandbox's VMM has its own vsock socket, console file and stderr log
//! in the sandbox's state directory, and its own CID. The VMM gets SIGTERM
//! when the thread that started it ends (`PR_SET_PDEATHSIG`; start
//! sandboxes from long-lived threads, such as tokio's workers), and is
//! killed when the [`Sandbox`] is dropped.
//!
//! A sandbox with a shared directory ([`SandboxConfig::shared_dir`]) gets a
//! virtio-fs device serving it (tag `rtvfs`; the guest mounts it with
//! `mount -t virtiofs rtvfs /mnt`). It is restored from a template made
//! with such a device (another key than the templates without one), which
//! was snapshotted before anything mounted it, so the restored device
//! serves the sandbox's own directory.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtv_protocol::{Identity, RequestBody, ResponseBody, MAX_HOSTNAME};

use crate::agent_client::{AgentClient, ClientError, Endpoint};
use crate::random::host_random;
use crate::template::{TemplateCache, TemplateError, TemplateSpec};
use crate::vmm_process::{file_tail, Hardening, Lifetime, Profile, VmmCommand};

/// Bytes of host entropy each sandbox gets.
pub const ENTROPY_BYTES: usize = 64;
/// The vsock socket's name in the state directory.
pub const VSOCK_FILE: &str = "vsock.sock";
/// The console file's name in the state directory.
pub const CONSOLE_FILE: &str = "console.log";
/// The VMM's stderr log's name in the state directory.
pub const STDERR_FILE: &str = "vmm.stderr.log";

/// Where the runtime notes why it killed a sandbox's VMM (a hung guest).
pub const END_REASON_FILE: &str = "vm-end-reason";

/// Why the VM of the sandbox whose state directory is `dir` ended, from
/// what was left there: the runtime's note when it killed a hung VM, else
/// the guest kernel's panic line, else the VMM's last line on standard
/// error (its exit), else that it was killed (SIGKILL leaves no line).
pub fn end_reason(dir: &Path) -> String {
    if let Ok(note) = std::fs::read_to_string(dir.join(END_REASON_FILE)) {
        return note;
    }
    let console = file_tail(&dir.join(CONSOLE_FILE), 16 * 1024);
    if let Some(at) = console
        .lines()
        .rev()
        .find_map(|l| l.find("Kernel panic").map(|i| &l[i..]))
    {
        return format!("the guest kernel panicked ({})", at.trim_end());
    }
    let stderr = file_tail(&dir.join(STDERR_FILE), 4096);
    match stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("rtv-vmm: "))
    {
        Some(last) => format!("its VMM ended: {last}"),
        None => "its VMM was killed (it left no reason)".into(),
    }
}
/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs (with the agent as /init).
    pub initramfs: PathBuf,
    /// The `rtv-vmm` binary.
    pub vmm: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Where this sandbox's vsock socket, console and VMM log go (created if
    /// needed; emptied of them, and removed if then empty, when it stops).
    pub state_dir: PathBuf,
    /// The guest's hostname.
    pub hostname: String,
    /// The guest's vsock CID (3 or more; distinct per sandbox).
    pub cid: u32,
    /// A host directory shared with the guest over virtio-fs (tag
    /// `rtvfs`), if any. Not removed when the sandbox stops.
    pub shared_dir: Option<PathBuf>,
    /// Start the VMM in a session of its own, not tied to the starting
    /// thread (no SIGTERM when it ends), so it can outlive this process;
    /// see [`Sandbox::detach`]. For the `rtv` command line, whose VMs
    /// live across invocations.
    pub detached: bool,
    /// Restore from a template (made if needed) instead of cold booting.
    pub use_template: bool,
    /// The template cache; `None`: [`TemplateCache::default_root`].
    pub template_dir: Option<PathBuf>,
    /// How long a cold boot (or making a template) may take to agent readiness.
    pub boot_timeout: Duration,
    /// How long a restored guest's agent may take to answer.
    pub restore_timeout: Duration,
    /// Profile the guest (its restore or boot included).
    pub profile: Option<Profile>,
    /// The tap the VM's NIC is attached to (the pod's network), if any;
    /// without one the NIC has no backend (the guest has loopback only).
    pub net_tap: Option<Arc<OwnedFd>>,
    /// The VMM's jail and seccomp switches (default: the configuration
    /// file's).
    pub hardening: Hardening,
}

impl SandboxConfig {
    /// A configuration with defaults: 128 MiB, 1 vCPU, templates on in the
    /// default cache, 300 s to boot, 120 s to restore.
    pub fn new(
        kernel: impl Into<PathBuf>,
        initramfs: impl Into<PathBuf>,
        vmm: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        hostname: impl Into<String>,
        cid: u32,
    ) -> Self {
        Self {
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            vmm: vmm.into(),
            mem_mib: 128,
            vcpus: 1,
            state_dir: state_dir.into(),
            hostname: hostname.into(),
            cid,
            shared_dir: None,
            detached: false,
            use_template: true,
            template_dir: None,
            boot_timeout: Duration::from_secs(300),
            restore_timeout: Duration::from_secs(120),
            profile: None,
            net_tap: None,
            hardening: Hardening::from_config(),
        }
    }

    /// The template this configuration restores from.
    pub fn template_spec(&self) -> TemplateSpec {
        TemplateSpec {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            vmm: self.vmm.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            virtio_fs: self.shared_dir.is_some(),
            guest: crate::vmm_process::GuestOptions::from_config(),
        }
    }

    /// The template cache this configuration uses.
    pub fn template_cache(&self) -> Result<TemplateCache, TemplateError> {
        let root = match &self.template_dir {
            Some(dir) => dir.clone(),
            None => crate::artifacts::template_dir(),
        };
        let budget_mib = crate::config::get()
            .templates
            .max_size_mib
            .unwrap_or(crate::template::DEFAULT_BUDGET_MIB);
        Ok(TemplateCache::new(root)
            .with_make_timeout(self.boot_timeout)
            .with_budget(budget_mib << 20))
    }

    fn check(&self) -> Result<(), SandboxError> {
        let bad = |field: &'static str, problem: String| SandboxError::Config { field, problem };
        if self.hostname.is_empty()
            || self.hostname.len() > MAX_HOSTNAME
            || self
                .hostname
                .bytes()
                .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return Err(bad(
                "hostname",
                format!(
                    "{:?}: 1 to {MAX_HOSTNAME} bytes, no NUL, '/' or white space",
                    self.hostname
                ),
            ));
        }
        if self.cid < 3 || self.cid == u32::MAX {
            return Err(bad(
                "cid",
                format!("{}: CIDs 0-2 and {} are reserved", self.cid, u32::MAX),
            ));
        }
        if self.vcpus == 0 {
            return Err(bad("vcpus", "0".into()));
        }
        if let Some(dir) = &self.shared_dir {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(bad(
                        "shared_dir",
                        format!("{}: not a directory", dir.display()),
                    ))
                }
                Err(e) => return Err(bad("shared_dir", format!("{}: {e}", dir.display()))),
            }
        }
        let sock = self.state_dir.join(VSOCK_FILE);
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(bad(
                "state_dir",
                format!(
                    "{}: the vsock socket path would be {} bytes, Unix sockets take {MAX_SOCKET_PATH}",
                    self.state_dir.display(),
                    sock.as_os_str().len()
                ),
            ));
        }
        Ok(())
    }
}

/// Sandbox errors, naming the file, template or VMM concerned.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A configuration field is not usable.
    #[error("sandbox config {field}: {problem}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The state directory (or a file in it) could not be made.
    #[error("sandbox state {path}: {source}")]
    State {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM could not be started.
    #[error("starting {vmm}: {source}")]
    Spawn {
        /// The binary.
        vmm: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM ended before the agent answered.
    #[error("rtv-vmm ({how}) exited with {status} before the agent answered; its stderr ends with:\n{stderr_tail}")]
    VmmExited {
        /// What it was doing (`--restore DIR` or a cold boot).
        how: String,
        /// Its exit status.
        status: ExitStatus,
        /// The end of its stderr.
        stderr_tail: String,
    },
    /// The agent could not be reached or refused a request.
    #[error("agent of sandbox {hostname} ({what}): {source}; console ends with:\n{console_tail}")]
    Agent {
        /// The sandbox.
        hostname: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: Box<ClientError>,
        /// The end of the guest console.
        console_tail: String,
    },
    /// A template could not be made or used.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The host's RNG failed.
    #[error("host getrandom: {0}")]
    Entropy(std::io::Error),
    /// A blocking task failed.
    #[error("background task: {0}")]
    Task(String),
    /// The VMM did not exit after the guest was asked to power off.
    #[error("rtv-vmm (pid {pid}) did not exit within {waited:?} of the shutdown request; killed")]
    StopTimeout {
        /// The VMM's pid.
        pid: u32,
        /// How long we waited.
        waited: Duration,
    },
}

/// How a sandbox's VM came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Restored from a template.
    Template {
        /// The template's key.
        key: String,
        /// How long making the template took, if this start made it.
        made_in: Option<Duration>,
        /// Problems found with earlier templates, which were replaced.
        replaced: Vec<String>,
    },
    /// Cold booted.
    ColdBoot {
        /// Why not from a template (`None`: templates were off).
        fallback_reason: Option<String>,
    },
}

/// A running VMM and the files it uses; killed and cleaned up when dropped.
struct Vmm {
    child: Child,
    state_dir: PathBuf,
    how: String,
    /// Left running (and its files kept) when dropped.
    detached: bool,
}

impl Vmm {
    fn file(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn kill(&mut self) {
        if self.exited().is_none() {
            let inner = crate::vmm_process::inner(self.child.id() as i32);
            let _ = self.child.kill();
            let _ = self.child.wait();
            crate::vmm_process::wait_gone(&inner, Duration::from_secs(5));
        }
    }

    fn cleanup(&self) {
        for name in [VSOCK_FILE, CONSOLE_FILE, STDERR_FILE] {
            let _ = std::fs::remove_file(self.file(name));
        }
        // Only if nothing else is in it.
        let _ = std::fs::remove_dir(&self.state_dir);
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.kill();
        self.cleanup();
    }
}

/// What to start the VMM with.
enum Boot<'a> {
    Cold,
    Restore(&'a Path),
}

/// A running sandbox.
pub struct Sandbox {
    client: Arc<AgentClient>,
    vmm: Vmm,
    hostname: String,
    origin: Origin,
    ready_after: Duration,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("hostname", &self.hostname)
            .field("pid", &self.vmm.child.id())
            .field("state_dir", &self.vmm.state_dir)
            .field("origin", &self.origin)
            .finish()
    }
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Sandbox {
    /// Starts a sandbox: from a template (made if needed) when
    /// `use_template`, else (or when that fails) by a cold boot; then
    /// connects the agent and sets the guest's identity.
    pub async fn start(cfg: SandboxConfig) -> Result<Sandbox, SandboxError> {
        cfg.check()?;
        let started = Instant::now();
        let mut fallback_reason = None;
        if cfg.use_template {
            match Self::from_template(&cfg, started).await {
                Ok(sandbox) => return Ok(sandbox),
                Err(e) => {
                    tracing::warn!(
                        sandbox = %cfg.hostname,
                        "cannot start from a template, cold booting: {e}"
                    );
                    fallback_reason = Some(e.to_string());
                }
            }
        }
        let (vmm, client) = launch(&cfg, Boot::Cold).await?;
        Self::finish(
            &cfg,
            vmm,
            client,
            Origin::ColdBoot { fallback_reason },
            started,
        )
        .await
    }

    async fn from_template(cfg: &SandboxConfig, started: Instant) -> Result<Sandbox, SandboxError> {
        let cache = cfg.template_cache()?;
        let spec = cfg.template_spec();
        let mut replaced = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (c, s) = (cache.clone(), spec.clone());
            let obtained = tokio::task::spawn_blocking(move || c.get_or_make(&s))
                .await
                .map_err(|e| SandboxError::Task(e.to_string()))??;
            replaced.extend(obtained.replaced.clone());
            let template = obtained.template;
            match launch(cfg, Boot::Restore(&template.snapshot_dir())).await {
                Ok((vmm, client)) => {
                    let origin = Origin::Template {
                        key: template.key().to_owned(),
                        made_in: obtained.made_in,
                        replaced,
                    };
                    return Self::finish(cfg, vmm, client, origin, started).await;
                }
                Err(SandboxError::VmmExited {
                    how,
                    status,
                    stderr_tail,
                }) if attempt == 1 => {
                    // The VMM checks every file of the snapshot and names
                    // the one it refuses: drop the template, make another.
                    let reason = format!("rtv-vmm {how} exited with {status}: {stderr_tail}");
                    tracing::warn!(
                        sandbox = %cfg.hostname,
                        template = %template.dir.display(),
                        "the VMM refused the template; replacing it: {reason}"
                    );
                    let c = cache.clone();
                    let r = reason.clone();
                    tokio::task::spawn_blocking(move || c.discard(&template, &r))
                        .await
                        .map_err(|e| SandboxError::Task(e.to_string()))??;
                    replaced.push(reason);
                }
                Err(e @ SandboxError::Agent { .. }) if attempt == 1 => {
                    // The VMM took the snapshot but the guest it restored
                    // does not come up (e.g. a template made on another
                    // CPU model, before the key said so): as useless as a
                    // refused one, so replaced the same way.
                    let reason = format!("the restored guest did not come up: {e}");
                    tracing::warn!(
                        sandbox = %cfg.hostname,
                        template = %template.dir.display(),
                        "{reason}; replacing the template"
                    );
                    let c = cache.clone();
                    let r = reason.clone();
                    tokio::task::spawn_blocking(move || c.discard(&template, &r))
                        .await
                        .map_err(|e| SandboxError::Task(e.to_string()))??;
                    replaced.push(reason);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn finish(
        cfg: &SandboxConfig,
        vmm: Vmm,
        client: AgentClient,
        origin: Origin,
        started: Instant,
    ) -> Result<Sandbox, SandboxError> {
        let mut entropy = vec![0u8; ENTROPY_BYTES];
        host_random(&mut entropy).map_err(SandboxError::Entropy)?;
        let identity = Identity {
            hostname: cfg.hostname.clone(),
            entropy,
            unix_time_ns: now_unix_ns(),
        };
        let agent_error = |what, source| SandboxError::Agent {
            hostname: cfg.hostname.clone(),
            what,
            source: Box::new(source),
            console_tail: file_tail(&vmm.file(CONSOLE_FILE), 2048),
        };
        match client.call(RequestBody::SetIdentity(identity)).await {
            Ok(ResponseBody::Ok) => {}
            Ok(other) => {
                return Err(agent_error(
                    "setting its identity",
                    ClientError::Unexpected(format!("{other:?}")),
                ))
            }
            Err(e) => return Err(agent_error("setting its identity", e)),
        }
        let ready_after = started.elapsed();
        tracing::info!(
            sandbox = %cfg.hostname,
            pid = vmm.child.id(),
            ms = ready_after.as_millis() as u64,
            "sandbox ready ({origin:?})"
        );
        Ok(Sandbox {
            client: Arc::new(client),
            vmm,
            hostname: cfg.hostname.clone(),
            origin,
            ready_after,
        })
    }

    /// Leaves the VMM running (with its socket, console and log) when the
    /// sandbox is dropped; only for a sandbox started `detached`, whose
    /// owner then ends the VMM by its pid.
    pub fn detach(mut self) {
        self.vmm.detached = true;
    }

    /// The agent's control connection.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// The agent's control connection, to share.
    pub fn shared_client(&self) -> Arc<AgentClient> {
        self.client.clone()
    }

    /// The process id of the `rtv-vmm` started: with its jail, the keeper,
    /// which relays signals to the VMM and ends as it ends (the VMM itself
    /// is its child, [`crate::vmm_process::family`]).
    pub fn pid(&self) -> u32 {
        self.vmm.child.id()
    }

    /// The guest's hostname, as set.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// How the VM came to be.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// From the call to `start` to the identity set (agent ready).
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The guest console's file.
    pub fn console_path(&self) -> PathBuf {
        self.vmm.file(CONSOLE_FILE)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.vmm.state_dir
    }

    /// Asks the agent to power the guest off, waits up to `timeout` for the
    /// VMM to exit (then kills it), and cleans the state directory.
    pub async fn stop(mut self, timeout: Duration) -> Result<ExitStatus, SandboxError> {
        let started = Instant::now();
        // The reply may be lost as the guest goes down: the exit is what counts.
        if let Err(e) = tokio::time::timeout(timeout, self.client.shutdown()).await {
            tracing::debug!(sandbox = %self.hostname, "shutdown request: {e}");
        }
        loop {
            if let Some(status) = self.vmm.exited() {
                return Ok(status);
            }
            if started.elapsed() >= timeout {
                let pid = self.pid();
                self.vmm.kill();
                return Err(SandboxError::StopTimeout {
                    pid,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Dropping `self` removes the state files.
    }
}

/// Starts the VMM and connects to its agent; a VMM that exits first is
/// reported with its status and stderr.
async fn launch(cfg: &SandboxConfig, boot: Boot<'_>) -> Result<(Vmm, AgentClient), SandboxError> {
    let dir = &cfg.state_dir;
    std::fs::create_dir_all(dir).map_err(|source| SandboxError::State {
        path: dir.clone(),
        source,
    })?;
    let uds = dir.join(VSOCK_FILE);
    // A socket left by a VMM that was killed would stop the new one binding.
    match std::fs::remove_file(&uds) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SandboxError::State { path: uds, source }),
    }
    let stderr_path = dir.join(STDERR_FILE);
    let stderr = File::create(&stderr_path).map_err(|source| SandboxError::State {
        path: stderr_path.clone(),
        source,
    })?;
    let (cmd, how, timeout) = match boot {
        Boot::Cold => (
            VmmCommand::cold_boot(&cfg.vmm, &cfg.kernel, &cfg.initramfs),
            "cold boot".to_string(),
            cfg.boot_timeout,
        ),
        Boot::Restore(snapshot) => (
            VmmCommand::restore(&cfg.vmm, snapshot),
            format!("--restore {}", snapshot.display()),
            cfg.restore_timeout,
        ),
    };
    let mut cmd = cmd
        .machine(cfg.mem_mib, cfg.vcpus)
        .vsock(cfg.cid, &uds)
        .console(&dir.join(CONSOLE_FILE))
        .lifetime(if cfg.detached {
            Lifetime::Detached
        } else {
            Lifetime::DiesWithParent
        });
    if let Some(share) = &cfg.shared_dir {
        cmd = cmd.shared_dir(share);
    }
    cmd = cmd
        .nic(cfg.net_tap.as_ref().map(|t| t.as_raw_fd()))
        .hardening(cfg.hardening);
    if let Some(p) = &cfg.profile {
        cmd = cmd.profile(p);
    }
    let child = cmd.spawn(stderr).map_err(|source| SandboxError::Spawn {
        vmm: cfg.vmm.clone(),
        source,
    })?;
    let mut vmm = Vmm {
        child,
        state_dir: dir.clone(),
        how,
        detached: false,
    };
    let connect = AgentClient::connect(Endpoint::vm(&uds), timeout);
    tokio::pin!(connect);
    let connected = loop {
        tokio::select! {
            r = &mut connect => break r,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if let Some(status) = vmm.exited() {
                    return Err(SandboxError::VmmExited {
                        how: vmm.how.clone(),
                        status,
                        stderr_tail: file_tail(&stderr_path, 2048),
                    });
                }
            }
        }
    };
    match connected {
        Ok(client) => Ok((vmm, client)),
        Err(source) => {
            if let Some(status) = vmm.exited() {
                return Err(SandboxError::VmmExited {
                    how: vmm.how.clone(),
                    status,
                    stderr_tail: file_tail(&stderr_path, 2048),
                });
            }
            Err(SandboxError::Agent {
                hostname: cfg.hostname.clone(),
                what: "connecting",
                source: Box::new(source),
                console_tail: file_tail(&vmm.file(CONSOLE_FILE), 2048),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why a VM ended, from what was left: the runtime's note first, then
    /// the guest's panic line (without its timestamp), then the VMM's last
    /// line, else killed.
    #[test]
    fn the_end_reason_comes_from_what_the_vm_left() {
        let dir = std::env::temp_dir().join(format!("rtv-end-reason-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(end_reason(&dir), "its VMM was killed (it left no reason)");
        std::fs::write(
            dir.join(STDERR_FILE),
            "rtv-vmm: warning: x\nrtv-vmm: stopped by signal 15 (SIGTERM)\n",
        )
        .unwrap();
        assert_eq!(
            end_reason(&dir),
            "its VMM ended: stopped by signal 15 (SIGTERM)"
        );
        std::fs::write(
            dir.join(CONSOLE_FILE),
            "rtv-agent: ready\n[   41.2] Kernel panic - not syncing: Out of memory\n",
        )
        .unwrap();
        assert_eq!(
            end_reason(&dir),
            "the guest kernel panicked (Kernel panic - not syncing: Out of memory)"
        );
        std::fs::write(dir.join(END_REASON_FILE), "taken as hung").unwrap();
        assert_eq!(end_reason(&dir), "taken as hung");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn cfg() -> SandboxConfig {
        SandboxConfig::new("k", "i", "v", "/tmp/sb", "sb-1", 3)
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert!(cfg().check().is_ok());
        let cases = [
            (
                SandboxConfig {
                    hostname: "a/b".into(),
                    ..cfg()
                },
                "hostname",
            ),
            (SandboxConfig { cid: 2, ..cfg() }, "cid"),
            (SandboxConfig { vcpus: 0, ..cfg() }, "vcpus"),
            (
                SandboxConfig {
                    shared_dir: Some(PathBuf::from("/nonexistent/rtv-share")),
                    ..cfg()
                },
                "shared_dir",
            ),
            (
                SandboxConfig {
                    shared_dir: Some(PathBuf::from("/proc/self/status")),
                    ..cfg()
                },
                "shared_dir",
            ),
            (
                SandboxConfig {
                    state_dir: PathBuf::from("/").join("x".repeat(100)),
                    ..cfg()
                },
                "state_dir",
            ),
        ];
        for (c, field) in cases {
            match c.check() {
                Err(SandboxError::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn host_random_fills_the_buffer() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        host_random(&mut a).unwrap();
        host_random(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn a_vmm_that_exits_at_once_is_reported_with_its_stderr() {
        let dir = std::env::temp_dir().join(format!("rtv-sb-unit-{}", std::process::id()));
        let c = SandboxConfig {
            vmm: PathBuf::from("/bin/false"),
            state_dir: dir.clone(),
            use_template: false,
            ..cfg()
        };
        match Sandbox::start(c).await {
            Err(SandboxError::VmmExited { how, status, .. }) => {
                assert_eq!(how, "cold boot");
                assert_eq!(status.code(), Some(1));
            }
            other => panic!("{other:?}"),
        }
        assert!(!dir.exists(), "state dir left behind");
    }
}
