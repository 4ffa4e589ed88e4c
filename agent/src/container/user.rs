//! The identity of a container process: `process.user`, with a user name
//! looked up in the container's own `/etc/passwd` and `/etc/group`.
//!
//! The root file system is untrusted: its `/etc` may be a symbolic link to
//! the guest's `/etc` or to `../../..`, and its `passwd` may be a FIFO or a
//! device. The files are opened with `openat2(2)` and `RESOLVE_IN_ROOT`
//! relative to the root file system, so every path resolves as if it were
//! chrooted there; only regular files are read, and only their first
//! [`MAX_FILE`] bytes.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use oci_spec::runtime::User;

use super::SpecError;

/// The most of `/etc/passwd` or `/etc/group` that is read.
const MAX_FILE: u64 = 4 << 20;

/// The user, groups and umask a container process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The real, effective and saved user id.
    pub uid: u32,
    /// The real, effective and saved group id.
    pub gid: u32,
    /// The supplementary groups (`setgroups(2)`), in order, without
    /// duplicates.
    pub additional_gids: Vec<u32>,
    /// The umask to set, if any.
    pub umask: Option<u32>,
    /// The home directory of `uid` in the container's `/etc/passwd`, for
    /// `HOME` when the environment lacks it.
    pub home: Option<String>,
}

/// One line of `/etc/passwd`.
#[derive(Debug, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: Option<String>,
}

/// One line of `/etc/group`.
#[derive(Debug, PartialEq, Eq)]
struct GroupEntry {
    gid: u32,
    members: Vec<String>,
}

/// Resolves `process.user` against the container's root file system
/// `rootfs` (a path of the agent, e.g. `/run/rtv/share/c1/rootfs`).
///
/// `uid`, `gid`, `additionalGids` and `umask` are taken as given. If
/// `username` is set (an rtv extension to Linux specs, used by `rtv exec
/// --user name`), the name is looked up in the rootfs's `/etc/passwd` (uid,
/// gid, home) and the groups listing it as a member in `/etc/group` are
/// added to the additional gids; an unknown name is a [`SpecError`] on
/// `process.user.username`. `home` is the passwd home of the resulting uid,
/// if `/etc/passwd` has it.
///
/// Missing files are not errors (numeric ids need no passwd), and lines
/// that do not parse are skipped. A file that exists but cannot be read
/// safely (a symbolic-link loop, not a regular file, a kernel without
/// `openat2`) is an error only when a user name must be looked up in it.
pub fn resolve(rootfs: &Path, user: &User) -> Result<Identity, SpecError> {
    let mut id = Identity {
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: Vec::new(),
        umask: user.umask(),
        home: None,
    };
    for &gid in user.additional_gids().iter().flatten() {
        add_group(&mut id.additional_gids, gid);
    }

    let root = open_root(rootfs);
    let passwd = root
        .as_ref()
        .map_err(clone_error)
        .and_then(|root| read_in_root(root, "etc/passwd"));

    match user.username().as_deref() {
        Some(name) => {
            let field = "process.user.username";
            let unreadable = |e: std::io::Error| {
                SpecError::new(
                    field,
                    format!(
                        "cannot read /etc/passwd of the container to look up user {name:?}: {e}"
                    ),
                )
            };
            let text = passwd.map_err(unreadable)?.unwrap_or_default();
            let entry = parse_passwd(&text)
                .find(|e| e.name == name)
                .ok_or_else(|| {
                    SpecError::new(
                        field,
                        format!("user {name:?} not found in /etc/passwd of the container"),
                    )
                })?;
            id.uid = entry.uid;
            id.gid = entry.gid;
            id.home = entry.home;

            let group = root
                .as_ref()
                .map_err(clone_error)
                .and_then(|root| read_in_root(root, "etc/group"))
                .map_err(|e| {
                    SpecError::new(
                        field,
                        format!("cannot read /etc/group of the container to look up the groups of user {name:?}: {e}"),
                    )
                })?
                .unwrap_or_default();
            for g in parse_group(&group).filter(|g| g.members.iter().any(|m| m == name)) {
                add_group(&mut id.additional_gids, g.gid);
            }
        }
        None => {
            // Only for HOME: a passwd that cannot be read leaves it unset.
            if let Ok(Some(text)) = passwd {
                id.home = parse_passwd(&text)
                    .find(|e| e.uid == id.uid)
                    .and_then(|e| e.home);
            }
        }
    }
    Ok(id)
}

fn add_group(groups: &mut Vec<u32>, gid: u32) {
    if !groups.contains(&gid) {
        groups.push(gid);
    }
}

/// A copy of an I/O error (`std::io::Error` is not `Clone`).
fn clone_error(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(errno) => std::io::Error::from_raw_os_error(errno),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// An `O_PATH` descriptor of the root file system.
fn open_root(rootfs: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(rootfs)
}

/// The contents of `path` resolved inside `root` as if `root` were `/`
/// (`RESOLVE_IN_ROOT`, magic links refused); `None` if it does not exist.
/// Only a regular file is read, and at most [`MAX_FILE`] bytes of it;
/// invalid UTF-8 is replaced.
fn read_in_root(root: &File, path: &str) -> std::io::Result<Option<String>> {
    let file = match openat2_in_root(root, path) {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE).read_to_end(&mut bytes)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// `openat2(root, path, O_RDONLY | O_NONBLOCK, RESOLVE_IN_ROOT |
/// RESOLVE_NO_MAGICLINKS)`. `O_NONBLOCK` keeps a FIFO from blocking the
/// open; the caller refuses anything but a regular file.
fn openat2_in_root(root: &File, path: &str) -> std::io::Result<File> {
    let c_path = std::ffi::CString::new(path)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers; all-zero is valid (and required
    // for fields this code does not set).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and `size_of::<open_how>()`
    // bytes of `how`, both live for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd =
        libc::c_int::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The entries of an `/etc/passwd` (`name:password:uid:gid:gecos:home:shell`),
/// skipping comments and lines that do not parse.
fn parse_passwd(text: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    text.lines().filter_map(|line| {
        if line.trim().is_empty() || line.starts_with('#') {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let (name, uid, gid) = (fields.first()?, fields.get(2)?, fields.get(3)?);
        if name.is_empty() {
            return None;
        }
        Some(PasswdEntry {
            name: (*name).to_owned(),
            uid: uid.trim().parse().ok()?,
            gid: gid.trim().parse().ok()?,
            home: fields
                .get(5)
                .filter(|h| !h.is_empty())
                .map(|h| (*h).to_owned()),
        })
    })
}

/// The entries of an `/etc/group` (`name:password:gid:member,member`),
/// skipping comments and lines that do not parse.
fn parse_group(text: &str) -> impl Iterator<Item = GroupEntry> + '_ {
    text.lines().filter_map(|line| {
        if line.trim().is_empty() || line.starts_with('#') {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let gid = fields.get(2)?.trim().parse().ok()?;
        let members = fields
            .get(3)
            .map(|m| {
                m.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Some(GroupEntry { gid, members })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("rtv-agent-user-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment
broken line
bad:x:notanumber:1::/bad:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1001:Alice:/home/alice:/bin/bash
nohome:x:1002:1002::
";

    const GROUP: &str = "\
root:x:0:
wheel:x:10:root,alice
users:x:100:bob, alice
alice:x:1001:
bad:x:nope:alice
docker:x:999:bob
";

    fn rootfs(tag: &str, passwd: Option<&str>, group: Option<&str>) -> TempDir {
        let dir = TempDir::new(tag);
        std::fs::create_dir_all(dir.0.join("etc")).unwrap();
        if let Some(p) = passwd {
            std::fs::write(dir.0.join("etc/passwd"), p).unwrap();
        }
        if let Some(g) = group {
            std::fs::write(dir.0.join("etc/group"), g).unwrap();
        }
        dir
    }

    fn user(json: &str) -> User {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn username_resolves_to_ids_home_and_groups() {
        let root = rootfs("name", Some(PASSWD), Some(GROUP));
        let id = resolve(
            &root.0,
            &user(r#"{"uid": 5, "gid": 5, "additionalGids": [7, 10], "umask": 18, "username": "alice"}"#),
        )
        .unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![7, 10, 100],
                umask: Some(0o022),
                home: Some("/home/alice".into()),
            }
        );

        // No group file: no groups from it, still fine.
        let root = rootfs("nogroup", Some(PASSWD), None);
        let id = resolve(&root.0, &user(r#"{"username": "daemon"}"#)).unwrap();
        assert_eq!((id.uid, id.gid), (1, 1));
        assert_eq!(id.additional_gids, Vec::<u32>::new());
        assert_eq!(id.home.as_deref(), Some("/usr/sbin"));
        assert_eq!(id.umask, None);

        let id = resolve(&root.0, &user(r#"{"username": "nohome"}"#)).unwrap();
        assert_eq!((id.uid, id.home), (1002, None));
    }

    #[test]
    fn unknown_username_is_an_error() {
        let root = rootfs("unknown", Some(PASSWD), Some(GROUP));
        let err = resolve(&root.0, &user(r#"{"username": "nobody2"}"#)).unwrap_err();
        assert_eq!(err.field, "process.user.username");
        assert_eq!(
            err.message,
            "user \"nobody2\" not found in /etc/passwd of the container"
        );

        // Without a passwd at all, too.
        let root = rootfs("nopasswd", None, None);
        let err = resolve(&root.0, &user(r#"{"username": "root"}"#)).unwrap_err();
        assert_eq!(err.field, "process.user.username");
        assert!(err.message.contains("not found"), "{err}");
    }

    #[test]
    fn numeric_ids_need_no_passwd() {
        let root = rootfs("numeric", None, None);
        let id = resolve(
            &root.0,
            &user(r#"{"uid": 1000, "gid": 1000, "additionalGids": [1000, 10, 10]}"#),
        )
        .unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![1000, 10],
                umask: None,
                home: None,
            }
        );

        // No etc directory at all.
        let empty = TempDir::new("empty");
        assert_eq!(resolve(&empty.0, &user(r#"{"uid": 3}"#)).unwrap().uid, 3);

        // With a passwd, the uid's home is found.
        let root = rootfs("numeric-home", Some(PASSWD), None);
        let id = resolve(&root.0, &user(r#"{"uid": 1000, "gid": 4}"#)).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 4));
        assert_eq!(id.home.as_deref(), Some("/home/alice"));
    }

    #[test]
    fn etc_symlinks_stay_inside_the_rootfs() {
        // etc -> /etc (absolute): resolved in the root it points at itself,
        // a loop; never the agent's /etc/passwd, whose root this would be.
        let root = TempDir::new("abs");
        std::os::unix::fs::symlink("/etc", root.0.join("etc")).unwrap();
        let err = resolve(&root.0, &user(r#"{"username": "root"}"#)).unwrap_err();
        assert_eq!(err.field, "process.user.username");
        assert!(err.message.contains("cannot read"), "{err}");
        // Numeric ids still work, without a home.
        let id = resolve(&root.0, &user(r#"{"uid": 0}"#)).unwrap();
        assert_eq!((id.uid, id.home), (0, None));

        // etc -> /realetc: the rootfs's /realetc, not the agent's.
        let root = TempDir::new("abs-inside");
        std::fs::create_dir(root.0.join("realetc")).unwrap();
        std::fs::write(
            root.0.join("realetc/passwd"),
            "root:x:4242:4343:inside:/inside:/bin/sh\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/realetc", root.0.join("etc")).unwrap();
        let id = resolve(&root.0, &user(r#"{"username": "root"}"#)).unwrap();
        assert_eq!((id.uid, id.gid), (4242, 4343));
        assert_eq!(id.home.as_deref(), Some("/inside"));

        // etc -> ../../..: ".." stops at the rootfs, so etc/passwd is the
        // rootfs's /passwd.
        let root = TempDir::new("rel");
        std::fs::write(root.0.join("passwd"), "root:x:77:78::/top:\n").unwrap();
        std::os::unix::fs::symlink("../../..", root.0.join("etc")).unwrap();
        let id = resolve(&root.0, &user(r#"{"username": "root"}"#)).unwrap();
        assert_eq!((id.uid, id.gid), (77, 78));

        // passwd -> /etc/passwd inside an otherwise normal etc.
        let root = TempDir::new("file-link");
        std::fs::create_dir(root.0.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.0.join("etc/passwd")).unwrap();
        let err = resolve(&root.0, &user(r#"{"username": "root"}"#)).unwrap_err();
        assert_eq!(err.field, "process.user.username");
        let id = resolve(&root.0, &user(r#"{"uid": 0}"#)).unwrap();
        assert_eq!(id.home, None);
    }

    #[test]
    fn a_fifo_is_not_read() {
        let root = rootfs("fifo", None, None);
        let path = std::ffi::CString::new(
            root.0
                .join("etc/passwd")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
        let err = resolve(&root.0, &user(r#"{"username": "root"}"#)).unwrap_err();
        assert!(err.message.contains("not a regular file"), "{err}");
        assert_eq!(resolve(&root.0, &user(r#"{"uid": 0}"#)).unwrap().home, None);
    }

    #[test]
    fn parsers_skip_bad_lines() {
        let names: Vec<String> = parse_passwd(PASSWD).map(|e| e.name).collect();
        assert_eq!(names, ["root", "daemon", "alice", "nohome"]);
        let groups: Vec<(u32, Vec<String>)> =
            parse_group(GROUP).map(|g| (g.gid, g.members)).collect();
        assert_eq!(groups[1], (10, vec!["root".to_owned(), "alice".to_owned()]));
        assert_eq!(groups[2], (100, vec!["bob".to_owned(), "alice".to_owned()]));
        assert_eq!(groups.len(), 5);
    }
}
