//! The host cgroup of a container's host processes (its waiter and, for
//! the first container of a sandbox, the VMM): `linux.cgroupsPath` as
//! runc interprets it, on cgroup v1 (every mounted controller hierarchy)
//! or v2 (the unified hierarchy). Limits are applied inside the guest; on
//! the host the cgroup groups and accounts the processes, as containerd
//! and the kubelet expect. The exceptions name host resources: a cpuset
//! names host CPUs, so the VMM's cgroup gets it (its vCPU threads run only
//! there) and the guest gets the same number of vCPUs (see
//! [`crate::spec::guest_spec`]); per-device blkio weights and throttles
//! name host block devices, which only the VMM uses (the guest has none:
//! its file I/O is the VMM's, through virtio-fs), so the VMM's cgroup gets
//! them ([`DeviceIo`]).

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
    /// A per-device blkio limit could not be given to the VMM's cgroup.
    #[error("linux.resources.blockIO.{field}: {message}")]
    DeviceIo {
        /// The spec's field.
        field: String,
        /// Why.
        message: String,
    },
}

/// What the VMM's host cgroup may use beyond its guest's memory: the VMM's
/// own heap, page tables, device buffers and the share's page cache
/// (reclaimable); the README's jail bench gives an idle VMM's own share.
pub const VMM_MEMORY_OVERHEAD_MIB: u64 = 64;
/// Tasks the VMM's cgroup may hold beyond one per vCPU: the VMM's main,
/// profiler and snapshot threads, the waiters rtv starts beside it, and
/// room for both during a restart (the pid limit stops a VMM a guest broke
/// into from exhausting the host's pids; its seccomp filters already stop
/// it from making threads).
pub const VMM_TASKS_HEADROOM: u64 = 32;

/// The limits the VMM's host cgroup gets: its guest's memory plus
/// [`VMM_MEMORY_OVERHEAD_MIB`], and its vCPUs plus [`VMM_TASKS_HEADROOM`]
/// tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmLimits {
    /// memory.limit_in_bytes (v1) or memory.max (v2).
    pub memory_bytes: u64,
    /// pids.max.
    pub pids: u64,
}

impl VmmLimits {
    /// The limits of a VMM whose guest has `mem_mib` and `vcpus`.
    pub fn for_vm(mem_mib: u64, vcpus: u8) -> Self {
        VmmLimits {
            memory_bytes: (mem_mib + VMM_MEMORY_OVERHEAD_MIB) << 20,
            pids: u64::from(vcpus) + VMM_TASKS_HEADROOM,
        }
    }

    /// Writes the limits into `dir` of `hierarchy`, where it has the
    /// files (a hierarchy of another controller has none).
    fn write(&self, hierarchy: &Path, rel: &Path, dir: &Path) -> Result<(), HostCgroupError> {
        let v2 = hierarchy.join("cgroup.controllers").exists();
        if v2 {
            enable_v2(hierarchy, rel, "memory");
            enable_v2(hierarchy, rel, "pids");
        }
        let memory = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        for (file, value) in [
            (memory, self.memory_bytes.to_string()),
            ("pids.max", self.pids.to_string()),
        ] {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            std::fs::write(&path, &value).map_err(|source| HostCgroupError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The per-device entries of `linux.resources.blockIO`: host block devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIo {
    /// One write per entry, in the spec's order.
    pub writes: Vec<DeviceIoWrite>,
}

/// One per-device limit, as each cgroup version writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIoWrite {
    /// The spec's field, e.g. `throttleReadBpsDevice[0]`.
    pub field: String,
    /// The cgroup v1 blkio file and line.
    pub v1: (&'static str, String),
    /// The cgroup v2 io file and line.
    pub v2: (&'static str, String),
}

impl DeviceIo {
    /// The per-device entries of `spec`'s blockIO, if any.
    pub fn of(spec: &oci_spec::runtime::Spec) -> Option<DeviceIo> {
        let b = spec
            .linux()
            .as_ref()?
            .resources()
            .as_ref()?
            .block_io()
            .as_ref()?;
        let mut writes = Vec::new();
        for (i, w) in b.weight_device().iter().flatten().enumerate() {
            if let Some(weight) = w.weight() {
                let dev = format!("{}:{}", w.major(), w.minor());
                writes.push(DeviceIoWrite {
                    field: format!("weightDevice[{i}]"),
                    v1: ("blkio.weight_device", format!("{dev} {weight}")),
                    v2: ("io.bfq.weight", format!("{dev} {weight}")),
                });
            }
        }
        let throttles = [
            (
                "throttleReadBpsDevice",
                b.throttle_read_bps_device(),
                "blkio.throttle.read_bps_device",
                "rbps",
            ),
            (
                "throttleWriteBpsDevice",
                b.throttle_write_bps_device(),
                "blkio.throttle.write_bps_device",
                "wbps",
            ),
            (
                "throttleReadIOPSDevice",
                b.throttle_read_iops_device(),
                "blkio.throttle.read_iops_device",
                "riops",
            ),
            (
                "throttleWriteIOPSDevice",
                b.throttle_write_iops_device(),
                "blkio.throttle.write_iops_device",
                "wiops",
            ),
        ];
        for (name, list, v1, key) in throttles {
            for (i, t) in list.iter().flatten().enumerate() {
                let dev = format!("{}:{}", t.major(), t.minor());
                writes.push(DeviceIoWrite {
                    field: format!("{name}[{i}]"),
                    v1: (v1, format!("{dev} {}", t.rate())),
                    v2: ("io.max", format!("{dev} {key}={}", t.rate())),
                });
            }
        }
        (!writes.is_empty()).then_some(DeviceIo { writes })
    }
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

/// Puts `pids` in `cgroups_path` in every hierarchy, with `cpuset` and
/// `limits` (the VMM's) written first; returns the cgroup directories, for
/// [`remove`].
/// The directories made are recorded in `dirs` as they are made, so that
/// a caller can remove them after a failure.
pub fn join(
    cgroups_path: &str,
    pids: &[i32],
    cpuset: Option<&Cpuset>,
    device_io: Option<&DeviceIo>,
    limits: Option<&VmmLimits>,
    dirs: &mut Vec<PathBuf>,
) -> Result<(), HostCgroupError> {
    let rel = relative_path(cgroups_path)?;
    let mut pinned = false;
    let mut io_done = vec![false; device_io.map_or(0, |d| d.writes.len())];
    for h in hierarchies() {
        let dir = h.join(&rel);
        std::fs::create_dir_all(&dir).map_err(|source| HostCgroupError::Io {
            path: dir.clone(),
            source,
        })?;
        dirs.push(dir.clone());
        if cpuset.is_some() {
            enable_v2(&h, &rel, "cpuset");
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
        if let Some(io) = device_io {
            let v2 = h.join("cgroup.controllers").exists();
            if v2 {
                enable_v2(&h, &rel, "io");
            }
            for (w, done) in io.writes.iter().zip(io_done.iter_mut()) {
                let (file, line) = if v2 { &w.v2 } else { &w.v1 };
                let path = dir.join(file);
                if !path.exists() {
                    continue;
                }
                std::fs::write(&path, line).map_err(|e| HostCgroupError::DeviceIo {
                    field: w.field.clone(),
                    message: format!("cannot write {line:?} to {}: {e}", path.display()),
                })?;
                *done = true;
            }
        }
        if let Some(limits) = limits {
            limits.write(&h, &rel, &dir)?;
        }
        let procs = dir.join("cgroup.procs");
        for pid in pids {
            std::fs::write(&procs, pid.to_string()).map_err(|source| HostCgroupError::Io {
                path: procs.clone(),
                source,
            })?;
        }
    }
    if let Some(set) = cpuset.filter(|_| !pinned) {
        return Err(HostCgroupError::NoCpuset(set.cpus.clone()));
    }
    if let Some(io) = device_io {
        if let Some((w, _)) = io.writes.iter().zip(&io_done).find(|(_, done)| !**done) {
            return Err(HostCgroupError::DeviceIo {
                field: w.field.clone(),
                message: format!(
                    "the host's cgroups have no {} (or {}) for the VMM's cgroup (runc fails alike)",
                    w.v1.0, w.v2.0
                ),
            });
        }
    }
    Ok(())
}

/// Pins the processes of the cgroups `dirs` (the VMM's, made by [`join`])
/// to the host CPUs `cpus`: cpuset.cpus of the one that has it.
pub fn set_cpus(dirs: &[PathBuf], cpus: &str) -> Result<(), HostCgroupError> {
    match dirs.iter().find(|d| d.join("cpuset.cpus").exists()) {
        Some(dir) => write_cpuset(dir, "cpus", cpus),
        None => Err(HostCgroupError::NoCpuset(cpus.to_owned())),
    }
}

/// The CPUs of a list such as "0-2,4", or `None` if it does not parse.
pub fn parse_cpu_list(list: &str) -> Option<std::collections::BTreeSet<u32>> {
    let mut set = std::collections::BTreeSet::new();
    for range in list.trim().split(',') {
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let n = range.trim().parse::<u32>().ok()?;
                (n, n)
            }
        };
        if b < a || b - a > 65_535 {
            return None;
        }
        set.extend(a..=b);
    }
    Some(set)
}

/// The union of two CPU lists, as a list ("0-3,6"); `None` if either does
/// not parse.
pub fn cpu_list_union(a: &str, b: &str) -> Option<String> {
    let mut set = parse_cpu_list(a)?;
    set.extend(parse_cpu_list(b)?);
    let mut out: Vec<String> = Vec::new();
    let mut iter = set.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    Some(out.join(","))
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

/// On a cgroup v2 hierarchy, enables `controller` on the way to `rel` (a
/// failure shows as a missing file).
fn enable_v2(hierarchy: &Path, rel: &Path, controller: &str) {
    if !hierarchy.join("cgroup.controllers").exists() {
        return;
    }
    let mut dir = hierarchy.to_path_buf();
    for c in rel.components() {
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
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

    /// A process to put in cgroups.
    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap()
    }

    /// Ends `child`, removes `dirs` and checks they are gone.
    fn end(mut child: std::process::Child, dirs: &[PathBuf]) {
        child.kill().unwrap();
        child.wait().unwrap();
        remove(dirs);
        for d in dirs {
            assert!(!d.exists(), "{} left", d.display());
        }
    }

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
        let child = sleeper();
        let path = format!("/rtv-test-join-{}", std::process::id());
        let mut dirs = Vec::new();
        join(&path, &[child.id() as i32], None, None, None, &mut dirs).unwrap();
        assert!(!dirs.is_empty(), "no cgroup hierarchy found");
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == child.id().to_string()),
                "{}",
                d.display()
            );
        }
        end(child, &dirs);
    }

    #[test]
    fn the_vmm_cgroup_is_limited_to_its_guest_and_overhead() {
        let limits = VmmLimits::for_vm(128, 2);
        assert_eq!(limits.memory_bytes, (128 + VMM_MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(limits.pids, 2 + VMM_TASKS_HEADROOM);
        let child = sleeper();
        let path = format!("/rtv-test-limits-{}", std::process::id());
        let mut dirs = Vec::new();
        join(
            &path,
            &[child.id() as i32],
            None,
            None,
            Some(&limits),
            &mut dirs,
        )
        .unwrap();
        let read = |file: &str| {
            dirs.iter()
                .find(|d| d.join(file).exists())
                .map(|d| std::fs::read_to_string(d.join(file)).unwrap())
        };
        let (memory, pids) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (read("memory.max"), read("pids.max"))
        } else {
            (read("memory.limit_in_bytes"), read("pids.max"))
        };
        assert_eq!(
            memory.as_deref().map(str::trim),
            Some(limits.memory_bytes.to_string().as_str())
        );
        assert_eq!(
            pids.as_deref().map(str::trim),
            Some(limits.pids.to_string().as_str())
        );
        end(child, &dirs);
    }

    #[test]
    fn a_cpuset_pins_the_process_and_a_bad_one_is_named() {
        let child = sleeper();
        let pid = child.id() as i32;
        let path = format!("/rtv-test-cpuset-{}", std::process::id());
        let set = Cpuset {
            cpus: "0".into(),
            mems: Some("0".into()),
        };
        let mut dirs = Vec::new();
        join(&path, &[pid], Some(&set), None, None, &mut dirs).unwrap();
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
        end(child, &dirs);

        // CPUs the host does not have: the error names the field, and the
        // directories made so far are there for the caller to remove.
        let child = sleeper();
        let bad = Cpuset {
            cpus: "4000".into(),
            mems: None,
        };
        let mut dirs = Vec::new();
        let err = join(
            &path,
            &[child.id() as i32],
            Some(&bad),
            None,
            None,
            &mut dirs,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("linux.resources.cpu.cpus: cannot write \"4000\""),
            "{err}"
        );
        end(child, &dirs);
    }

    #[test]
    fn per_device_io_goes_to_the_cgroup_or_is_refused_by_name() {
        // The host's first disk (not a loop or RAM device).
        let disk = std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram")
            })
            .find_map(|e| std::fs::read_to_string(e.path().join("dev")).ok())
            .expect("a block device")
            .trim()
            .to_owned();
        let (major, minor) = disk.split_once(':').unwrap();
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"resources": {"blockIO": {"weight": 0, "throttleReadBpsDevice": [
                {"major": major.parse::<i64>().unwrap(), "minor": minor.parse::<i64>().unwrap(), "rate": 1048576}
            ]}}}
        }))
        .unwrap();
        let io = DeviceIo::of(&spec).expect("per-device entries");
        assert_eq!(io.writes.len(), 1);
        assert_eq!(
            io.writes[0].v1,
            ("blkio.throttle.read_bps_device", format!("{disk} 1048576"))
        );
        assert_eq!(io.writes[0].v2, ("io.max", format!("{disk} rbps=1048576")));

        let child = sleeper();
        let path = format!("/rtv-test-device-io-{}", std::process::id());
        let mut dirs = Vec::new();
        let throttling = hierarchies().iter().any(|h| {
            h.join("blkio.throttle.read_bps_device").exists() || h.join("io.max").exists()
        });
        let result = join(
            &path,
            &[child.id() as i32],
            None,
            Some(&io),
            None,
            &mut dirs,
        );
        if throttling {
            result.unwrap();
            let written = dirs.iter().any(|d| {
                ["blkio.throttle.read_bps_device", "io.max"]
                    .iter()
                    .any(|f| {
                        std::fs::read_to_string(d.join(f))
                            .is_ok_and(|t| t.contains(&disk) && t.contains("1048576"))
                    })
            });
            assert!(written, "no throttle in {dirs:?}");
        } else {
            // A host kernel without blkio throttling (this one): refused
            // with the field named, as runc fails.
            let err = result.unwrap_err().to_string();
            assert!(
                err.starts_with("linux.resources.blockIO.throttleReadBpsDevice[0]: "),
                "{err}"
            );
        }
        end(child, &dirs);
    }

    #[test]
    fn cpu_lists_parse_and_unite() {
        assert_eq!(
            parse_cpu_list("0-2,4")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [0, 1, 2, 4]
        );
        assert_eq!(cpu_list_union("1", "0").as_deref(), Some("0-1"));
        assert_eq!(cpu_list_union("0-1,6", "3,2,7").as_deref(), Some("0-3,6-7"));
        for bad in ["", "a", "3-1", "1,,2", "0-99999999"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }
}
