//! What the shim needs to know before it talks to a guest: how a container
//! belongs to a pod (CRI annotations), where the guest kernel, initramfs,
//! VMM and templates are, where a pod's state goes on the host, and the
//! spec as the guest agent takes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use sha2::{Digest, Sha256};

/// The CRI annotation naming a container's kind (`sandbox` or `container`).
pub const CRI_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI annotation naming the pod sandbox a container belongs to.
pub const CRI_SANDBOX: &str = "io.kubernetes.cri.sandbox-id";

/// Where the shim keeps each pod's VM state (vsock socket, console, VMM
/// log and the virtio-fs share): `<root>/<namespace>/<pod>`.
pub const STATE_ROOT: &str = "/run/rtv-shim";

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why the shim cannot go on with a container.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A guest artifact is missing.
    #[error("{path} not found (set ${var}, or run scripts/build.sh, which puts {name} next to containerd-shim-rtv-v2)")]
    Artifact {
        /// Where it was looked for.
        path: String,
        /// The variable that names it.
        var: &'static str,
        /// Its name next to the shim.
        name: &'static str,
    },
    /// A spec field the shim cannot map into the guest.
    #[error("{field}: {message}")]
    Spec {
        /// The field's JSON path.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// How a container relates to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A CRI pod's sandbox container: it makes the pod's VM.
    Sandbox,
    /// A CRI container of the pod with this sandbox id: it joins the VM.
    Member(String),
    /// No CRI annotations: a container with a VM of its own.
    Standalone,
}

impl Role {
    /// The role the annotations give a container.
    pub fn of(annotations: &HashMap<String, String>) -> Role {
        match (
            annotations.get(CRI_TYPE).map(String::as_str),
            annotations.get(CRI_SANDBOX),
        ) {
            (Some("sandbox"), _) => Role::Sandbox,
            (Some("container"), Some(sandbox)) if !sandbox.is_empty() => {
                Role::Member(sandbox.clone())
            }
            _ => Role::Standalone,
        }
    }

    /// The id of the pod (and of its shim) that container `id` belongs
    /// to: the sandbox id for a member, else its own.
    pub fn group<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::Member(sandbox) => sandbox,
            Role::Sandbox | Role::Standalone => id,
        }
    }
}

/// The annotations of the spec in `bundle` (none if it cannot be read).
pub fn bundle_annotations(bundle: &Path) -> HashMap<String, String> {
    rtv_runtime::spec::load(&bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default()
}

/// The guest kernel, initramfs and VMM binary.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs with the agent.
    pub initramfs: PathBuf,
    /// `rtv-vmm`.
    pub vmm: PathBuf,
}

/// Finds the guest artifacts: `$RTV_KERNEL`, `$RTV_INITRAMFS`, `$RTV_VMM`,
/// else `rtv-vmlinux`, `rtv-initramfs.cpio` and `rtv-vmm` next to this
/// binary (as `rtv` finds them).
pub fn artifacts() -> Result<Artifacts, GuestError> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let find = |var: &'static str, name: &'static str| -> Result<PathBuf, GuestError> {
        let p = std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| exe_dir.join(name));
        if p.exists() {
            Ok(p)
        } else {
            Err(GuestError::Artifact {
                path: p.display().to_string(),
                var,
                name,
            })
        }
    };
    Ok(Artifacts {
        kernel: find("RTV_KERNEL", "rtv-vmlinux")?,
        initramfs: find("RTV_INITRAMFS", "rtv-initramfs.cpio")?,
        vmm: find("RTV_VMM", "rtv-vmm")?,
    })
}

/// Where VM templates are kept: `$RTV_CACHE_DIR/templates`,
/// `~/.cache/rtv/templates`, or `/var/cache/rtv/templates` (a shim started
/// by a containerd without `$HOME`).
pub fn template_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RTV_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("templates");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache/rtv/templates");
    }
    PathBuf::from("/var/cache/rtv/templates")
}

fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The state directory of pod `pod` in containerd namespace `namespace`:
/// `<root>/<namespace>/<pod>`, or `<root>/by-hash/<sha256 prefix>` when the
/// names are not plain file names or the VM's vsock socket path would be
/// too long for a Unix socket.
pub fn state_dir(root: &Path, namespace: &str, pod: &str) -> PathBuf {
    let plain = root.join(namespace).join(pod);
    let sock_len = plain
        .join(rtv_runtime::sandbox::VSOCK_FILE)
        .as_os_str()
        .len();
    if plain_name(namespace) && plain_name(pod) && sock_len <= MAX_SOCKET_PATH {
        return plain;
    }
    let digest = Sha256::digest(format!("{namespace}/{pod}").as_bytes());
    root.join("by-hash")
        .join(&rtv_runtime::template::hex(&digest)[..32])
}

/// The spec the agent takes ([`rtv_runtime::spec::guest_spec`]): the
/// shim reports guest pids as tasks' pids, so a pod's namespace paths
/// already name guest processes; only those of `pod_pids` are accepted.
pub fn guest_spec(spec: Spec, id: &str, pod_pids: &[i32]) -> Result<Spec, GuestError> {
    rtv_runtime::spec::guest_spec(spec, id, |pid| pod_pids.contains(&pid).then_some(pid)).map_err(
        |e| GuestError::Spec {
            field: e.field,
            message: e.message,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn roles_group_a_pod_under_its_sandbox_id() {
        let sb = annotations(&[(CRI_TYPE, "sandbox"), (CRI_SANDBOX, "pod1")]);
        assert_eq!(Role::of(&sb), Role::Sandbox);
        assert_eq!(Role::of(&sb).group("pod1"), "pod1");
        let member = annotations(&[(CRI_TYPE, "container"), (CRI_SANDBOX, "pod1")]);
        assert_eq!(Role::of(&member), Role::Member("pod1".into()));
        assert_eq!(Role::of(&member).group("c1"), "pod1");
        assert_eq!(Role::of(&HashMap::new()), Role::Standalone);
        assert_eq!(Role::of(&HashMap::new()).group("c2"), "c2");
        let no_sandbox = annotations(&[(CRI_TYPE, "container")]);
        assert_eq!(Role::of(&no_sandbox), Role::Standalone);
    }

    #[test]
    fn state_dirs_are_plain_or_hashed() {
        let root = Path::new("/run/rtv-shim");
        assert_eq!(
            state_dir(root, "k8s.io", "abc"),
            PathBuf::from("/run/rtv-shim/k8s.io/abc")
        );
        for (ns, id) in [("k8s.io", "../x"), ("..", "a"), ("ns", &"x".repeat(100))] {
            let d = state_dir(root, ns, id);
            assert!(d.starts_with("/run/rtv-shim/by-hash"), "{}", d.display());
            assert!(d.join(rtv_runtime::sandbox::VSOCK_FILE).as_os_str().len() <= 107);
        }
        assert_ne!(state_dir(root, "a", "../x"), state_dir(root, "a", "../y"));
    }

    fn spec(json: &str) -> Spec {
        rtv_runtime::spec::parse("test", json.as_bytes()).unwrap()
    }

    #[test]
    fn guest_specs_map_pod_namespaces() {
        let s = spec(
            r#"{"ociVersion":"1.0.2",
                "hooks":{"prestart":[{"path":"/bin/true"}]},
                "linux":{"cgroupsPath":"/k8s/pod/c1","namespaces":[
                  {"type":"pid"},
                  {"type":"network","path":"/var/run/netns/cni-1"},
                  {"type":"ipc","path":"/proc/42/ns/ipc"},
                  {"type":"uts","path":"/proc/42/ns/uts"}]}}"#,
        );
        let g = guest_spec(s.clone(), "c1", &[42]).unwrap();
        assert!(g.hooks().is_none());
        let linux = g.linux().as_ref().unwrap();
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("rtv/c1")));
        let nss = linux.namespaces().as_ref().unwrap();
        assert_eq!(nss[1].path(), &None);
        assert_eq!(nss[2].path().as_deref(), Some(Path::new("/proc/42/ns/ipc")));
        let e = guest_spec(s, "c1", &[7]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("linux.namespaces[2].path: /proc/42/ns/ipc is not"),
            "{e}"
        );
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"ipc","path":"/proc/42/root/x"}]}}"#,
        );
        assert!(guest_spec(s, "c1", &[42]).is_err());
    }
}
