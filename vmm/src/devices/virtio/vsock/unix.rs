//! The host side's Unix sockets: the listener at the configured path and
//! non-blocking connections to `<path>_<port>`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors setting up the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Something is already listening on the path.
    #[error("vsock socket {0}: already in use (something is listening on it)")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("vsock socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// The path is longer than a Unix socket address allows.
    #[error("vsock socket {0}: path too long for a Unix socket ({1} bytes, at most {max})", max = MAX_PATH_LEN)]
    TooLong(PathBuf, usize),
    /// Binding or inspecting the path failed.
    #[error("vsock socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Longest socket path (sun_path holds 108 bytes including the NUL).
pub const MAX_PATH_LEN: usize = 107;

/// The listening socket; its path is removed when it is dropped.
#[derive(Debug)]
pub struct UdsListener {
    listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
}

impl UdsListener {
    /// Listens at `path`. A socket file already there is replaced only if
    /// nothing listens on it (a leftover of a VMM that died); anything else
    /// at the path is an error.
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
        let io_err = |source| ListenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = path.as_os_str().len();
        if len > MAX_PATH_LEN {
            return Err(ListenError::TooLong(path.to_path_buf(), len));
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_socket() {
                    return Err(ListenError::NotASocket(path.to_path_buf()));
                }
                match UnixStream::connect(path) {
                    Ok(_) => return Err(ListenError::InUse(path.to_path_buf())),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        tracing::info!(path = %path.display(), "removing a stale vsock socket");
                        std::fs::remove_file(path).map_err(io_err)?;
                    }
                    Err(e) => return Err(io_err(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
        let this = Self {
            listener,
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
        };
        this.listener.set_nonblocking(true).map_err(io_err)?;
        Ok(this)
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The path it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsRawFd for UdsListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for UdsListener {
    fn drop(&mut self) {
        // Remove the path only if it is still our socket.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "cannot remove the vsock socket: {e}");
                }
            }
        }
    }
}

/// `<base>_<port>`: where a guest connection to host port `port` goes.
pub fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the Unix socket at `path` without blocking: a listener whose
/// backlog is full is a failure, not a wait.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is a plain C struct for which all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a usable Unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket that nothing else owns; the
    // stream closes it when dropped (also on the error path below).
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and
    // `len` does not exceed its size (checked against sun_path above).
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("rtv-uds-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn listener_refuses_live_sockets_and_replaces_stale_ones() {
        let path = temp("live");
        let first = UdsListener::bind(&path).unwrap();
        let err = UdsListener::bind(&path).unwrap_err();
        assert!(matches!(err, ListenError::InUse(_)), "{err}");
        // A stale socket (nothing listening) is replaced.
        let stale = UnixListener::bind(temp("stale")).unwrap();
        drop(stale);
        let again = UdsListener::bind(&temp("stale")).unwrap();
        drop(again);
        assert!(!temp("stale").exists(), "socket file left behind");
        drop(first);
        assert!(!path.exists(), "socket file left behind");
        // A regular file is never removed.
        std::fs::write(&path, b"data").unwrap();
        let err = UdsListener::bind(&path).unwrap_err();
        assert!(matches!(err, ListenError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        std::fs::remove_file(&path).unwrap();
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(matches!(
            UdsListener::bind(&long).unwrap_err(),
            ListenError::TooLong(..)
        ));
    }

    #[test]
    fn nonblocking_connect() {
        let path = temp("conn");
        let l = UdsListener::bind(&path).unwrap();
        let s = connect_nonblocking(&path).unwrap();
        let (_peer, _) = l.listener().accept().unwrap();
        drop(s);
        assert!(connect_nonblocking(&temp("absent")).is_err());
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 1024),
            PathBuf::from("/run/v.sock_1024")
        );
    }
}
