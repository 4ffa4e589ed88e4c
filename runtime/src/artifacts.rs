//! Where rtv's parts are on the host, decided in one place for every front
//! end: the guest kernels, the initramfs and the VMM binary (from
//! `$RTV_KERNEL`, `$RTV_KERNEL_UP`, `$RTV_INITRAMFS` and `$RTV_VMM`, else
//! the configuration file's `guest.*` and `vmm.path`, else next to the
//! running binary, where `scripts/build.sh` links them), and the
//! template cache.

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

/// The guest kernels, the initramfs and the VMM binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts {
    /// The guest kernel (ELF vmlinux), SMP: for any number of vCPUs.
    pub kernel: PathBuf,
    /// The same kernel built without SMP (`guest-kernel/build.sh --up`), for
    /// VMs with one vCPU, when there is one: no per-cgroup load tracking,
    /// Tiny RCU, no spinlocks (guest-kernel/README.md measures it).
    pub kernel_up: Option<PathBuf>,
    /// The initramfs with the agent as /init.
    pub initramfs: PathBuf,
    /// `rtv-vmm`.
    pub vmm: PathBuf,
}

impl Artifacts {
    /// The kernel a VM with `vcpus` vCPUs boots: the uniprocessor one for
    /// one vCPU when there is one, else the SMP kernel.
    pub fn kernel_for(&self, vcpus: u8) -> &Path {
        match &self.kernel_up {
            Some(up) if vcpus == 1 => up,
            _ => &self.kernel,
        }
    }

    /// The `System.map` of [`Artifacts::kernel_for`], for the guest
    /// profiler: beside the kernel (its symlinks followed: the kernel cache
    /// keeps it there).
    pub fn system_map_for(&self, vcpus: u8) -> Option<PathBuf> {
        let kernel = std::fs::canonicalize(self.kernel_for(vcpus)).ok()?;
        let map = kernel.with_file_name("System.map");
        map.exists().then_some(map)
    }

    /// Finds them: each from its variable when set and not empty, else
    /// `rtv-vmlinux`, `rtv-vmlinux-up`, `rtv-initramfs.cpio` and `rtv-vmm`
    /// next to the running binary. A missing one is an error naming its
    /// variable; the uniprocessor kernel is optional, and when `$RTV_KERNEL`
    /// names a kernel it is looked for only in `$RTV_KERNEL_UP` (a chosen
    /// kernel is not mixed with the one next to the binary).
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
        let config = crate::config::get();
        let configured = |var: &str| match var {
            "RTV_KERNEL" => config.guest.kernel.clone(),
            "RTV_KERNEL_UP" => config.guest.kernel_up.clone(),
            "RTV_INITRAMFS" => config.guest.initramfs.clone(),
            "RTV_VMM" => config.vmm.path.clone(),
            _ => None,
        };
        let find = |var: &'static str, name: &'static str| {
            let path = std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| configured(var))
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
        let kernel = find("RTV_KERNEL", "rtv-vmlinux")?;
        let kernel_chosen = std::env::var_os("RTV_KERNEL").is_some_and(|v| !v.is_empty())
            || config.guest.kernel.is_some();
        let up_chosen = std::env::var_os("RTV_KERNEL_UP").is_some_and(|v| !v.is_empty())
            || config.guest.kernel_up.is_some();
        let kernel_up = if up_chosen {
            Some(find("RTV_KERNEL_UP", "rtv-vmlinux-up")?)
        } else if kernel_chosen {
            None
        } else {
            find("RTV_KERNEL_UP", "rtv-vmlinux-up").ok()
        };
        Ok(Artifacts {
            kernel,
            kernel_up,
            initramfs: find("RTV_INITRAMFS", "rtv-initramfs.cpio")?,
            vmm: find("RTV_VMM", "rtv-vmm")?,
        })
    }
}

/// Where VM templates are kept: `$RTV_CACHE_DIR/templates`, else the
/// configuration's `templates.dir`, else `$HOME/.cache/rtv/templates`, else `/var/cache/rtv/templates` (a shim
/// started by a containerd without `$HOME`).
pub fn template_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RTV_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("templates");
    }
    if let Some(d) = &crate::config::get().templates.dir {
        return d.clone();
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache/rtv/templates");
    }
    PathBuf::from("/var/cache/rtv/templates")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_vcpu_boots_the_uniprocessor_kernel_when_there_is_one() {
        let mut a = Artifacts {
            kernel: "/k/smp".into(),
            kernel_up: Some("/k/up".into()),
            initramfs: "/i".into(),
            vmm: "/v".into(),
        };
        assert_eq!(a.kernel_for(1), Path::new("/k/up"));
        assert_eq!(a.kernel_for(2), Path::new("/k/smp"));
        a.kernel_up = None;
        assert_eq!(a.kernel_for(1), Path::new("/k/smp"));
    }
}
