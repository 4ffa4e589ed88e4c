//! VM templates: a snapshot of a booted guest whose agent is ready, made
//! once per (kernel, initramfs, VMM build, memory size, vCPU count, with or
//! without a virtio-fs device) and restored by every sandbox that asks for
//! the same.
//!
//! The cache directory (`$RTV_CACHE_DIR/templates`, or
//! `~/.cache/rtv/templates`) holds one directory per key:
//!
//! | path | content |
//! |---|---|
//! | `<key>/template.json` | [`TemplateManifest`]: the key's inputs, when it was made, the snapshot's VMM build id |
//! | `<key>/snapshot/` | the VMM's snapshot (`state.json`, `memory.bin`, ...) |
//! | `<key>/make-console.log` | the guest console of the boot that made it |
//! | `<key>/share/` | templates with a virtio-fs device: the empty placeholder directory the device shared while the template was made (the guest never mounts it; each restore shares the sandbox's own directory) |
//! | `<key>/last-used` | its modification time: when a sandbox last started from it |
//! | `<key>.lock` | flocked by whoever makes, replaces, discards or evicts `<key>` |
//!
//! The key is the sha256 of the kernel's and the initramfs's sha256, the
//! output of `rtv-vmm --version` with the VMM's build id, the memory size,
//! the vCPU count, whether the VM has a virtio-fs device, and the host's CPU
//! model and flags ([`host_cpu`]: a snapshot made on one CPU model is not
//! restored on another). `rtv-vmm` does not print its snapshot build id, so
//! the build id in the key is the sha256 of the `rtv-vmm` binary (stricter:
//! any rebuild is another key); the snapshot's own build id is recorded in
//! `template.json` once made, and checked against `state.json` before use.
//!
//! A template is made in a temporary directory next to the others and
//! renamed into place, under the key's lock: concurrent makers wait for the
//! first and reuse its template. Before use a template is checked cheaply
//! (our manifest, the snapshot manifest's build, sizes and the presence of
//! every file); the VMM checks every file's sha256 when it restores, and
//! exits 1 naming the file: the sandbox then discards the template
//! ([`TemplateCache::discard`]) and makes a new one.
//!
//! The cache has a size budget (`templates.max_size_mib`,
//! [`DEFAULT_BUDGET_MIB`]): once a new template makes the cache larger,
//! the least recently used others are removed until it fits
//! ([`TemplateCache::evict`]). A template whose lock is held (being made,
//! replaced or discarded) is left; a VM already restored from a removed
//! template keeps its private mapping of the memory; a sandbox that found
//! it just before it went falls back to making it again.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vmm_process::{memory_file, open_file_tail, VmmCommand};

/// Our manifest's file name, in the template's directory.
pub const MANIFEST_FILE: &str = "template.json";
/// The VMM snapshot's directory name, in the template's directory.
pub const SNAPSHOT_DIR: &str = "snapshot";
/// The VMM snapshot's manifest, in [`SNAPSHOT_DIR`].
pub const SNAPSHOT_MANIFEST: &str = "state.json";
/// The version of [`TemplateManifest`] this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The vsock CID of the guest a template is made from (restores get their own).
pub const TEMPLATE_CID: u32 = 3;
/// The file whose modification time says when a template was last used.
pub const LAST_USED_FILE: &str = "last-used";
/// The template cache's size budget without `templates.max_size_mib`, MiB.
pub const DEFAULT_BUDGET_MIB: u64 = 1024;
/// The placeholder share's directory name, in the template's directory.
pub const SHARE_DIR: &str = "share";
/// How long making a template (a cold boot) may take by default.
pub const DEFAULT_MAKE_TIMEOUT: Duration = Duration::from_secs(300);

/// Template errors; each names the file, directory or process concerned.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// An input (kernel, initramfs, VMM binary) cannot be read.
    #[error("{what} {path}: {source}")]
    Input {
        /// Which input.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `rtv-vmm --version` failed.
    #[error("asking {vmm} for its version: {problem}")]
    VmmVersion {
        /// The binary.
        vmm: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// A file or directory of the cache could not be used.
    #[error("template cache {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// There is no template for the key yet.
    #[error("template {dir}: missing")]
    Missing {
        /// Where it would be.
        dir: PathBuf,
    },
    /// The template is damaged or does not match what was asked for.
    #[error("template {dir}: {problem}")]
    Invalid {
        /// The template's directory.
        dir: PathBuf,
        /// What is wrong, naming the file.
        problem: String,
    },
    /// The VMM could not make the template.
    #[error("making template {key}: rtv-vmm {status}; its stderr ends with:\n{stderr_tail}")]
    Make {
        /// The key.
        key: String,
        /// How the VMM ended (or that it could not start, or timed out).
        status: String,
        /// The end of its stderr.
        stderr_tail: String,
    },
}

impl TemplateError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        TemplateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a template is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    /// The guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The `rtv-vmm` binary.
    pub vmm: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// With a virtio-fs device (the sandboxes restored from it share a
    /// directory each).
    pub virtio_fs: bool,
    /// The kernel arguments and PVM mode it boots with.
    pub guest: crate::vmm_process::GuestOptions,
}

/// The inputs of a template's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    /// sha256 of the kernel file.
    pub kernel_sha256: String,
    /// sha256 of the initramfs file.
    pub initramfs_sha256: String,
    /// `rtv-vmm --version`.
    pub vmm_version: String,
    /// The VMM's build id: `sha256:` and the hash of the `rtv-vmm` binary.
    pub vmm_build_id: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// With a virtio-fs device.
    #[serde(default)]
    pub virtio_fs: bool,
    /// The configuration's `vm.kernel_args`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// The configuration's `vm.pvm`, unless auto.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvm: Option<String>,
    /// The host's CPU ([`host_cpu`]): a snapshot holds the vCPUs' CPUID
    /// and MSRs as this CPU gave them, and a guest restored on another
    /// model (a cache carried to another host, or a VM host migrated
    /// under us) may not run.
    #[serde(default)]
    pub host_cpu: String,
}

/// The host CPU's identity for template keys: vendor, family, model and
/// stepping, and a hash of its feature flags, from `/proc/cpuinfo` (empty
/// when it cannot be read).
pub fn host_cpu() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        cpu_identity(&text)
    })
    .clone()
}

/// [`host_cpu`] from the text of `/proc/cpuinfo` (its first processor).
fn cpu_identity(cpuinfo: &str) -> String {
    let first = cpuinfo.split("\n\n").next().unwrap_or_default();
    let field = |name: &str| {
        first
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let flags = hex(&Sha256::digest(field("flags").as_bytes()));
    format!(
        "{} {}/{}/{} flags:{}",
        field("vendor_id"),
        field("cpu family"),
        field("model"),
        field("stepping"),
        &flags[..16]
    )
}

impl KeyInputs {
    /// The key: sha256 of the inputs, lowercase hex.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            "rtv-template-key-v2-nic",
            &self.kernel_sha256,
            &self.initramfs_sha256,
            &self.vmm_version,
            &self.vmm_build_id,
            &self.mem_mib.to_string(),
            &self.vcpus.to_string(),
            if self.virtio_fs { "virtio-fs" } else { "no-fs" },
            &self.host_cpu,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        // Set only by a configuration file: keys without them stay as
        // they were.
        for (name, value) in [("kernel-args", &self.kernel_args), ("pvm", &self.pvm)] {
            if let Some(v) = value {
                let part = format!("{name}={v}");
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        hex(&h.finalize())
    }
}

/// `template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateManifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The key (the directory's name).
    pub key: String,
    /// What the key is made of.
    pub inputs: KeyInputs,
    /// The files it was made from (for people; not part of the key).
    pub made_from: MadeFrom,
    /// When, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// How long making it took, in milliseconds.
    pub make_ms: u64,
    /// The build id the VMM wrote into the snapshot's `state.json`.
    pub snapshot_build_id: String,
    /// A random id of this very template, so a discard never removes a
    /// newer one made in its place.
    pub instance: String,
}

/// The paths a template was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeFrom {
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// VMM binary.
    pub vmm: PathBuf,
}

/// A checked template.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: TemplateManifest,
}

impl Template {
    /// The VMM's snapshot directory, for `rtv-vmm --restore`.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR)
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.manifest.key
    }
}

/// What [`TemplateCache::get_or_make`] did.
#[derive(Debug, Clone)]
pub struct Obtained {
    /// The template.
    pub template: Template,
    /// How long making it took, if this call made it.
    pub made_in: Option<Duration>,
    /// Why an earlier template with the same key was replaced, if it was.
    pub replaced: Option<String>,
}

/// The parts of the VMM's `state.json` checked before use.
#[derive(Debug, Deserialize)]
struct SnapshotManifest {
    format_version: u32,
    vmm: SnapshotVmm,
    mem_size_mib: u64,
    vcpus: u8,
    files: BTreeMap<String, SnapshotFile>,
    #[serde(default)]
    devices: Vec<SnapshotDevice>,
}

#[derive(Debug, Deserialize)]
struct SnapshotDevice {
    kind: String,
}

#[derive(Debug, Deserialize)]
struct SnapshotVmm {
    version: String,
    build_id: String,
}

#[derive(Debug, Deserialize)]
struct SnapshotFile {
    size: u64,
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file's identity on disk, to reuse its hash while it is unchanged.
type FileStamp = (PathBuf, u64, u64, u64, i64, i64);

fn stamp(path: &Path, meta: &std::fs::Metadata) -> FileStamp {
    (
        path.to_path_buf(),
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// sha256 of a file, remembered per process while the file is unchanged
/// (kernels are tens of MiB; every sandbox start needs the key).
pub fn file_sha256(what: &'static str, path: &Path) -> Result<String, TemplateError> {
    static MEMO: Mutex<Option<HashMap<FileStamp, String>>> = Mutex::new(None);
    let input = |source| TemplateError::Input {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(input)?;
    let key = stamp(path, &meta);
    if let Some(h) = MEMO
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok(h.clone());
    }
    let mut file = File::open(path).map_err(input)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(input)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let h = hex(&hasher.finalize());
    MEMO.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key, h.clone());
    Ok(h)
}

/// `rtv-vmm --version`, remembered per process while the binary is unchanged.
fn vmm_version(vmm: &Path) -> Result<String, TemplateError> {
    static MEMO: Mutex<Option<HashMap<FileStamp, String>>> = Mutex::new(None);
    let meta = std::fs::metadata(vmm).map_err(|source| TemplateError::Input {
        what: "VMM binary",
        path: vmm.to_path_buf(),
        source,
    })?;
    let key = stamp(vmm, &meta);
    if let Some(v) = MEMO
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok(v.clone());
    }
    let problem = |problem: String| TemplateError::VmmVersion {
        vmm: vmm.to_path_buf(),
        problem,
    };
    let out = Command::new(vmm)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| problem(e.to_string()))?;
    if !out.status.success() {
        return Err(problem(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if version.is_empty() {
        return Err(problem("it printed nothing".into()));
    }
    MEMO.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key, version.clone());
    Ok(version)
}

impl TemplateSpec {
    /// The inputs of this spec's key (hashes the files; remembered).
    pub fn inputs(&self) -> Result<KeyInputs, TemplateError> {
        Ok(KeyInputs {
            kernel_sha256: file_sha256("kernel", &self.kernel)?,
            initramfs_sha256: file_sha256("initramfs", &self.initramfs)?,
            vmm_version: vmm_version(&self.vmm)?,
            vmm_build_id: format!("sha256:{}", file_sha256("VMM binary", &self.vmm)?),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            virtio_fs: self.virtio_fs,
            kernel_args: self.guest.kernel_args.clone(),
            pvm: (self.guest.pvm != crate::config::Pvm::Auto)
                .then(|| self.guest.pvm.as_str().to_owned()),
            host_cpu: host_cpu(),
        })
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a template maker's vsock socket goes (see `make_in`); removed
/// when dropped.
struct UdsDir {
    dir: PathBuf,
    /// A directory of its own (removed whole), not the making directory.
    own: bool,
}

impl UdsDir {
    const NAME: &'static str = "vsock.sock";
    /// The longest Unix socket path, less the VMM's `_<port>` suffixes.
    const MAX_PATH: usize = 96;

    fn for_making(making: &Path) -> Result<UdsDir, TemplateError> {
        if making.join(Self::NAME).as_os_str().len() <= Self::MAX_PATH {
            return Ok(UdsDir {
                dir: making.to_path_buf(),
                own: false,
            });
        }
        let dir = std::env::temp_dir().join(format!("rtv-{}", unique("tmpl")));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| TemplateError::io(&dir, e))?;
        Ok(UdsDir { dir, own: true })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join(Self::NAME)
    }
}

impl Drop for UdsDir {
    fn drop(&mut self) {
        if self.own {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            let _ = std::fs::remove_file(self.socket());
        }
    }
}

/// A name nobody else uses at once: pid, a counter and the clock.
fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    )
}

/// 16 random bytes from the host, hex.
fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = crate::random::host_random(&mut b);
    hex(&b)
}

/// An exclusive flock on a file, released when dropped.
struct Lock(File);

impl Lock {
    /// The lock file, made if missing.
    fn open(path: &Path) -> Result<File, TemplateError> {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| TemplateError::io(path, e))
    }

    fn take(path: &Path) -> Result<Self, TemplateError> {
        let file = Self::open(path)?;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock(file));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(TemplateError::io(path, e));
            }
        }
    }
}

impl Lock {
    /// The lock if nobody holds it now; `None` if somebody does.
    fn try_take(path: &Path) -> Result<Option<Self>, TemplateError> {
        let file = Self::open(path)?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(Lock(file)));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        Err(TemplateError::io(path, e))
    }
}

/// The disk space `path` takes (allocated blocks, symlinks not followed):
/// a snapshot's memory file is sparse.
fn allocated(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| allocated(&e.path())).sum::<u64>())
        .unwrap_or(0)
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor (closing it would too).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The template cache.
#[derive(Debug, Clone)]
pub struct TemplateCache {
    root: PathBuf,
    make_timeout: Duration,
    budget: u64,
}

impl TemplateCache {
    /// The cache in `root` (created when a template is made).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            make_timeout: DEFAULT_MAKE_TIMEOUT,
            budget: DEFAULT_BUDGET_MIB << 20,
        }
    }

    /// The cache's size budget in bytes ([`DEFAULT_BUDGET_MIB`] by
    /// default), enforced when a template is made ([`Self::evict`]).
    pub fn with_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }

    /// Records that a sandbox starts from the template in `dir` (the
    /// modification time of its [`LAST_USED_FILE`]); best effort.
    fn mark_used(dir: &Path) {
        let path = dir.join(LAST_USED_FILE);
        let done = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        if let Err(e) = done {
            tracing::debug!(path = %path.display(), "cannot record the template's use: {e}");
        }
    }

    /// The templates in the cache and the disk space they take, against
    /// the budget: (count, bytes, budget bytes).
    pub fn usage(&self) -> (usize, u64, u64) {
        let dirs = self.template_dirs();
        let bytes = dirs.iter().map(|(_, d)| allocated(d)).sum();
        (dirs.len(), bytes, self.budget)
    }

    /// The templates' keys and directories: the cache's directories but
    /// the temporary ones (`.making-*`, `.trash-*`).
    fn template_dirs(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let key = e.file_name().to_str()?.to_owned();
                (!key.starts_with('.')).then(|| (key, e.path()))
            })
            .collect()
    }

    /// Removes the least recently used templates other than `keep` while
    /// the cache is over its budget; returns the keys removed. A template
    /// whose lock somebody holds (being made, replaced or discarded) is
    /// left. Temporary directories (`.making-*`, `.trash-*`) are not
    /// counted: they are gone once their maker is done.
    pub fn evict(&self, keep: &str) -> Vec<String> {
        let mut all: Vec<(std::time::SystemTime, u64, String)> = self
            .template_dirs()
            .into_iter()
            .map(|(key, dir)| {
                let used = [
                    dir.join(LAST_USED_FILE),
                    dir.join(MANIFEST_FILE),
                    dir.clone(),
                ]
                .iter()
                .find_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .unwrap_or(std::time::UNIX_EPOCH);
                (used, allocated(&dir), key)
            })
            .collect();
        let mut total: u64 = all.iter().map(|t| t.1).sum();
        all.sort();
        let mut removed = Vec::new();
        for (used, size, key) in all {
            if total <= self.budget {
                break;
            }
            if key == keep {
                continue;
            }
            let lock = match Lock::try_take(&self.lock_of(&key)) {
                Ok(Some(lock)) => lock,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("template cache: {e}");
                    continue;
                }
            };
            match self.remove(&self.dir_of(&key)) {
                Ok(()) => {
                    tracing::info!(
                        template = %key,
                        size_mib = size >> 20,
                        last_used = ?used,
                        budget_mib = self.budget >> 20,
                        "removed the least recently used template: the cache was over its budget"
                    );
                    total = total.saturating_sub(size);
                    removed.push(key);
                }
                Err(e) => tracing::warn!("template cache: {e}"),
            }
            drop(lock);
        }
        removed
    }

    /// The cache in the default place ([`crate::artifacts::template_dir`]).
    pub fn default_root() -> PathBuf {
        crate::artifacts::template_dir()
    }

    /// How long making a template may take before the VMM is killed.
    pub fn with_make_timeout(mut self, timeout: Duration) -> Self {
        self.make_timeout = timeout;
        self
    }

    /// The cache's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the template with `key` lives.
    pub fn dir_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn lock_of(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.lock"))
    }

    /// The template for `spec`, checked, if there is a good one; does not
    /// make or remove anything.
    pub fn check(&self, spec: &TemplateSpec) -> Result<Template, TemplateError> {
        let inputs = spec.inputs()?;
        self.validate(&inputs)
    }

    fn validate(&self, inputs: &KeyInputs) -> Result<Template, TemplateError> {
        let key = inputs.key();
        let dir = self.dir_of(&key);
        let invalid = |problem: String| TemplateError::Invalid {
            dir: dir.clone(),
            problem,
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return if dir.exists() {
                    Err(invalid(format!("{MANIFEST_FILE} is missing")))
                } else {
                    Err(TemplateError::Missing { dir })
                };
            }
            Err(e) => return Err(invalid(format!("{MANIFEST_FILE}: cannot read: {e}"))),
        };
        let manifest: TemplateManifest = serde_json::from_slice(&text)
            .map_err(|e| invalid(format!("{MANIFEST_FILE}: not a template manifest: {e}")))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(invalid(format!(
                "{MANIFEST_FILE}: format_version {}, this runtime reads {FORMAT_VERSION}",
                manifest.format_version
            )));
        }
        if manifest.key != key || manifest.inputs != *inputs {
            return Err(invalid(format!(
                "{MANIFEST_FILE}: made from other inputs (VMM {} build {}, kernel {}, initramfs {}, {} MiB, {} vCPUs); wanted VMM {} build {}, kernel {}, initramfs {}, {} MiB, {} vCPUs",
                manifest.inputs.vmm_version,
                manifest.inputs.vmm_build_id,
                manifest.inputs.kernel_sha256,
                manifest.inputs.initramfs_sha256,
                manifest.inputs.mem_mib,
                manifest.inputs.vcpus,
                inputs.vmm_version,
                inputs.vmm_build_id,
                inputs.kernel_sha256,
                inputs.initramfs_sha256,
                inputs.mem_mib,
                inputs.vcpus,
            )));
        }
        let snap = dir.join(SNAPSHOT_DIR);
        let state_path = snap.join(SNAPSHOT_MANIFEST);
        let name = format!("{SNAPSHOT_DIR}/{SNAPSHOT_MANIFEST}");
        let state_text =
            std::fs::read(&state_path).map_err(|e| invalid(format!("{name}: cannot read: {e}")))?;
        let state: SnapshotManifest = serde_json::from_slice(&state_text)
            .map_err(|e| invalid(format!("{name}: not a snapshot manifest: {e}")))?;
        if state.vmm.build_id != manifest.snapshot_build_id {
            return Err(invalid(format!(
                "{name}: written by VMM build {} (version {}, format {}), {MANIFEST_FILE} says build {}",
                state.vmm.build_id, state.vmm.version, state.format_version, manifest.snapshot_build_id
            )));
        }
        if state.mem_size_mib != inputs.mem_mib || state.vcpus != inputs.vcpus {
            return Err(invalid(format!(
                "{name}: {} MiB and {} vCPUs, wanted {} MiB and {} vCPUs",
                state.mem_size_mib, state.vcpus, inputs.mem_mib, inputs.vcpus
            )));
        }
        let has_fs = state.devices.iter().any(|d| d.kind == "fs");
        if has_fs != inputs.virtio_fs {
            return Err(invalid(format!(
                "{name}: the snapshot {} a virtio-fs device, the key says it {}",
                if has_fs { "has" } else { "has no" },
                if inputs.virtio_fs {
                    "has one"
                } else {
                    "has none"
                }
            )));
        }
        for (file, entry) in &state.files {
            let path = snap.join(file);
            let len = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) => return Err(invalid(format!("{SNAPSHOT_DIR}/{file}: {e}"))),
            };
            if len != entry.size {
                let how = if len < entry.size {
                    "truncated"
                } else {
                    "too long"
                };
                return Err(invalid(format!(
                    "{SNAPSHOT_DIR}/{file}: {how}: {len} bytes, {name} says {}",
                    entry.size
                )));
            }
        }
        Ok(Template { dir, manifest })
    }

    /// The template for `spec`: a good one from the cache, or a new one
    /// (made by this call, or by a concurrent maker it waited for). A
    /// damaged or mismatched template in the way is logged, removed and
    /// made anew.
    pub fn get_or_make(&self, spec: &TemplateSpec) -> Result<Obtained, TemplateError> {
        let inputs = spec.inputs()?;
        match self.validate(&inputs) {
            Ok(template) => {
                Self::mark_used(&template.dir);
                return Ok(Obtained {
                    template,
                    made_in: None,
                    replaced: None,
                });
            }
            Err(TemplateError::Missing { .. }) | Err(TemplateError::Invalid { .. }) => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&self.root).map_err(|e| TemplateError::io(&self.root, e))?;
        let key = inputs.key();
        let lock = Lock::take(&self.lock_of(&key))?;
        // Someone may have made it while we waited for the lock.
        let replaced = match self.validate(&inputs) {
            Ok(template) => {
                Self::mark_used(&template.dir);
                return Ok(Obtained {
                    template,
                    made_in: None,
                    replaced: None,
                });
            }
            Err(TemplateError::Missing { .. }) => None,
            Err(TemplateError::Invalid { dir, problem }) => {
                tracing::warn!(
                    template = %dir.display(),
                    "template is damaged or does not match, removing and making it again: {problem}"
                );
                self.remove(&dir)?;
                Some(problem)
            }
            Err(e) => return Err(e),
        };
        let started = Instant::now();
        let template = self.make(spec, &inputs)?;
        Self::mark_used(&template.dir);
        // Others' locks are taken without waiting, after ours is let go.
        drop(lock);
        self.evict(&key);
        Ok(Obtained {
            template,
            made_in: Some(started.elapsed()),
            replaced,
        })
    }

    /// Removes `template` because the VMM refused it (or it failed
    /// otherwise), unless it was already replaced by another one.
    pub fn discard(&self, template: &Template, reason: &str) -> Result<(), TemplateError> {
        let _lock = Lock::take(&self.lock_of(template.key()))?;
        let current: Option<TemplateManifest> = std::fs::read(template.dir.join(MANIFEST_FILE))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok());
        match current {
            Some(m) if m.instance != template.manifest.instance => {
                tracing::info!(
                    template = %template.dir.display(),
                    "template was already replaced"
                );
                Ok(())
            }
            _ => {
                tracing::warn!(
                    template = %template.dir.display(),
                    "removing a template the VMM could not restore: {reason}"
                );
                self.remove(&template.dir)
            }
        }
    }

    /// Moves `dir` out of the way (atomically), then deletes it. Running
    /// VMs restored from it keep their private mappings of its memory.
    fn remove(&self, dir: &Path) -> Result<(), TemplateError> {
        let trash = self.root.join(format!(".{}", unique("trash")));
        match std::fs::rename(dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(TemplateError::io(dir, e)),
        }
        std::fs::remove_dir_all(&trash).map_err(|e| TemplateError::io(&trash, e))
    }

    /// Cold boots the guest with `--snapshot-on-ready` into a temporary
    /// directory, writes our manifest, and renames it into place (the
    /// caller holds the key's lock).
    fn make(&self, spec: &TemplateSpec, inputs: &KeyInputs) -> Result<Template, TemplateError> {
        let key = inputs.key();
        let tmp = self.root.join(format!(".{}", unique("making")));
        std::fs::create_dir_all(&tmp).map_err(|e| TemplateError::io(&tmp, e))?;
        let result = self.make_in(spec, inputs, &key, &tmp);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    fn make_in(
        &self,
        spec: &TemplateSpec,
        inputs: &KeyInputs,
        key: &str,
        tmp: &Path,
    ) -> Result<Template, TemplateError> {
        let started = Instant::now();
        let failed = |status: String, stderr: &File| TemplateError::Make {
            key: key.to_owned(),
            status,
            stderr_tail: open_file_tail(stderr, 2048),
        };
        // In the making directory, or, when that path is too long for a
        // Unix socket (107 bytes), in a private directory of its own: never
        // straight in /tmp, which the jailed VMM would then bind whole into
        // its root (and with it not the mounts under /tmp, the cache's own
        // among them).
        let uds_dir = UdsDir::for_making(tmp)?;
        let uds = uds_dir.socket();
        // The VMM's stderr in memory, not in the cache: its last words
        // must not be lost to the cache's file system being full.
        let stderr_mem =
            memory_file("rtv-template-stderr").map_err(|e| TemplateError::io(tmp, e))?;
        let stderr = stderr_mem
            .try_clone()
            .map_err(|e| TemplateError::io(tmp, e))?;
        let snapshot = tmp.join(SNAPSHOT_DIR);
        let mut cmd = VmmCommand::cold_boot(&spec.vmm, &spec.kernel, &spec.initramfs)
            .guest_options(spec.guest.clone())
            .machine(spec.mem_mib, spec.vcpus)
            .vsock(TEMPLATE_CID, &uds)
            .nic(None)
            .snapshot_on_ready(&snapshot)
            .console(&tmp.join("make-console.log"));
        if spec.virtio_fs {
            // The guest is snapshotted at readiness, before anything could
            // mount it: the snapshot holds no file system state, and each
            // restore shares the sandbox's own directory.
            let share = tmp.join(SHARE_DIR);
            std::fs::create_dir(&share).map_err(|e| TemplateError::io(&share, e))?;
            cmd = cmd.shared_dir(&share);
        }
        tracing::info!(key, "making a VM template (cold boot)");
        let mut child = cmd
            .spawn(stderr)
            .map_err(|e| failed(format!("could not start: {e}"), &stderr_mem))?;
        let deadline = started + self.make_timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(
                        format!("did not snapshot within {:?}", self.make_timeout),
                        &stderr_mem,
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!("cannot be waited for: {e}"), &stderr_mem));
                }
            }
        };
        drop(uds_dir);
        if !status.success() {
            return Err(failed(format!("exited with {status}"), &stderr_mem));
        }
        let state_path = snapshot.join(SNAPSHOT_MANIFEST);
        let state: SnapshotManifest = std::fs::read(&state_path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_slice(&t).map_err(|e| e.to_string()))
            .map_err(|e| {
                failed(
                    format!("exited 0 without a usable {}: {e}", state_path.display()),
                    &stderr_mem,
                )
            })?;
        let manifest = TemplateManifest {
            format_version: FORMAT_VERSION,
            key: key.to_owned(),
            inputs: inputs.clone(),
            made_from: MadeFrom {
                kernel: spec.kernel.clone(),
                initramfs: spec.initramfs.clone(),
                vmm: spec.vmm.clone(),
            },
            created_unix_ms: now_unix_ms(),
            make_ms: started.elapsed().as_millis() as u64,
            snapshot_build_id: state.vmm.build_id,
            instance: random_id(),
        };
        let manifest_path = tmp.join(MANIFEST_FILE);
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| TemplateError::Io {
            path: manifest_path.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&manifest_path, bytes).map_err(|e| TemplateError::io(&manifest_path, e))?;
        let dir = self.dir_of(key);
        std::fs::rename(tmp, &dir).map_err(|e| TemplateError::io(&dir, e))?;
        tracing::info!(
            key,
            ms = manifest.make_ms,
            "VM template made in {}",
            dir.display()
        );
        Ok(Template { dir, manifest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> KeyInputs {
        KeyInputs {
            kernel_sha256: "k".into(),
            initramfs_sha256: "i".into(),
            vmm_version: "rtv-vmm 0.1.0".into(),
            vmm_build_id: "sha256:b".into(),
            mem_mib: 128,
            vcpus: 1,
            virtio_fs: false,
            kernel_args: None,
            pvm: None,
            host_cpu: "GenuineIntel 6/85/7 flags:0123456789abcdef".into(),
        }
    }

    #[test]
    fn the_host_cpu_is_its_model_and_a_hash_of_its_flags() {
        let intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\
                     model\t\t: 85\nstepping\t: 7\nflags\t\t: fpu vme avx512f\n\n\
                     processor\t: 1\nvendor_id\t: Other\n";
        let id = cpu_identity(intel);
        assert!(id.starts_with("GenuineIntel 6/85/7 flags:"), "{id}");
        assert_eq!(id.len(), "GenuineIntel 6/85/7 flags:".len() + 16);
        let fewer_flags = intel.replace(" avx512f", "");
        assert_ne!(cpu_identity(&fewer_flags), id);
        let amd = intel.replace("GenuineIntel", "AuthenticAMD");
        assert_ne!(cpu_identity(&amd), id);
        assert!(!host_cpu().is_empty());
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = inputs().key();
        assert_eq!(base.len(), 64);
        let variants = [
            KeyInputs {
                kernel_sha256: "k2".into(),
                ..inputs()
            },
            KeyInputs {
                initramfs_sha256: "i2".into(),
                ..inputs()
            },
            KeyInputs {
                vmm_version: "rtv-vmm 0.2.0".into(),
                ..inputs()
            },
            KeyInputs {
                vmm_build_id: "sha256:c".into(),
                ..inputs()
            },
            KeyInputs {
                mem_mib: 256,
                ..inputs()
            },
            KeyInputs {
                vcpus: 2,
                ..inputs()
            },
            KeyInputs {
                virtio_fs: true,
                ..inputs()
            },
            KeyInputs {
                kernel_args: Some("quiet".into()),
                ..inputs()
            },
            KeyInputs {
                pvm: Some("off".into()),
                ..inputs()
            },
            KeyInputs {
                host_cpu: "AuthenticAMD 25/1/1 flags:0123456789abcdef".into(),
                ..inputs()
            },
        ];
        let keys: std::collections::HashSet<String> = variants.iter().map(KeyInputs::key).collect();
        assert_eq!(keys.len(), variants.len(), "two inputs give one key");
        for v in variants {
            assert_ne!(v.key(), base, "{v:?}");
        }
        // Length-prefixed parts: moving a character between parts matters.
        let shifted = KeyInputs {
            kernel_sha256: "ki".into(),
            initramfs_sha256: String::new(),
            ..inputs()
        };
        assert_ne!(shifted.key(), base);
    }

    #[test]
    fn missing_and_invalid_templates_are_told_apart() {
        let root = std::env::temp_dir().join(unique("rtv-template-unit"));
        let cache = TemplateCache::new(&root);
        let key = inputs().key();
        assert!(matches!(
            cache.validate(&inputs()),
            Err(TemplateError::Missing { .. })
        ));
        let dir = cache.dir_of(&key);
        std::fs::create_dir_all(dir.join(SNAPSHOT_DIR)).unwrap();
        let err = cache.validate(&inputs()).unwrap_err().to_string();
        assert!(err.contains("template.json is missing"), "{err}");
        let manifest = TemplateManifest {
            format_version: FORMAT_VERSION,
            key: key.clone(),
            inputs: inputs(),
            made_from: MadeFrom {
                kernel: "k".into(),
                initramfs: "i".into(),
                vmm: "v".into(),
            },
            created_unix_ms: 1,
            make_ms: 1,
            snapshot_build_id: "abc".into(),
            instance: "x".into(),
        };
        std::fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let state = |build: &str, size: u64| {
            format!(
                r#"{{"format_version":1,"vmm":{{"version":"0.1.0","build_id":"{build}"}},"mem_size_mib":128,"vcpus":1,"files":{{"memory.bin":{{"size":{size},"sha256":"00"}}}}}}"#
            )
        };
        std::fs::write(dir.join(SNAPSHOT_DIR).join("memory.bin"), [0u8; 10]).unwrap();
        std::fs::write(
            dir.join(SNAPSHOT_DIR).join(SNAPSHOT_MANIFEST),
            state("abc", 10),
        )
        .unwrap();
        let t = cache.validate(&inputs()).unwrap();
        assert_eq!(t.snapshot_dir(), dir.join(SNAPSHOT_DIR));
        std::fs::write(
            dir.join(SNAPSHOT_DIR).join(SNAPSHOT_MANIFEST),
            state("other", 10),
        )
        .unwrap();
        let err = cache.validate(&inputs()).unwrap_err().to_string();
        assert!(err.contains("state.json") && err.contains("other"), "{err}");
        std::fs::write(
            dir.join(SNAPSHOT_DIR).join(SNAPSHOT_MANIFEST),
            state("abc", 11),
        )
        .unwrap();
        let err = cache.validate(&inputs()).unwrap_err().to_string();
        assert!(
            err.contains("memory.bin") && err.contains("truncated"),
            "{err}"
        );
        let other = KeyInputs {
            mem_mib: 256,
            ..inputs()
        };
        // Another key is another directory: missing.
        assert!(matches!(
            cache.validate(&other),
            Err(TemplateError::Missing { .. })
        ));
        cache.remove(&dir).unwrap();
        assert!(!dir.exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A stand-in for rtv-vmm: answers --version, and for
    /// --snapshot-on-ready writes a small snapshot after a second, counting
    /// its runs in `count`.
    fn fake_vmm(dir: &Path, tag: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("fake-vmm-{tag}"));
        let count = dir.join("makes");
        let script = format!(
            r#"#!/bin/sh
# {tag}
if [ "$1" = --version ]; then echo "rtv-vmm 9.9.9"; exit 0; fi
devices='[]'
while [ $# -gt 0 ]; do
  [ "$1" = --snapshot-on-ready ] && out=$2
  if [ "$1" = --shared-dir ]; then
    [ -d "$2" ] || {{ echo "no shared dir $2" >&2; exit 1; }}
    devices='[{{"kind":"fs","tag":"rtvfs"}}]'
  fi
  shift
done
echo made >> {count}
sleep 1
mkdir -p "$out"
printf abcd > "$out/memory.bin"
printf '{{"format_version":1,"vmm":{{"version":"9.9.9","build_id":"fake-{tag}"}},"mem_size_mib":128,"vcpus":1,"devices":%s,"files":{{"memory.bin":{{"size":4,"sha256":"x"}}}}}}' "$devices" > "$out/state.json"
"#,
            count = count.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn makes(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("makes"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The spec's inputs, retrying while the new script is busy (another
    /// test's fork may briefly hold it open for writing).
    fn ready(spec: &TemplateSpec) {
        for _ in 0..50 {
            if spec.inputs().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        spec.inputs().unwrap();
    }

    /// A work directory `tag` with a kernel, an initramfs and the fake VMM
    /// `vmm`, and the spec of a 128 MiB, 1-vCPU template without a share.
    fn fake_work(tag: &str, vmm: &str) -> (PathBuf, TemplateSpec) {
        let work = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(work.join("initrd"), b"initramfs").unwrap();
        let spec = TemplateSpec {
            kernel: work.join("vmlinux"),
            initramfs: work.join("initrd"),
            vmm: fake_vmm(&work, vmm),
            mem_mib: 128,
            vcpus: 1,
            virtio_fs: false,
            guest: Default::default(),
        };
        ready(&spec);
        (work, spec)
    }

    #[test]
    fn concurrent_makers_make_one_template_and_another_build_gets_its_own() {
        let (work, spec) = fake_work("rtv-template-makers", "a");
        let cache = TemplateCache::new(work.join("cache"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, s) = (cache.clone(), spec.clone());
                std::thread::spawn(move || c.get_or_make(&s))
            })
            .collect();
        let got: Vec<Obtained> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert_eq!(makes(&work), 1, "one maker, the others waited");
        assert_eq!(got.iter().filter(|o| o.made_in.is_some()).count(), 1);
        let first = &got[0].template;
        assert!(got
            .iter()
            .all(|o| o.template.manifest.instance == first.manifest.instance));
        assert_eq!(first.manifest.snapshot_build_id, "fake-a");
        assert!(first.snapshot_dir().join("memory.bin").exists());
        // No temporary directories are left.
        let leftovers: Vec<_> = std::fs::read_dir(cache.root())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Another VMM build (another binary): another key, never the old one.
        let other = TemplateSpec {
            vmm: fake_vmm(&work, "b"),
            ..spec.clone()
        };
        ready(&other);
        let b = cache.get_or_make(&other).unwrap();
        assert_eq!(makes(&work), 2);
        assert_ne!(b.template.key(), first.key());
        assert_eq!(b.template.manifest.snapshot_build_id, "fake-b");
        assert!(
            cache.check(&spec).is_ok(),
            "the first build's template stays"
        );
        // With a virtio-fs device: another key, made with an empty
        // placeholder share in the template's directory.
        let with_fs = TemplateSpec {
            virtio_fs: true,
            ..spec.clone()
        };
        let fs = cache.get_or_make(&with_fs).unwrap();
        assert_eq!(makes(&work), 3);
        assert_ne!(fs.template.key(), first.key());
        assert_ne!(fs.template.key(), b.template.key());
        assert!(fs.template.manifest.inputs.virtio_fs);
        let share = fs.template.dir.join(SHARE_DIR);
        assert_eq!(std::fs::read_dir(&share).unwrap().count(), 0, "empty share");
        assert!(cache.check(&with_fs).is_ok());
        assert!(cache.check(&spec).is_ok(), "the template without stays");
        // A snapshot whose devices disagree with the key is refused.
        let state = fs.template.snapshot_dir().join(SNAPSHOT_MANIFEST);
        let text = std::fs::read_to_string(&state).unwrap();
        std::fs::write(&state, text.replace(r#""kind":"fs""#, r#""kind":"vsock""#)).unwrap();
        let err = cache.check(&with_fs).unwrap_err().to_string();
        assert!(err.contains("virtio-fs"), "{err}");
        let first_makes = makes(&work);
        // Discarding a template that was replaced meanwhile keeps the new one.
        let stale = first.clone();
        cache.discard(&stale, "test").unwrap();
        assert!(cache.check(&spec).is_err());
        let again = cache.get_or_make(&spec).unwrap();
        assert_eq!(makes(&work), first_makes + 1);
        cache.discard(&stale, "stale").unwrap();
        let kept = cache.check(&spec).unwrap();
        assert_eq!(kept.manifest.instance, again.template.manifest.instance);
        // A failing VMM is reported with its stderr.
        let broken = work.join("broken-vmm");
        std::fs::write(
            &broken,
            "#!/bin/sh\n[ \"$1\" = --version ] && { echo v; exit 0; }\necho 'no KVM here' >&2\nexit 1\n",
        )
        .unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let bad = TemplateSpec {
            vmm: broken,
            ..spec.clone()
        };
        ready(&bad);
        match cache.get_or_make(&bad) {
            Err(TemplateError::Make {
                status,
                stderr_tail,
                ..
            }) => {
                assert!(status.contains("exit status: 1"), "{status}");
                assert!(stderr_tail.contains("no KVM here"), "{stderr_tail}");
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&work);
    }

    /// The cache's budget: under two templates, making one removes the
    /// other, which is made again when asked for; with room for two, the
    /// least recently used goes first; a template whose lock is held stays.
    #[test]
    fn the_budget_removes_the_least_recently_used_templates() {
        let (work, a) = fake_work("rtv-template-budget", "budget-a");
        let b = TemplateSpec {
            virtio_fs: true,
            ..a.clone()
        };
        let c = TemplateSpec {
            vmm: fake_vmm(&work, "budget-c"),
            ..a.clone()
        };
        ready(&c);
        let root = work.join("cache");
        let made_a = TemplateCache::new(&root).get_or_make(&a).unwrap();
        let one = allocated(&made_a.template.dir);
        assert!(one > 0);

        // Room for one and a half: B's making removes A; A comes back
        // (made again) and B goes.
        let small = TemplateCache::new(&root).with_budget(one + one / 2);
        small.get_or_make(&b).unwrap();
        assert_eq!(makes(&work), 2);
        assert!(matches!(
            small.check(&a),
            Err(TemplateError::Missing { .. })
        ));
        assert!(small.check(&b).is_ok());
        let again = small.get_or_make(&a).unwrap();
        assert!(again.made_in.is_some(), "A made again");
        assert_eq!(makes(&work), 3);
        assert!(small.check(&b).is_err(), "B removed for A");

        // Room for two and a half: B made again (A and B), A used after B,
        // then C made: B, the least recently used, goes.
        let roomy = TemplateCache::new(&root).with_budget(2 * one + one / 2);
        roomy.get_or_make(&b).unwrap();
        assert_eq!(makes(&work), 4);
        std::thread::sleep(Duration::from_millis(20));
        assert!(roomy.get_or_make(&a).unwrap().made_in.is_none());
        roomy.get_or_make(&c).unwrap();
        assert_eq!(makes(&work), 5);
        assert!(roomy.check(&a).is_ok(), "A was used last");
        assert!(roomy.check(&b).is_err(), "B was the least recently used");
        assert!(roomy.check(&c).is_ok());

        // A template whose lock is held is left, even over the budget.
        let key_a = a.inputs().unwrap().key();
        let held = Lock::take(&roomy.lock_of(&key_a)).unwrap();
        let tiny = TemplateCache::new(&root).with_budget(1);
        let key_c = c.inputs().unwrap().key();
        assert_eq!(tiny.evict(&key_c), Vec::<String>::new());
        assert!(tiny.check(&a).is_ok());
        drop(held);
        assert_eq!(tiny.evict(&key_c), vec![key_a]);
        assert!(tiny.check(&c).is_ok(), "the one kept is never removed");
        let _ = std::fs::remove_dir_all(&work);
    }
}
