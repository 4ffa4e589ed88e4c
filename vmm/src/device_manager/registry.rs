//! The kinds of virtio device rtv-vmm builds: the one place a device kind
//! is registered (see the [module above](super) for the steps).

use serde::{Deserialize, Serialize};

use super::VirtioHandle;
use crate::devices::virtio::fs::{FsConfig, FsError, VirtioFs};
use crate::devices::virtio::net::{Net, NetConfig, NetError};
use crate::devices::virtio::vsock::{self, Vsock, VsockConfig};
use crate::vm::RestoreConfig;

/// A virtio device of a VM: its kind and how it is set up.
///
/// A snapshot saves each device as this, without the host-side resources
/// (the configuration types' `#[serde(skip)]` fields: sockets,
/// directories), which a restored VM is given anew ([`crate::RestoreConfig`]).
/// In JSON: `{"kind": "vsock", "guest_cid": 3}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceConfig {
    /// virtio-vsock: hybrid vsock over a Unix socket
    /// ([`crate::devices::virtio::vsock`]).
    Vsock(VsockConfig),
    /// virtio-fs: a host directory served in the VMM
    /// ([`crate::devices::virtio::fs`]).
    Fs(FsConfig),
    /// virtio-net over a tap ([`crate::devices::virtio::net`]); in JSON
    /// `{"kind": "net", "mac": [2, 114, 116, 118, 0, 1], "mtu": 1500}`.
    Net(NetConfig),
}

impl DeviceConfig {
    /// The device's name in logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vsock(_) => "vsock",
            Self::Fs(_) => "virtio-fs",
            Self::Net(_) => "virtio-net",
        }
    }

    /// Checks the configuration without creating anything.
    pub fn validate(&self) -> Result<(), DeviceError> {
        match self {
            Self::Vsock(c) => c.validate()?,
            Self::Fs(c) => c.validate()?,
            Self::Net(c) => c.validate()?,
        }
        Ok(())
    }

    /// Creates the device (a vsock device listens on its socket from here).
    pub(crate) fn build(&self) -> Result<VirtioHandle, DeviceError> {
        Ok(match self {
            Self::Vsock(c) => VirtioHandle::new(Vsock::new(c)?),
            Self::Fs(c) => VirtioHandle::new(VirtioFs::new(c)?),
            Self::Net(c) => VirtioHandle::new(Net::new(c)?),
        })
    }

    /// The device a restore rebuilds from this saved one: what the snapshot
    /// kept, with the host-side resources `restore` gives; a missing one is
    /// refused, naming its `rtv-vmm` flag.
    pub(crate) fn restored(&self, restore: &RestoreConfig) -> Result<Self, String> {
        match self {
            Self::Vsock(saved) => {
                let Some(uds) = &restore.vsock_uds else {
                    return Err(
                        "the snapshot has a vsock device: give it a socket path (--vsock-uds)"
                            .into(),
                    );
                };
                Ok(Self::Vsock(VsockConfig {
                    guest_cid: restore.vsock_cid.unwrap_or(saved.guest_cid),
                    uds_path: uds.clone(),
                }))
            }
            Self::Fs(saved) => {
                let Some(dir) = &restore.shared_dir else {
                    return Err(
                        "the snapshot has a virtio-fs device: give it a directory to share (--shared-dir)"
                            .into(),
                    );
                };
                Ok(Self::Fs(FsConfig {
                    shared_dir: dir.clone(),
                    tag: saved.tag.clone(),
                }))
            }
            // A NIC restored without a tap keeps its place, link down.
            Self::Net(saved) => Ok(Self::Net(NetConfig {
                tap_fd: restore.net_tap_fd,
                ..saved.clone()
            })),
        }
    }
}

/// Why a device's configuration is refused, or the device cannot be
/// created: each kind's errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The vsock configuration is not usable.
    #[error("vsock: {0}")]
    VsockConfig(#[from] vsock::ConfigError),
    /// The vsock device's socket cannot be set up.
    #[error(transparent)]
    VsockListen(#[from] vsock::ListenError),
    /// The virtio-fs device cannot be set up.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The virtio-net configuration is not usable, or its tap cannot be set
    /// up.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Refuses a host-side resource `restore` gives for a kind of device the
/// snapshot (whose devices are `saved`) does not have.
pub(super) fn refuse_unused(restore: &RestoreConfig, saved: &[DeviceConfig]) -> Result<(), String> {
    let has = |kind: fn(&DeviceConfig) -> bool| saved.iter().any(kind);
    if restore.vsock_uds.is_some() && !has(|d| matches!(d, DeviceConfig::Vsock(_))) {
        return Err("the snapshot has no vsock device; a socket path was given".into());
    }
    if restore.shared_dir.is_some() && !has(|d| matches!(d, DeviceConfig::Fs(_))) {
        return Err(
            "the snapshot has no virtio-fs device; a directory to share (--shared-dir) was given"
                .into(),
        );
    }
    if restore.net_tap_fd.is_some() && !has(|d| matches!(d, DeviceConfig::Net(_))) {
        return Err("the snapshot has no virtio-net device; a tap (--net-tap-fd) was given".into());
    }
    Ok(())
}
