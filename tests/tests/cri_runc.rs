//! The CRI client (tests/cri/cri.py over tests/cri/api.proto) and the CRI
//! harness (tests/src/cri.rs) proven with Debian's runc: a pod's life
//! through containerd 1.6's CRI plugin on a `runc` handler (runc's shim,
//! `io.containerd.runc.v2`), in a private containerd each, each followed by
//! the check that nothing is left behind; and pod networking through CNI
//! (bridge, host-local, portmap) in a containerd of its own network
//! namespace. rtv's handler runs the same scenarios (shim/tests/cri.rs).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context};
use rtv_tests::containerd::{self, CriRuntime};
use rtv_tests::cri::{self, with_cri};

fn runc_handler() -> CriRuntime {
    CriRuntime {
        name: "runc".into(),
        runtime_type: containerd::RUNC_SHIM.into(),
        binary_name: Some(containerd::find_binary("runc").expect("runc (apt-get install runc)")),
        root: None,
        config_path: None,
        pod_annotations: Vec::new(),
    }
}

#[test]
fn pod_lifecycle_on_the_runc_handler() {
    cri::run_pod_scenario("cri-runc", runc_handler(), None, "containerd-shim-runc-v2");
}

/// Pod networking with Debian's CNI plugins (bridge, host-local, portmap,
/// loopback) in a containerd of its own network namespace: runc's pods get
/// their addresses, talk TCP to each other, the gateway and the node, a
/// hostNetwork pod shares containerd's namespace, and nothing is left.
#[test]
fn pod_network_on_the_runc_handler() {
    cri::run_net_scenario(
        "cri-net-runc",
        vec![runc_handler()],
        None,
        &cri::NetScenario {
            handler: "runc".into(),
            peer_handler: None,
            host_network: cri::HostNetwork::NodeNamespace,
        },
    );
}

/// Privileged containers, CAP_NET_ADMIN and a host device on runc (the
/// harness's check for rtv's scenario), in containerd's own namespace.
#[test]
fn privileged_containers_and_devices_on_runc() {
    let opts = cri::cri_net_options(vec![runc_handler()], None);
    with_cri("cri-priv-runc", &opts, |c, cri| {
        cri::scenario_privileged(c, cri, "runc", false)
    });
}

#[test]
fn removing_a_running_pod_on_runc_leaves_nothing() {
    let opts = cri::cri_options(vec![runc_handler()], None);
    with_cri("cri-runc-rm", &opts, |c, cri| {
        cri::scenario_remove_running_pod(c, cri, "runc")
    });
}

#[test]
fn an_unknown_handler_is_refused() {
    let opts = cri::cri_options(vec![runc_handler()], None);
    with_cri("cri-no-handler", &opts, cri::scenario_unknown_handler);
}

/// The harness cleans a pod the test left running: dropping the instance
/// kills and deletes the pod's tasks and containers through containerd,
/// and nothing is left.
#[test]
fn drop_cleans_up_a_running_pod() {
    let opts = cri::cri_options(vec![runc_handler()], None);
    drop_cleans_up("cri-drop", &opts, cri::Network::Node);
}

/// The same with a pod on the CNI network: the pod's network namespace,
/// which CRI would remove at StopPodSandbox, and containerd's own go too.
#[test]
fn drop_cleans_up_a_running_pod_with_a_network() {
    let opts = cri::cri_net_options(vec![runc_handler()], None);
    drop_cleans_up("cri-drop-net", &opts, cri::Network::Pod);
}

fn drop_cleans_up(name: &str, opts: &containerd::ContainerdOptions, network: cri::Network) {
    let c = containerd::Containerd::start_with(name, opts).expect("starting containerd");
    let footprint = {
        let cri = cri::CriClient::connect(&c).unwrap();
        cri::wait_cri_ready(&cri, std::time::Duration::from_secs(30)).unwrap();
        cri::import_cri_images(&c, &cri).unwrap();
        let pod_cfg = cri::pod_config_in(&c, "left-running", network).unwrap();
        let pod = cri.run_pod(&pod_cfg, "runc").unwrap();
        let cfg = cri::container_config_in("sleeper", &["sleep", "1000"], &[], network);
        let id = cri.create_container(&pod, &cfg, &pod_cfg).unwrap();
        cri.start(&id).unwrap();
        assert!(!c.shims().is_empty(), "no shim for the running pod");
        c.footprint()
    };
    assert!(
        footprint
            .ids
            .iter()
            .filter(|(ns, _)| ns == cri::CRI_NAMESPACE)
            .count()
            == 2,
        "the pod and its container are not in the footprint: {:?}",
        footprint.ids
    );
    // With a network: the pod's namespace and containerd's.
    let want_netns = if network == cri::Network::Pod { 2 } else { 0 };
    assert_eq!(
        footprint.netns.len(),
        want_netns,
        "network namespaces in the footprint: {:?}",
        footprint.netns
    );
    let t = Instant::now();
    drop(c);
    eprintln!(
        "[{name}] cleanup of a running pod: {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// The client's command line, as a person uses it: `version`, `images`,
/// `image-status`, a bad method (usage error, exit 2), a gRPC error (exit
/// 1, the code named).
#[test]
fn the_client_command_line() {
    let opts = cri::cri_options(vec![runc_handler()], None);
    with_cri("cri-cli", &opts, |c, _cri| {
        let run = |args: &[&str]| {
            containerd::run_with_timeout(cri::client_command(c, args), None, cri::CRI_TIMEOUT)
        };
        let json = |out: &std::process::Output| -> anyhow::Result<serde_json::Value> {
            ensure!(out.status.success(), "{}", containerd::describe(out));
            serde_json::from_slice(&out.stdout).context("the client's JSON")
        };
        let v = json(&run(&["version"])?)?;
        ensure!(
            v["runtime_name"] == "containerd"
                && v["runtime_api_version"] == "v1"
                && v["runtime_version"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("1.6")),
            "version: {v}"
        );
        let images = json(&run(&["images"])?)?;
        let tags: Vec<&str> = images["images"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["repo_tags"].as_array().into_iter().flatten())
            .filter_map(|t| t.as_str())
            .collect();
        ensure!(
            tags.contains(&cri::PAUSE_REF) && tags.contains(&containerd::BUSYBOX_REF),
            "images: {tags:?}"
        );
        let st = json(&run(&["image-status", containerd::BUSYBOX_REF])?)?;
        ensure!(
            st["image"]["size"].as_u64().is_some_and(|s| s > 0),
            "image-status: {st}"
        );
        let st = json(&run(&["image-status", "rtv.local/absent:1"])?)?;
        ensure!(
            st["image"].is_null(),
            "image-status of an absent image: {st}"
        );
        let out = run(&["call", "RuntimeService/NoSuchMethod"])?;
        ensure!(
            out.status.code() == Some(2)
                && String::from_utf8_lossy(&out.stderr).contains("NoSuchMethod"),
            "an unknown method: {}",
            containerd::describe(&out)
        );
        let out = run(&["pod-status", "no-such-pod"])?;
        ensure!(
            out.status.code() == Some(1)
                && String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"),
            "pod-status of an unknown pod: {}",
            containerd::describe(&out)
        );
        Ok(())
    });
}

#[test]
fn pause_image_is_reproducible() {
    let dir = std::env::temp_dir().join(format!("rtv-pause-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fresh = dir.join("pause.tar");
    containerd::busybox_image_tar_with(&fresh, cri::PAUSE_REF, &cri::PAUSE_CMD).unwrap();
    let fresh_bytes = std::fs::read(&fresh).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let cached: PathBuf = cri::pause_image_tar().unwrap();
    assert_eq!(std::fs::read(cached).unwrap(), fresh_bytes);
    let text = String::from_utf8_lossy(&fresh_bytes);
    assert!(text.contains(cri::PAUSE_REF), "the index names the image");
    assert!(
        text.contains("trap 'exit 0' TERM"),
        "the config has the Cmd"
    );
}
