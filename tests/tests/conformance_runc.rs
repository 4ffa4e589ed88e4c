//! The conformance suite (`rtv_tests::conformance`) against Debian's runc,
//! as root with a temporary `--root`: it validates the suite itself, so that
//! what it asks of rtv is what runc does.
//!
//! runc comes from `apt-get install -y runc` (scripts/install-deps.sh);
//! `$RTV_RUNC` names another binary. Scenarios needing a command this runc
//! lacks (a capability probe), or a guarantee it does not give (several
//! commands on one id at once: runc 1.1 has no lock across processes, see
//! `Capability::IdLocking`), are reported as "not a guarantee of this
//! runc"; everything else must pass. rtv runs every scenario. `$RTV_CONFORMANCE_ONLY` (comma-separated
//! scenario names) runs a subset.

use std::path::PathBuf;

use rtv_tests::conformance::{busybox_bundle, run_suite, Runtime, SuiteOptions};

fn runc() -> PathBuf {
    if let Some(p) = std::env::var_os("RTV_RUNC") {
        return PathBuf::from(p);
    }
    ["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("runc is not installed: apt-get install -y runc"))
}

#[test]
fn runc_passes_the_conformance_suite() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "runc needs root: run the tests as root");
    let runc = runc();
    let version = std::process::Command::new(&runc)
        .arg("--version")
        .output()
        .expect("running runc --version");
    eprintln!("{}", String::from_utf8_lossy(&version.stdout).trim());

    let root =
        std::env::temp_dir().join(format!("rtv-conformance-runc-root-{}", std::process::id()));
    let options = SuiteOptions {
        skip_unsupported: true,
        only: std::env::var("RTV_CONFORMANCE_ONLY")
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    let report = {
        let rt = Runtime::new(&runc, &root, &busybox_bundle).expect("setting up the suite");
        run_suite(&rt, &options)
    };
    eprintln!("{}", report.table());
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&root);
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{} scenario(s) failed against runc:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(left.is_empty(), "containers left under --root: {left:?}");
}
