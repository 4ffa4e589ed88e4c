//! A micro-VM: KVM VM and vCPUs, guest memory, interrupt controllers,
//! legacy devices and the [`DeviceManager`]'s virtio devices (put together
//! by `builder.rs`); it runs until the guest stops, and answers snapshot
//! requests on the way.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::mptable;
use crate::arch::regs::{self, BootEntry};
use crate::builder;
use crate::device_manager::{self, DeviceConfig, DeviceManager, VirtioHandle, VmResources};
use crate::devices::bus::{self, Bus};
use crate::devices::serial::{LineHook, SerialDevice};
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitNotifier, VmExit};
use crate::profile::{self, DumpHandle, Profiler};
use crate::seccomp;
use crate::signals;
use crate::snapshot::cpu::SaveParams;
use crate::snapshot::{self, DevicesState, SnapshotInfo, VmState};
use crate::vcpu::{self, Vcpu, VcpuHandle};

/// The KVM API version every KVM since Linux 2.6.22 reports.
pub(crate) const KVM_API_VERSION: i32 = 12;
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
    /// The virtio devices, in slot order (see [`device_manager`]): e.g. a
    /// vsock device (hybrid vsock over a Unix socket) and a virtio-fs
    /// device sharing a host directory. A VM with virtio-fs can be
    /// snapshotted only while the guest has sent the device no FUSE
    /// request (has not mounted it).
    pub devices: Vec<DeviceConfig>,
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
            devices: Vec::new(),
            stop_on_signals: false,
            pvm: false,
        }
    }
}

/// The `virtio_mmio.device=` kernel command-line entries for the devices
/// `config` asks for, in the order [`Vm::new`] places them.
pub fn virtio_cmdline_entries(config: &MachineConfig) -> Vec<String> {
    device_manager::cmdline_entries(&config.devices)
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
    /// A virtio device cannot be set up or placed.
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
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
    if config.devices.len() > device_manager::MAX_DEVICES {
        return Err(device_manager::Error::TooManyDevices(device_manager::MAX_DEVICES).into());
    }
    for device in &config.devices {
        device.validate().map_err(device_manager::Error::from)?;
    }
    Ok(())
}

/// How a VM is restored from a snapshot ([`Vm::restore`]). The snapshot's
/// devices get their host-side resources (sockets, directories) from here,
/// never from the snapshot ([`DeviceConfig`]).
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
    /// An open tap fd (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) for the
    /// snapshot's virtio-net device (refused when the snapshot has none).
    /// Without one, a snapshot's NIC is restored with no backend, its link
    /// down. The fd stays the caller's: the device works on a duplicate.
    pub net_tap_fd: Option<RawFd>,
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
            net_tap_fd: None,
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

pub(crate) struct SnapshotRequest {
    dir: PathBuf,
    then: AfterSnapshot,
    reply: Option<SnapshotReply>,
}

pub(crate) struct ControlQueue {
    pub(crate) open: bool,
    pub(crate) requests: VecDeque<SnapshotRequest>,
}

pub(crate) struct ControlShared {
    pub(crate) queue: Mutex<ControlQueue>,
    pub(crate) evt: EventFd,
    /// The profiler's dump requests, when the VM is profiled.
    pub(crate) profile: Mutex<Option<DumpHandle>>,
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

    /// Asks a profiled VM to write the samples since its previous dump
    /// (`<n>.folded`, then `<n>.svg`) and count anew, as SIGUSR1 does in
    /// `rtv-vmm`; `false` when the VM is not profiled or not running.
    pub fn dump_profile(&self) -> bool {
        bus::lock(&self.shared.profile)
            .as_ref()
            .is_some_and(DumpHandle::request)
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

/// A VM ready to be given a boot entry and run.
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) fd: VmFd,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) mem_size_mib: u64,
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) exit: Arc<ExitNotifier>,
    pub(crate) panicked: Arc<AtomicBool>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// The virtio devices.
    pub(crate) devices: DeviceManager,
    pub(crate) stop_on_signals: bool,
    pub(crate) control: Arc<ControlShared>,
    /// The kvmclock value to set just before the vCPUs start (restore).
    pub(crate) pending_clock: Option<VmState>,
    /// The guest profiler, when asked for ([`Vm::set_profiler`]).
    pub(crate) profiler: Option<Profiler>,
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
    /// console (to `console`), the reset port and `config.devices`.
    pub fn new(config: &MachineConfig, console: Box<dyn Write + Send>) -> Result<Vm, Error> {
        builder::build_for_boot(config, console)
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
        builder::build_from_snapshot(dir, config, console)
    }

    /// Profiles the VM while it runs ([`profile`]): samples every vCPU at
    /// the profiler's rate from the start of [`Vm::run`] to its end, writes
    /// a part at each [`VmController::dump_profile`] (SIGUSR1 with
    /// `stop_on_signals`) and the last part and `all.*` when the VM ends,
    /// whatever ends it. Works the same for a booted and a restored VM; the
    /// profiler's state is never part of a snapshot.
    pub fn set_profiler(&mut self, profiler: Profiler) {
        *bus::lock(&self.control.profile) = Some(profiler.dump_handle());
        self.profiler = Some(profiler);
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
    /// VM runs. Returns the slot's base address and GSI. The device manager
    /// cannot rebuild such a device from a snapshot: a VM with one refuses
    /// to be snapshotted.
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    ) -> Result<(u64, u32), Error> {
        let slot = self.devices.attach_foreign(
            &mut VmResources {
                fd: &self.fd,
                memory: &self.memory,
                mmio: &mut self.mmio,
            },
            VirtioHandle { device, subscriber },
        )?;
        Ok((slot.base, slot.irq))
    }

    /// The `virtio_mmio.device=` entries the guest kernel needs for the
    /// devices placed so far.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.devices.cmdline_entries()
    }

    /// The virtio devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
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
        for subscriber in self.devices.subscribers() {
            events.add_subscriber(subscriber);
        }
        // Blocked before the vCPU threads start, so they inherit the mask.
        let _signals = if self.stop_on_signals {
            let dump = self.profiler.as_ref().map(Profiler::dump_handle);
            let watcher = signals::SignalWatcher::new(self.exit.clone(), dump)
                .map_err(io_err("signalfd for SIGTERM, SIGINT and SIGUSR1"))?;
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

        let session = self.profiler.take().map(|p| p.session(self.vcpus.len()));
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let mut vcpu = Vcpu::new(
                index as u8,
                fd,
                self.pio.clone(),
                self.mmio.clone(),
                self.memory.clone(),
                self.exit.clone(),
            );
            if let Some(session) = &session {
                vcpu = vcpu.with_sampler(session.sampler(index));
            }
            match vcpu.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit
                        .notify(VmExit::Error(format!("cannot start a vCPU thread: {e}")));
                    break;
                }
            }
        }

        let profiling = session.and_then(|session| {
            let threads = handles.iter().map(VcpuHandle::pthread).collect();
            match session.start(threads, vcpu::kick_signal()) {
                Ok(running) => Some(running),
                Err(e) => {
                    self.exit.notify(VmExit::Error(e.to_string()));
                    None
                }
            }
        });

        // Every thread exists now: the event loop takes its filter before
        // it handles anything the guest sent.
        if let Err(e) = seccomp::enter(seccomp::Thread::Vmm) {
            self.exit.notify(VmExit::Error(e.to_string()));
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
        // The timer kicks the vCPU threads: it ends before they are joined.
        let profiling = profiling.map(profile::Running::stop_timer);
        vcpu::stop_all(handles);
        if let Some(stopped) = profiling {
            stopped.finish();
        }

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
        // The event loop (this thread) serves the devices' queues: what a
        // device answers cannot change before it is saved.
        self.devices
            .can_snapshot()
            .map_err(snapshot::Error::Device)?;
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
            xsave_size: builder::xsave_size(&self.kvm, &self.fd),
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
            virtio: self.devices.save(),
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
