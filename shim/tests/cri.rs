//! CRI with rtv: containerd 1.6's CRI plugin with a runtime handler `rtv`
//! (`runtime_type = "io.containerd.rtv.v2"`), driven by the CRI client kept
//! in the repo (tests/cri/): RunPodSandbox, two containers in the pod's one
//! VM, ExecSync, ContainerStatus with exit codes, StopPodSandbox,
//! RemovePodSandbox, and nothing left behind; and pod networking through
//! real CNI plugins (bridge, host-local, portmap) with rtv's pods beside a
//! runc pod on the same bridge. The same scenarios pass with runc in
//! tests/tests/cri_runc.rs.

use std::path::{Path, PathBuf};

use rtv_tests::containerd::{self, CriRuntime};
use rtv_tests::cri::VmFault;
use rtv_tests::{cri, initramfs, one_vm_at_a_time, vmm_binary};

/// The guest kernels, initramfs and VMM in the environment containerd and
/// the shim inherit; the directory of the shim, for containerd's `PATH`.
fn setup() -> PathBuf {
    rtv_tests::export_kernels().expect("guest kernels");
    std::env::set_var("RTV_INITRAMFS", initramfs().expect("initramfs"));
    std::env::set_var("RTV_VMM", vmm_binary().expect("rtv-vmm"));
    let shim = Path::new(env!("CARGO_BIN_EXE_containerd-shim-rtv-v2"));
    shim.parent().expect("the shim's directory").to_path_buf()
}

#[test]
fn a_pod_of_two_containers_through_cri() {
    let dir = setup();
    let _one = one_vm_at_a_time();
    cri::run_pod_scenario(
        "cri-rtv",
        CriRuntime::rtv(),
        Some(dir),
        "containerd-shim-rtv-v2",
    );
}

/// Two rtv pods and a runc pod on one CNI bridge (in a containerd of its
/// own network namespace): addresses, TCP between them, the gateway and
/// the node, hostPort; a hostNetwork rtv pod gets loopback only; nothing
/// is left after the pods are removed.
#[test]
fn pod_network_through_cri() {
    let dir = setup();
    let runc = CriRuntime {
        name: "runc".into(),
        runtime_type: containerd::RUNC_SHIM.into(),
        binary_name: Some(containerd::find_binary("runc").expect("runc (apt-get install runc)")),
        root: None,
        config_path: None,
        pod_annotations: Vec::new(),
    };
    let _one = one_vm_at_a_time();
    cri::run_net_scenario(
        "cri-net-rtv",
        vec![CriRuntime::rtv(), runc],
        Some(dir),
        &cri::NetScenario {
            handler: "rtv".into(),
            peer_handler: Some("runc".into()),
            host_network: cri::HostNetwork::LoopbackOnly,
        },
    );
}

/// A privileged container with containerd's defaults (the host's devices
/// listed) runs with the guest's devices, every capability and no seccomp,
/// and mounts; CAP_NET_ADMIN makes a bridge in the VM; a host device the
/// guest lacks is refused by name.
///
/// In the same containerd: more handlers of the same shim with their own
/// configuration files (`options.ConfigPath`), one sizing the VM (and
/// passing containerd 1.7's pod-size annotations), one broken, one the
/// shipped config/config.toml (a 2 GiB, 2-vCPU pod); then pods
/// whose VM fails under their two containers: the VMM killed, the guest
/// kernel panicking, the guest hung (on a handler whose file sets a 10 s
/// agent.answer_timeout_secs): both containers reported exited with 137,
/// the pod removable, nothing left; then ten pods started at once on
/// a handler whose template cache is empty (ten shims, one template made).
#[test]
fn privileged_containers_and_devices_through_cri() {
    let dir = setup();
    let _one = one_vm_at_a_time();
    let files = std::env::temp_dir().join(format!("rtv-cri-config-{}", std::process::id()));
    std::fs::create_dir_all(&files).unwrap();
    let sized = files.join("sized.toml");
    std::fs::write(
        &sized,
        "[vm]\ndefault_memory_mib = 256\ndefault_vcpus = 1\n",
    )
    .unwrap();
    let broken = files.join("broken.toml");
    std::fs::write(&broken, "[vm]\n\ndefault_memory_mib = 0\n").unwrap();
    let impatient = files.join("impatient.toml");
    std::fs::write(
        &impatient,
        format!("[agent]\nanswer_timeout_secs = 10\n{}", rtv_tests::TINY_VM),
    )
    .unwrap();
    let templates = files.join("templates");
    let fresh = files.join("fresh.toml");
    std::fs::write(
        &fresh,
        format!(
            "[templates]\ndir = {:?}\n{}",
            templates.display().to_string(),
            rtv_tests::TINY_VM
        ),
    )
    .unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/config.toml");
    let with_file = |name: &str, path: &Path| CriRuntime {
        name: name.into(),
        config_path: Some(path.to_path_buf()),
        ..CriRuntime::rtv()
    };
    let opts = rtv_tests::cri::cri_net_options(
        vec![
            CriRuntime::rtv(),
            CriRuntime {
                pod_annotations: vec!["io.kubernetes.cri.sandbox-*".into()],
                ..with_file("rtv-256", &sized)
            },
            with_file("rtv-broken", &broken),
            with_file("rtv-fresh", &fresh),
            with_file("rtv-impatient", &impatient),
            with_file("rtv-shipped", &shipped),
        ],
        Some(dir),
    );
    rtv_tests::cri::with_cri("cri-priv-rtv", &opts, |c, cri| {
        cri::scenario_privileged(c, cri, "rtv", true)?;
        cri::scenario_config_path(c, cri, "rtv-256", "rtv-broken", &broken)?;
        cri::scenario_shipped_size(c, cri, "rtv-shipped")?;
        for fault in [VmFault::Killed, VmFault::Panicked] {
            cri::scenario_vm_fault(c, cri, "rtv", fault)?;
        }
        cri::scenario_vm_fault(c, cri, "rtv-impatient", VmFault::Hung)?;
        cri::scenario_pods_at_once(c, cri, "rtv-fresh", &templates, 10)
    });
    let _ = std::fs::remove_dir_all(&files);
}
