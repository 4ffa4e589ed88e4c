//! Containers inside the guest: an OCI runtime spec becomes a process in its
//! own mount, pid, uts and ipc namespaces, on a root file system from the
//! sandbox's share, in its own cgroup.


// Wired into the server module by module while containers land.
#![allow(dead_code)]
pub mod caps;
pub mod cgroup;
pub mod rlimit;
pub mod seccomp;
pub mod user;

/// A spec field the agent cannot honour, named by its JSON path
/// (`process.capabilities.bounding`, `mounts[3].source`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The field's path in config.json.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SpecError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The errno of a failed system call, for code that runs in a freshly
/// forked child and may not allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's errno.
    pub fn last() -> Self {
        Self(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::io::Error::from_raw_os_error(self.0).fmt(f)
    }
}
