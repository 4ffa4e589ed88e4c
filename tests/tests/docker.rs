//! Docker 20.10 and Podman 4.3 as clients (tests/src/docker.rs): each
//! scenario with runc first (the harness's check), then with rtv. Each test
//! starts its own dockerd in a network namespace of its own and checks that
//! nothing is left when it stops.

use rtv_tests::docker::{docker_scenarios, podman_scenarios, Dockerd};
use rtv_tests::one_vm_at_a_time;

fn rtv() -> std::path::PathBuf {
    rtv_tests::rtv_with_artifacts().expect("building rtv and its guest")
}

fn with_dockerd(name: &str, f: impl FnOnce(&Dockerd) -> anyhow::Result<()>) {
    let rtv = rtv();
    let d = Dockerd::start(name, &rtv).expect("starting dockerd");
    let result = d.import_busybox().and_then(|()| f(&d));
    let log = d.log_tail();
    let stopped = d.stop();
    if let Err(e) = result {
        panic!("{name}: {e:#}\ndockerd's log ends:\n{log}");
    }
    if let Err(e) = stopped {
        panic!("{name}: {e:#}");
    }
}

#[test]
fn docker_and_podman_with_runc() {
    let runc = rtv_tests::containerd::find_binary("runc").expect("runc");
    with_dockerd("runc", |d| {
        docker_scenarios(d, "runc")?;
        podman_scenarios(d, &runc)
    });
}

#[test]
fn docker_and_podman_with_rtv() {
    let rtv = rtv();
    rtv_tests::docker::link_artifacts_beside(&rtv).expect("linking the guest artifacts");
    let _one = one_vm_at_a_time();
    with_dockerd("rtv", |d| {
        docker_scenarios(d, "rtv")?;
        podman_scenarios(d, &rtv)
    });
}
