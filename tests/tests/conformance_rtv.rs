//! The conformance suite (`rtv_tests::conformance`, validated against
//! runc by conformance_runc.rs) against `rtv`: every scenario, none
//! skipped. Each container runs in its own VM, restored from a template.
//! `$RTV_CONFORMANCE_ONLY` (comma-separated scenario names) runs a subset.

use rtv_tests::conformance::{busybox_bundle, run_suite, Runtime, SuiteOptions};
use rtv_tests::{initramfs, one_vm_at_a_time, vmm_binary, workspace_binary};

#[test]
fn rtv_passes_the_conformance_suite() {
    let rtv = workspace_binary("rtv-runtime", "rtv").expect("building rtv");
    // rtv finds the guest and the VMM through these (as a deployment
    // would put them next to the binary).
    rtv_tests::export_kernels().expect("guest kernels");
    std::env::set_var("RTV_INITRAMFS", initramfs().expect("initramfs"));
    std::env::set_var("RTV_VMM", vmm_binary().expect("rtv-vmm"));
    let root =
        std::env::temp_dir().join(format!("rtv-conformance-rtv-root-{}", std::process::id()));
    let options = SuiteOptions {
        skip_unsupported: false,
        only: std::env::var("RTV_CONFORMANCE_ONLY")
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    let _one = one_vm_at_a_time();
    let report = {
        let rt = Runtime::new(&rtv, &root, &busybox_bundle).expect("setting up the suite");
        run_suite(&rt, &options)
    };
    eprintln!("{}", report.table());
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| !p.ends_with(".lock") && !p.ends_with(".sandboxes"))
                .collect()
        })
        .unwrap_or_default();
    let sandboxes: Vec<_> = std::fs::read_dir(root.join(".sandboxes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if let Err(e) = rtv_runtime::remove_tree(&root) {
        eprintln!("cleanup: {e}");
    }
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed against rtv:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(left.is_empty(), "left under --root: {left:?}");
    assert!(sandboxes.is_empty(), "sandboxes left: {sandboxes:?}");
}
