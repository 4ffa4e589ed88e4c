//! Builds a [`Vm`] (Firecracker's builder): for a boot ([`build_for_boot`]),
//! or from a snapshot ([`build_from_snapshot`]) by the same steps with each
//! part given its saved state. Both end by registering the machine's virtio
//! devices with its [`DeviceManager`], in order.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{self, EBDA_START};
use crate::arch::{cpuid, mptable, regs};
use crate::device_manager::{self, DeviceManager, VmResources};
use crate::devices::bus::Bus;
use crate::devices::reset::{ResetDevice, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleSink, SerialDevice, SerialSnapshot, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use crate::exit::ExitNotifier;
use crate::snapshot;
use crate::vm::{
    io_err, kvm_err, validate, ControlQueue, ControlShared, Error, MachineConfig, RestoreConfig,
    RestoreError, Vm, KVM_API_VERSION,
};

/// A new VM of `config`'s shape: KVM objects, memory, vCPUs, irqchip, PIT,
/// serial console (to `console`), the reset port, and the configured virtio
/// devices.
pub(crate) fn build_for_boot(
    config: &MachineConfig,
    console: Box<dyn Write + Send>,
) -> Result<Vm, Error> {
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
    let mut vm = build_base(kvm, fd, memory, config, vcpus, console, None)?;
    for device in &config.devices {
        vm.devices.attach(
            &mut VmResources {
                fd: &vm.fd,
                memory: &vm.memory,
                mmio: &mut vm.mmio,
            },
            device,
        )?;
    }
    Ok(vm)
}

/// A VM from the snapshot in `dir`: guest memory mapped MAP_PRIVATE from its
/// memory file, the KVM state of the VM and every vCPU, the devices and
/// their queues. The snapshot, and what `config` gives its devices, are
/// checked before anything is created.
pub(crate) fn build_from_snapshot(
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
    let devices = device_manager::restore_plan(&loaded.devices.virtio, config).map_err(mismatch)?;
    let machine = MachineConfig {
        mem_size_mib: manifest.mem_size_mib,
        vcpus: manifest.vcpus,
        kvm_device: config.kvm_device.clone(),
        devices,
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
    let mut vm = build_base(
        kvm,
        fd,
        memory,
        &machine,
        vcpus,
        console,
        Some(&loaded.devices.serial),
    )?;
    vm.devices
        .restore(
            &mut VmResources {
                fd: &vm.fd,
                memory: &vm.memory,
                mmio: &mut vm.mmio,
            },
            &loaded.devices.virtio,
            &machine.devices,
        )
        .map_err(Error::from)?;
    vm.pending_clock = Some(loaded.vm);
    Ok(vm)
}

/// The parts every VM has: exit notifier, serial console (new, or with its
/// saved state), reset port, control channel; no virtio device yet.
fn build_base(
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
        profile: Mutex::new(None),
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
        devices: DeviceManager::new(),
        stop_on_signals: config.stop_on_signals,
        control,
        pending_clock: None,
        profiler: None,
    })
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

/// KVM_CAP_XSAVE2's size (0 when KVM lacks it), or `None` without XSAVE.
pub(crate) fn xsave_size(kvm: &Kvm, fd: &VmFd) -> Option<usize> {
    if !kvm.check_extension(kvm_ioctls::Cap::Xsave) {
        return None;
    }
    Some(usize::try_from(fd.check_extension_int(kvm_ioctls::Cap::Xsave2)).unwrap_or(0))
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
