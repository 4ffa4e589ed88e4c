//! A sandbox's shared directory: the host directory the VMM serves over
//! virtio-fs (tag `rtvfs`), mounted by the agent at
//! [`SHARE_MOUNTPOINT`] in the guest. Each container gets
//! `<share>/<id>@<n>/rootfs`, a bind mount of its bundle's root file
//! system, and `<share>/<id>@<n>/mounts/<n>` for each bind mount of its
//! spec.
//!
//! `<n>` is new for every create: the guest's FUSE client keeps a looked-up
//! name for a few seconds without asking the host, so a container created
//! again with the same id right after a failed create or a delete would
//! otherwise reach the previous attempt's directory, and either run in the
//! previous root file system or lose its root bind mount to the late
//! revalidation (pivot_root then fails with EINVAL). Container ids cannot
//! contain `@`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::runtime::Spec;
use rtv_protocol::SHARE_MOUNTPOINT;

/// Why the share could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A file-system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A spec field cannot be mapped into the share.
    #[error("{field}: {message}")]
    Spec {
        /// The field.
        field: String,
        /// Why.
        message: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ShareError + 'a {
    move |source| ShareError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn cpath(path: &Path) -> Result<CString, ShareError> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| ShareError::Spec {
        field: "path".into(),
        message: format!("{} contains a NUL byte", path.display()),
    })
}

fn bind(source: &Path, target: &Path) -> Result<(), ShareError> {
    let (s, t) = (cpath(source)?, cpath(target)?);
    // SAFETY: valid NUL-terminated paths; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(io("bind-mounting onto", target)(
            std::io::Error::last_os_error(),
        ));
    }
    // Keep the sandbox's mounts out of the host's other namespaces.
    // SAFETY: as above, with a null source and type.
    unsafe {
        libc::mount(
            std::ptr::null(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE | libc::MS_REC,
            std::ptr::null(),
        )
    };
    Ok(())
}

fn unmount(target: &Path) {
    if let Ok(t) = cpath(target) {
        // SAFETY: a valid path; a lazy unmount of a mount we made.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The mount points at or below `dir` (from /proc/self/mountinfo),
/// deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Removes `dir` recursively, but only once nothing is mounted below it:
/// a recursive removal through a leftover bind mount would delete the
/// bundle's root file system. Mounts found are lazily unmounted first.
pub fn remove_tree(dir: &Path) -> Result<(), ShareError> {
    for m in mounts_under(dir) {
        unmount(&m);
    }
    let left = mounts_under(dir);
    if let Some(m) = left.first() {
        return Err(ShareError::Io {
            what: "refusing to remove a tree with a mount in it",
            path: m.clone(),
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", dir)(e)),
    }
}

/// A sandbox's shared directory on the host.
#[derive(Debug, Clone)]
pub struct Share {
    dir: PathBuf,
    /// Where the agent sees `dir`.
    agent_view: PathBuf,
}

impl Share {
    /// The share at `dir` (created if missing), which the guest's agent
    /// sees at [`SHARE_MOUNTPOINT`].
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ShareError> {
        Self::seen_at(dir, SHARE_MOUNTPOINT)
    }

    /// The share at `dir`, which the agent sees at `agent_view` (its own
    /// path, for an agent running on the host in tests).
    pub fn seen_at(
        dir: impl Into<PathBuf>,
        agent_view: impl Into<PathBuf>,
    ) -> Result<Self, ShareError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(Self {
            dir,
            agent_view: agent_view.into(),
        })
    }

    /// The host directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directories container `id` has in the share (one, or none).
    pub fn container_dirs(&self, id: &str) -> Vec<PathBuf> {
        container_dirs(&self.dir, id)
    }

    /// Where the agent sees `rel` under the container directory `name`.
    fn agent_path(&self, name: &str, rel: &str) -> PathBuf {
        self.agent_view.join(name).join(rel)
    }

    /// Places container `id`'s root file system and bind-mount sources in
    /// the share, and returns the spec rewritten with their guest paths.
    /// On error nothing is left in the share.
    pub fn add_container(&self, id: &str, rootfs: &Path, spec: &Spec) -> Result<Spec, ShareError> {
        let result = self.add_inner(id, rootfs, spec);
        if result.is_err() {
            self.remove_container(id);
        }
        result
    }

    fn add_inner(&self, id: &str, rootfs: &Path, spec: &Spec) -> Result<Spec, ShareError> {
        let name = attempt_name(id);
        let cdir = self.dir.join(&name);
        let target = cdir.join("rootfs");
        std::fs::create_dir_all(&target).map_err(io("creating", &target))?;
        bind(rootfs, &target)?;
        let mut spec = spec.clone();
        if let Some(root) = spec.root_mut() {
            root.set_path(self.agent_path(&name, "rootfs"));
        }
        if let Some(mounts) = spec.mounts_mut() {
            for (i, m) in mounts.iter_mut().enumerate() {
                let is_bind = m.typ().as_deref() == Some("bind")
                    || m.options()
                        .iter()
                        .flatten()
                        .any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    continue;
                }
                let Some(source) = m.source().clone() else {
                    return Err(ShareError::Spec {
                        field: format!("mounts[{i}].source"),
                        message: "a bind mount needs a source".into(),
                    });
                };
                let meta = std::fs::metadata(&source).map_err(|e| ShareError::Spec {
                    field: format!("mounts[{i}].source"),
                    message: format!("{}: {e}", source.display()),
                })?;
                let dest = cdir.join("mounts").join(i.to_string());
                if meta.is_dir() {
                    std::fs::create_dir_all(&dest).map_err(io("creating", &dest))?;
                } else {
                    let parent = cdir.join("mounts");
                    std::fs::create_dir_all(&parent).map_err(io("creating", &parent))?;
                    std::fs::File::create(&dest).map_err(io("creating", &dest))?;
                }
                bind(&source, &dest)?;
                m.set_source(Some(self.agent_path(&name, &format!("mounts/{i}"))));
            }
        }
        Ok(spec)
    }

    /// Unmounts and removes everything of container `id` in the share.
    pub fn remove_container(&self, id: &str) {
        for cdir in self.container_dirs(id) {
            remove_container_dir(&cdir);
        }
    }
}

/// A fresh directory name for one create of container `id`.
fn attempt_name(id: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{id}@{:x}",
        nanos ^ (u64::from(std::process::id()) << 40) ^ n
    )
}

/// The directories container `id` has in the share at `share`.
pub fn container_dirs(share: &Path, id: &str) -> Vec<PathBuf> {
    let prefix = format!("{id}@");
    let Ok(entries) = std::fs::read_dir(share) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .map(|e| e.path())
        .collect()
}

fn remove_container_dir(cdir: &Path) {
    if let Ok(entries) = std::fs::read_dir(cdir.join("mounts")) {
        for e in entries.flatten() {
            unmount(&e.path());
        }
    }
    unmount(&cdir.join("rootfs"));
    // Only empty directories and files we created remain; a failed
    // unmount leaves the mount point, which remove_dir_all would descend
    // into, so remove non-recursively.
    if let Ok(entries) = std::fs::read_dir(cdir.join("mounts")) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
        }
    }
    let _ = std::fs::remove_dir(cdir.join("mounts"));
    let _ = std::fs::remove_dir(cdir.join("rootfs"));
    let _ = std::fs::remove_dir(cdir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_create_of_an_id_gets_a_new_directory_and_remove_takes_them_all() {
        let base = std::env::temp_dir().join(format!("rtv-share-unit-{}", std::process::id()));
        let rootfs = base.join("bundle-rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(rootfs.join("marker"), b"x").unwrap();
        let share = Share::seen_at(base.join("share"), "/agent/share").unwrap();
        let spec = Spec::default();

        let first = share.add_container("c1", &rootfs, &spec).unwrap();
        let second = share.add_container("c1", &rootfs, &spec).unwrap();
        let other = share.add_container("c1.x", &rootfs, &spec).unwrap();
        let root = |s: &Spec| s.root().as_ref().unwrap().path().clone();
        assert_ne!(root(&first), root(&second));
        for s in [&first, &second] {
            let name = root(s).parent().unwrap().file_name().unwrap().to_owned();
            assert!(name.to_str().unwrap().starts_with("c1@"), "{name:?}");
            let host = share.dir().join(&name).join("rootfs/marker");
            assert!(
                host.exists(),
                "{} is not the bundle's rootfs",
                host.display()
            );
        }
        assert_eq!(share.container_dirs("c1").len(), 2);

        share.remove_container("c1");
        assert!(share.container_dirs("c1").is_empty());
        assert!(mounts_under(share.dir())
            .iter()
            .all(|m| m.to_str().unwrap().contains("/c1.x@")));
        // Another id with c1 as its prefix is untouched.
        assert_eq!(share.container_dirs("c1.x").len(), 1);
        assert!(root(&other).starts_with("/agent/share"));
        share.remove_container("c1.x");
        assert!(mounts_under(share.dir()).is_empty());
        remove_tree(&base).unwrap();
    }
}
