//! The containerd harness (tests/src/containerd.rs) proven with Debian's
//! runc: the scenarios rtv must pass the same way, each in its own private
//! containerd, and each followed by a check that the instance left nothing
//! behind (processes, mounts, its directory, what containerd 1.6 puts under
//! /run/containerd, the containers' cgroups).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rtv_tests::containerd::{
    self, with_containerd, with_containerd_opts, Containerd, ContainerdOptions, CriConfig,
    CriRuntime,
};

fn runc() -> PathBuf {
    containerd::find_binary("runc").expect("runc (apt-get install runc)")
}

#[test]
fn busybox_image_is_reproducible() {
    let dir = std::env::temp_dir().join(format!("rtv-oci-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.tar"), dir.join("b.tar"));
    containerd::busybox_image_tar(&a).unwrap();
    containerd::busybox_image_tar(&b).unwrap();
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(a, b, "two builds of the busybox image differ");
    assert_eq!(&a[..10], b"oci-layout");
    assert_eq!(&a[512..542], br#"{"imageLayoutVersion":"1.0.0"}"#);
    let cached = containerd::cached_busybox_image_tar().unwrap();
    assert_eq!(std::fs::read(cached).unwrap(), a);
}

#[test]
fn run_rm_prints_and_returns_the_exit_code() {
    with_containerd("run-rm", |c| containerd::scenario_run_rm(c, &runc()));
}

#[test]
fn run_uses_the_given_runtime_binary() {
    with_containerd("wrapper", |c| {
        let (wrapper, log) = containerd::logging_wrapper(c, &runc())?;
        containerd::scenario_run_rm(c, &wrapper)?;
        let calls = std::fs::read_to_string(&log)?;
        for verb in [" create ", " start ", " delete "] {
            anyhow::ensure!(
                calls.lines().any(|l| l.contains(verb)),
                "the shim never called `{}` on the runtime; calls:\n{calls}",
                verb.trim()
            );
        }
        let root = c.runtime_root().join(c.namespace());
        anyhow::ensure!(
            calls.contains(&format!("--root {}", root.display())),
            "the runtime was not given --root {}; calls:\n{calls}",
            root.display()
        );
        eprintln!("runc's shim called the runtime:\n{calls}");
        Ok(())
    });
}

#[test]
fn run_with_stdin() {
    with_containerd("stdin", |c| containerd::scenario_stdin(c, &runc()));
}

#[test]
fn detached_container_exec_ps_kill_delete() {
    with_containerd("detached", |c| {
        containerd::scenario_detached_lifecycle(c, &runc())
    });
}

#[test]
fn run_with_a_tty() {
    with_containerd("tty", |c| containerd::scenario_tty(c, &runc()));
}

/// A running container (and its shim) is cleaned up by the harness when
/// the test does not delete it.
#[test]
fn drop_cleans_up_a_running_container() {
    let c = Containerd::start("drop").unwrap();
    let image = c.import_busybox().unwrap();
    let id = c.new_id("left-running");
    let mut args = vec!["run".to_owned(), "-d".to_owned()];
    args.extend(c.run_flags(&runc()));
    args.extend([image, id.clone(), "sleep".into(), "1000".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.ctr(&args, containerd::CTR_TIMEOUT).unwrap();
    assert!(out.status.success(), "{}", containerd::describe(&out));
    let (pid, _) = containerd::task_state(&c, &id).unwrap().unwrap();
    let shim = containerd::shim_socket(c.address(), c.namespace(), &id);
    assert!(shim.exists(), "no shim socket at {}", shim.display());
    let rootfs = c
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .join(c.namespace())
        .join(&id)
        .join("rootfs");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo.contains(&format!(" {} ", rootfs.display())),
        "the container's rootfs {} is not mounted",
        rootfs.display()
    );
    let footprint = c.footprint();
    let t = Instant::now();
    drop(c);
    eprintln!(
        "[drop] cleanup of a running container: {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the container's init {pid} is still there"
    );
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// After containerd and the shim are killed (SIGKILL), the harness still
/// cleans up: the container's process, its rootfs mount, and what the
/// container left under /run/containerd (here with ctr's and runc's default
/// directories: FIFOs, runc state, the shim socket).
#[test]
fn drop_cleans_up_after_a_crash() {
    let c = Containerd::start("crash").unwrap();
    let image = c.import_busybox().unwrap();
    let id = c.new_id("crashed");
    let runc = runc();
    let args = [
        "run",
        "-d",
        "--runtime",
        containerd::RUNC_SHIM,
        "--runc-binary",
        runc.to_str().unwrap(),
        &image,
        &id,
        "sleep",
        "1000",
    ];
    let out = c.ctr(&args, containerd::CTR_TIMEOUT).unwrap();
    assert!(out.status.success(), "{}", containerd::describe(&out));
    let (pid, _) = containerd::task_state(&c, &id).unwrap().unwrap();
    let shims = c.shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    assert_eq!(shims[0].1, id);
    let footprint = c.footprint();
    let ns = c.namespace().to_owned();
    let state = std::path::Path::new(containerd::DEFAULT_RUNC_ROOT)
        .join(&ns)
        .join(&id);
    assert!(state.exists(), "no runc state at {}", state.display());
    let kill = |pid: u32| {
        let st = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    kill(c.pid());
    kill(shims[0].0);
    std::thread::sleep(Duration::from_millis(200));
    let before = footprint.leftovers();
    assert!(
        before.iter().any(|l| l.contains("/run/containerd/s/")),
        "the killed shim's socket should be there: {before:#?}"
    );
    drop(c);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty(),
        "the container's init {pid} is still running"
    );
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// The CRI variant of the configuration loads: containerd starts with the
/// CRI plugin and a runtime handler table, and the plugin reports ok.
#[test]
fn cri_configuration_loads() {
    let opts = ContainerdOptions {
        cri: Some(CriConfig {
            sandbox_image: "registry.k8s.io/pause:3.6".into(),
            runtimes: vec![CriRuntime {
                name: "runc".into(),
                runtime_type: containerd::RUNC_SHIM.into(),
                binary_name: Some(runc()),
                root: None,
                config_path: None,
                pod_annotations: Vec::new(),
            }],
            default_runtime: "runc".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
            cni_conf_dir: None,
        }),
        ..Default::default()
    };
    with_containerd_opts("cri", &opts, |c| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let plugins = c.ctr_ok(&["plugins", "ls"])?;
            let cri = plugins
                .lines()
                .find(|l| l.starts_with("io.containerd.grpc.v1") && l.contains(" cri "));
            match cri {
                Some(l) if l.trim_end().ends_with("ok") => return Ok(()),
                Some(l) if Instant::now() >= deadline => {
                    anyhow::bail!("the CRI plugin is not ok: {l}")
                }
                None => anyhow::bail!("no CRI plugin listed:\n{plugins}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
}
