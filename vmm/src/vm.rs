//! Assembles a micro-VM: KVM VM and vCPUs, guest memory, interrupt
//! controllers, legacy devices; then runs it until the guest stops.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{self, EBDA_START};
use crate::arch::regs::{self, BootEntry};
use crate::arch::{cpuid, mptable};
use crate::devices::bus::{self, Bus};
use crate::devices::reset::{ResetDevice, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleSink, LineHook, SerialDevice, SerialSnapshot, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use crate::devices::virtio::fs::{FsConfig, FsError, VirtioFs};
use crate::devices::virtio::mmio::{
    self as virtio_mmio, MmioState, MmioTransport, MMIO_WINDOW_SIZE,
};
use crate::devices::virtio::vsock::{self, Vsock, VsockConfig};
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitNotifier, VmExit};
use crate::signals;
use crate::snapshot::cpu::SaveParams;
use crate::snapshot::{self, DeviceEntry, DevicesState, SnapshotInfo, VirtioSnapshot, VmState};
use crate::vcpu::{self, Vcpu, VcpuHandle};

/// The KVM API version every KVM since Linux 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// Smallest guest rtv accepts.
pub const MIN_MEM_MIB: u64 = 16;

/// The machine's shape.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// A virtio-vsock device (hybrid vsock over a Unix socket), if any.
    pub vsock: Option<VsockConfig>,
    /// A virtio-fs device sharing a host directory, if any (placed after
    /// the vsock device). A VM with one can be snapshotted only while the
    /// guest has sent the device no FUSE request (has not mounted it).
    pub fs: Option<FsConfig>,
    /// Stop the VM cleanly on SIGTERM and SIGINT ([`VmExit::Signal`]).
    /// [`Vm::run`] blocks them in its thread (so in the vCPU threads it
    /// starts) and reads them from a signalfd; a process should call
    /// [`signals::block_stop_signals`] first thing, before any other thread
    /// exists.
    pub stop_on_signals: bool,
    /// PVM accommodations in the machine itself: the guest is not offered
    /// KVM's paravirtual IPIs and scheduler yield (their hypercalls do not
    /// work in PVM native mode; with them a second vCPU never comes up).
    pub pvm: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            mem_size_mib: 128,
            vcpus: 1,
            kvm_device: PathBuf::from("/dev/kvm"),
            vsock: None,
            fs: None,
            stop_on_signals: false,
            pvm: false,
        }
    }
}

/// First GSI given to virtio-mmio devices (after COM1's 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Where the `index`th virtio-mmio device sits: its window base and GSI.
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    )
}

/// The `virtio_mmio.device=` kernel command-line entries for the devices
/// `config` asks for, in the order [`Vm::new`] places them.
pub fn virtio_cmdline_entries(config: &MachineConfig) -> Vec<String> {
    let count = usize::from(config.vsock.is_some()) + usize::from(config.fs.is_some());
    (0..count)
        .map(|i| {
            let (base, irq) = virtio_slot(i);
            format!(
                "virtio_mmio.device={}K@{base:#x}:{irq}",
                MMIO_WINDOW_SIZE / 1024
            )
        })
        .collect()
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM device cannot be opened.
    #[error("cannot open the KVM device {path}: {source}")]
    KvmOpen {
        /// The device path.
        path: PathBuf,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// KVM reports an API version other than 12.
    #[error("KVM at {path} reports API version {version}; rtv needs {KVM_API_VERSION}")]
    KvmApi {
        /// The device path.
        path: PathBuf,
        /// The version found.
        version: i32,
    },
    /// A KVM capability rtv depends on is missing.
    #[error("KVM lacks the {0} capability")]
    KvmCap(&'static str),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: kvm_ioctls::Error,
    },
    /// The requested memory size is not usable.
    #[error("guest memory of {mib} MiB: {reason}")]
    MemorySize {
        /// The size asked for.
        mib: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The requested vCPU count is not usable.
    #[error("{count} vCPUs: {reason}")]
    VcpuCount {
        /// The count asked for.
        count: u8,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing to guest memory failed.
    #[error("writing {what} to guest memory: {source}")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// Why it failed.
        source: vm_memory::GuestMemoryError,
    },
    /// Setting up a vCPU failed.
    #[error("vCPU setup: {0}")]
    VcpuSetup(#[from] regs::Error),
    /// Placing a device failed.
    #[error("device setup: {0}")]
    Bus(#[from] bus::Error),
    /// The MP table cannot be built.
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::Error),
    /// An OS resource (eventfd, thread, epoll) could not be had.
    #[error("{what}: {source}")]
    Io {
        /// What was being created.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(#[from] event_manager::Error),
    /// The vsock configuration is not usable.
    #[error("vsock: {0}")]
    VsockConfig(#[from] vsock::ConfigError),
    /// The vsock device's socket cannot be set up.
    #[error(transparent)]
    VsockListen(#[from] vsock::ListenError),
    /// The virtio-fs device cannot be set up.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// No room left for another virtio device.
    #[error("too many virtio devices (at most {0})")]
    TooManyDevices(usize),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Total host memory in MiB, from /proc/meminfo.
fn host_mem_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks a machine shape before anything is created.
pub fn validate(config: &MachineConfig) -> Result<(), Error> {
    let mib = config.mem_size_mib;
    if mib < MIN_MEM_MIB {
        return Err(Error::MemorySize {
            mib,
            reason: format!("below the minimum of {MIN_MEM_MIB} MiB"),
        });
    }
    if let Some(host) = host_mem_mib() {
        if mib > host {
            return Err(Error::MemorySize {
                mib,
                reason: format!("more than the host's {host} MiB of memory"),
            });
        }
    }
    if config.vcpus == 0 || usize::from(config.vcpus) > mptable::max_cpus() {
        return Err(Error::VcpuCount {
            count: config.vcpus,
            reason: format!("rtv supports 1 to {}", mptable::max_cpus()),
        });
    }
    if let Some(vsock) = &config.vsock {
        vsock.validate()?;
    }
    if let Some(fs) = &config.fs {
        fs.validate()?;
    }
    Ok(())
}

/// How a VM is restored from a snapshot ([`Vm::restore`]).
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// The vsock device's Unix socket (required when the snapshot has a
    /// vsock device; each restored VM needs its own).
    pub vsock_uds: Option<PathBuf>,
    /// The guest's new CID (default: the snapshot's).
    pub vsock_cid: Option<u64>,
    /// The directory the virtio-fs device shares (required when the
    /// snapshot has a virtio-fs device, refused otherwise). The snapshot
    /// holds no file system state, so this is the new VM's own share.
    pub shared_dir: Option<PathBuf>,
    /// Stop the VM cleanly on SIGTERM and SIGINT (see [`MachineConfig`]).
    pub stop_on_signals: bool,
    /// Refuse a snapshot whose guest has another memory size (MiB).
    pub expect_mem_mib: Option<u64>,
    /// Refuse a snapshot whose guest has another vCPU count.
    pub expect_vcpus: Option<u8>,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        Self {
            kvm_device: PathBuf::from("/dev/kvm"),
            vsock_uds: None,
            vsock_cid: None,
            shared_dir: None,
            stop_on_signals: false,
            expect_mem_mib: None,
            expect_vcpus: None,
        }
    }
}

/// What the VM does once a snapshot is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Go on running.
    Resume,
    /// Stop ([`VmExit::Snapshotted`]).
    Exit,
}

type SnapshotReply = mpsc::Sender<Result<SnapshotInfo, snapshot::Error>>;

struct SnapshotRequest {
    dir: PathBuf,
    then: AfterSnapshot,
    reply: Option<SnapshotReply>,
}

struct ControlQueue {
    open: bool,
    requests: VecDeque<SnapshotRequest>,
}

struct ControlShared {
    queue: Mutex<ControlQueue>,
    evt: EventFd,
}

/// Asks a VM, from any thread, for a snapshot or to stop. Requests made
/// before [`Vm::run`] wait for it; after the VM ended they fail.
#[derive(Clone)]
pub struct VmController {
    shared: Arc<ControlShared>,
    exit: Arc<ExitNotifier>,
}

impl VmController {
    fn push(&self, request: SnapshotRequest) -> Result<(), snapshot::Error> {
        let mut queue = bus::lock(&self.shared.queue);
        if !queue.open {
            return Err(snapshot::Error::NotRunning);
        }
        queue.requests.push_back(request);
        drop(queue);
        let _ = self.shared.evt.write(1);
        Ok(())
    }

    /// Pauses the VM, writes a snapshot to `dir`, then resumes or stops it;
    /// blocks until the snapshot is written. On an error the VM resumes.
    pub fn snapshot(
        &self,
        dir: &Path,
        then: AfterSnapshot,
    ) -> Result<SnapshotInfo, snapshot::Error> {
        let (tx, rx) = mpsc::channel();
        self.push(SnapshotRequest {
            dir: dir.to_path_buf(),
            then,
            reply: Some(tx),
        })?;
        rx.recv().unwrap_or(Err(snapshot::Error::NotRunning))
    }

    /// Like [`Self::snapshot`] but does not wait: the VM logs the result;
    /// with [`AfterSnapshot::Exit`] a failed snapshot ends the VM with
    /// [`VmExit::Error`]. Safe to call from a console hook.
    pub fn request_snapshot(&self, dir: &Path, then: AfterSnapshot) {
        if let Err(e) = self.push(SnapshotRequest {
            dir: dir.to_path_buf(),
            then,
            reply: None,
        }) {
            tracing::warn!("snapshot request: {e}");
        }
    }

    /// Stops the VM ([`VmExit::Stopped`]).
    pub fn stop(&self) {
        self.exit.notify(VmExit::Stopped);
    }

    /// Stops the VM with an error ([`VmExit::Error`]).
    pub fn fail(&self, reason: String) {
        self.exit.notify(VmExit::Error(reason));
    }
}

/// A placed virtio device.
struct VirtioSlot {
    entry: DeviceEntry,
    transport: Arc<Mutex<MmioTransport>>,
}

/// A VM ready to be given a boot entry and run.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
    mem_size_mib: u64,
    vcpus: Vec<VcpuFd>,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitNotifier>,
    panicked: Arc<AtomicBool>,
    serial: Arc<Mutex<SerialDevice>>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    virtio: Vec<VirtioSlot>,
    cmdline_entries: Vec<String>,
    stop_on_signals: bool,
    control: Arc<ControlShared>,
    /// The kvmclock value to set just before the vCPUs start (restore).
    pending_clock: Option<VmState>,
    foreign_devices: usize,
    /// The virtio-fs devices, asked before a snapshot whether the guest
    /// has used them.
    fs_devices: Vec<Arc<Mutex<VirtioFs>>>,
}

fn open_kvm(kvm_device: &Path, vcpus: u8) -> Result<Kvm, Error> {
    let open_err = |source| Error::KvmOpen {
        path: kvm_device.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(c_path).map_err(open_err)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::KvmApi {
            path: kvm_device.to_path_buf(),
            version,
        });
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "IRQCHIP"),
        (kvm_ioctls::Cap::Irqfd, "IRQFD"),
        (kvm_ioctls::Cap::Ioeventfd, "IOEVENTFD"),
        (kvm_ioctls::Cap::UserMemory, "USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(vcpus) > max_vcpus {
        return Err(Error::VcpuCount {
            count: vcpus,
            reason: format!("KVM allows at most {max_vcpus}"),
        });
    }
    Ok(kvm)
}

fn create_vm_fd(kvm: &Kvm) -> Result<VmFd, Error> {
    let fd = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
    // Intel VMX needs these two pages below 4 GiB; elsewhere they are harmless.
    if let Err(e) = fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize) {
        tracing::debug!("KVM_SET_TSS_ADDR: {e}");
    }
    if let Err(e) = fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS) {
        tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
    }
    fd.create_irq_chip()
        .map_err(kvm_err("creating the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("creating the PIT"))?;
    Ok(fd)
}

/// Errors restoring a VM: the snapshot's, or building the VM's.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot is unusable, or setting its state failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// Building the VM failed.
    #[error(transparent)]
    Vm(#[from] Error),
}

impl Vm {
    /// Creates the VM: KVM objects, memory, vCPUs, irqchip, PIT, serial
    /// console (to `console`) and the reset port.
    pub fn new(config: &MachineConfig, console: Box<dyn Write + Send>) -> Result<Vm, Error> {
        validate(config)?;
        let kvm = open_kvm(&config.kvm_device, config.vcpus)?;
        let fd = create_vm_fd(&kvm)?;
        let memory = create_memory(config.mem_size_mib)?;
        register_memory(&fd, &memory)?;

        let table = mptable::build(EBDA_START, config.vcpus)?;
        memory
            .write_slice(&table, GuestAddress(EBDA_START))
            .map_err(|source| Error::GuestWrite {
                what: "MP table",
                source,
            })?;

        let supported = cpuid::supported(&kvm).map_err(kvm_err("reading supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("creating a vCPU"))?;
            vcpu.set_cpuid2(&cpuid::for_vcpu(
                supported.clone(),
                index,
                config.vcpus,
                config.pvm,
            ))
            .map_err(kvm_err("setting CPUID"))?;
            regs::setup_msrs(&vcpu)?;
            regs::setup_fpu(&vcpu)?;
            regs::setup_lapic(&vcpu)?;
            vcpus.push(vcpu);
        }
        let mut vm = Self::assemble(kvm, fd, memory, config, vcpus, console, None)?;
        if let Some(vsock) = &config.vsock {
            let device = Arc::new(Mutex::new(Vsock::new(vsock)?));
            vm.place_virtio_device(
                device.clone(),
                device,
                DeviceEntry::Vsock {
                    guest_cid: vsock.guest_cid,
                },
                None,
            )?;
        }
        if let Some(fs) = &config.fs {
            vm.place_fs_device(fs, None)?;
        }
        Ok(vm)
    }

    /// The parts every VM has: exit notifier, serial console, reset port.
    fn assemble(
        kvm: Kvm,
        fd: VmFd,
        memory: GuestMemoryMmap,
        config: &MachineConfig,
        vcpus: Vec<VcpuFd>,
        console: Box<dyn Write + Send>,
        serial_state: Option<&SerialSnapshot>,
    ) -> Result<Vm, Error> {
        let exit = Arc::new(ExitNotifier::new().map_err(io_err("exit eventfd"))?);
        let panicked = Arc::new(AtomicBool::new(false));
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial eventfd"))?;
        fd.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("serial irqfd"))?;
        let sink = ConsoleSink::new(console, panicked.clone());
        let serial = match serial_state {
            None => SerialDevice::new(serial_irq, sink),
            Some(state) => {
                SerialDevice::from_state(serial_irq, sink, state).map_err(|e| Error::Io {
                    what: "restoring the serial port",
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?
            }
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(ResetDevice::new(exit.clone()))),
            I8042_BASE,
            I8042_LEN,
        )?;
        let control = Arc::new(ControlShared {
            queue: Mutex::new(ControlQueue {
                open: true,
                requests: VecDeque::new(),
            }),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(io_err("control eventfd"))?,
        });
        Ok(Vm {
            kvm,
            fd,
            memory,
            mem_size_mib: config.mem_size_mib,
            vcpus,
            pio,
            mmio: Bus::new(),
            exit,
            panicked,
            serial,
            subscribers: Vec::new(),
            virtio: Vec::new(),
            cmdline_entries: Vec::new(),
            stop_on_signals: config.stop_on_signals,
            control,
            pending_clock: None,
            foreign_devices: 0,
            fs_devices: Vec::new(),
        })
    }

    /// Builds a VM from the snapshot in `dir`: guest memory mapped
    /// MAP_PRIVATE from its memory file, the KVM state of the VM and every
    /// vCPU, the devices and their queues. The snapshot is checked first
    /// ([`snapshot::load`]); nothing is created if it is unusable. Run it
    /// with [`Vm::run`]; the vsock device then tells the guest its
    /// connections are gone.
    pub fn restore(
        dir: &Path,
        config: &RestoreConfig,
        console: Box<dyn Write + Send>,
    ) -> Result<Vm, RestoreError> {
        let loaded = snapshot::load(dir)?;
        let manifest = &loaded.manifest;
        let mismatch = |problem: String| snapshot::Error::Mismatch {
            dir: dir.to_path_buf(),
            problem,
        };
        if let Some(mib) = config.expect_mem_mib {
            if mib != manifest.mem_size_mib {
                return Err(mismatch(format!(
                    "memory size mismatch: the snapshot's guest has {} MiB, {mib} MiB asked for",
                    manifest.mem_size_mib
                ))
                .into());
            }
        }
        if let Some(n) = config.expect_vcpus {
            if n != manifest.vcpus {
                return Err(mismatch(format!(
                    "vCPU count mismatch: the snapshot's guest has {} vCPUs, {n} asked for",
                    manifest.vcpus
                ))
                .into());
            }
        }
        let saved_cid = manifest.devices.iter().find_map(|d| match d {
            DeviceEntry::Vsock { guest_cid } => Some(*guest_cid),
            _ => None,
        });
        let vsock = match (saved_cid, &config.vsock_uds) {
            (Some(saved), Some(uds)) => Some(VsockConfig {
                guest_cid: config.vsock_cid.unwrap_or(saved),
                uds_path: uds.clone(),
            }),
            (Some(_), None) => {
                return Err(mismatch(
                    "the snapshot has a vsock device: give it a socket path (--vsock-uds)".into(),
                )
                .into())
            }
            (None, Some(_)) => {
                return Err(mismatch(
                    "the snapshot has no vsock device; a socket path was given".into(),
                )
                .into())
            }
            (None, None) => None,
        };
        let saved_tag = manifest.devices.iter().find_map(|d| match d {
            DeviceEntry::Fs { tag } => Some(tag.clone()),
            _ => None,
        });
        let fs = match (saved_tag, &config.shared_dir) {
            (Some(tag), Some(dir)) => Some(FsConfig {
                shared_dir: dir.clone(),
                tag,
            }),
            (Some(_), None) => {
                return Err(mismatch(
                    "the snapshot has a virtio-fs device: give it a directory to share (--shared-dir)"
                        .into(),
                )
                .into())
            }
            (None, Some(_)) => {
                return Err(mismatch(
                    "the snapshot has no virtio-fs device; a directory to share (--shared-dir) was given"
                        .into(),
                )
                .into())
            }
            (None, None) => None,
        };
        let machine = MachineConfig {
            mem_size_mib: manifest.mem_size_mib,
            vcpus: manifest.vcpus,
            kvm_device: config.kvm_device.clone(),
            vsock: vsock.clone(),
            fs: fs.clone(),
            stop_on_signals: config.stop_on_signals,
            // CPUID comes from the snapshot.
            pvm: false,
        };
        validate(&machine)?;

        let kvm = open_kvm(&config.kvm_device, manifest.vcpus)?;
        let fd = create_vm_fd(&kvm)?;
        let xsave2 = xsave_size(&kvm, &fd);
        for state in &loaded.vcpus {
            if let Some(x) = &state.xsave {
                let need = std::mem::size_of::<kvm_bindings::kvm_xsave>() + 4 * x.extra.len();
                if !x.extra.is_empty() && xsave2.unwrap_or(0) < need {
                    return Err(mismatch(format!(
                        "vCPU {}: its XSAVE area ({need} bytes) is larger than this KVM's",
                        state.index
                    ))
                    .into());
                }
            }
        }
        let ranges: Vec<(u64, u64)> = manifest
            .ram_regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        let memory = snapshot::memory::map_private(&loaded.memory_path, &ranges).map_err(|e| {
            snapshot::Error::File {
                path: loaded.memory_path.clone(),
                problem: format!("cannot map: {e}"),
            }
        })?;
        register_memory(&fd, &memory)?;

        let mut vcpus = Vec::with_capacity(loaded.vcpus.len());
        for state in &loaded.vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(state.index))
                .map_err(kvm_err("creating a vCPU"))?;
            let cpuid = snapshot::cpu::cpuid_of(state).map_err(|source| snapshot::Error::Vcpu {
                index: usize::from(state.index),
                source,
            })?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("setting CPUID"))?;
            vcpus.push(vcpu);
        }
        loaded.vm.restore_devices(&fd)?;
        for (vcpu, state) in vcpus.iter().zip(&loaded.vcpus) {
            snapshot::cpu::restore(vcpu, state).map_err(|source| snapshot::Error::Vcpu {
                index: usize::from(state.index),
                source,
            })?;
        }
        let mut vm = Self::assemble(
            kvm,
            fd,
            memory,
            &machine,
            vcpus,
            console,
            Some(&loaded.devices.serial),
        )?;
        for slot in &loaded.devices.virtio {
            match &slot.device {
                DeviceEntry::Vsock { .. } => {
                    let Some(vsock) = &vsock else {
                        return Err(mismatch("vsock device without a configuration".into()).into());
                    };
                    let device = Arc::new(Mutex::new(Vsock::new(vsock).map_err(Error::from)?));
                    vm.place_virtio_device(
                        device.clone(),
                        device,
                        DeviceEntry::Vsock {
                            guest_cid: vsock.guest_cid,
                        },
                        Some(&slot.transport),
                    )?;
                }
                DeviceEntry::Fs { .. } => {
                    let Some(fs) = &fs else {
                        return Err(
                            mismatch("virtio-fs device without a configuration".into()).into()
                        );
                    };
                    vm.place_fs_device(fs, Some(&slot.transport))?;
                }
            }
        }
        vm.pending_clock = Some(loaded.vm);
        Ok(vm)
    }

    /// A handle to ask the VM for snapshots, or to stop, from any thread.
    pub fn controller(&self) -> VmController {
        VmController {
            shared: self.control.clone(),
            exit: self.exit.clone(),
        }
    }

    /// Calls `hook` once, on a vCPU thread, when a console line contains
    /// `marker` (e.g. the agent's `rtv-agent: ready`). The hook must not
    /// block: hand the news on (a channel, [`VmController::request_snapshot`]).
    pub fn on_console_line(&self, marker: &str, hook: LineHook) {
        bus::lock(&self.serial)
            .sink_mut()
            .watch(marker.as_bytes(), hook);
    }

    /// Places a virtio device on the next virtio-mmio slot (4 KiB window,
    /// own GSI through an irqfd, ioeventfds for its queue notifications);
    /// `subscriber` (usually the same object) joins the event loop when the
    /// VM runs. Returns the slot's base address and GSI.
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    ) -> Result<(u64, u32), Error> {
        // Devices from outside cannot be rebuilt from a snapshot: a VM
        // with one refuses to be snapshotted.
        self.foreign_devices += 1;
        self.place_virtio_device_inner(device, subscriber, None, None)
    }

    fn place_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
        entry: DeviceEntry,
        state: Option<&MmioState>,
    ) -> Result<(u64, u32), Error> {
        self.place_virtio_device_inner(device, subscriber, Some(entry), state)
    }

    /// Places a virtio-fs device sharing `fs` (with its transport's saved
    /// registers and queues, on a restore).
    fn place_fs_device(&mut self, fs: &FsConfig, state: Option<&MmioState>) -> Result<(), Error> {
        let device = Arc::new(Mutex::new(VirtioFs::new(fs)?));
        self.place_virtio_device(
            device.clone(),
            device.clone(),
            DeviceEntry::Fs {
                tag: fs.tag.clone(),
            },
            state,
        )?;
        self.fs_devices.push(device);
        Ok(())
    }

    fn place_virtio_device_inner(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
        entry: Option<DeviceEntry>,
        state: Option<&MmioState>,
    ) -> Result<(u64, u32), Error> {
        let index = self.cmdline_entries.len();
        let (base, irq) = virtio_slot(index);
        let max = (layout::IOAPIC_START - layout::VIRTIO_MMIO_START) / MMIO_WINDOW_SIZE;
        if irq >= u32::from(mptable::IOAPIC_PINS) || index as u64 >= max {
            return Err(Error::TooManyDevices(index));
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(io_err("virtio irq eventfd"))?;
        self.fd
            .register_irqfd(&irqfd, irq)
            .map_err(kvm_err("virtio irqfd"))?;
        let transport = match state {
            None => MmioTransport::new(self.memory.clone(), device, irqfd)
                .map_err(io_err("virtio-mmio transport"))?,
            Some(state) => MmioTransport::restore(self.memory.clone(), device, irqfd, state)
                .map_err(|e| Error::Io {
                    what: "restoring a virtio-mmio transport",
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?,
        };
        let notify = IoEventAddress::Mmio(base + virtio_mmio::reg::QUEUE_NOTIFY);
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            self.fd
                .register_ioevent(evt, &notify, queue as u32)
                .map_err(kvm_err("virtio ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.subscribers.push(subscriber);
        if let Some(entry) = entry {
            self.virtio.push(VirtioSlot { entry, transport });
        }
        self.cmdline_entries.push(format!(
            "virtio_mmio.device={}K@{base:#x}:{irq}",
            MMIO_WINDOW_SIZE / 1024
        ));
        tracing::debug!(base = format_args!("{base:#x}"), irq, "virtio-mmio device");
        Ok((base, irq))
    }

    /// The `virtio_mmio.device=` entries the guest kernel needs for the
    /// devices placed so far.
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline_entries
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The KVM VM handle.
    pub fn vm_fd(&self) -> &VmFd {
        &self.fd
    }

    /// The port I/O bus, to add devices.
    pub fn pio_bus_mut(&mut self) -> &mut Bus {
        &mut self.pio
    }

    /// The MMIO bus, to add devices.
    pub fn mmio_bus_mut(&mut self) -> &mut Bus {
        &mut self.mmio
    }

    /// Sets the boot vCPU's registers for `entry`; the others wait for the
    /// guest to start them (INIT/SIPI through the in-kernel LAPIC).
    pub fn set_boot_entry(&self, entry: BootEntry) -> Result<(), Error> {
        let boot = self.vcpus.first().ok_or(Error::VcpuCount {
            count: 0,
            reason: "no boot vCPU".into(),
        })?;
        regs::setup_boot_vcpu(&self.memory, boot, entry)?;
        Ok(())
    }

    /// Runs the VM until the guest stops or fails, answering the
    /// [`VmController`]'s requests on the way.
    pub fn run(mut self) -> Result<VmExit, Error> {
        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new()?;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            exit: self.exit.clone(),
        })));
        events.add_subscriber(Arc::new(Mutex::new(ControlWatcher {
            control: self.control.clone(),
            exit: self.exit.clone(),
        })));
        for subscriber in &self.subscribers {
            events.add_subscriber(subscriber.clone());
        }
        // Blocked before the vCPU threads start, so they inherit the mask.
        let _signals = if self.stop_on_signals {
            let watcher = signals::SignalWatcher::new(self.exit.clone())
                .map_err(io_err("signalfd for SIGTERM and SIGINT"))?;
            let watcher = Arc::new(Mutex::new(watcher));
            events.add_subscriber(watcher.clone());
            Some(watcher)
        } else {
            None
        };
        if let Some(saved) = self.pending_clock.take() {
            // Last before the vCPUs run: the guest's clock goes on from
            // where it was saved.
            if let Err(e) = saved.restore_clock(&self.fd) {
                tracing::warn!("restoring kvmclock: {e}");
            }
        }

        let mut handles = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let vcpu = Vcpu::new(
                index as u8,
                fd,
                self.pio.clone(),
                self.mmio.clone(),
                self.memory.clone(),
                self.exit.clone(),
            );
            match vcpu.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit
                        .notify(VmExit::Error(format!("cannot start a vCPU thread: {e}")));
                    break;
                }
            }
        }

        while !self.exit.stopping() {
            if let Err(e) = events.run() {
                self.exit.notify(VmExit::Error(format!("event loop: {e}")));
            }
            loop {
                let request = bus::lock(&self.control.queue).requests.pop_front();
                let Some(request) = request else { break };
                if self.exit.stopping() {
                    if let Some(reply) = request.reply {
                        let _ = reply.send(Err(snapshot::Error::NotRunning));
                    }
                    continue;
                }
                self.serve_snapshot(&handles, request);
            }
        }
        {
            let mut queue = bus::lock(&self.control.queue);
            queue.open = false;
            for request in queue.requests.drain(..) {
                if let Some(reply) = request.reply {
                    let _ = reply.send(Err(snapshot::Error::NotRunning));
                }
            }
        }
        vcpu::stop_all(handles);

        let reason = self
            .exit
            .reason()
            .unwrap_or_else(|| VmExit::Error("stopped without a reason".into()));
        // With `panic=-1` a panicking kernel resets the machine: report the panic.
        if reason.is_clean() && self.panicked.load(Ordering::SeqCst) {
            return Ok(VmExit::Panicked);
        }
        Ok(reason)
    }

    fn serve_snapshot(&self, handles: &[VcpuHandle], request: SnapshotRequest) {
        let start = Instant::now();
        let result = self.take_snapshot(handles, &request.dir);
        match &result {
            Ok(info) => tracing::info!(
                dir = %info.dir.display(),
                paused_ms = info.paused_for.as_millis() as u64,
                disk_usage = info.disk_usage,
                "snapshot written"
            ),
            Err(e) => tracing::error!("snapshot to {}: {e}", request.dir.display()),
        }
        match (&result, request.then) {
            (Ok(_), AfterSnapshot::Exit) => self.exit.notify(VmExit::Snapshotted),
            (Err(e), AfterSnapshot::Exit) if request.reply.is_none() => self.exit.notify(
                VmExit::Error(format!("snapshot to {}: {e}", request.dir.display())),
            ),
            _ => {
                for h in handles {
                    h.resume();
                }
                tracing::debug!(paused_ms = start.elapsed().as_millis() as u64, "VM resumed");
            }
        }
        if let Some(reply) = request.reply {
            let _ = reply.send(result);
        }
    }

    fn take_snapshot(
        &self,
        handles: &[VcpuHandle],
        dir: &Path,
    ) -> Result<SnapshotInfo, snapshot::Error> {
        // The event loop (this thread) serves the device's queues, so the
        // count cannot change under us. Requests the guest queued but the
        // device has not taken yet stay in the saved rings and are served
        // by the restored device.
        for device in &self.fs_devices {
            let served = bus::lock(device).requests_served();
            if served > 0 {
                return Err(snapshot::Error::Device(format!(
                    "virtio-fs (--shared-dir): the guest has used the share ({served} FUSE requests served); \
                     its inodes and open files live in this VMM and cannot be saved: snapshot before the guest mounts it"
                )));
            }
        }
        if self.foreign_devices > 0 {
            return Err(snapshot::Error::Device(
                "added with add_virtio_device cannot be snapshotted".into(),
            ));
        }
        let start = Instant::now();
        let params = SaveParams {
            msr_indices: self
                .kvm
                .get_msr_index_list()
                .map(|l| l.as_slice().to_vec())
                .map_err(|source| snapshot::Error::Kvm {
                    what: "reading the MSR index list".into(),
                    source,
                })?,
            xsave_size: xsave_size(&self.kvm, &self.fd),
            xcrs: self.kvm.check_extension(kvm_ioctls::Cap::Xcrs),
        };
        for h in handles {
            h.pause(Duration::from_secs(5))
                .map_err(snapshot::Error::Pause)?;
        }
        let mut vcpus = Vec::with_capacity(handles.len());
        for h in handles {
            vcpus.push(h.save(params.clone()).map_err(snapshot::Error::Pause)?);
        }
        let vm = VmState::save(&self.fd)?;
        let devices = DevicesState {
            serial: bus::lock(&self.serial).state(),
            virtio: self
                .virtio
                .iter()
                .map(|slot| VirtioSnapshot {
                    device: slot.entry.clone(),
                    transport: bus::lock(&slot.transport).state(),
                })
                .collect(),
        };
        let (memory_size, memory_data) = snapshot::write(
            dir,
            &snapshot::Parts {
                mem_size_mib: self.mem_size_mib,
                memory: &self.memory,
                vcpus: &vcpus,
                vm: &vm,
                devices: &devices,
            },
        )?;
        Ok(SnapshotInfo {
            dir: dir.to_path_buf(),
            paused_for: start.elapsed(),
            memory_size,
            memory_data,
            disk_usage: snapshot::disk_usage(dir),
        })
    }
}

/// KVM_CAP_XSAVE2's size (0 when KVM lacks it), or `None` without XSAVE.
fn xsave_size(kvm: &Kvm, fd: &VmFd) -> Option<usize> {
    if !kvm.check_extension(kvm_ioctls::Cap::Xsave) {
        return None;
    }
    Some(usize::try_from(fd.check_extension_int(kvm_ioctls::Cap::Xsave2)).unwrap_or(0))
}

/// Wakes the event loop for the controller's requests.
struct ControlWatcher {
    control: Arc<ControlShared>,
    exit: Arc<ExitNotifier>,
}

impl MutEventSubscriber for ControlWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            let _ = self.control.evt.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control.evt, EventSet::IN)) {
            self.exit.notify(VmExit::Error(format!(
                "cannot watch the control event: {e}"
            )));
        }
    }
}

fn create_memory(mib: u64) -> Result<GuestMemoryMmap, Error> {
    let size = mib << 20;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::MemorySize {
        mib,
        reason: format!("the host cannot map it: {e}"),
    })
}

fn register_memory(fd: &VmFd, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|source| Error::GuestWrite {
                what: "memory slot",
                source,
            })?;
        let mr = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned
        // by `memory`, which the VM keeps (and the vCPUs clone) for as long
        // as the guest can run; slots do not overlap.
        unsafe { fd.set_user_memory_region(mr) }.map_err(kvm_err("registering guest memory"))?;
    }
    Ok(())
}

/// Wakes the event loop when the VM has a reason to stop.
struct ExitWatcher {
    exit: Arc<ExitNotifier>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            let _ = self.exit.event().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.event(), EventSet::IN)) {
            self.exit
                .notify(VmExit::Error(format!("cannot watch the exit event: {e}")));
        }
    }
}
