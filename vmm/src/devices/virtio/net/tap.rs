//! The host side of virtio-net: a tap file descriptor opened by someone
//! else (the runtime, or whoever started `rtv-vmm`) with `IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`.
//!
//! Ownership: a [`super::NetConfig`] carries the fd as a plain number (so
//! the configuration stays `Clone`/`Eq`/serde like every other device
//! configuration). Nothing here ever closes that number: [`Tap::open`]
//! checks it and *duplicates* it (`F_DUPFD_CLOEXEC`), and the device owns
//! and closes its duplicate. The caller keeps the fd it passed and closes it
//! when it likes. The duplicate shares the open file description, so the
//! non-blocking mode and the vnet header size the device sets are seen
//! through the original fd too.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of the virtio-net header on every frame both ways
/// (`virtio_net_hdr_v1`: the legacy 10 bytes and `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Why a file descriptor cannot be the device's tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The number is not an open file descriptor of this process.
    #[error("fd {fd} is not an open file descriptor")]
    NotOpen {
        /// The fd.
        fd: RawFd,
    },
    /// The fd is open but is not an attached tun/tap device.
    #[error("fd {fd} is not a tap device (TUNGETIFF: {source})")]
    NotTap {
        /// The fd.
        fd: RawFd,
        /// What TUNGETIFF said.
        source: io::Error,
    },
    /// A tun/tap device without the flags the device needs.
    #[error("fd {fd} is tun/tap device {name}, but {problem}")]
    Flags {
        /// The fd.
        fd: RawFd,
        /// The interface name.
        name: String,
        /// What is missing.
        problem: &'static str,
    },
    /// Setting the tap up failed.
    #[error("tap {name} (fd {fd}): {what}: {source}")]
    Setup {
        /// The fd.
        fd: RawFd,
        /// The interface name.
        name: String,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

/// What `TUNGETIFF` says about a tap fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapInfo {
    /// The interface name.
    pub name: String,
    /// The `IFF_*` flags the fd was attached with.
    pub flags: i32,
}

fn ifreq_zeroed() -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct (a name array and a union of plain
    // C types and a raw pointer); all-zero bytes are a valid value of it.
    unsafe { std::mem::zeroed() }
}

fn name_of(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Checks that `fd` is an open tap with `IFF_TAP`, `IFF_NO_PI` and
/// `IFF_VNET_HDR`, without taking it or changing it.
pub fn inspect(fd: RawFd) -> Result<TapInfo, TapError> {
    if fd < 0 {
        return Err(TapError::NotOpen { fd });
    }
    // SAFETY: F_GETFD on any number only reads the descriptor table entry;
    // no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(TapError::NotOpen { fd });
    }
    let mut ifr = ifreq_zeroed();
    // SAFETY: TUNGETIFF writes at most a `struct ifreq` to the pointer,
    // which points to one we own; other drivers reject the request number
    // (ENOTTY) without touching memory.
    let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr as *mut libc::ifreq) };
    if rc < 0 {
        return Err(TapError::NotTap {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: TUNGETIFF filled in ifr_flags, the union member it sets; a
    // c_short has no invalid values.
    let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
    let name = name_of(&ifr);
    let problem = if flags & libc::IFF_TAP == 0 {
        Some("it is a tun (layer 3) device, not a tap (IFF_TAP)")
    } else if flags & libc::IFF_NO_PI == 0 {
        Some("it was opened without IFF_NO_PI")
    } else if flags & libc::IFF_VNET_HDR == 0 {
        Some("it was opened without IFF_VNET_HDR")
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(TapError::Flags { fd, name, problem });
    }
    Ok(TapInfo { name, flags })
}

/// The device's own duplicate of a tap fd, non-blocking, with 12-byte
/// vnet headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Checks `fd` ([`inspect`]), duplicates it, makes it non-blocking and
    /// sets its vnet header size to [`VNET_HDR_LEN`]. `fd` stays the
    /// caller's.
    pub fn open(fd: RawFd) -> Result<Self, TapError> {
        let info = inspect(fd)?;
        let setup = |what: &'static str| TapError::Setup {
            fd,
            name: info.name.clone(),
            what,
            source: io::Error::last_os_error(),
        };
        // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor and passes no
        // memory.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(setup("duplicating the fd"));
        }
        // SAFETY: `dup` was just created by F_DUPFD_CLOEXEC and nothing else
        // owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let tap = Self {
            file: File::from(owned),
            name: info.name.clone(),
        };
        tap.set_nonblocking().map_err(|source| TapError::Setup {
            fd,
            name: info.name.clone(),
            what: "setting O_NONBLOCK",
            source,
        })?;
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int from the pointer, which
        // points to a live local.
        let rc = unsafe {
            libc::ioctl(
                tap.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &size as *const libc::c_int,
            )
        };
        if rc < 0 {
            return Err(setup("TUNSETVNETHDRSZ 12"));
        }
        Ok(tap)
    }

    /// Wraps an fd that is not checked as a tap (tests drive the device's
    /// back-pressure paths over a socket pair with it).
    #[cfg(test)]
    pub(crate) fn unchecked(fd: OwnedFd, name: &str) -> Self {
        let tap = Self {
            file: File::from(fd),
            name: name.to_string(),
        };
        tap.set_nonblocking().expect("O_NONBLOCK");
        tap
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.as_raw_fd();
        // SAFETY: F_GETFL on our own fd; no memory passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_SETFL on our own fd; no memory passed.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the reader (the guest) takes
    /// (`TUN_F_*`): what it may put in the frames it hands the device.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // passed.
        let rc = unsafe {
            libc::ioctl(
                self.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (vnet header first) into `buf`.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header first).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The `TUN_F_*` offloads for the guest's acked virtio-net `features`: the
/// kernel may hand the tap reader checksum-partial frames only if the guest
/// took GUEST_CSUM, and TSO/UFO only with it (the kernel refuses TSO without
/// `TUN_F_CSUM`).
pub fn offload_flags(features: u64) -> u32 {
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    };
    let has = |bit: u32| features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}
