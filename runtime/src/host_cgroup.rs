//! The host cgroup of a container's host processes (its waiter and, for
//! the first container of a sandbox, the VMM): `linux.cgroupsPath` as
//! runc interprets it, on cgroup v1 (every mounted controller hierarchy)
//! or v2 (the unified hierarchy). Limits are applied inside the guest; on
//! the host the cgroup groups and accounts the processes, as containerd
//! and the kubelet expect.

use std::path::{Component, Path, PathBuf};

/// Why a process could not be put in its cgroup.
#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    /// The path is not one rtv accepts.
    #[error("linux.cgroupsPath: {0}")]
    Path(String),
    /// A cgroup file or directory could not be made or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The relative cgroup path for `cgroups_path`: a plain path (`/a/b` or
/// `a/b`), or systemd's `slice:prefix:name` (expanded as runc does:
/// `a-b.slice` → `a.slice/a-b.slice`, then `prefix-name.scope`).
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf, HostCgroupError> {
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let rel = if parts.len() == 3 {
        let (slice, prefix, name) = (parts[0], parts[1], parts[2]);
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let mut path = PathBuf::new();
        let stem = slice
            .strip_suffix(".slice")
            .ok_or_else(|| HostCgroupError::Path(format!("{slice:?} is not a systemd slice")))?;
        let mut acc = String::new();
        for piece in stem.split('-').filter(|p| !p.is_empty()) {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(piece);
            path.push(format!("{acc}.slice"));
        }
        path.push(format!("{prefix}-{name}.scope"));
        path
    } else {
        PathBuf::from(cgroups_path.trim_start_matches('/'))
    };
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(HostCgroupError::Path(format!(
            "{cgroups_path:?} is empty or leaves the cgroup tree"
        )));
    }
    Ok(rel)
}

/// The host's cgroup hierarchies: the v2 mount, or every v1 controller
/// mount (one per hierarchy).
pub fn hierarchies() -> Vec<PathBuf> {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return vec![PathBuf::from("/sys/fs/cgroup")];
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in info.lines() {
        // ... mount-point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split(' ').next().unwrap_or_default();
        let mount = left.split(' ').nth(4).unwrap_or_default();
        // cgroup v1 controllers only (the named systemd hierarchy is
        // systemd's own, and the bare v2 mount of a hybrid host holds
        // nothing rtv needs).
        let is_named = right.contains("name=");
        if fstype == "cgroup" && !is_named {
            out.push(PathBuf::from(mount));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Puts `pid` in `cgroups_path` in every hierarchy; returns the cgroup
/// directories, for [`remove`].
pub fn join(cgroups_path: &str, pid: i32) -> Result<Vec<PathBuf>, HostCgroupError> {
    let rel = relative_path(cgroups_path)?;
    let mut dirs = Vec::new();
    for h in hierarchies() {
        let dir = h.join(&rel);
        std::fs::create_dir_all(&dir).map_err(|source| HostCgroupError::Io {
            path: dir.clone(),
            source,
        })?;
        init_cpuset(&h, &rel)?;
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|source| HostCgroupError::Io {
            path: procs,
            source,
        })?;
        dirs.push(dir);
    }
    Ok(dirs)
}

/// A new v1 cpuset cgroup has no CPUs or memory nodes until given its
/// parent's (as runc does), level by level from the hierarchy's root.
fn init_cpuset(hierarchy: &Path, rel: &Path) -> Result<(), HostCgroupError> {
    let mut dir = hierarchy.to_path_buf();
    for c in rel.components() {
        let parent = dir.clone();
        dir.push(c);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let path = dir.join(file);
            let Ok(current) = std::fs::read_to_string(&path) else {
                return Ok(()); // not a cpuset hierarchy
            };
            if current.trim().is_empty() {
                let value = std::fs::read_to_string(parent.join(file)).unwrap_or_default();
                std::fs::write(&path, value.trim()).map_err(|source| HostCgroupError::Io {
                    path: path.clone(),
                    source,
                })?;
            }
        }
    }
    Ok(())
}

/// Removes cgroup directories made by [`join`] (once their processes are
/// gone); errors are ignored, as a busy cgroup stays for the next delete.
pub fn remove(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_as_runc_reads_them() {
        assert_eq!(
            relative_path("/default/c1").unwrap(),
            PathBuf::from("default/c1")
        );
        assert_eq!(relative_path("rtv/c1").unwrap(), PathBuf::from("rtv/c1"));
        assert_eq!(
            relative_path("kubepods-besteffort-pod12.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert!(relative_path("/a/../../b").is_err());
        assert!(relative_path("").is_err());
    }

    #[test]
    fn a_process_joins_and_leaves() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let path = format!("/rtv-test/join-{}", std::process::id());
        let dirs = join(&path, child.id() as i32).unwrap();
        assert!(!dirs.is_empty(), "no cgroup hierarchy found");
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == child.id().to_string()),
                "{}",
                d.display()
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        remove(&dirs);
        for d in &dirs {
            assert!(!d.exists(), "{} left", d.display());
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
    }
}
