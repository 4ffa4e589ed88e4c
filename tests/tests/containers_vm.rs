//! Containers in a VM: the product's initramfs (the agent alone) in a pod
//! started through the pod layer from a template, with a virtio-fs share
//! into which each container's busybox root file system is bind-mounted.
//! Every scenario of tests/src/containers.rs, plus cgroup v2 limits (OOM
//! kill, pids.max, cpu.max) inside the guest, every kind of request at
//! once on two containers beside a CPU hog, and the pod layer's container
//! lifecycle (tests/src/pod.rs) through a second handle re-opened from the
//! pod's record, as `rtv` re-opens it. The VM is sized from the OOM
//! scenario's spec.

use std::time::Duration;

use rtv_runtime::pod::{Pod, PodConfig};
use rtv_runtime::spec::{self, vm_size};
use rtv_runtime::Share;
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
    // The largest container of the run: a 64 MiB memory limit.
    let sized = containers::patched(
        &spec::default_spec(),
        serde_json::json!({"linux": {"resources": {"memory": {"limit": 67108864}}}}),
    )
    .unwrap();
    let size = vm_size(&sized, 2);
    assert_eq!(size.mem_mib, 128);
    let cfg = PodConfig {
        id: "ctr-vm".into(),
        dir: dir.join("pod"),
        artifacts: rtv_tests::artifacts().unwrap(),
        template_dir: rtv_runtime::template_dir(),
        size,
        hostname: "ctr-vm".into(),
        detached: false,
        host_cgroup: None,
        host_cpuset: None,
        host_device_io: None,
        profile: None,
        network: rtv_runtime::net::NetworkMode::Loopback,
    };
    let _one = one_vm_at_a_time();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pod = Pod::start(cfg).await.unwrap();
        eprintln!("pod ready ({:?})", pod.origin());
        let place = Place::Vm {
            rootfs: rootfs.clone(),
            share: Share::new(pod.dir().join("share")).unwrap(),
        };
        let client = pod.client();
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
        // The pod layer through a handle re-opened from the record.
        let started = std::time::Instant::now();
        let scratch = dir.join("scratch");
        let pod_layer = async {
            let reopened = Pod::open(pod.dir()).await?;
            anyhow::ensure!(reopened.vmm_pid() == pod.vmm_pid() && reopened.size() == size);
            rtv_tests::pod::failed_creates(&reopened, &rootfs, &scratch).await?;
            rtv_tests::pod::lifecycle(&reopened, &rootfs, &scratch).await
        };
        match pod_layer.await {
            Ok(()) => eprintln!("ok   pod_layer ({:.2} s)", started.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("FAIL pod_layer: {e:#}");
                failures.push(format!("pod_layer: {e:#}"));
            }
        }
        // The guest survived everything, OOM kills included.
        let info = tokio::time::timeout(Duration::from_secs(60), client.guest_info())
            .await
            .expect("guest info in time")
            .expect("guest info");
        assert!(info.mem_total_kib > 64 * 1024, "{info:?}");
        let left: Vec<_> = std::fs::read_dir(pod.dir().join("share"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left in the share: {left:?}");
        let vmm = pod.vmm_pid();
        pod.stop().await;
        assert!(!dir.join("pod").exists(), "the pod's directory is left");
        assert!(
            !std::path::Path::new(&format!("/proc/{vmm}")).exists(),
            "the VMM (pid {vmm}) is left"
        );
        assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
    });
}
