//! Mounting the root file system containerd hands a task (an overlay of the
//! image's layers, or a bind mount of one), at `<bundle>/rootfs`.
//!
//! containerd-shim's own `mount_rootfs` forks and waits for the child
//! through the crate's reaper, which the shim leaves off (it would reap the
//! VMMs that `std::process::Child` waits for); this is the same mount in
//! the shim's process.

use std::ffi::CString;
use std::path::Path;

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// An argument holds a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// The mount data is longer than the kernel takes (a page).
    #[error("mount options of {0} bytes are longer than a page")]
    TooLong(usize),
    /// mount(2) failed.
    #[error("mount {from} ({fstype}) on {target}: {err}")]
    Mount {
        /// The source.
        from: String,
        /// The file system type.
        fstype: String,
        /// The target.
        target: String,
        /// The error.
        err: std::io::Error,
    },
}

/// A mount option that sets (or clears) flags.
struct Flag {
    name: &'static str,
    clear: bool,
    flags: libc::c_ulong,
}

const fn set(name: &'static str, flags: libc::c_ulong) -> Flag {
    Flag {
        name,
        clear: false,
        flags,
    }
}

const fn clear(name: &'static str, flags: libc::c_ulong) -> Flag {
    Flag {
        name,
        clear: true,
        flags,
    }
}

/// The options mount(8) turns into flags, as containerd reads them.
const FLAGS: &[Flag] = &[
    clear("async", libc::MS_SYNCHRONOUS),
    clear("atime", libc::MS_NOATIME),
    set("bind", libc::MS_BIND),
    set("defaults", 0),
    clear("dev", libc::MS_NODEV),
    clear("diratime", libc::MS_NODIRATIME),
    set("dirsync", libc::MS_DIRSYNC),
    clear("exec", libc::MS_NOEXEC),
    set("mand", libc::MS_MANDLOCK),
    set("noatime", libc::MS_NOATIME),
    set("nodev", libc::MS_NODEV),
    set("nodiratime", libc::MS_NODIRATIME),
    set("noexec", libc::MS_NOEXEC),
    clear("nomand", libc::MS_MANDLOCK),
    clear("norelatime", libc::MS_RELATIME),
    clear("nostrictatime", libc::MS_STRICTATIME),
    set("nosuid", libc::MS_NOSUID),
    set("rbind", libc::MS_BIND | libc::MS_REC),
    set("relatime", libc::MS_RELATIME),
    set("remount", libc::MS_REMOUNT),
    set("ro", libc::MS_RDONLY),
    clear("rw", libc::MS_RDONLY),
    set("strictatime", libc::MS_STRICTATIME),
    clear("suid", libc::MS_NOSUID),
    set("sync", libc::MS_SYNCHRONOUS),
];

/// Propagation options, applied by a second mount(2).
const PROPAGATION: &[(&str, libc::c_ulong)] = &[
    ("private", libc::MS_PRIVATE),
    ("rprivate", libc::MS_PRIVATE | libc::MS_REC),
    ("shared", libc::MS_SHARED),
    ("rshared", libc::MS_SHARED | libc::MS_REC),
    ("slave", libc::MS_SLAVE),
    ("rslave", libc::MS_SLAVE | libc::MS_REC),
    ("unbindable", libc::MS_UNBINDABLE),
    ("runbindable", libc::MS_UNBINDABLE | libc::MS_REC),
];

/// Options split into flags, propagation and file-system data.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    flags: libc::c_ulong,
    propagation: libc::c_ulong,
    data: String,
}

fn parse(options: &[String]) -> Parsed {
    let mut flags = 0;
    let mut propagation = 0;
    let mut data = Vec::new();
    for o in options {
        if let Some(f) = FLAGS.iter().find(|f| f.name == o) {
            if f.clear {
                flags &= !f.flags;
            } else {
                flags |= f.flags;
            }
        } else if let Some((_, p)) = PROPAGATION.iter().find(|(n, _)| n == o) {
            propagation |= p;
        } else {
            data.push(o.as_str());
        }
    }
    Parsed {
        flags,
        propagation,
        data: data.join(","),
    }
}

fn cstr(s: &str) -> Result<CString, MountError> {
    CString::new(s).map_err(|_| MountError::Nul(s.to_owned()))
}

/// Mounts `source` (of type `fstype`, with mount(8)-style `options`) on
/// `target`.
pub fn mount(
    fstype: &str,
    source: &str,
    options: &[String],
    target: &Path,
) -> Result<(), MountError> {
    let p = parse(options);
    let page = 4096;
    if p.data.len() >= page {
        return Err(MountError::TooLong(p.data.len()));
    }
    let target_s = target.to_string_lossy().into_owned();
    let (src, tgt, ty, data) = (
        cstr(source)?,
        cstr(&target_s)?,
        cstr(fstype)?,
        cstr(&p.data)?,
    );
    let fail = |err| MountError::Mount {
        from: source.to_owned(),
        fstype: fstype.to_owned(),
        target: target_s.clone(),
        err,
    };
    let data_ptr = if p.data.is_empty() {
        std::ptr::null()
    } else {
        data.as_ptr().cast()
    };
    let ty_ptr = if fstype.is_empty() {
        std::ptr::null()
    } else {
        ty.as_ptr()
    };
    // SAFETY: valid NUL-terminated strings (or null where the kernel
    // takes none); mount(2) keeps no pointer.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty_ptr, p.flags, data_ptr) };
    if rc < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // A read-only bind mount takes a remount to be read-only.
    let bind_ro = libc::MS_BIND | libc::MS_RDONLY;
    if p.flags & bind_ro == bind_ro && p.flags & libc::MS_REMOUNT == 0 {
        // SAFETY: as above, with a null source, type and data.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                tgt.as_ptr(),
                std::ptr::null(),
                p.flags | libc::MS_REMOUNT,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            unmount(target);
            return Err(fail(err));
        }
    }
    if p.propagation != 0 {
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                tgt.as_ptr(),
                std::ptr::null(),
                p.propagation,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            unmount(target);
            return Err(fail(err));
        }
    }
    Ok(())
}

fn unmount(target: &Path) {
    if let Ok(t) = CString::new(target.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid NUL-terminated path; umount2 keeps no pointer.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Unmounts everything at or below `dir`, deepest first.
pub fn unmount_all(dir: &Path) {
    for m in rtv_runtime::share::mounts_under(dir) {
        let Ok(c) = CString::new(m.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated path; umount2 keeps no pointer.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } < 0 {
            tracing::warn!(
                "unmounting {}: {}",
                m.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let p = parse(&opts(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l1:/l2",
        ]));
        assert_eq!(p.flags, 0);
        assert_eq!(p.data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2");
        let p = parse(&opts(&["ro", "rbind", "nosuid", "rprivate"]));
        assert_eq!(
            p.flags,
            libc::MS_RDONLY | libc::MS_BIND | libc::MS_REC | libc::MS_NOSUID
        );
        assert_eq!(p.propagation, libc::MS_PRIVATE | libc::MS_REC);
        assert!(p.data.is_empty());
        assert_eq!(parse(&opts(&["ro", "rw"])).flags, 0);
    }

    /// A read-only bind mount is read-only, and goes away.
    #[test]
    fn read_only_bind_mounts() {
        let base = std::env::temp_dir().join(format!("rtv-shim-mount-{}", std::process::id()));
        let (src, dst) = (base.join("src"), base.join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        mount(
            "bind",
            &src.to_string_lossy(),
            &opts(&["ro", "rbind"]),
            &dst,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(dst.join("f")).unwrap(), "x");
        assert!(std::fs::write(dst.join("g"), "y").is_err());
        unmount_all(&dst);
        assert!(!dst.join("f").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
