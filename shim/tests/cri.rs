//! CRI with rtv: containerd 1.6's CRI plugin with a runtime handler `rtv`
//! (`runtime_type = "io.containerd.rtv.v2"`), driven by the CRI client kept
//! in the repo (tests/cri/): RunPodSandbox, two containers in the pod's one
//! VM, ExecSync, ContainerStatus with exit codes, StopPodSandbox,
//! RemovePodSandbox, and nothing left behind. The same scenario passes with
//! runc in tests/tests/cri_runc.rs.

use std::path::Path;

use rtv_tests::containerd::CriRuntime;
use rtv_tests::{cri, initramfs, one_vm_at_a_time, vmm_binary};

#[test]
fn a_pod_of_two_containers_through_cri() {
    rtv_tests::export_kernels().expect("guest kernels");
    std::env::set_var("RTV_INITRAMFS", initramfs().expect("initramfs"));
    std::env::set_var("RTV_VMM", vmm_binary().expect("rtv-vmm"));
    let shim = Path::new(env!("CARGO_BIN_EXE_containerd-shim-rtv-v2"));
    let dir = shim.parent().expect("the shim's directory").to_path_buf();
    let _one = one_vm_at_a_time();
    cri::run_pod_scenario(
        "cri-rtv",
        CriRuntime {
            name: "rtv".into(),
            runtime_type: "io.containerd.rtv.v2".into(),
            binary_name: None,
            root: None,
        },
        Some(dir),
        "containerd-shim-rtv-v2",
    );
}
