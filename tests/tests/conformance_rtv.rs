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

/// `rtv --debug` profiles the guest of the pod it starts: one part per
/// phase, labelled in `parts.txt`, kernel stacks named from the guest
/// kernel's System.map, and a flame graph of the parts drawn from them.
#[test]
fn debug_profiles_each_phase_of_a_pod() {
    let rtv = workspace_binary("rtv-runtime", "rtv").expect("building rtv");
    rtv_tests::export_kernels().expect("guest kernels");
    std::env::set_var("RTV_INITRAMFS", initramfs().expect("initramfs"));
    std::env::set_var("RTV_VMM", vmm_binary().expect("rtv-vmm"));
    let dir = std::env::temp_dir().join(format!("rtv-debug-profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bundle = dir.join("bundle");
    busybox_bundle(&bundle, &["sh", "-c", "true"]).expect("bundle");
    let root = dir.join("root");
    let id = "profiled";
    let _one = one_vm_at_a_time();
    let out = std::process::Command::new(&rtv)
        .arg("--debug")
        .arg("--root")
        .arg(&root)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(id)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running rtv");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let check = || -> anyhow::Result<()> {
        anyhow::ensure!(out.status.success(), "rtv run: {}: {stderr}", out.status);
        let profile = root.join("profiles").join(id);
        let parts = rtv_tests::profile::parts(&profile)?;
        let labels: Vec<&str> = parts.iter().map(|(_, l)| l.as_str()).collect();
        let want = [
            "the pod's VM starts (restore or boot)".to_owned(),
            format!("create {id}"),
            format!("start {id}"),
            format!("delete {id}"),
            "until the VM stopped".to_owned(),
        ];
        anyhow::ensure!(labels == want, "parts.txt: {labels:?}, want {want:?}");
        for (i, (n, _)) in parts.iter().enumerate() {
            anyhow::ensure!(*n == i as u32 + 1, "parts numbered {parts:?}");
            for ext in ["folded", "svg", "label"] {
                let f = profile.join(format!("{n}.{ext}"));
                anyhow::ensure!(f.exists(), "{} missing", f.display());
            }
        }
        anyhow::ensure!(profile.join("all.folded").exists(), "no all.folded");
        // The create is the agent's work in the guest kernel: named frames.
        let create = rtv_tests::profile::add_folded(&[profile.join("2.folded")])?;
        let samples: u64 = create.values().sum();
        anyhow::ensure!(samples > 0, "no samples in the create's part");
        let named: u64 = create
            .iter()
            .filter(|(s, _)| s.contains("do_syscall_64"))
            .map(|(_, c)| c)
            .sum();
        anyhow::ensure!(
            named > 0,
            "no system call named in the create's {samples} samples: {create:?}"
        );
        // Samples are attributed to the guest's tasks (this pod's VM runs
        // the uniprocessor kernel, whose `current_task` is no per-cpu
        // offset).
        let unknown: u64 = create
            .iter()
            .filter(|(s, _)| s.starts_with("[unknown task]"))
            .map(|(_, c)| c)
            .sum();
        anyhow::ensure!(
            unknown * 10 < samples,
            "{unknown} of the create's {samples} samples have no task: {create:?}"
        );
        let files: Vec<_> = (1..=3)
            .map(|n| profile.join(format!("{n}.folded")))
            .collect();
        let svg = dir.join("start.svg");
        let total = rtv_tests::profile::flamegraph(&svg, "pod start", &files)?;
        let text = std::fs::read_to_string(&svg)?;
        anyhow::ensure!(
            total > 0 && text.contains("<svg"),
            "flame graph: {text:.200}"
        );
        Ok(())
    };
    let result = check();
    let _ = rtv_runtime::remove_tree(&dir);
    if let Err(e) = result {
        panic!("{e:#}");
    }
}
