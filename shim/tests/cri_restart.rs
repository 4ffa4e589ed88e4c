//! containerd restarted while an rtv pod is starting, through containerd
//! 1.6's CRI plugin (a private containerd, the CRI client kept in the repo):
//! right after containerd started the pod's shim, when the pod's VMM runs,
//! a second later (the guest up, the sandbox starting), and once the pod is
//! ready. Whatever containerd recorded of the pod can be stopped and
//! removed, nothing is left, and the next pod runs.

use std::path::{Path, PathBuf};

use rtv_tests::containerd::CriRuntime;
use rtv_tests::cri::{self, RestartAt};
use rtv_tests::{initramfs, one_vm_at_a_time, vmm_binary};

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
fn a_pod_starting_while_containerd_restarts_is_cleaned_up() {
    let dir = setup();
    let _one = one_vm_at_a_time();
    let opts = cri::cri_options(vec![CriRuntime::rtv()], Some(dir));
    cri::with_cri("cri-restart-rtv", &opts, |c, cri| {
        for at in [
            RestartAt::ShimStarted,
            RestartAt::VmStarted,
            RestartAt::VmUp,
            RestartAt::PodReady,
        ] {
            cri::scenario_containerd_restart_mid_start(c, cri, "rtv", at)?;
        }
        cri::scenario_next_pod_runs(c, cri, "rtv")
    });
}
