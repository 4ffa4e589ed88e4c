use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::vsock::VsockConfig;
use crate::devices::virtio::{ActivateError, Interrupt};
use crate::vm::{self, MachineConfig, RestoreConfig, Vm};

/// A device with two queues whose snapshot hook says what it is told to.
struct Dummy {
    refuse: Option<&'static str>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _features: u64,
        _mem: GuestMemoryMmap,
        _queues: Vec<Queue>,
        _interrupt: Arc<Interrupt>,
        _queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn can_snapshot(&self) -> Result<(), String> {
        self.refuse.map_or(Ok(()), |why| Err(why.to_string()))
    }
}

impl MutEventSubscriber for Dummy {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    fn init(&mut self, _ops: &mut EventOps) {}
}

fn vsock(cid: u64, uds: &str) -> DeviceConfig {
    DeviceConfig::Vsock(VsockConfig {
        guest_cid: cid,
        uds_path: PathBuf::from(uds),
    })
}

fn fs(dir: &Path, tag: &str) -> DeviceConfig {
    DeviceConfig::Fs(FsConfig {
        shared_dir: dir.to_path_buf(),
        tag: tag.to_string(),
    })
}

fn transport_state() -> MmioState {
    MmioState {
        device_features_sel: 1,
        driver_features_sel: 1,
        driver_features: 1 << 32,
        queue_sel: 2,
        status: 15,
        config_generation: 0,
        activated: true,
        interrupt_status: 1,
        queues: Vec::new(),
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rtv-dm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The VM tests need KVM; without it they fail (they are not skipped).
fn assert_kvm() {
    assert!(Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
}

#[test]
fn slots_are_windows_one_after_the_other_each_with_its_own_gsi() {
    assert_eq!(
        MmioSlot::nth(0).unwrap(),
        MmioSlot {
            base: 0xd000_0000,
            irq: 5
        }
    );
    assert_eq!(
        MmioSlot::nth(1).unwrap(),
        MmioSlot {
            base: 0xd000_1000,
            irq: 6
        }
    );
    // GSIs 5 to 23: the IOAPIC's pins after COM1's.
    assert_eq!(MAX_DEVICES, 19);
    let last = MmioSlot::nth(MAX_DEVICES - 1).unwrap();
    assert_eq!(last.irq, 23);
    assert!(last.base + MMIO_WINDOW_SIZE <= layout::IOAPIC_START);
    let err = MmioSlot::nth(MAX_DEVICES).unwrap_err();
    assert!(matches!(err, Error::TooManyDevices(19)), "{err:?}");
    assert_eq!(err.to_string(), "too many virtio devices (at most 19)");
}

#[test]
fn command_line_entries_follow_the_device_order() {
    let dir = std::env::temp_dir();
    let devices = [vsock(3, "/tmp/v.sock"), fs(&dir, "rtvfs")];
    assert_eq!(
        cmdline_entries(&devices),
        [
            "virtio_mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0001000:6"
        ]
    );
    assert_eq!(
        MmioSlot::nth(18).unwrap().cmdline_entry(),
        "virtio_mmio.device=4K@0xd0012000:23"
    );
    assert!(cmdline_entries(&[]).is_empty());
}

#[test]
fn too_many_devices_are_refused_before_anything_is_created() {
    let dir = std::env::temp_dir();
    let config = MachineConfig {
        mem_size_mib: 16,
        devices: vec![fs(&dir, "rtvfs"); MAX_DEVICES + 1],
        ..Default::default()
    };
    let err = vm::validate(&config).unwrap_err();
    assert!(
        matches!(err, vm::Error::Devices(Error::TooManyDevices(19))),
        "{err:?}"
    );
    // The command line names only the devices that have a slot.
    assert_eq!(cmdline_entries(&config.devices).len(), MAX_DEVICES);
    let config = MachineConfig {
        devices: vec![fs(&dir, "rtvfs"); MAX_DEVICES],
        ..config
    };
    vm::validate(&config).expect("19 devices fit");
}

#[test]
fn a_vm_places_devices_in_order_until_the_gsis_run_out() {
    assert_kvm();
    let config = MachineConfig {
        mem_size_mib: 16,
        ..Default::default()
    };
    let mut vm = Vm::new(&config, Box::new(std::io::sink())).expect("create VM");
    for index in 0..MAX_DEVICES {
        let device = Arc::new(Mutex::new(Dummy { refuse: None }));
        let (base, irq) = vm
            .add_virtio_device(device.clone(), device)
            .expect("a free slot");
        let slot = MmioSlot::nth(index).unwrap();
        assert_eq!((base, irq), (slot.base, slot.irq));
    }
    assert_eq!(
        vm.devices().slots(),
        (0..MAX_DEVICES)
            .map(|i| MmioSlot::nth(i).unwrap())
            .collect::<Vec<_>>()
    );
    assert_eq!(vm.cmdline_entries().len(), MAX_DEVICES);
    assert_eq!(
        vm.cmdline_entries()[1],
        "virtio_mmio.device=4K@0xd0001000:6"
    );
    let device = Arc::new(Mutex::new(Dummy { refuse: None }));
    let err = vm.add_virtio_device(device.clone(), device).unwrap_err();
    assert!(
        matches!(err, vm::Error::Devices(Error::TooManyDevices(19))),
        "{err:?}"
    );
    // Devices from outside cannot be rebuilt: no snapshot.
    let refusal = vm.devices().can_snapshot().unwrap_err();
    assert!(refusal.contains("add_virtio_device"), "{refusal}");
}

/// A manager holding `devices` as the builder would have placed them, but
/// without KVM (their transports are not on a VM).
fn manager_with(devices: Vec<(Option<DeviceConfig>, Dummy)>) -> DeviceManager {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut manager = DeviceManager::new();
    for (index, (config, dummy)) in devices.into_iter().enumerate() {
        let handle = VirtioHandle::new(dummy);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(memory.clone(), handle.device.clone(), irqfd).unwrap();
        manager.devices.push(MmioDevice {
            slot: MmioSlot::nth(index).unwrap(),
            config,
            device: handle.device,
            subscriber: handle.subscriber,
            transport: Arc::new(Mutex::new(transport)),
        });
    }
    manager
}

#[test]
fn every_device_is_asked_whether_it_can_be_snapshotted() {
    let dir = std::env::temp_dir();
    let ok = manager_with(vec![
        (Some(vsock(3, "/tmp/a.sock")), Dummy { refuse: None }),
        (Some(fs(&dir, "rtvfs")), Dummy { refuse: None }),
    ]);
    ok.can_snapshot().expect("nobody refuses");
    let saved = ok.save();
    assert_eq!(saved.len(), 2);
    assert_eq!(saved[0].slot, MmioSlot::nth(0).unwrap());
    assert_eq!(saved[1].slot, MmioSlot::nth(1).unwrap());
    assert_eq!(saved[1].device, fs(&dir, "rtvfs"));
    assert_eq!(saved[1].transport.queues.len(), 2);

    let refusing = manager_with(vec![
        (Some(vsock(3, "/tmp/a.sock")), Dummy { refuse: None }),
        (
            Some(fs(&dir, "rtvfs")),
            Dummy {
                refuse: Some("the guest holds inodes"),
            },
        ),
    ]);
    assert_eq!(
        refusing.can_snapshot().unwrap_err(),
        "the guest holds inodes"
    );
    let foreign = manager_with(vec![(None, Dummy { refuse: None })]);
    assert_eq!(
        foreign.can_snapshot().unwrap_err(),
        "added with add_virtio_device cannot be snapshotted"
    );
}

#[test]
fn the_device_list_round_trips_through_a_snapshot_without_host_resources() {
    let old_share = temp_dir("old-share");
    let saved = vec![
        VirtioSnapshot {
            slot: MmioSlot::nth(0).unwrap(),
            device: vsock(9, "/run/old.sock"),
            transport: transport_state(),
        },
        VirtioSnapshot {
            slot: MmioSlot::nth(1).unwrap(),
            device: fs(&old_share, "data"),
            transport: transport_state(),
        },
    ];
    let json = serde_json::to_string(&saved).unwrap();
    assert!(
        !json.contains("old.sock") && !json.contains("old-share"),
        "host paths saved: {json}"
    );
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        value[0]["device"],
        serde_json::json!({"kind": "vsock", "guest_cid": 9})
    );
    assert_eq!(
        value[1]["device"],
        serde_json::json!({"kind": "fs", "tag": "data"})
    );
    assert_eq!(
        value[1]["slot"],
        serde_json::json!({"base": 0xd000_1000u64, "irq": 6})
    );
    let back: Vec<VirtioSnapshot> = serde_json::from_str(&json).unwrap();
    assert_eq!(back[0].device, vsock(9, ""));
    assert_eq!(back[1].device, fs(Path::new(""), "data"));
    assert_eq!(back[1].slot, saved[1].slot);
    assert_eq!(back[1].transport, saved[1].transport);

    // A restore gives each device its new host side; the CID may change.
    let new_share = temp_dir("new-share");
    let restore = RestoreConfig {
        vsock_uds: Some(PathBuf::from("/run/new.sock")),
        shared_dir: Some(new_share.clone()),
        ..Default::default()
    };
    assert_eq!(
        restore_plan(&back, &restore).unwrap(),
        [vsock(9, "/run/new.sock"), fs(&new_share, "data")]
    );
    let restore = RestoreConfig {
        vsock_cid: Some(7),
        ..restore
    };
    assert_eq!(
        restore_plan(&back, &restore).unwrap()[0],
        vsock(7, "/run/new.sock")
    );
    let _ = std::fs::remove_dir_all(old_share);
    let _ = std::fs::remove_dir_all(new_share);
}

#[test]
fn a_restore_must_give_each_device_what_it_needs_and_nothing_else() {
    let dir = std::env::temp_dir();
    let entry = |index: usize, device: DeviceConfig| VirtioSnapshot {
        slot: MmioSlot::nth(index).unwrap(),
        device,
        transport: transport_state(),
    };
    let with_vsock = [entry(0, vsock(3, ""))];
    let with_fs = [entry(0, fs(Path::new(""), "rtvfs"))];
    let uds = RestoreConfig {
        vsock_uds: Some(PathBuf::from("/run/v.sock")),
        ..Default::default()
    };
    let both = RestoreConfig {
        shared_dir: Some(dir.clone()),
        ..uds.clone()
    };
    let err = restore_plan(&with_vsock, &RestoreConfig::default()).unwrap_err();
    assert!(err.contains("--vsock-uds"), "{err}");
    let err = restore_plan(&with_fs, &RestoreConfig::default()).unwrap_err();
    assert!(err.contains("--shared-dir"), "{err}");
    let err = restore_plan(&with_fs, &uds).unwrap_err();
    assert!(err.contains("--shared-dir"), "{err}");
    let err = restore_plan(&[], &uds).unwrap_err();
    assert!(err.contains("no vsock device"), "{err}");
    let err = restore_plan(&with_vsock, &both).unwrap_err();
    assert!(
        err.contains("no virtio-fs device") && err.contains("--shared-dir"),
        "{err}"
    );
    assert!(restore_plan(&[], &RestoreConfig::default())
        .unwrap()
        .is_empty());

    // A device saved in another slot than this VMM gives it is refused.
    let mut moved = entry(0, vsock(3, ""));
    moved.slot = MmioSlot::nth(1).unwrap();
    let err = restore_plan(&[moved], &uds).unwrap_err();
    assert!(
        err.contains("(vsock) was saved at 0xd0001000, GSI 6")
            && err.contains("places it at 0xd0000000, GSI 5"),
        "{err}"
    );
}

#[test]
fn a_version_1_snapshot_is_refused_naming_its_version() {
    // The manifest as rtv-vmm wrote it before the device manager.
    let dir = temp_dir("v1-snapshot");
    let manifest = serde_json::json!({
        "format_version": 1,
        "vmm": {"version": crate::snapshot::VMM_VERSION, "build_id": crate::snapshot::build_id()},
        "created_unix_ms": 0,
        "mem_size_mib": 16,
        "vcpus": 1,
        "ram_regions": [{"guest_addr": 0, "size": 16u64 << 20}],
        "devices": [{"kind": "vsock", "guest_cid": 3}],
        "files": {}
    });
    std::fs::write(
        dir.join(crate::snapshot::MANIFEST_FILE),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let err = crate::snapshot::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("state.json")
            && err.contains("format_version 1,")
            && err.contains(&format!(
                "reads version {}",
                crate::snapshot::FORMAT_VERSION
            ))
            && err.contains("older rtv-vmm"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
