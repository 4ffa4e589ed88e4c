//! virtio-fs (device ID 26) served inside the VMM with fuse-backend-rs's
//! passthrough file system, the way Dragonball does it.
//!
//! Two queues: the high-priority queue (FORGET/INTERRUPT) and one request
//! queue. Both carry FUSE requests and are served the same way on the VMM's
//! event loop thread: each descriptor chain becomes a fuse-backend-rs
//! virtio-fs `Reader`/`Writer` pair handed to `Server::handle_message`.
//!
//! The guest is untrusted, and so is every FUSE request it sends:
//!
//! - The passthrough root is the shared directory, opened (`O_PATH`) when
//!   the device is made, or by rtv-vmm before the jail's mount namespace
//!   ([`hold_share`]): the passthrough imports its root as `.` at the
//!   guest's FUSE_INIT (and again at DESTROY), which the device serves with
//!   that descriptor as the working directory ([`ShareDir`]). The share is
//!   never looked up by name once the VM runs, so the jail's root
//!   (`jail::confine`) need not hold it, and mounts the host adds under the
//!   share later are reached through the host's mount tree (lookups from a
//!   descriptor follow the mounts of the namespace it was opened in). Lookups of `.` and `..`
//!   are refused before they reach the passthrough file system (it lets them
//!   through for NFS export, and `..` of the root would be the host directory
//!   above the share; `..` of a directory the host moved out of the share
//!   would be outside too). Every other name is one path component (the
//!   passthrough refuses `/` in names), opened with
//!   `openat(parent, name, O_PATH | O_NOFOLLOW)`: symlinks are never
//!   followed on the host; the guest reads their target and resolves it in
//!   its own namespace.
//! - Data is reached by reopening an inode's `O_PATH` fd through
//!   `/proc/self/fd`, and only for regular files and directories
//!   (`is_safe_inode`): device nodes, FIFOs and sockets in the share are
//!   never opened by the VMM. A MKNOD of a block or character device is
//!   refused here (EPERM): the VMM runs as root, and a host device node in
//!   the share would give any host process that opens it the device. FIFOs
//!   and sockets may be made (the guest kernel serves them itself).
//! - `inode_file_handles` is off: the host never uses name_to_handle_at /
//!   open_by_handle_at (which would bypass path lookup and need
//!   CAP_DAC_READ_SEARCH). INIT never offers FUSE_EXPORT_SUPPORT, so the
//!   guest's open_by_handle_at only reaches inodes it already holds, all in
//!   the share.
//! - Extended attributes are off: the guest cannot set `security.*` or
//!   `trusted.*` attributes (file capabilities, overlayfs metadata) on host
//!   files, which would be set with the VMM's root privileges.
//! - Malformed chains are dropped with a log; malformed requests get an
//!   error reply (or none, when there is no room for one) and the device goes
//!   on serving (tests/virtiofs.rs sends truncated and random requests).
//!
//! Known and not handled here: the guest's root acts as root in the shared
//! directory (requests carry the guest's uid/gid), so it can create
//! set-user-ID files owned by any host uid. Keep shares where untrusted host
//! users cannot execute from them, or on a `nosuid` mount. A guest can also
//! hold an `O_PATH` fd per inode it looks up, up to the VMM's descriptor
//! limit (it only starves its own VM).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::activation::Activation;

mod keep_cache;
pub use keep_cache::KeepCache;

/// The file system the device serves: the passthrough, with
/// FOPEN_KEEP_CACHE on opens of files unchanged since their previous open.
type Fs = KeepCache<PassthroughFs>;
use super::{ActivateError, Interrupt, VirtioDevice, DEVICE_ID_FS, VIRTIO_F_VERSION_1};

/// The tag the guest mounts (`mount -t virtiofs rtvfs /mnt`).
pub const DEFAULT_TAG: &str = rtv_protocol::SHARE_TAG;
/// Size of the tag field of the configuration space.
pub const TAG_LEN: usize = 36;
/// Size of the configuration space: tag + num_request_queues.
pub const CONFIG_LEN: usize = TAG_LEN + 4;
/// Number of request queues.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the high-priority queue.
pub const HIPRIO_QUEUE: usize = 0;
/// Index of the (only) request queue.
pub const REQUEST_QUEUE: usize = 1;

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const FUSE_DESTROY: u32 = 38;
const FUSE_MKNOD: u32 = 8;
const IN_HEADER_LEN: usize = 40;

/// What the device shares. A snapshot saves the tag only: a restored VM
/// is given its own directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    /// The host directory the guest sees as the root of the mount.
    #[serde(skip)]
    pub shared_dir: PathBuf,
    /// The mount tag (at most 36 bytes).
    pub tag: String,
}

/// Why the device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The shared directory is not usable.
    #[error("virtio-fs shared directory {path}")]
    SharedDir {
        /// The path given.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The tag does not fit the configuration space.
    #[error("virtio-fs tag {0:?}: must be 1 to 36 bytes")]
    Tag(String),
    /// The passthrough file system cannot be set up.
    #[error("virtio-fs passthrough file system")]
    Passthrough(#[source] std::io::Error),
}

impl FsConfig {
    /// A share of `shared_dir` under the default tag.
    pub fn new(shared_dir: impl Into<PathBuf>) -> Self {
        Self {
            shared_dir: shared_dir.into(),
            tag: DEFAULT_TAG.to_string(),
        }
    }

    /// Checks the tag and that the directory exists.
    pub fn validate(&self) -> Result<(), FsError> {
        if self.tag.is_empty() || self.tag.len() > TAG_LEN {
            return Err(FsError::Tag(self.tag.clone()));
        }
        let meta = std::fs::metadata(&self.shared_dir).map_err(|source| FsError::SharedDir {
            path: self.shared_dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(FsError::SharedDir {
                path: self.shared_dir.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"),
            });
        }
        Ok(())
    }
}

/// The virtio-fs device.
pub struct VirtioFs {
    config_space: [u8; CONFIG_LEN],
    shared_dir: PathBuf,
    dir: ShareDir,
    server: Server<Fs>,
    act: Activation,
    requests: u64,
}

impl VirtioFs {
    /// Creates the device sharing `config.shared_dir`.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        config.validate()?;
        let root =
            std::fs::canonicalize(&config.shared_dir).map_err(|source| FsError::SharedDir {
                path: config.shared_dir.clone(),
                source,
            })?;
        let dir = match take_held(&root) {
            Some(fd) => ShareDir(fd),
            None => ShareDir::open(&root).map_err(|source| FsError::SharedDir {
                path: root.clone(),
                source,
            })?,
        };
        let fs_cfg = PassthroughConfig {
            // Relative to the working directory, which is `dir` whenever the
            // passthrough imports (serve_chain).
            root_dir: ".".into(),
            // Keep the root import at INIT (so a remount after a driver
            // reset works) and, with it, the passthrough's own validation of
            // path components in create/mkdir/rename/...
            // Known: the import sets the whole VMM process's umask to 0 so
            // the modes the guest asks for are kept. The VMM creates its
            // files (console, vsock socket) before the guest can send INIT,
            // and a VM whose guest has sent INIT (or any request) refuses
            // to be snapshotted, so no snapshot file gets the permissive
            // mask either.
            do_import: true,
            xattr: false,
            // O_PATH fds, not file handles: no open_by_handle_at (needs
            // CAP_DAC_READ_SEARCH).
            inode_file_handles: false,
            writeback: false,
            cache_policy: CachePolicy::Auto,
            ..Default::default()
        };
        let fs = PassthroughFs::new(fs_cfg).map_err(FsError::Passthrough)?;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..config.tag.len()].copy_from_slice(config.tag.as_bytes());
        config_space[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        let act = Activation::new("virtio-fs").map_err(FsError::Passthrough)?;
        Ok(Self {
            config_space,
            shared_dir: root,
            dir,
            server: Server::new(KeepCache::new(fs)),
            act,
            requests: 0,
        })
    }

    /// The shared directory (canonical).
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    /// Number of FUSE requests served so far.
    pub fn requests_served(&self) -> u64 {
        self.requests
    }

    /// Serves every available chain of queue `index`.
    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.act.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        loop {
            let Some(queue) = active.queues.get_mut(index) else {
                return;
            };
            let chain = match queue.iter(&mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    tracing::warn!(index, "virtio-fs: cannot read the queue: {e}");
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = serve_chain(&self.server, &self.dir, &mem, chain);
            self.requests += 1;
            if let Err(e) = queue.add_used(&mem, head, len) {
                tracing::warn!(head, "virtio-fs: cannot return a descriptor chain: {e}");
            }
            used = true;
        }
        if used {
            active.interrupt.signal_used_queue();
        }
    }

    fn sync_activation(&mut self, ops: &mut EventOps) {
        if self.act.sync(ops) {
            self.process_queue(HIPRIO_QUEUE);
            self.process_queue(REQUEST_QUEUE);
        }
    }
}

/// The request's header fields the device looks at before the passthrough.
struct Peek {
    opcode: u32,
    unique: u64,
    /// The start of the body (up to 4 bytes).
    body: Vec<u8>,
}

/// Reads the FUSE request's header (and the start of its body), or None
/// when the chain is too short for one.
fn peek(mem: &GuestMemoryMmap, chain: &DescriptorChain<&GuestMemoryMmap>) -> Option<Peek> {
    let mut head = [0u8; IN_HEADER_LEN + 4];
    let mut filled = 0;
    for desc in chain.clone().readable() {
        if filled == head.len() {
            break;
        }
        let take = (head.len() - filled).min(desc.len() as usize);
        if mem
            .read_slice(&mut head[filled..filled + take], desc.addr())
            .is_err()
        {
            return None;
        }
        filled += take;
    }
    if filled < IN_HEADER_LEN {
        return None;
    }
    Some(Peek {
        opcode: u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        unique: u64::from_le_bytes(head[8..16].try_into().unwrap_or_default()),
        body: head[IN_HEADER_LEN..filled].to_vec(),
    })
}

/// Refuses, before the passthrough file system sees them, a LOOKUP of `.`
/// or `..` (EACCES) and a MKNOD of a block or character device (EPERM).
/// Returns the (positive) errno when refused.
fn refused(req: &Peek) -> Option<i32> {
    let body = &req.body;
    match req.opcode {
        FUSE_LOOKUP => {
            let dot = body.first() == Some(&b'.')
                && (body.get(1) == Some(&0)
                    || (body.get(1) == Some(&b'.') && body.get(2) == Some(&0)));
            dot.then_some(libc::EACCES)
        }
        FUSE_MKNOD => {
            // fuse_mknod_in starts with the mode in every protocol version.
            let mode = u32::from_le_bytes(body.get(..4)?.try_into().ok()?);
            matches!(mode & libc::S_IFMT, libc::S_IFBLK | libc::S_IFCHR).then_some(libc::EPERM)
        }
        _ => None,
    }
}

/// Shares opened ahead of their device ([`hold_share`]), by canonical path.
static HELD: std::sync::Mutex<Vec<(PathBuf, OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// Opens the shared directory `path` now, for a device made later from the
/// same path. rtv-vmm calls it before the jail gives the VMM a mount
/// namespace of its own: the share is then the host's directory, and the
/// mounts the host adds under it later (the container root file systems
/// rtv mounts into a running pod's share) are reached through the host's
/// mount tree, which lookups from this descriptor follow. Returns the
/// descriptor, for the jail to keep open.
pub fn hold_share(path: &Path) -> std::io::Result<std::os::fd::RawFd> {
    let root = std::fs::canonicalize(path)?;
    let dir = ShareDir::open(&root)?;
    let fd = dir.0.as_raw_fd();
    HELD.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((root, dir.0));
    Ok(fd)
}

/// The descriptor [`hold_share`] opened for `root`, if any.
fn take_held(root: &Path) -> Option<OwnedFd> {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let at = held.iter().position(|(p, _)| p == root)?;
    Some(held.swap_remove(at).1)
}

/// The shared directory, held open from the device's creation: the
/// passthrough's import (`.`) runs with it as the process's working
/// directory ([`ShareDir::enter`]).
struct ShareDir(OwnedFd);

impl ShareDir {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self(file.into()))
    }

    /// Makes the share the working directory until the guard drops, which
    /// returns to the previous one.
    fn enter(&self) -> std::io::Result<WorkingDir> {
        let back = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(".")?;
        // SAFETY: fchdir on a descriptor we own (O_PATH directories are
        // accepted since Linux 3.5).
        if unsafe { libc::fchdir(self.0.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(WorkingDir(back.into()))
    }
}

/// Returns to the saved working directory when dropped.
struct WorkingDir(OwnedFd);

impl Drop for WorkingDir {
    fn drop(&mut self) {
        // SAFETY: fchdir on a descriptor we own.
        if unsafe { libc::fchdir(self.0.as_raw_fd()) } != 0 {
            tracing::warn!(
                "virtio-fs: cannot return to the working directory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Answers request `unique` with `-errno`; returns the bytes written.
fn reply_error(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    unique: u64,
    errno: i32,
) -> u32 {
    let head = chain.head_index();
    let mut reply = [0u8; 16];
    reply[..4].copy_from_slice(&16u32.to_le_bytes());
    reply[4..8].copy_from_slice(&(-errno).to_le_bytes());
    reply[8..].copy_from_slice(&unique.to_le_bytes());
    match VirtioFsWriter::new(mem, chain) {
        Ok(mut w) => match w.write_all(&reply) {
            Ok(()) => 16,
            Err(e) => {
                tracing::warn!(head, "virtio-fs: cannot write a reply: {e}");
                0
            }
        },
        Err(e) => {
            tracing::warn!(
                head,
                "virtio-fs: dropping a malformed descriptor chain: {e}"
            );
            0
        }
    }
}

/// Serves one chain; returns the number of bytes written for the used ring.
fn serve_chain(
    server: &Server<Fs>,
    dir: &ShareDir,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let head = chain.head_index();
    let req = peek(mem, &chain);
    if let Some((unique, errno)) = req
        .as_ref()
        .and_then(|r| refused(r).map(|errno| (r.unique, errno)))
    {
        tracing::warn!(
            head,
            errno,
            "virtio-fs: refusing a lookup of . or .., or the creation of a device node"
        );
        return reply_error(mem, chain, unique, errno);
    }
    // INIT and DESTROY import the passthrough's root, `.`: the share. Never
    // import from another working directory.
    let _cwd = match &req {
        Some(r) if matches!(r.opcode, FUSE_INIT | FUSE_DESTROY) => match dir.enter() {
            Ok(guard) => Some(guard),
            Err(e) => {
                tracing::warn!(head, "virtio-fs: cannot enter the shared directory: {e}");
                return reply_error(mem, chain, r.unique, libc::EIO);
            }
        },
        _ => None,
    };
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                head,
                "virtio-fs: dropping a malformed descriptor chain: {e}"
            );
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => Writer::VirtioFs(w),
        Err(e) => {
            tracing::warn!(
                head,
                "virtio-fs: dropping a malformed descriptor chain: {e}"
            );
            return 0;
        }
    };
    match server.handle_message(reader, writer, None, None) {
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(e) => {
            tracing::warn!(head, "virtio-fs: dropping a request: {e}");
            0
        }
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        DEVICE_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(data.len())
            .filter(|&end| end <= CONFIG_LEN)
        {
            Some(end) => data.copy_from_slice(&self.config_space[start..end]),
            None => {
                tracing::debug!(
                    offset,
                    len = data.len(),
                    "virtio-fs: config read out of range"
                );
                data.fill(0);
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            offset,
            len = data.len(),
            "virtio-fs: the driver wrote the read-only config space"
        );
    }

    fn activate(
        &mut self,
        _features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        self.act.activate(2, mem, queues, interrupt, queue_evts)?;
        tracing::debug!("virtio-fs: activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.act.reset();
        tracing::debug!("virtio-fs: reset");
    }

    fn active_queue_states(&self) -> Vec<QueueState> {
        self.act.queue_states()
    }

    /// Only while the guest has sent no FUSE request: it has not mounted
    /// the share, so neither side holds inodes or open files. Requests the
    /// guest queued but the device has not taken yet stay in the saved
    /// rings and are served by the restored device.
    fn can_snapshot(&self) -> Result<(), String> {
        match self.requests {
            0 => Ok(()),
            served => Err(format!(
                "virtio-fs (--shared-dir): the guest has used the share ({served} FUSE requests served); \
                 its inodes and open files live in this VMM and cannot be saved: snapshot before the guest mounts it"
            )),
        }
    }
}

impl MutEventSubscriber for VirtioFs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.act.is_control(fd) {
            self.sync_activation(ops);
        } else if let Some(index) = self.act.queue_event(fd) {
            self.process_queue(index);
        } else {
            self.act.drain_stale(fd);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.act.init(ops);
    }
}
