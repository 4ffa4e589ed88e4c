//! Docker 20.10 and Podman 4.3 as clients (tests/src/docker.rs): each
//! scenario with runc first (the harness's check), then with rtv. Each test
//! starts its own dockerd in a network namespace of its own and checks that
//! nothing is left when it stops. The bridge-network tests start theirs
//! with Docker's default bridge, docker0, inside that namespace.

use rtv_tests::docker::{bridge_scenarios, docker_scenarios, podman_scenarios, Dockerd, Network};
use rtv_tests::one_vm_at_a_time;

fn rtv() -> std::path::PathBuf {
    rtv_tests::rtv_with_artifacts().expect("building rtv and its guest")
}

fn with_dockerd(name: &str, network: Network, f: impl FnOnce(&Dockerd) -> anyhow::Result<()>) {
    let rtv = rtv();
    let d = Dockerd::start_with(name, &rtv, network).expect("starting dockerd");
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
    with_dockerd("runc", Network::None, |d| {
        docker_scenarios(d, "runc")?;
        podman_scenarios(d, &runc)
    });
}

#[test]
fn docker_and_podman_with_rtv() {
    let rtv = rtv();
    rtv_tests::docker::link_artifacts_beside(&rtv).expect("linking the guest artifacts");
    let _one = one_vm_at_a_time();
    with_dockerd("rtv", Network::None, |d| {
        docker_scenarios(d, "rtv")?;
        podman_scenarios(d, &rtv)
    });
}

/// Docker's bridge network (docker0 in dockerd's namespace) with runc.
#[test]
fn docker_bridge_network_with_runc() {
    with_dockerd("br-runc", Network::Bridge, |d| bridge_scenarios(d, "runc"));
}

/// Docker's bridge network with rtv: rtv's containers on docker0, with
/// each other and with a runc container.
#[test]
fn docker_bridge_network_with_rtv() {
    rtv_tests::docker::link_artifacts_beside(&rtv()).expect("linking the guest artifacts");
    let _one = one_vm_at_a_time();
    with_dockerd("br-rtv", Network::Bridge, |d| bridge_scenarios(d, "rtv"));
}
