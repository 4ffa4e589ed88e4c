//! Snapshots of a running VM, and what is needed to restore one.
//!
//! A snapshot is a directory:
//!
//! | file | content |
//! |---|---|
//! | `state.json` | the manifest ([`Manifest`]): `format_version`, the VMM's version and build id, memory size, vCPU count, RAM layout, devices, and the size and sha256 of every other file (of `memory.bin`: of its non-zero pages); written last |
//! | `memory.bin` | guest RAM, the regions one after the other, sparse (zero pages are holes) |
//! | `vm.json` | [`VmState`]: PIC master and slave, IOAPIC, PIT, kvmclock |
//! | `vcpu-N.json` | [`cpu::VcpuState`] of vCPU N |
//! | `devices.json` | [`DevicesState`]: the UART; each virtio device's slot, configuration (without host-side resources) and virtio-mmio transport with its queues ([`VirtioSnapshot`]: vsock; virtio-fs while unmounted) |
//!
//! [`load`] checks everything before anything is built from it: a missing,
//! truncated or corrupted file, another format version or VMM build, a
//! memory size or vCPU count that does not match, each fail with an error
//! that names the file and the problem.

pub mod cpu;
pub mod memory;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

pub use crate::device_manager::{DeviceConfig, VirtioSnapshot};
use crate::devices::serial::SerialSnapshot;
use cpu::VcpuState;

/// The snapshot format this VMM writes and reads. Version 2: the devices
/// are the device manager's ([`VirtioSnapshot`]: slot, configuration and
/// transport of each). Version 3: the memory file's digest covers its
/// non-zero pages ([`memory::sparse_sha256_file`]). Older snapshots are
/// refused; a template cache makes its templates again.
pub const FORMAT_VERSION: u32 = 3;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "state.json";
/// Guest memory's file name.
pub const MEMORY_FILE: &str = "memory.bin";
/// The VM state's file name.
pub const VM_FILE: &str = "vm.json";
/// The devices' file name.
pub const DEVICES_FILE: &str = "devices.json";

/// vCPU `index`'s file name.
pub fn vcpu_file(index: usize) -> String {
    format!("vcpu-{index}.json")
}

/// This VMM's version.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// An id of this VMM's build: a hash of its sources and lock file, taken at
/// build time. Snapshots are restored only by the build that wrote them.
pub fn build_id() -> &'static str {
    env!("RTV_VMM_BUILD_ID")
}

/// Snapshot and restore errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot file is missing, unreadable, damaged or does not match.
    #[error("snapshot file {path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The snapshot does not fit what the caller asked for.
    #[error("snapshot {dir}: {problem}")]
    Mismatch {
        /// The snapshot directory.
        dir: PathBuf,
        /// What does not match.
        problem: String,
    },
    /// The vCPUs could not be paused or saved.
    #[error("pausing the VM: {0}")]
    Pause(String),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being saved or set.
        what: String,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// A vCPU's state could not be saved or set.
    #[error("vCPU {index}: {source}")]
    Vcpu {
        /// The vCPU.
        index: usize,
        /// Why.
        source: cpu::Error,
    },
    /// A device could not be rebuilt from its state.
    #[error("device {0}")]
    Device(String),
    /// The VM is not running (it ended, or never ran).
    #[error("the VM is not running")]
    NotRunning,
}

impl Error {
    fn file(path: &Path, problem: impl Into<String>) -> Self {
        Error::File {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm {
        what: what.to_string(),
        source,
    }
}

/// The VMM that wrote a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmId {
    /// Crate version.
    pub version: String,
    /// Build id ([`build_id`]).
    pub build_id: String,
}

/// One RAM region: where it sits in the guest; the file holds the regions
/// in this order.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Size and sha256 of a snapshot file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Length in bytes (the logical length, for the sparse memory file).
    pub size: u64,
    /// sha256 of the content, lowercase hex.
    pub sha256: String,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The VMM that wrote it.
    pub vmm: VmmId,
    /// When, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// RAM layout (and the memory file's layout).
    pub ram_regions: Vec<RamRegion>,
    /// The virtio devices, in slot order, without their host-side
    /// resources (`{"kind": "vsock", "guest_cid": 3}`).
    pub devices: Vec<DeviceConfig>,
    /// Every other file of the snapshot.
    pub files: BTreeMap<String, FileEntry>,
}

/// The VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the irqchips, PIT and clock (the vCPUs must be paused).
    pub fn save(fd: &VmFd) -> Result<Self, Error> {
        let chip = |id| -> Result<kvm_irqchip, Error> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c).map_err(kvm("reading the irqchip"))?;
            Ok(c)
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kvm("reading the PIT"))?,
            clock: fd.get_clock().map_err(kvm("reading kvmclock"))?,
        })
    }

    /// Sets the irqchips and PIT (the clock separately, last: [`Self::restore_clock`]).
    pub fn restore_devices(&self, fd: &VmFd) -> Result<(), Error> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(kvm("setting the irqchip"))?;
        }
        fd.set_pit2(&self.pit).map_err(kvm("setting the PIT"))
    }

    /// Sets kvmclock: the guest's clock goes on from the saved value.
    pub fn restore_clock(&self, fd: &VmFd) -> Result<(), Error> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(kvm("setting kvmclock"))
    }
}

/// Every device's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialSnapshot,
    /// The virtio devices in slot order (the device manager's).
    pub virtio: Vec<VirtioSnapshot>,
}

/// Everything a snapshot holds but guest memory.
pub struct Parts<'a> {
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Guest memory.
    pub memory: &'a vm_memory::GuestMemoryMmap,
    /// The vCPUs, in order.
    pub vcpus: &'a [VcpuState],
    /// The VM.
    pub vm: &'a VmState,
    /// The devices.
    pub devices: &'a DevicesState,
}

/// What a snapshot took.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// Where it is.
    pub dir: PathBuf,
    /// How long the vCPUs were paused for it (from the pause request to
    /// the last file written).
    pub paused_for: Duration,
    /// Guest RAM size (the memory file's logical size).
    pub memory_size: u64,
    /// Bytes of guest RAM actually written (non-zero pages).
    pub memory_data: u64,
    /// Space the snapshot's files take on disk.
    pub disk_usage: u64,
}

fn write_json<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
    files: &mut BTreeMap<String, FileEntry>,
) -> Result<(), Error> {
    let path = dir.join(name);
    let bytes =
        serde_json::to_vec(value).map_err(|e| Error::file(&path, format!("cannot encode: {e}")))?;
    std::fs::write(&path, &bytes).map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
    use sha2::Digest;
    files.insert(
        name.to_string(),
        FileEntry {
            size: bytes.len() as u64,
            sha256: memory::hex(&sha2::Sha256::digest(&bytes)),
        },
    );
    Ok(())
}

/// Space the files in `dir` take on disk.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Writes a snapshot into `dir` (created if needed; a snapshot already
/// there is replaced). The manifest comes last, so a snapshot cut short
/// has none and is refused.
pub fn write(dir: &Path, parts: &Parts<'_>) -> Result<(u64, u64), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create the directory: {e}")))?;
    let manifest_path = dir.join(MANIFEST_FILE);
    match std::fs::remove_file(&manifest_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::file(&manifest_path, format!("cannot replace: {e}"))),
    }
    let mut files = BTreeMap::new();
    let mem_path = dir.join(MEMORY_FILE);
    let written = memory::write(parts.memory, &mem_path)
        .map_err(|e| Error::file(&mem_path, format!("cannot write: {e}")))?;
    files.insert(
        MEMORY_FILE.to_string(),
        FileEntry {
            size: written.size,
            sha256: written.sha256.clone(),
        },
    );
    write_json(dir, VM_FILE, parts.vm, &mut files)?;
    write_json(dir, DEVICES_FILE, parts.devices, &mut files)?;
    for (index, state) in parts.vcpus.iter().enumerate() {
        write_json(dir, &vcpu_file(index), state, &mut files)?;
    }
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        vmm: VmmId {
            version: VMM_VERSION.to_string(),
            build_id: build_id().to_string(),
        },
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        mem_size_mib: parts.mem_size_mib,
        vcpus: parts.vcpus.len() as u8,
        ram_regions: parts
            .memory
            .iter()
            .map(|r| RamRegion {
                guest_addr: vm_memory::Address::raw_value(&r.start_addr()),
                size: r.len(),
            })
            .collect(),
        devices: parts
            .devices
            .virtio
            .iter()
            .map(|v| v.device.clone())
            .collect(),
        files,
    };
    let bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::file(&manifest_path, format!("cannot encode: {e}")))?;
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    std::fs::write(&tmp, &bytes).map_err(|e| Error::file(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, &manifest_path)
        .map_err(|e| Error::file(&manifest_path, format!("cannot write: {e}")))?;
    Ok((written.size, written.data_bytes))
}

/// A checked snapshot, ready to be built into a VM.
#[derive(Debug)]
pub struct Loaded {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The VM state.
    pub vm: VmState,
    /// The vCPUs, in order.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DevicesState,
    /// The memory file (checked).
    pub memory_path: PathBuf,
}

#[derive(Deserialize)]
struct VersionOnly {
    format_version: u32,
}

fn read_checked(dir: &Path, manifest: &Manifest, name: &str) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    let Some(entry) = manifest.files.get(name) else {
        return Err(Error::file(
            &dir.join(MANIFEST_FILE),
            format!("does not list {name}"),
        ));
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::file(&path, "missing"))
        }
        Err(e) => return Err(Error::file(&path, format!("cannot read: {e}"))),
    };
    if meta.len() != entry.size {
        let how = if meta.len() < entry.size {
            "truncated"
        } else {
            "too long"
        };
        return Err(Error::file(
            &path,
            format!(
                "{how}: {} bytes, the manifest says {}",
                meta.len(),
                entry.size
            ),
        ));
    }
    let digest = if name == MEMORY_FILE {
        memory::sparse_sha256_file(&path)
    } else {
        memory::sha256_file(&path)
    };
    let (_, sha) = digest.map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    if sha != entry.sha256 {
        return Err(Error::file(
            &path,
            format!(
                "corrupted: sha256 {sha}, the manifest says {}",
                entry.sha256
            ),
        ));
    }
    Ok(path)
}

fn read_json<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    manifest: &Manifest,
    name: &str,
) -> Result<T, Error> {
    let path = read_checked(dir, manifest, name)?;
    let bytes =
        std::fs::read(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::file(&path, format!("not valid: {e}")))
}

/// Reads and checks the snapshot in `dir`: the manifest's version and VMM
/// build, every file's presence, size and sha256, and that memory size and
/// vCPU count agree across the files.
pub fn load(dir: &Path) -> Result<Loaded, Error> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::file(
                &manifest_path,
                "missing (not a snapshot, or one that was not finished)",
            ))
        }
        Err(e) => return Err(Error::file(&manifest_path, format!("cannot read: {e}"))),
    };
    let version: VersionOnly = serde_json::from_slice(&text)
        .map_err(|e| Error::file(&manifest_path, format!("not a snapshot manifest: {e}")))?;
    if version.format_version != FORMAT_VERSION {
        let by = if version.format_version < FORMAT_VERSION {
            "an older"
        } else {
            "a newer"
        };
        return Err(Error::file(
            &manifest_path,
            format!(
                "format_version {}, this rtv-vmm reads version {FORMAT_VERSION}: the snapshot was written by {by} rtv-vmm; make it again",
                version.format_version
            ),
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| Error::file(&manifest_path, format!("not a valid manifest: {e}")))?;
    if manifest.vmm.version != VMM_VERSION || manifest.vmm.build_id != build_id() {
        return Err(Error::file(
            &manifest_path,
            format!(
                "written by rtv-vmm {} (build {}), this is {VMM_VERSION} (build {}); snapshots are restored only by the build that wrote them",
                manifest.vmm.version,
                manifest.vmm.build_id,
                build_id()
            ),
        ));
    }
    let ram: u64 = manifest.ram_regions.iter().map(|r| r.size).sum();
    if ram != manifest.mem_size_mib << 20 {
        return Err(Error::file(
            &manifest_path,
            format!(
                "memory size mismatch: RAM regions add up to {ram} bytes, mem_size_mib is {}",
                manifest.mem_size_mib
            ),
        ));
    }
    if let Some(entry) = manifest.files.get(MEMORY_FILE) {
        if entry.size != ram {
            return Err(Error::file(
                &manifest_path,
                format!(
                    "memory size mismatch: {MEMORY_FILE} is listed with {} bytes, the guest has {ram}",
                    entry.size
                ),
            ));
        }
    }
    let vcpu_files = manifest
        .files
        .keys()
        .filter(|k| k.starts_with("vcpu-"))
        .count();
    if manifest.vcpus == 0 || vcpu_files != usize::from(manifest.vcpus) {
        return Err(Error::file(
            &manifest_path,
            format!(
                "vCPU count mismatch: vcpus is {}, {vcpu_files} vCPU state files are listed",
                manifest.vcpus
            ),
        ));
    }
    let memory_path = read_checked(dir, &manifest, MEMORY_FILE)?;
    let vm: VmState = read_json(dir, &manifest, VM_FILE)?;
    let devices: DevicesState = read_json(dir, &manifest, DEVICES_FILE)?;
    let mut vcpus = Vec::with_capacity(usize::from(manifest.vcpus));
    for index in 0..usize::from(manifest.vcpus) {
        let state: VcpuState = read_json(dir, &manifest, &vcpu_file(index))?;
        if usize::from(state.index) != index {
            return Err(Error::file(
                &dir.join(vcpu_file(index)),
                format!("holds vCPU {}", state.index),
            ));
        }
        vcpus.push(state);
    }
    let listed: Vec<DeviceConfig> = devices.virtio.iter().map(|v| v.device.clone()).collect();
    if listed != manifest.devices {
        return Err(Error::file(
            &dir.join(DEVICES_FILE),
            "its devices differ from the manifest's",
        ));
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        manifest,
        vm,
        vcpus,
        devices,
        memory_path,
    })
}
