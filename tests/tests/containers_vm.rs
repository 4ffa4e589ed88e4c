//! Containers in a VM: the product's initramfs (the agent alone) in a
//! sandbox started from a template, with a virtio-fs share into which each
//! container's busybox root file system is bind-mounted. Every scenario of
//! tests/src/containers.rs, plus cgroup v2 limits (OOM kill, pids.max,
//! cpu.max) inside the guest, and every kind of request at once on two
//! containers beside a CPU hog. The VM is sized from the OOM scenario's
//! spec.

use std::time::Duration;

use rtv_runtime::sandbox::{Sandbox, SandboxConfig};
use rtv_runtime::spec::{self, vm_size};
use rtv_tests::containers::{self, Place};
use rtv_tests::one_vm_at_a_time;
use rtv_tests::stress::{self, CpuHog, StressConfig};

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = rtv_runtime::remove_tree(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

#[test]
fn every_container_scenario_in_a_vm() {
    let dir = std::env::temp_dir().join(format!("rtv-containers-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("scratch")).unwrap();
    let _cleanup = Cleanup(dir.clone());
    let rootfs = dir.join("rootfs");
    containers::busybox_rootfs(&rootfs).unwrap();
    let place = containers::share_at(&dir.join("share"), &rootfs).unwrap();
    // The largest container of the run: a 64 MiB memory limit.
    let sized = containers::patched(
        &spec::default_spec(),
        serde_json::json!({"linux": {"resources": {"memory": {"limit": 67108864}}}}),
    )
    .unwrap();
    let size = vm_size(&sized, 2);
    assert_eq!(size.mem_mib, 128);
    let mut cfg = SandboxConfig::new(
        rtv_tests::kernel().unwrap(),
        rtv_tests::initramfs().unwrap(),
        rtv_tests::vmm_binary().unwrap(),
        dir.join("state"),
        "ctr-vm",
        7,
    );
    cfg.mem_mib = size.mem_mib;
    cfg.vcpus = size.vcpus;
    cfg.shared_dir = Some(dir.join("share"));
    let _one = one_vm_at_a_time();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sandbox = Sandbox::start(cfg).await.unwrap();
        eprintln!(
            "sandbox ready after {:.2}s ({:?})",
            sandbox.ready_after().as_secs_f64(),
            sandbox.origin()
        );
        let client = sandbox.client();
        let mut failures = containers::run_all(client, &place, &dir.join("scratch")).await;
        let cfg = StressConfig {
            containers: 2,
            execs: 3,
            hang: Duration::from_secs(300),
            update: serde_json::from_value(serde_json::json!({"pids": {"limit": 100}})).unwrap(),
        };
        let started = std::time::Instant::now();
        let hog = CpuHog::start(1);
        match stress::stress(client, &place, &cfg).await {
            Ok(()) => eprintln!("ok   stress ({:.2} s)", started.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("FAIL stress: {e:#}");
                failures.push(format!("stress: {e:#}"));
            }
        }
        drop(hog);
        // The guest survived everything, OOM kills included.
        let info = tokio::time::timeout(Duration::from_secs(60), client.guest_info())
            .await
            .expect("guest info in time")
            .expect("guest info");
        assert!(info.mem_total_kib > 64 * 1024, "{info:?}");
        if let Place::Vm { share, .. } = &place {
            let left: Vec<_> = std::fs::read_dir(share.dir())
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "left in the share: {left:?}");
        }
        assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
    });
}
