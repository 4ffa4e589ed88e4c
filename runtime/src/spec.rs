//! OCI runtime specs: reading config.json with errors that name the
//! offending field, and the default spec `rtv spec` writes.

use std::path::Path;

use oci_spec::runtime::Spec;

/// Why a spec could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A field does not parse; `field` is its JSON path.
    #[error("{path}: {field}: {message}")]
    Field {
        /// The file.
        path: String,
        /// The field's JSON path (`linux.namespaces[2].type`).
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Parses a spec from JSON text; errors name the field by its JSON path.
pub fn parse(path: &str, text: &[u8]) -> Result<Spec, SpecError> {
    let de = &mut serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        SpecError::Field {
            path: path.to_owned(),
            field: if field == "." {
                "(document)".into()
            } else {
                field
            },
            message: e.into_inner().to_string(),
        }
    })
}

/// Reads and parses `path` (a bundle's config.json).
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| SpecError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

/// The default spec for a busybox-style root file system, as `runc spec`
/// writes it (without a network namespace: containers share the VM's).
pub const DEFAULT_SPEC: &str = r#"{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": true,
    "user": { "uid": 0, "gid": 0 },
    "args": ["sh"],
    "env": [
      "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
      "TERM=xterm"
    ],
    "cwd": "/",
    "capabilities": {
      "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
      "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
      "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    },
    "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
    "noNewPrivileges": true
  },
  "root": { "path": "rootfs", "readonly": true },
  "hostname": "rtv",
  "mounts": [
    { "destination": "/proc", "type": "proc", "source": "proc" },
    { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
      "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
    { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
      "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
    { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
      "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
    { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
      "options": ["nosuid", "noexec", "nodev"] },
    { "destination": "/sys", "type": "sysfs", "source": "sysfs",
      "options": ["nosuid", "noexec", "nodev", "ro"] },
    { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
      "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] }
  ],
  "linux": {
    "resources": { "devices": [{ "allow": false, "access": "rwm" }] },
    "namespaces": [
      { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" },
      { "type": "cgroup" }
    ],
    "maskedPaths": [
      "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
      "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
      "/proc/scsi"
    ],
    "readonlyPaths": [
      "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
    ]
  }
}
"#;

/// The default spec.
pub fn default_spec() -> Spec {
    // DEFAULT_SPEC is a constant checked by a test below.
    parse("(default spec)", DEFAULT_SPEC.as_bytes()).unwrap_or_default()
}

/// A spec field that cannot be mapped into the guest.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct GuestSpecError {
    /// The field's JSON path.
    pub field: String,
    /// Why.
    pub message: String,
}

/// Turns a container's spec (already rewritten by the share with guest
/// paths) into the spec the agent takes: no hooks (they run on the host),
/// the guest cgroup `rtv/<id>` (the spec's path names the host's), no
/// network namespace path (the VM is the pod's network namespace), and
/// each other namespace path `/proc/<pid>/ns/<type>` mapped by `guest_pid`
/// (the pid a runtime reported for a container of the same pod) to the
/// guest's `/proc/<guest pid>/ns/<type>`. A path `guest_pid` does not know
/// is refused with the field named. A cpuset (host CPUs, to which the
/// pod's VMM is pinned on the host) becomes the same number of the VM's
/// `vcpus` in the guest (see [`guest_cpuset`]).
pub fn guest_spec(
    mut spec: Spec,
    id: &str,
    guest_pid: impl Fn(i32) -> Option<i32>,
    vcpus: u8,
) -> Result<Spec, GuestSpecError> {
    spec.set_hooks(None);
    let Some(linux) = spec.linux_mut() else {
        return Ok(spec);
    };
    linux.set_cgroups_path(Some(std::path::PathBuf::from(format!("rtv/{id}"))));
    // Per-device blkio entries name host block devices: the pod's VMM's
    // host cgroup has them (see host_cgroup::DeviceIo).
    if let Some(b) = linux
        .resources_mut()
        .as_mut()
        .and_then(|r| r.block_io_mut().as_mut())
    {
        b.set_weight_device(None);
        b.set_throttle_read_bps_device(None);
        b.set_throttle_write_bps_device(None);
        b.set_throttle_read_iops_device(None);
        b.set_throttle_write_iops_device(None);
    }
    if let Some(cpu) = linux
        .resources_mut()
        .as_mut()
        .and_then(|r| r.cpu_mut().as_mut())
    {
        let cpus = cpu.cpus().clone().filter(|c| !c.trim().is_empty());
        let mems = cpu.mems().clone().filter(|m| !m.trim().is_empty());
        if let Some(host) = cpus {
            let guest = guest_cpuset(&host, vcpus).ok_or_else(|| GuestSpecError {
                field: "linux.resources.cpu.cpus".into(),
                message: format!("{host:?} is not a list of CPUs such as \"0-2,4\""),
            })?;
            cpu.set_cpus(guest);
        }
        // The guest has one memory node.
        if mems.is_some() {
            cpu.set_mems((vcpus > 1).then(|| "0".to_owned()));
        }
    }
    let Some(nss) = linux.namespaces_mut() else {
        return Ok(spec);
    };
    for (i, ns) in nss.iter_mut().enumerate() {
        let Some(path) = ns.path().clone() else {
            continue;
        };
        if ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network {
            ns.set_path(None);
            continue;
        }
        let pid: Option<i32> = path
            .strip_prefix("/proc")
            .ok()
            .and_then(|p| p.iter().next())
            .and_then(|p| p.to_str())
            .and_then(|p| p.parse().ok());
        let kind = path.file_name().and_then(|n| n.to_str()).filter(|_| {
            path.parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "ns")
        });
        match (pid.and_then(&guest_pid), kind) {
            (Some(g), Some(kind)) => {
                ns.set_path(Some(std::path::PathBuf::from(format!(
                    "/proc/{g}/ns/{kind}"
                ))));
            }
            _ => {
                return Err(GuestSpecError {
                    field: format!("linux.namespaces[{i}].path"),
                    message: format!(
                        "{} is not a namespace of a container in this pod",
                        path.display()
                    ),
                })
            }
        }
    }
    Ok(spec)
}

/// The guest's cpuset for a container whose spec names the host CPUs
/// `host` (a list such as "2-3,6"): the first n of the VM's `vcpus`, n
/// being the number of host CPUs (at most `vcpus`); `Some(None)` with one
/// vCPU: the whole guest (whose kernel has no cpuset controller). `None`
/// if `host` does not parse.
pub fn guest_cpuset(host: &str, vcpus: u8) -> Option<Option<String>> {
    let count = crate::host_cgroup::parse_cpu_list(host)?.len() as u64;
    let n = count.min(u64::from(vcpus));
    Some(match n {
        0 | 1 if vcpus <= 1 => None,
        1 => Some("0".to_owned()),
        n => Some(format!("0-{}", n - 1)),
    })
}

/// The host's CPUs, for sizing VMs.
pub fn host_cpus() -> u8 {
    std::thread::available_parallelism()
        .map(|n| u8::try_from(n.get()).unwrap_or(u8::MAX))
        .unwrap_or(1)
}

/// Guest memory a sandbox needs beyond its containers' memory limits: the
/// guest kernel, the agent, page tables and page cache for the share.
/// Measured idle use of the guest is ~25 MiB (see README).
pub const VM_MEMORY_OVERHEAD_MIB: u64 = 64;
/// Guest memory when the spec sets no memory limit: a CRI pod under
/// containerd 1.6 (whose sandbox spec says nothing of the pod's containers)
/// gets a VM that holds real workloads; the host pays only for the guest
/// pages touched (see README, "Sizing").
pub const DEFAULT_VM_MEMORY_MIB: u64 = 2048;
/// vCPUs when the spec sets no CPU quota (at most the host's CPUs).
pub const DEFAULT_VM_VCPUS: u8 = 2;

/// A sandbox VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// containerd 1.7's pod-level sizes on a CRI sandbox's spec (the sum of
/// its containers' limits, as the kubelet gives them in the
/// PodSandboxConfig): memory in bytes, and the CPU quota and period.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// See [`SANDBOX_MEMORY`].
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// See [`SANDBOX_MEMORY`].
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// A positive number from annotation `key`, if there is one; a value that
/// is not one is logged and left out (the spec's own limits then size the
/// VM).
fn annotation_number(spec: &Spec, key: &str) -> Option<i64> {
    let value = spec.annotations().as_ref()?.get(key)?;
    match value.trim().parse::<i64>() {
        Ok(n) if n > 0 => Some(n),
        Ok(_) => None,
        Err(_) => {
            tracing::warn!(
                "annotation {key}: {value:?} is not a number; left out of the VM's size"
            );
            None
        }
    }
}

/// The memory limit of the container with `spec`, MiB rounded up, when it
/// sets one.
pub fn memory_limit_mib(spec: &Spec) -> Option<u64> {
    spec.linux()
        .as_ref()?
        .resources()
        .as_ref()?
        .memory()
        .as_ref()?
        .limit()
        .filter(|l| *l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20))
}

/// The VM for a container with `spec`: memory = the memory limit rounded
/// up to 2 MiB plus [`VM_MEMORY_OVERHEAD_MIB`] (or
/// the configuration's `vm.default_memory_mib`, [`DEFAULT_VM_MEMORY_MIB`]
/// unset, without a limit); vCPUs = the CPU quota over its period, rounded
/// up, at most `host_cpus` (or `vm.default_vcpus`, [`DEFAULT_VM_VCPUS`]
/// unset, at most `host_cpus`). A CRI sandbox's pod-level sizes
/// ([`SANDBOX_MEMORY`], [`SANDBOX_CPU_QUOTA`], [`SANDBOX_CPU_PERIOD`],
/// containerd 1.7) take the place of the spec's own limits: the VM holds
/// the whole pod.
pub fn vm_size(spec: &Spec, host_cpus: u8) -> VmSize {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let limit = annotation_number(spec, SANDBOX_MEMORY).or_else(|| {
        resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
    });
    let mem_mib = match limit {
        Some(bytes) => {
            let mib = (bytes as u64).div_ceil(1 << 20);
            mib.div_ceil(2) * 2 + VM_MEMORY_OVERHEAD_MIB
        }
        None => crate::config::get()
            .vm
            .default_memory_mib
            .unwrap_or(DEFAULT_VM_MEMORY_MIB),
    };
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let (quota, period) = match annotation_number(spec, SANDBOX_CPU_QUOTA) {
        Some(q) => (
            Some(q),
            annotation_number(spec, SANDBOX_CPU_PERIOD).map_or(100_000, |p| p as u64),
        ),
        None => (
            cpu.and_then(|c| c.quota()).filter(|q| *q > 0),
            cpu.and_then(|c| c.period())
                .filter(|p| *p > 0)
                .unwrap_or(100_000),
        ),
    };
    // At most the host's CPUs, and at most `vm.max_vcpus`.
    let cap = crate::config::get()
        .vm
        .max_vcpus
        .map_or(host_cpus, |m| m.min(host_cpus))
        .max(1);
    let vcpus = match quota {
        Some(q) => {
            let n = (q as u64).div_ceil(period).max(1);
            u8::try_from(n).unwrap_or(u8::MAX).min(cap)
        }
        None => crate::config::get()
            .vm
            .default_vcpus
            .unwrap_or(DEFAULT_VM_VCPUS)
            .min(cap),
    };
    VmSize { mem_mib, vcpus }
}

/// Refuses a VM of `size` over the configuration's `vm.max_memory_mib`,
/// naming what asked for it (the spec's memory limit or the pod's
/// annotation) and the key.
pub fn check_vm_size(spec: &Spec, size: VmSize) -> Result<(), String> {
    let config = crate::config::get();
    let Some(max) = config.vm.max_memory_mib else {
        return Ok(());
    };
    if size.mem_mib <= max {
        return Ok(());
    }
    let asked = if annotation_number(spec, SANDBOX_MEMORY).is_some() {
        format!("annotation {SANDBOX_MEMORY}")
    } else if memory_limit_mib(spec).is_some() {
        "linux.resources.memory.limit".to_owned()
    } else {
        "vm.default_memory_mib".to_owned()
    };
    let file = config
        .path
        .as_ref()
        .map_or_else(String::new, |p| format!(" in {}", p.display()));
    Err(format!(
        "{asked} asks for a VM of {} MiB (with {VM_MEMORY_OVERHEAD_MIB} MiB for the guest), \
         over vm.max_memory_mib = {max}{file}",
        size.mem_mib
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_parses() {
        let s = parse("default", DEFAULT_SPEC.as_bytes()).unwrap();
        assert_eq!(
            s.process().as_ref().unwrap().args().as_ref().unwrap()[0],
            "sh"
        );
        assert_eq!(s.mounts().as_ref().unwrap().len(), 7);
    }

    /// The default VM size in force (the suite may run under
    /// `RTV_CONFIG=config/tiny.toml`).
    fn default_size(host_cpus: u8) -> VmSize {
        let vm = &crate::config::get().vm;
        VmSize {
            mem_mib: vm.default_memory_mib.unwrap_or(DEFAULT_VM_MEMORY_MIB),
            vcpus: vm
                .default_vcpus
                .unwrap_or(DEFAULT_VM_VCPUS)
                .min(vm.max_vcpus.unwrap_or(u8::MAX))
                .min(host_cpus),
        }
    }

    #[test]
    fn vms_are_sized_from_the_spec() {
        let s = default_spec();
        assert_eq!(vm_size(&s, 2), default_size(2));
        assert_eq!(vm_size(&s, 1).vcpus, 1);
        let s = parse(
            "c",
            br#"{"ociVersion":"1.0.2","linux":{"resources":{
                "memory":{"limit":33554432},"cpu":{"quota":150000,"period":100000}}}}"#,
        )
        .unwrap();
        assert_eq!(
            vm_size(&s, 4),
            VmSize {
                mem_mib: 32 + 64,
                vcpus: 2
            }
        );
        assert_eq!(vm_size(&s, 1).vcpus, 1);
        let s = parse(
            "c",
            br#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1000001}}}}"#,
        )
        .unwrap();
        assert_eq!(vm_size(&s, 2).mem_mib, 2 + 64);
    }

    #[test]
    fn a_sandbox_is_sized_for_its_pod_by_containerd_1_7s_annotations() {
        let s = parse(
            "c",
            br#"{"ociVersion":"1.0.2","annotations":{
                "io.kubernetes.cri.sandbox-memory":"629145600",
                "io.kubernetes.cri.sandbox-cpu-quota":"250000",
                "io.kubernetes.cri.sandbox-cpu-period":"100000"},
                "linux":{"resources":{"memory":{"limit":33554432}}}}"#,
        )
        .unwrap();
        assert_eq!(
            vm_size(&s, 4),
            VmSize {
                mem_mib: 600 + 64,
                vcpus: 3
            }
        );
        // A value that is not a number is left out: the spec's own limit.
        let s = parse(
            "c",
            br#"{"ociVersion":"1.0.2","annotations":{
                "io.kubernetes.cri.sandbox-memory":"lots",
                "io.kubernetes.cri.sandbox-cpu-quota":"0"},
                "linux":{"resources":{"memory":{"limit":33554432}}}}"#,
        )
        .unwrap();
        assert_eq!(
            vm_size(&s, 4),
            VmSize {
                mem_mib: 32 + 64,
                vcpus: default_size(4).vcpus
            }
        );
    }

    #[test]
    fn a_host_cpuset_becomes_as_many_vcpus() {
        assert_eq!(guest_cpuset("2-3", 2), Some(Some("0-1".into())));
        assert_eq!(guest_cpuset("5", 2), Some(Some("0".into())));
        assert_eq!(guest_cpuset("0-3,8", 4), Some(Some("0-3".into())));
        assert_eq!(guest_cpuset("0-3", 1), Some(None));
        for bad in ["", "a", "3-1", "1,,2"] {
            assert_eq!(guest_cpuset(bad, 2), None, "{bad:?}");
        }
        let mut spec = default_spec();
        let host: oci_spec::runtime::LinuxResources =
            serde_json::from_str(r#"{"cpu": {"cpus": "6-7", "mems": "1"}}"#).unwrap();
        spec.linux_mut().as_mut().unwrap().set_resources(Some(host));
        let cpu = |s: &Spec| {
            let c = s.linux().as_ref().unwrap().resources().as_ref().unwrap();
            let c = c.cpu().as_ref().unwrap();
            (c.cpus().clone(), c.mems().clone())
        };
        let two = guest_spec(spec.clone(), "c", |_| None, 2).unwrap();
        assert_eq!(cpu(&two), (Some("0-1".into()), Some("0".into())));
        let one = guest_spec(spec.clone(), "c", |_| None, 1).unwrap();
        assert_eq!(cpu(&one), (None, None));
        let mut bad = spec;
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_str(r#"{"cpu": {"cpus": "x"}}"#).unwrap();
        bad.linux_mut().as_mut().unwrap().set_resources(Some(r));
        let err = guest_spec(bad, "c", |_| None, 2).unwrap_err();
        assert_eq!(err.field, "linux.resources.cpu.cpus");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(
            "config.json",
            br#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},{"type":"bogus"}]}}"#,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("linux.namespaces[1].type"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
        let e = parse(
            "config.json",
            br#"{"ociVersion":"1.0.2","process":{"user":{"uid":"x"}}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("process.user.uid"), "{e}");
        let e = parse("config.json", b"{").unwrap_err();
        assert!(e.to_string().starts_with("config.json: "), "{e}");
        let e = load(Path::new("/nonexistent/rtv/config.json")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/rtv/config.json"),
            "{e}"
        );
    }
}
