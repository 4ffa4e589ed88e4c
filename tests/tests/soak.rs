//! A short soak in CI (`scripts/bench.sh soak` runs the long one): a few
//! container lifecycles through `rtv` and a few pods through containerd's
//! CRI plugin on the rtv shim, with pod networks on a CNI bridge; after
//! the first cycle of each the host's census ([`rtv_tests::soak::Census`]:
//! runtime processes, mounts, sockets, links, network namespaces, cgroups,
//! state directories, descriptors of containerd and of this process) is
//! the base, and the last cycle's census may not be above it.

use std::path::Path;

use rtv_tests::conformance::busybox_bundle;
use rtv_tests::containerd::CriRuntime;
use rtv_tests::soak::{self, Census, Places};
use rtv_tests::{cri, one_vm_at_a_time};

/// Cycles of each kind: the first is the base, the rest may leak.
const CYCLES: usize = 3;

fn report(kind: &str) -> impl FnMut(usize, &Census, &[String]) {
    let kind = kind.to_owned();
    move |n, census, leaks| eprintln!("[soak {kind}] {} {leaks:?}", census.row(n))
}

#[test]
fn lifecycles_through_rtv_and_cri_leave_nothing() {
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
    let shim = rtv_tests::workspace_binary("containerd-shim-rtv-v2", "containerd-shim-rtv-v2")
        .expect("building the shim");
    let _one = one_vm_at_a_time();
    let dir = std::env::temp_dir().join(format!("rtv-soak-test-{}", std::process::id()));
    let root = dir.join("root");
    let bundle = dir.join("bundle");
    busybox_bundle(&bundle, &["sleep", "1000"]).expect("bundle");
    let templates = rtv_runtime::template_dir();
    let places = Places {
        rtv_root: Some(&root),
        templates: Some(&templates),
        containerd: None,
    };
    let leaks = soak::soak(
        CYCLES,
        10,
        |n| soak::rtv_cycle(&rtv, &root, &bundle, &format!("soak-{n}")),
        || Census::take(&places),
        report("rtv"),
    );
    let _ = rtv_runtime::remove_tree(&dir);
    let leaks = leaks.expect("rtv lifecycles");
    assert!(leaks.is_empty(), "rtv lifecycles leaked: {leaks:?}");

    let handler = CriRuntime::rtv();
    let shim_dir = shim.parent().map(Path::to_path_buf);
    let opts = cri::cri_net_options(vec![handler], shim_dir);
    cri::with_cri("soak-cri", &opts, |c, client| {
        let places = Places {
            rtv_root: None,
            templates: Some(&templates),
            containerd: Some(c),
        };
        let leaks = soak::soak(
            CYCLES,
            10,
            |n| soak::cri_cycle(c, client, "rtv", n),
            || Census::take(&places),
            report("cri"),
        )?;
        anyhow::ensure!(leaks.is_empty(), "CRI pods leaked: {leaks:?}");
        Ok(())
    });
}
