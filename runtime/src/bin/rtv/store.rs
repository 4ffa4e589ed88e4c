//! rtv's state under `--root`: one directory per container
//! (`<root>/<id>/state.json`, the spec as created, the exit status the
//! waiter records), and the state directory of each pod
//! (`<root>/.sandboxes/<key>/`, which the pod layer keeps: the VMM's vsock
//! socket, console and logs, the share, `pod.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rtv_protocol::ExitStatus;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A container's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Its id.
    pub id: String,
    /// The bundle's absolute path.
    pub bundle: PathBuf,
    /// The root file system on the host.
    pub rootfs: PathBuf,
    /// When it was created (RFC 3339).
    pub created: String,
    /// The spec's annotations.
    pub annotations: HashMap<String, String>,
    /// The sandbox (VM) it runs in.
    pub sandbox_id: String,
    /// The init process's exec id in the agent.
    pub exec_id: u64,
    /// Its pid in the guest.
    pub guest_pid: i32,
    /// The host process that stands for the container's init (the pid in
    /// `--pid-file`): it lives as long as the init and exits with its
    /// status.
    pub waiter_pid: i32,
    /// Its start time (/proc/<pid>/stat), against pid reuse.
    pub waiter_start: u64,
    /// The user who created it.
    pub owner: String,
    /// Host cgroup directories the waiter was put in.
    #[serde(default)]
    pub host_cgroups: Vec<PathBuf>,
}

/// How a container ended, as its waiter recorded it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The status.
    pub status: ExitStatus,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Checks a container id as runc does: letters, digits, `_`, `+`, `-`,
/// `.`, not `.` or `..`, at most 1024 bytes.
pub fn check_id(id: &str) -> Result<()> {
    if !rtv_protocol::valid_container_id(id) {
        bail!("invalid container id format: {id:?}");
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

impl Store {
    /// The store at `root` (created if missing, mode 0711 like runc's).
    pub fn open(root: &Path) -> Result<Store> {
        std::fs::create_dir_all(root.join(".sandboxes"))
            .with_context(|| format!("creating the state directory {}", root.display()))?;
        Ok(Store {
            root: root.to_owned(),
        })
    }

    /// A container's directory.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// A sandbox's directory (short, so the vsock socket path fits).
    pub fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        let hash = Sha256::digest(sandbox_id.as_bytes());
        let key: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
        self.root.join(".sandboxes").join(key)
    }

    /// Reserves `id`: creates its directory, failing if it exists.
    pub fn reserve(&self, id: &str) -> Result<PathBuf> {
        check_id(id)?;
        let dir = self.dir(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container with id exists: {id}")
            }
            Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }

    /// A container's record.
    pub fn load(&self, id: &str) -> Result<ContainerRecord> {
        check_id(id)?;
        let path = self.dir(id).join("state.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container does not exist: {id}")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Saves a container's record.
    pub fn save(&self, rec: &ContainerRecord) -> Result<()> {
        write_atomic(
            &self.dir(&rec.id).join("state.json"),
            &serde_json::to_vec_pretty(rec)?,
        )
    }

    /// The ids of every container.
    pub fn ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .with_context(|| format!("reading {}", self.root.display()))?
        {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && e.path().join("state.json").exists() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// How container `id` ended, if its waiter recorded it.
    pub fn exit(&self, id: &str) -> Option<ExitRecord> {
        let text = std::fs::read(self.dir(id).join("exit.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Records how container `id` ended.
    pub fn save_exit(&self, id: &str, status: ExitStatus) -> Result<()> {
        write_atomic(
            &self.dir(id).join("exit.json"),
            &serde_json::to_vec(&ExitRecord { status })?,
        )
    }
}
