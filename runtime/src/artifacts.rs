//! Where rtv's parts are on the host, decided in one place for every front
//! end: the guest kernel, the initramfs and the VMM binary (from
//! `$RTV_KERNEL`, `$RTV_INITRAMFS` and `$RTV_VMM`, else next to the running
//! binary, where `scripts/build.sh` links them), and the template cache.

use std::path::{Path, PathBuf};

/// A guest artifact that is not where it was looked for.
#[derive(Debug, thiserror::Error)]
#[error("{} not found (set ${var}, or run scripts/build.sh, which puts {name} next to {exe})", path.display())]
pub struct ArtifactError {
    /// Where it was looked for.
    pub path: PathBuf,
    /// The variable that names it.
    pub var: &'static str,
    /// Its name next to the binary.
    pub name: &'static str,
    /// The running binary's name.
    pub exe: String,
}

/// The guest kernel, the initramfs and the VMM binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts {
    /// The guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs with the agent as /init.
    pub initramfs: PathBuf,
    /// `rtv-vmm`.
    pub vmm: PathBuf,
}

impl Artifacts {
    /// The guest kernel's `System.map`, for the guest profiler: beside the
    /// kernel (its symlinks followed: the kernel cache keeps it there).
    pub fn system_map(&self) -> Option<PathBuf> {
        let kernel = std::fs::canonicalize(&self.kernel).ok()?;
        let map = kernel.with_file_name("System.map");
        map.exists().then_some(map)
    }

    /// Finds them: each from its variable when set and not empty, else
    /// `rtv-vmlinux`, `rtv-initramfs.cpio` and `rtv-vmm` next to the running
    /// binary. A missing one is an error naming its variable.
    pub fn find() -> Result<Artifacts, ArtifactError> {
        let exe = std::env::current_exe().ok();
        let exe_dir = exe
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let exe_name = exe
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "rtv".into());
        let find = |var: &'static str, name: &'static str| {
            let path = std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| exe_dir.join(name));
            if path.exists() {
                Ok(path)
            } else {
                Err(ArtifactError {
                    path,
                    var,
                    name,
                    exe: exe_name.clone(),
                })
            }
        };
        Ok(Artifacts {
            kernel: find("RTV_KERNEL", "rtv-vmlinux")?,
            initramfs: find("RTV_INITRAMFS", "rtv-initramfs.cpio")?,
            vmm: find("RTV_VMM", "rtv-vmm")?,
        })
    }
}

/// Where VM templates are kept: `$RTV_CACHE_DIR/templates`, else
/// `$HOME/.cache/rtv/templates`, else `/var/cache/rtv/templates` (a shim
/// started by a containerd without `$HOME`).
pub fn template_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RTV_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("templates");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache/rtv/templates");
    }
    PathBuf::from("/var/cache/rtv/templates")
}
