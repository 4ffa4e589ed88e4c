//! The host cgroup of a container's host processes (its waiter and, for
//! the first container of a sandbox, the VMM): `linux.cgroupsPath` as
//! runc interprets it, on cgroup v1 (every mounted controller hierarchy)
//! or v2 (the unified hierarchy). Limits are applied inside the guest; on
//! the host the cgroup groups and accounts the processes, as containerd
//! and the kubelet expect. The one exception is a cpuset: it names host
//! CPUs, so the VMM's cgroup gets it (its vCPU threads run only there),
//! and the guest gets the same number of vCPUs (see
//! [`crate::spec::guest_spec`]).

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
    /// The spec's cpuset could not be given to the cgroup.
    #[error("linux.resources.cpu.{field}: cannot write {value:?} to {}: {source}", path.display())]
    Cpuset {
        /// "cpus" or "mems".
        field: &'static str,
        /// The cpuset file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// The spec asks for a cpuset and no host hierarchy has one.
    #[error("linux.resources.cpu.cpus: the host has no cpuset controller to pin the VMM to {0:?}")]
    NoCpuset(String),
}

/// A cpuset of the host (`linux.resources.cpu.cpus` and `.mems`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpuset {
    /// Host CPUs, such as "2-3".
    pub cpus: String,
    /// Host memory nodes, if the spec names them.
    pub mems: Option<String>,
}

impl Cpuset {
    /// The cpuset `spec` asks for, if any.
    pub fn of(spec: &oci_spec::runtime::Spec) -> Option<Cpuset> {
        let cpu = spec
            .linux()
            .as_ref()?
            .resources()
            .as_ref()?
            .cpu()
            .as_ref()?;
        let nonempty = |s: &Option<String>| {
            s.as_ref()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        Some(Cpuset {
            cpus: nonempty(cpu.cpus())?,
            mems: nonempty(cpu.mems()),
        })
    }
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

/// Puts `pid` in `cgroups_path` in every hierarchy, with `cpuset` (the
/// VMM's) written first; returns the cgroup directories, for [`remove`].
/// The directories made are recorded in `dirs` as they are made, so that
/// a caller can remove them after a failure.
pub fn join(
    cgroups_path: &str,
    pid: i32,
    cpuset: Option<&Cpuset>,
    dirs: &mut Vec<PathBuf>,
) -> Result<(), HostCgroupError> {
    let rel = relative_path(cgroups_path)?;
    let mut pinned = false;
    for h in hierarchies() {
        let dir = h.join(&rel);
        std::fs::create_dir_all(&dir).map_err(|source| HostCgroupError::Io {
            path: dir.clone(),
            source,
        })?;
        dirs.push(dir.clone());
        if cpuset.is_some() {
            enable_cpuset_v2(&h, &rel);
        }
        init_cpuset(&h, &rel)?;
        if let Some(set) = cpuset {
            if dir.join("cpuset.cpus").exists() {
                write_cpuset(&dir, "cpus", &set.cpus)?;
                if let Some(mems) = &set.mems {
                    write_cpuset(&dir, "mems", mems)?;
                }
                pinned = true;
            }
        }
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|source| HostCgroupError::Io {
            path: procs,
            source,
        })?;
    }
    match cpuset {
        Some(set) if !pinned => Err(HostCgroupError::NoCpuset(set.cpus.clone())),
        _ => Ok(()),
    }
}

/// Writes cpuset.<field> of `dir`.
fn write_cpuset(dir: &Path, field: &'static str, value: &str) -> Result<(), HostCgroupError> {
    let path = dir.join(format!("cpuset.{field}"));
    std::fs::write(&path, value).map_err(|source| HostCgroupError::Cpuset {
        field,
        path,
        value: value.to_owned(),
        source,
    })
}

/// On a cgroup v2 hierarchy, enables cpuset on the way to `rel` (a
/// failure shows as a missing cpuset.cpus).
fn enable_cpuset_v2(hierarchy: &Path, rel: &Path) {
    if !hierarchy.join("cgroup.controllers").exists() {
        return;
    }
    let mut dir = hierarchy.to_path_buf();
    for c in rel.components() {
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+cpuset");
        dir.push(c);
    }
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
        let mut dirs = Vec::new();
        join(&path, child.id() as i32, None, &mut dirs).unwrap();
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

    #[test]
    fn a_cpuset_pins_the_process_and_a_bad_one_is_named() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let path = format!("/rtv-test/cpuset-{}", std::process::id());
        let set = Cpuset {
            cpus: "0".into(),
            mems: Some("0".into()),
        };
        let mut dirs = Vec::new();
        join(&path, pid, Some(&set), &mut dirs).unwrap();
        let cpuset_dir = dirs
            .iter()
            .find(|d| d.join("cpuset.cpus").exists())
            .expect("a cpuset hierarchy");
        let read = |f: &str| std::fs::read_to_string(cpuset_dir.join(f)).unwrap();
        assert_eq!(read("cpuset.cpus").trim(), "0");
        assert_eq!(read("cpuset.mems").trim(), "0");
        let allowed = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            allowed.lines().any(|l| l == "Cpus_allowed_list:\t0"),
            "{allowed}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        remove(&dirs);

        // CPUs the host does not have: the error names the field, and the
        // directories made so far are there for the caller to remove.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let bad = Cpuset {
            cpus: "4000".into(),
            mems: None,
        };
        let mut dirs = Vec::new();
        let err = join(&path, child.id() as i32, Some(&bad), &mut dirs).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("linux.resources.cpu.cpus: cannot write \"4000\""),
            "{err}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        remove(&dirs);
        for d in &dirs {
            assert!(!d.exists(), "{} left", d.display());
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
    }
}
