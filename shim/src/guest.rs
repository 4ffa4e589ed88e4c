//! Where the shim keeps a pod's state on the host, and what it reads of a
//! bundle before it talks to a pod.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where the shim keeps each pod's state directory (the pod layer's vsock
/// socket, console, VMM log, share and record): `<root>/<namespace>/<pod>`.
pub const STATE_ROOT: &str = "/run/rtv-shim";

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The annotations of the spec in `bundle` (none if it cannot be read).
pub fn bundle_annotations(bundle: &Path) -> HashMap<String, String> {
    rtv_runtime::spec::load(&bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
