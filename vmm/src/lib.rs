//! rtv's micro-VM monitor: a KVM VMM on the rust-vmm crates.
//!
//! [`vm::Vm`] is a machine (memory, vCPUs, in-kernel irqchip and PIT,
//! serial console, reset port), put together by `builder.rs`, with its
//! virtio devices in a [`device_manager::DeviceManager`] (the place a new
//! device kind is registered); [`linux::load`] puts a Linux kernel,
//! initramfs and command line into it; [`vm::Vm::run`] runs it until the
//! guest stops. [`platform`] holds the switches for PVM hosts.
//!
//! Templates: [`VmController::snapshot`] pauses a running VM and writes a
//! [`snapshot`] directory; [`Vm::restore`] builds a new VM from one, with
//! guest memory mapped copy-on-write from the snapshot's memory file.
//!
//! Profiling: [`Vm::set_profiler`] with a [`profile::Profiler`] samples the
//! guest's vCPUs while it runs and writes folded stacks and flame graphs.

pub mod arch;
mod builder;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod jail;
pub mod linux;
pub mod platform;
pub mod profile;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use device_manager::DeviceConfig;
pub use devices::virtio::fs::FsConfig;
pub use devices::virtio::net::NetConfig;
pub use devices::virtio::vsock::VsockConfig;
pub use exit::VmExit;
pub use linux::{BootProtocol, KernelConfig};
pub use profile::{ProfileConfig, Profiler};
pub use snapshot::SnapshotInfo;
pub use vm::{AfterSnapshot, MachineConfig, RestoreConfig, RestoreError, Vm, VmController};

/// The command line the guest gets for `machine`: `cmdline` with the
/// `virtio_mmio.device=` entries of the machine's devices appended (those
/// already present are not repeated).
pub fn full_cmdline(machine: &MachineConfig, cmdline: &str) -> String {
    linux::with_device_entries(cmdline, &vm::virtio_cmdline_entries(machine))
}

/// Errors of a whole boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building or running the VM failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// Loading the kernel failed.
    #[error(transparent)]
    Kernel(#[from] linux::Error),
    /// Setting the boot vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] arch::regs::Error),
}

/// Checks the kernel and initramfs files before any VM exists, so bad input
/// fails before anything is created.
pub fn validate(machine: &MachineConfig, kernel: &KernelConfig) -> Result<(), Error> {
    vm::validate(machine)?;
    linux::open_vmlinux(&kernel.kernel)?;
    if let Some(initrd) = &kernel.initrd {
        std::fs::File::open(initrd).map_err(|source| linux::Error::File {
            kind: "initramfs",
            path: initrd.clone(),
            source,
        })?;
    }
    linux::build_cmdline(&[&full_cmdline(machine, &kernel.cmdline)])?;
    Ok(())
}

/// The line the guest agent prints when it is ready for requests: the
/// moment a template VM is snapshotted.
pub const READY_MARKER: &str = rtv_protocol::READY_LINE;

/// Builds a VM and loads `kernel` into it, ready to [`Vm::run`].
pub fn prepare(
    machine: &MachineConfig,
    kernel: &KernelConfig,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Vm, Error> {
    validate(machine, kernel)?;
    let vm = Vm::new(machine, console)?;
    let entry = linux::load(&vm, kernel)?;
    vm.set_boot_entry(entry)?;
    Ok(vm)
}

/// Builds a VM, boots `kernel` in it and runs it to the end.
pub fn boot(
    machine: &MachineConfig,
    kernel: &KernelConfig,
    console: Box<dyn std::io::Write + Send>,
) -> Result<VmExit, Error> {
    Ok(prepare(machine, kernel, console)?.run()?)
}
