//! The conformance suite (`rtv_tests::conformance`, validated against
//! runc by conformance_runc.rs) against `rtv`: every scenario, none
//! skipped. Each container runs in its own VM, restored from a template.
//! `$RTV_CONFORMANCE_ONLY` (comma-separated scenario names) runs a subset.

use rtv_tests::conformance::{busybox_bundle, run_suite, Runtime, SuiteOptions};
use rtv_tests::one_vm_at_a_time;

#[test]
fn rtv_passes_the_conformance_suite() {
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
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
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
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

/// The specs real hosts write (tests/fixtures/specs, see generate.py there)
/// run under `rtv run` and their controls take effect in the guest:
/// Docker 20.10's default (seccomp without no-new-privileges, AppArmor,
/// blockIO weight 0, memory+swap twice the memory) and with
/// no-new-privileges; containerd CRI's RuntimeDefault with hugepage
/// limits, a cpuset and a blkio weight, whose VMM is pinned on the host.
/// The fields only the host can mean are named in rtv's log.
#[test]
fn specs_real_hosts_write_run() {
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
    let dir = std::env::temp_dir().join(format!("rtv-host-specs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the test's directory");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/specs");
    let root = dir.join("root");
    let cgroup_parent = format!("rtv-host-specs-{}", std::process::id());
    let _one = one_vm_at_a_time();
    // Output to files: a detached container keeps the stdio it was given
    // (as with runc), so pipes would stay open.
    let seq = std::cell::Cell::new(0);
    let rtv_cmd = |log: &std::path::Path, args: &[&str]| {
        seq.set(seq.get() + 1);
        let out = dir.join(format!("out-{}", seq.get()));
        let err = dir.join(format!("err-{}", seq.get()));
        let status = std::process::Command::new(&rtv)
            .arg("--log")
            .arg(log)
            .arg("--root")
            .arg(&root)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .status()
            .expect("running rtv");
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        (status, read(&out), read(&err))
    };
    // A bundle `name` from the fixture `fixture`.
    let bundle =
        |fixture: &str, name: &str, script: &str, edit: &dyn Fn(&mut serde_json::Value)| {
            let b = dir.join(name);
            rtv_tests::containers::busybox_rootfs(&b.join("rootfs"))?;
            let text = std::fs::read(fixtures.join(format!("{fixture}.json")))?;
            let mut spec: serde_json::Value = serde_json::from_slice(&text)?;
            spec["process"]["args"] = serde_json::json!(["sh", "-c", script]);
            spec["linux"]["cgroupsPath"] = format!("/{cgroup_parent}/{name}").into();
            edit(&mut spec);
            std::fs::write(b.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
            anyhow::Ok(b)
        };
    let check = || -> anyhow::Result<()> {
        // Docker: what the container reports of itself.
        let script = "grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status; \
             cg=$(sed -n 's/^0:://p' /proc/self/cgroup); \
             echo memory.max $(cat /sys/fs/cgroup$cg/memory.max); \
             unshare -U true 2>&1; echo unshare $?; \
             echo lo flags $(cat /sys/class/net/lo/flags)";
        for (name, nnp) in [("docker-20.10-run", "0"), ("docker-20.10-nnp", "1")] {
            let b = bundle(name, name, script, &|_| {})?;
            let log = dir.join(format!("{name}.log"));
            let (status, out, err) = rtv_cmd(
                &log,
                &[
                    "run",
                    "--bundle",
                    &b.to_string_lossy(),
                    &format!("hs-{name}"),
                ],
            );
            anyhow::ensure!(status.success(), "{name}: rtv run: {status}: {out}{err}");
            for want in [
                format!("NoNewPrivs:\t{nnp}"),
                "Seccomp:\t2".to_owned(),
                // Docker's 14 default capabilities.
                "CapEff:\t00000000a80425fb".to_owned(),
                "memory.max 67108864".to_owned(),
                // unshare(2) is not in the profile's allowlist: EPERM.
                "Operation not permitted".to_owned(),
                "unshare 1".to_owned(),
                // `--network none`: lo is up (IFF_UP | IFF_LOOPBACK), as
                // with runc.
                "lo flags 0x9".to_owned(),
            ] {
                anyhow::ensure!(out.contains(&want), "{name}: no {want:?} in {out:?}");
            }
            let logged = std::fs::read_to_string(&log)?;
            for want in [
                "process.apparmorProfile",
                "docker-default",
                "linux.resources.memory.swap: the guest has no swap",
            ] {
                anyhow::ensure!(
                    logged.contains(want),
                    "{name}: the log does not name {want:?}: {logged}"
                );
            }
        }

        // CRI: the controls in the guest, and the VMM pinned on the host.
        // One host CPU (CPU 1) for a two-vCPU VM: the guest's cpuset is
        // vCPU 0.
        let name = "cri-runtime-default";
        let b = bundle(name, name, "sleep 1000", &|s| {
            s["linux"]["resources"]["cpu"]["cpus"] = "1".into();
        })?;
        let id = "hs-cri";
        let log = dir.join(format!("{name}.log"));
        let (status, out, err) =
            rtv_cmd(&log, &["run", "-d", "--bundle", &b.to_string_lossy(), id]);
        anyhow::ensure!(status.success(), "{name}: rtv run -d: {status}: {out}{err}");
        let inside = (|| {
            let (status, out, err) = rtv_cmd(
                &log,
                &[
                    "exec",
                    id,
                    "sh",
                    "-c",
                    "cd /sys/fs/cgroup; for f in cpuset.cpus.effective cpuset.mems.effective \
                     hugetlb.2MB.max io.weight cpu.max; do echo $f: $(cat $f); done; \
                     grep -c ^processor /proc/cpuinfo; grep Seccomp: /proc/self/status",
                ],
            );
            anyhow::ensure!(status.success(), "exec: {status}: {out}{err}");
            for want in [
                "cpuset.cpus.effective: 0\n",
                "cpuset.mems.effective: 0\n",
                "hugetlb.2MB.max: 0\n",
                // blkio 300 as io.weight, converted as runc does.
                "io.weight: default 2930\n",
                "cpu.max: 200000 100000\n",
                "\n2\n",
                "Seccomp:\t2\n",
            ] {
                anyhow::ensure!(out.contains(want), "no {want:?} in {out:?}");
            }
            // The VMM (the pod's) is in the spec's host cgroup, pinned to
            // host CPU 1.
            let host = std::path::Path::new("/sys/fs/cgroup/cpuset")
                .join(&cgroup_parent)
                .join(name);
            let cpus = std::fs::read_to_string(host.join("cpuset.cpus"))?;
            anyhow::ensure!(cpus.trim() == "1", "host cpuset.cpus {cpus:?}");
            let tasks = std::fs::read_to_string(host.join("cgroup.procs"))?;
            let mut vmm = None;
            for pid in tasks.lines() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "rtv-vmm" {
                    vmm = Some(pid.to_owned());
                }
            }
            let vmm =
                vmm.ok_or_else(|| anyhow::anyhow!("no rtv-vmm in {}: {tasks:?}", host.display()))?;
            let status = std::fs::read_to_string(format!("/proc/{vmm}/status"))?;
            anyhow::ensure!(
                status.contains("Cpus_allowed_list:\t1\n"),
                "the VMM is not pinned: {status}"
            );
            // Its cgroup is limited to its guest (128 MiB, 2 vCPUs) and the
            // VMM's overhead.
            let limits = rtv_runtime::host_cgroup::VmmLimits::for_vm(128, 2);
            for (controller, file, want) in [
                ("memory", "memory.limit_in_bytes", limits.memory_bytes),
                ("pids", "pids.max", limits.pids),
            ] {
                let path = std::path::Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(&cgroup_parent)
                    .join(name)
                    .join(file);
                let got = std::fs::read_to_string(&path)?;
                anyhow::ensure!(
                    got.trim() == want.to_string(),
                    "{}: {got:?}, expected {want}",
                    path.display()
                );
            }
            let logged = std::fs::read_to_string(&log)?;
            for want in ["cri-containerd.apparmor.d", "the guest has no 1GB pages"] {
                anyhow::ensure!(
                    logged.contains(want),
                    "the log does not name {want:?}: {logged}"
                );
            }
            Ok(())
        })();
        let (status, out, err) = rtv_cmd(&log, &["delete", "--force", id]);
        inside?;
        anyhow::ensure!(status.success(), "delete: {status}: {out}{err}");

        // A CRI pod as kubelet's static CPU manager makes it: no cpuset on
        // the sandbox, one on the app container. The VMM (in the
        // sandbox's host cgroup) is pinned to the app container's CPUs.
        let sandbox = bundle(name, "cri-sandbox", "sleep 1000", &|s| {
            s["annotations"] = serde_json::json!({"io.kubernetes.cri.container-type": "sandbox"});
            s["linux"]["resources"] = serde_json::json!({});
            s["linux"]["cgroupsPath"] = format!("/{cgroup_parent}/cri-sandbox").into();
        })?;
        let app = bundle(name, "cri-member", "sleep 1000", &|s| {
            s["annotations"] = serde_json::json!({
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "hs-sb",
            });
            s["linux"]["resources"]["cpu"]["cpus"] = "1".into();
            s["linux"]["resources"]["cpu"]["quota"] = serde_json::Value::Null;
            s["linux"]["cgroupsPath"] = format!("/{cgroup_parent}/cri-member").into();
        })?;
        let log = dir.join("cri-pod.log");
        let pod = (|| {
            for (b, id) in [(&sandbox, "hs-sb"), (&app, "hs-app")] {
                let (status, out, err) =
                    rtv_cmd(&log, &["run", "-d", "--bundle", &b.to_string_lossy(), id]);
                anyhow::ensure!(status.success(), "{id}: rtv run -d: {status}: {out}{err}");
            }
            let host = std::path::Path::new("/sys/fs/cgroup/cpuset")
                .join(&cgroup_parent)
                .join("cri-sandbox");
            let cpus = std::fs::read_to_string(host.join("cpuset.cpus"))?;
            anyhow::ensure!(
                cpus.trim() == "1",
                "the sandbox's host cpuset.cpus {cpus:?}"
            );
            let procs = std::fs::read_to_string(host.join("cgroup.procs"))?;
            let vmm = procs
                .lines()
                .find(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "rtv-vmm")
                })
                .ok_or_else(|| anyhow::anyhow!("no rtv-vmm in {}", host.display()))?;
            let status = std::fs::read_to_string(format!("/proc/{vmm}/status"))?;
            anyhow::ensure!(
                status.contains("Cpus_allowed_list:\t1\n"),
                "the pod's VMM is not pinned: {status}"
            );
            Ok(())
        })();
        for id in ["hs-app", "hs-sb"] {
            let _ = rtv_cmd(&log, &["delete", "--force", id]);
        }
        pod?;
        Ok(())
    };
    let result = check();
    for name in [
        "docker-20.10-run",
        "docker-20.10-nnp",
        "cri-runtime-default",
    ] {
        let _ = rtv_cmd(
            &dir.join("cleanup.log"),
            &["delete", "--force", &format!("hs-{name}")],
        );
    }
    for id in ["hs-cri", "hs-app", "hs-sb"] {
        let _ = rtv_cmd(&dir.join("cleanup.log"), &["delete", "--force", id]);
    }
    let mut left = Vec::new();
    for h in rtv_runtime::host_cgroup::hierarchies() {
        let parent = h.join(&cgroup_parent);
        for name in [
            "docker-20.10-run",
            "docker-20.10-nnp",
            "cri-runtime-default",
        ] {
            if parent.join(name).exists() {
                left.push(parent.join(name));
            }
        }
        let _ = std::fs::remove_dir(&parent);
    }
    let _ = rtv_runtime::remove_tree(&dir);
    if let Err(e) = result {
        panic!("{e:#}");
    }
    assert!(left.is_empty(), "host cgroups left: {left:?}");
}

/// `rtv check` reports the host: KVM, the guest's files, the template, and
/// what the host gives the VMM's hardening; every line is ok here.
#[test]
fn check_reports_the_host_and_the_vmm_hardening() {
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
    let out = std::process::Command::new(&rtv)
        .arg("check")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running rtv check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rtv check: {}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for what in [
        "/dev/kvm",
        "guest kernel",
        "rtv-vmm",
        "VMM hardening: descriptors",
        "VMM hardening: namespaces",
        "VMM hardening: capabilities",
        "VMM hardening: no_new_privs",
        "VMM hardening: seccomp",
    ] {
        assert!(
            stdout.contains(&format!("[ok]   {what}:")),
            "no ok line for {what}: {stdout}"
        );
    }
    assert!(!stdout.contains("[FAIL]"), "{stdout}");
}

/// The configuration file through `rtv --config`: every key takes effect
/// (with the variables that would win over it unset): the guest's parts
/// and the VMM from the file's paths, the template cache in its
/// directory, a spec without limits in a VM of `vm.default_memory_mib`,
/// and `vmm.jail = false` and `vmm.seccomp = "off"` starting the VMM with
/// `--jail off --seccomp off`; a bad file
/// is refused with its line and key, and nothing runs.
#[test]
fn the_configuration_file_takes_effect() {
    use std::process::{Command, Stdio};
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
    let a = rtv_runtime::artifacts::Artifacts::find().expect("artifacts");
    let dir = std::env::temp_dir().join(format!("rtv-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let link = |name: &str, to: &std::path::Path| {
        let p = dir.join(name);
        std::os::unix::fs::symlink(std::fs::canonicalize(to).unwrap(), &p).unwrap();
        p
    };
    let kernel = link("kernel", &a.kernel);
    let kernel_up = link("kernel-up", a.kernel_for(1));
    let initramfs = link("initramfs", &a.initramfs);
    let vmm = link("vmm", &a.vmm);
    let templates = dir.join("templates");
    let config = dir.join("config.toml");
    // PVM's accommodations named as this host needs them.
    let pvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "on"
    } else {
        "off"
    };
    std::fs::write(
        &config,
        format!(
            "# rtv's configuration\n[guest]\nkernel = {:?}\nkernel_up = {:?}\ninitramfs = {:?}\n\
             [vmm]\npath = {:?}\njail = false\nseccomp = \"off\"\n\
             [vm]\ndefault_memory_mib = 256\ndefault_vcpus = 1\nmax_memory_mib = 512\n\
             max_vcpus = 1\nkernel_args = \"rtv.configured=yes\"\npvm = \"{pvm}\"\n\
             [templates]\ndir = {:?}\nmax_size_mib = 300\n\
             [log]\nlevel = \"debug\"\n\
             [agent]\nanswer_timeout_secs = 300\n",
            kernel, kernel_up, initramfs, vmm, templates
        ),
    )
    .unwrap();
    let cmd = |args: &[&str], config: &std::path::Path| {
        let mut c = Command::new(&rtv);
        c.arg("--config").arg(config).args(args);
        for var in [
            "RTV_KERNEL",
            "RTV_KERNEL_UP",
            "RTV_INITRAMFS",
            "RTV_VMM",
            "RTV_CACHE_DIR",
            "RTV_CONFIG",
        ] {
            c.env_remove(var);
        }
        c.stdin(Stdio::null());
        c
    };
    let root = dir.join("root");
    let id = "configured";
    let _one = one_vm_at_a_time();
    let result = (|| -> anyhow::Result<()> {
        // The paths and sizes, as `rtv check` reports them.
        let out = cmd(&["check"], &config).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "rtv check: {stdout}");
        for want in [
            format!("configuration: {}", config.display()),
            format!("guest kernel: {}", kernel.display()),
            format!("guest kernel, 1 vCPU: {}", kernel_up.display()),
            format!("initramfs: {}", initramfs.display()),
            format!("rtv-vmm: {}", vmm.display()),
            "default VM: 256 MiB, 1 vCPU(s)".into(),
            "VMM hardening off".into(),
            "VMM seccomp filters off (vmm.seccomp = \"off\")".into(),
            templates.display().to_string(),
            "of its 300 MiB budget (templates.max_size_mib)".into(),
            "at most 512 MiB (vm.max_memory_mib) and 1 vCPU(s) (vm.max_vcpus)".into(),
            "kernel arguments added: rtv.configured=yes".into(),
            format!("PVM accommodations: {pvm}"),
            "log level: debug".into(),
            "a guest silent for 300 s is stopped (agent.answer_timeout_secs)".into(),
        ] {
            anyhow::ensure!(stdout.contains(&want), "no {want:?} in {stdout}");
        }

        // A container: its VM has the default size, its VMM runs with
        // --jail off, its template is made in the file's directory.
        // It asks for 2 CPUs (a quota of two periods); vm.max_vcpus caps
        // them at 1.
        let bundle = dir.join("bundle");
        busybox_bundle(
            &bundle,
            &[
                "sh",
                "-c",
                "grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo; \
                 cat /proc/cmdline; sleep 2",
            ],
        )?;
        // Sets linux.resources.<field> in a bundle's config.json.
        let set_resource = |bundle: &std::path::Path, field: &str, value: serde_json::Value| {
            let path = bundle.join("config.json");
            let mut spec: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            spec["linux"]["resources"][field] = value;
            std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
            anyhow::Ok(())
        };
        set_resource(
            &bundle,
            "cpu",
            serde_json::json!({"quota": 200000, "period": 100000}),
        )?;
        let log = dir.join("rtv.log");
        let child = cmd(
            &[
                "--log",
                log.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
                "run",
                "--bundle",
                bundle.to_str().unwrap(),
                id,
            ],
            &config,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
        let mut vmm_seen = None;
        let start = std::time::Instant::now();
        while vmm_seen.is_none() && start.elapsed() < std::time::Duration::from_secs(120) {
            for e in std::fs::read_dir("/proc")?.flatten() {
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&templates.display().to_string())
                    && cmdline.contains("--restore")
                {
                    let status =
                        std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
                    vmm_seen = Some((cmdline, status));
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "rtv run: {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (cmdline, status) = vmm_seen
            .ok_or_else(|| anyhow::anyhow!("no VMM restored from {}", templates.display()))?;
        // The file's VMM (argv[0]: without the jail it does not start
        // itself again).
        anyhow::ensure!(
            cmdline.starts_with(&format!("{} ", vmm.display())),
            "{cmdline}"
        );
        anyhow::ensure!(cmdline.contains("--jail off"), "{cmdline}");
        anyhow::ensure!(status.contains("NoNewPrivs:\t0"), "{status}");
        anyhow::ensure!(cmdline.contains("--seccomp off"), "{cmdline}");
        anyhow::ensure!(status.contains("Seccomp:\t0"), "{status}");
        anyhow::ensure!(cmdline.contains(&format!("--pvm {pvm}")), "{cmdline}");
        let lines: Vec<&str> = stdout.lines().collect();
        anyhow::ensure!(
            lines.get(1) == Some(&"1"),
            "CPUs in a VM of vm.max_vcpus = 1 for a quota of 2: {stdout}"
        );
        anyhow::ensure!(
            lines
                .get(2)
                .is_some_and(|l| l.split_whitespace().any(|a| a == "rtv.configured=yes")),
            "the guest's command line lacks vm.kernel_args: {stdout}"
        );
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        anyhow::ensure!(
            logged.contains("level=debug"),
            "no debug line in rtv's log with log.level = \"debug\": {logged}"
        );
        let kb: u64 = stdout
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no MemTotal in {stdout:?}"))?;
        anyhow::ensure!(
            (200 * 1024..256 * 1024).contains(&kb),
            "MemTotal {kb} kB in a VM of vm.default_memory_mib = 256"
        );
        anyhow::ensure!(
            std::fs::read_dir(&templates)?.next().is_some(),
            "no template in {}",
            templates.display()
        );

        // A container asking for more than vm.max_memory_mib: refused,
        // naming the field, the key and the file; nothing left.
        let big = dir.join("big");
        busybox_bundle(&big, &["true"])?;
        set_resource(&big, "memory", serde_json::json!({"limit": 1u64 << 30}))?;
        let out = cmd(
            &[
                "--root",
                root.to_str().unwrap(),
                "run",
                "--bundle",
                big.to_str().unwrap(),
                "big",
            ],
            &config,
        )
        .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(
            !out.status.success(),
            "a VM over vm.max_memory_mib was started"
        );
        anyhow::ensure!(
            stderr.contains(&format!(
                "linux.resources.memory.limit asks for a VM of 1088 MiB (with 64 MiB for the guest), \
                 over vm.max_memory_mib = 512 in {}",
                config.display()
            )),
            "{stderr}"
        );
        anyhow::ensure!(
            !root.join("big").exists(),
            "state left for the refused container"
        );

        // A bad file: refused with the line and the key, nothing runs.
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[vm]\n\ndefault_memory_mib = -5\n")?;
        let out = cmd(
            &[
                "--root",
                root.to_str().unwrap(),
                "run",
                "--bundle",
                bundle.to_str().unwrap(),
                "bad",
            ],
            &bad,
        )
        .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(!out.status.success(), "a bad file was accepted");
        anyhow::ensure!(
            stderr.contains(&format!("{}:3: vm.default_memory_mib", bad.display())),
            "{stderr}"
        );
        anyhow::ensure!(
            !root.join("bad").exists(),
            "state left for the refused container"
        );
        Ok(())
    })();
    let _ = cmd(
        &["--root", root.to_str().unwrap(), "delete", "--force", id],
        &config,
    )
    .output();
    let _ = rtv_runtime::remove_tree(&dir);
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

/// Fault (issue 18): the pod's VMM killed with SIGKILL while its container
/// runs. `state` says stopped, the pid-file's process (the waiter
/// containerd would wait on) exits with 137 as if the container had been
/// killed, `delete` succeeds, and nothing is left: no process, no sandbox
/// directory, no mount under the root.
/// How a pod's VM fails under a running container, in
/// [`faults_of_a_pods_vm_stop_its_container_and_leave_nothing`].
#[derive(Debug, Clone, Copy)]
enum VmFault {
    /// The VMM is killed (SIGKILL).
    Killed,
    /// The VM stops answering (its VMM is stopped with SIGSTOP): the next
    /// command times out (`agent.answer_timeout_secs`) and kills it.
    Hung,
    /// The guest kernel panics (an OOM kill in a container, with the
    /// guest's `vm.panic_on_oom = 2`).
    Panicked,
}

/// Each fault of a pod's VM while its container runs: what the client
/// sees (the waiter, which containerd waits on, exits 137 as for a
/// container killed with its host; `state` says stopped; `delete`
/// works), the reason in the log, and nothing left (no process, sandbox
/// directory or mount).
#[test]
fn faults_of_a_pods_vm_stop_its_container_and_leave_nothing() {
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
    let root = std::env::temp_dir().join(format!("rtv-fault-vmm-{}", std::process::id()));
    let _one = one_vm_at_a_time();
    let mut rt = Runtime::new(&rtv, &root, &busybox_bundle).expect("setting up");
    let config = rt.scratch("config.toml");
    std::fs::write(&config, "[agent]\nanswer_timeout_secs = 5\n").unwrap();
    let root_text = root.display().to_string();
    let mut result = Ok(());
    for fault in [VmFault::Killed, VmFault::Hung, VmFault::Panicked] {
        let log = rt.scratch("rtv.log");
        rt.global_args = vec!["--log".into(), log.display().to_string()];
        result = vm_fault(&mut rt, fault, &root_text, &log, &config)
            .map_err(|e| e.context(format!("{fault:?}")));
        if result.is_err() {
            break;
        }
    }
    drop(rt);
    let _ = rtv_runtime::remove_tree(&root);
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

/// One [`VmFault`]; `impatient` (a 5 s `agent.answer_timeout_secs`) is the
/// configuration of the command that meets the hung guest (the others keep
/// the default, so a slow but live guest is never taken as hung).
fn vm_fault(
    rt: &mut Runtime<'_>,
    fault: VmFault,
    root_text: &str,
    log: &std::path::Path,
    impatient: &std::path::Path,
) -> anyhow::Result<()> {
    let id = rt.id("vm-fault");
    let bundle = rt.bundle(&["sleep", "1000"])?;
    // /proc/sys writable (the panic's sysctl); nothing else changes.
    rt.edit_config(&bundle, |c| {
        c["linux"]["readonlyPaths"] = serde_json::json!([])
    })?;
    let (_, pid) = rt.create(&id, &bundle)?;
    rt.ok(&["start", &id])?;
    let vmm = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            comm.trim() == "rtv-vmm" && String::from_utf8_lossy(&cmdline).contains(root_text)
        })
        .ok_or_else(|| anyhow::anyhow!("no rtv-vmm of {root_text}"))?;
    let reason = match fault {
        VmFault::Killed => {
            // SAFETY: a signal to the VMM process this test's runtime started.
            anyhow::ensure!(unsafe { libc::kill(vmm, libc::SIGKILL) } == 0);
            "its VMM was killed"
        }
        VmFault::Hung => {
            // SAFETY: as above.
            anyhow::ensure!(unsafe { libc::kill(vmm, libc::SIGSTOP) } == 0);
            rt.use_config_and_log(impatient, log);
            let out = rt.run(&["exec", &id, "true"]);
            rt.global_args = vec!["--log".into(), log.display().to_string()];
            let out = out?;
            anyhow::ensure!(!out.success(), "exec in a hung VM: {}", out.describe());
            anyhow::ensure!(
                out.stderr.contains("hung") && out.elapsed < std::time::Duration::from_secs(60),
                "exec in a hung VM should fail naming the hang within the timeout: {}",
                out.describe()
            );
            "did not answer a new connection within 5 s"
        }
        VmFault::Panicked => {
            rt.ok(&["update", "--memory", "4194304", &id])?;
            let out = rt.run(&[
                "exec",
                &id,
                "sh",
                "-c",
                "echo 2 > /proc/sys/vm/panic_on_oom && head -c 8388608 /dev/zero | tail",
            ])?;
            anyhow::ensure!(!out.success(), "the panicking exec: {}", out.describe());
            "the guest kernel panicked (Kernel panic - not syncing: Out of memory"
        }
    };
    let status = rt.wait_pid(pid)?;
    anyhow::ensure!(
        status == 137,
        "the waiter exited {status} after its VM failed (want 137)"
    );
    let state = rt.wait_for_status(&id, "stopped")?;
    anyhow::ensure!(state["pid"] == 0, "{state}");
    let text = std::fs::read_to_string(log)?;
    anyhow::ensure!(
        text.contains(reason),
        "the log does not say {reason:?}:\n{text}"
    );
    rt.ok(&["delete", &id])?;
    rt.assert_gone(&id)?;
    // The VMM was reparented to this test (a subreaper, as containerd's
    // shim is): a zombie until reaped here.
    // SAFETY: reaps our adopted child, if it is one.
    unsafe { libc::waitpid(vmm, std::ptr::null_mut(), libc::WNOHANG) };
    anyhow::ensure!(!rtv_tests::conformance::pid_running(vmm), "the VMM is left");
    let sandboxes: Vec<_> = std::fs::read_dir(std::path::Path::new(root_text).join(".sandboxes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    anyhow::ensure!(sandboxes.is_empty(), "sandboxes left: {sandboxes:?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    anyhow::ensure!(
        !mounts.contains(root_text),
        "mounts left under the root: {mounts}"
    );
    Ok(())
}

/// A tmpfs of `size` mounted on `dir` (made if missing), for the disk-full
/// test; unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "rtv-test",
            ])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs on {}", dir.display());
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The disk full under the template cache, then under the state
/// directory (`--root`), during a create. A full cache: the template
/// cannot be written, the sandbox cold boots instead (the container runs;
/// the log says why) and no half-made template is left. A full state
/// directory: `create` fails naming the problem, leaves no process, mount
/// or entry under `--root`, and once there is space again the next create
/// of the same id works.
#[test]
fn a_full_disk_fails_cleanly_and_the_next_create_works() {
    let rtv = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
    let base = std::env::temp_dir().join(format!("rtv-full-{}", std::process::id()));
    let (state, cache) = (base.join("state"), base.join("templates"));
    let _one = one_vm_at_a_time();
    let result = (|| -> anyhow::Result<()> {
        let state_fs = SmallFs::mount(&state, "64m");
        let cache_fs = SmallFs::mount(&cache, "1m");
        let mut rt = Runtime::new(&rtv, &state, &busybox_bundle)?;
        let config = rt.scratch("config.toml");
        std::fs::write(
            &config,
            format!(
                "[templates]\ndir = {:?}\n{}",
                cache.display().to_string(),
                rtv_tests::TINY_VM
            ),
        )?;
        let log = rt.scratch("rtv.log");
        rt.use_config_and_log(&config, &log);
        let state_text = state.display().to_string();
        let nothing_left = |rt: &Runtime<'_>| -> anyhow::Result<()> {
            // Directories rtv keeps (empty once their containers are gone)
            // are not leftovers.
            let entries: Vec<_> = rt
                .root_entries()
                .into_iter()
                .filter(|p| std::fs::read_dir(p).map_or(true, |mut d| d.next().is_some()))
                .collect();
            anyhow::ensure!(entries.is_empty(), "left under --root: {entries:?}");
            let mounts = std::fs::read_to_string("/proc/self/mounts")?;
            let under: Vec<&str> = mounts
                .lines()
                .filter(|l| l.contains(&state_text) && !l.starts_with("rtv-test "))
                .collect();
            anyhow::ensure!(under.is_empty(), "mounts left under --root: {under:?}");
            let vmms = vmms_of(&state_text);
            anyhow::ensure!(vmms.is_empty(), "VMMs left: {vmms:?}");
            Ok(())
        };

        // The template cache is full: a cold boot instead.
        let (id, _, pid) = rt.started("cache-full", &["sleep", "1000"])?;
        let out = rt.ok(&["exec", &id, "echo", "cold-booted"])?;
        anyhow::ensure!(out.stdout.trim() == "cold-booted", "{}", out.describe());
        let text = std::fs::read_to_string(&log)?;
        anyhow::ensure!(
            text.contains("cannot start from a template, cold booting")
                && text.contains("No space left on device"),
            "the log should say why the sandbox cold booted:\n{text}"
        );
        let in_cache: Vec<_> = std::fs::read_dir(&cache)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        anyhow::ensure!(
            in_cache.is_empty(),
            "a half-made template is left: {in_cache:?}"
        );
        rt.ok(&["kill", &id, "KILL"])?;
        rt.wait_pid(pid)?;
        rt.ok(&["delete", &id])?;
        nothing_left(&rt)?;
        drop(cache_fs);

        // The state directory is full: create fails and leaves nothing.
        drop(state_fs);
        let state_fs = SmallFs::mount(&state, "4k");
        let id = rt.id("state-full");
        let bundle = rt.bundle(&["sleep", "1000"])?;
        let out = rt.run(&["create", "--bundle", &bundle.display().to_string(), &id])?;
        anyhow::ensure!(!out.success(), "create on a full disk: {}", out.describe());
        anyhow::ensure!(
            out.stderr.contains("No space left on device"),
            "create on a full disk should say so: {}",
            out.describe()
        );
        nothing_left(&rt)?;
        // Space again: the same id is created, runs and goes.
        drop(state_fs);
        let _state_fs = SmallFs::mount(&state, "64m");
        let (_, pid) = rt.create(&id, &bundle)?;
        rt.ok(&["start", &id])?;
        let out = rt.ok(&["exec", &id, "echo", "room"])?;
        anyhow::ensure!(out.stdout.trim() == "room", "{}", out.describe());
        rt.ok(&["kill", &id, "KILL"])?;
        rt.wait_pid(pid)?;
        rt.ok(&["delete", &id])?;
        nothing_left(&rt)?;
        drop(rt);
        Ok(())
    })();
    let _ = std::process::Command::new("umount")
        .arg("-R")
        .arg("-l")
        .arg(&base)
        .status();
    let _ = std::fs::remove_dir_all(&base);
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

/// The rtv-vmm processes whose command line names `path`.
fn vmms_of(path: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                    let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    comm.trim() == "rtv-vmm" && String::from_utf8_lossy(&cmdline).contains(path)
                })
                .collect()
        })
        .unwrap_or_default()
}
