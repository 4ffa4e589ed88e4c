//! Container scenarios on a busybox bundle, written once and run twice:
//! against `rtv-agent --listen unix:...` on the host (root file systems are
//! host paths, no cgroup controllers), and in a VM whose share holds the
//! bundle (every scenario, plus the cgroup limits).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use oci_spec::runtime::{Process, Spec};
use rtv_protocol::{
    ContainerStatus, CreateContainer, ErrorKind, ExecInContainer, ExitStatus, Stdio, StreamKind,
};
use rtv_runtime::agent_client::Started;
use rtv_runtime::{AgentClient, ClientError, Share};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Applets the test rootfs links to busybox.
const APPLETS: &[&str] = &[
    "sh", "ls", "id", "cat", "echo", "hostname", "sleep", "ps", "mkdir", "touch", "grep", "head",
    "dd", "true", "false", "env", "pwd", "stat", "find", "wc", "tty", "mount", "rm", "ln",
    "unshare", "ip", "nc", "httpd", "wget", "ifconfig", "route", "ping",
];

/// Builds a busybox root file system (from Debian's busybox-static) in
/// `dir`: /bin with the applets, /etc/passwd and /etc/group with a user
/// `app` (1000) in groups `app` (1000) and `extra` (2000), and a marker
/// file `/rtv-bundle-marker`.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.exists(),
        "/bin/busybox is missing: apt-get install busybox-static"
    );
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "home/app"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox"))?;
    for a in APPLETS {
        let link = dir.join("bin").join(a);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )?;
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
    )?;
    std::fs::write(dir.join("rtv-bundle-marker"), "bundle\n")?;
    Ok(())
}

/// Where the agent finds containers' root file systems.
pub enum Place {
    /// The agent runs on the host: the rootfs path is used as is.
    Host(PathBuf),
    /// The agent runs in a VM: each container's rootfs is bind-mounted
    /// into the sandbox's share.
    Vm {
        /// The bundle's rootfs on the host.
        rootfs: PathBuf,
        /// The sandbox's share.
        share: Share,
    },
}

impl Place {
    /// `spec` for container `id`, with its rootfs (and binds) placed.
    pub fn spec_for(&self, id: &str, spec: &Spec) -> Result<Spec> {
        match self {
            Place::Host(rootfs) => {
                let mut spec = spec.clone();
                if let Some(root) = spec.root_mut() {
                    root.set_path(rootfs.clone());
                }
                Ok(spec)
            }
            Place::Vm { rootfs, share } => Ok(share.add_container(id, rootfs, spec)?),
        }
    }

    /// Removes container `id` from the share.
    pub fn remove(&self, id: &str) {
        if let Place::Vm { share, .. } = self {
            share.remove_container(id);
        }
    }

    fn in_vm(&self) -> bool {
        matches!(self, Place::Vm { .. })
    }
}

/// The spec the scenarios start from: the runtime's default spec, with
/// `args`, no terminal, and a writable /tmp.
pub fn base_spec(args: &[&str]) -> Spec {
    let mut spec = rtv_runtime::spec::default_spec();
    let mut text = serde_json::to_value(&spec).unwrap_or_default();
    text["process"]["terminal"] = false.into();
    text["process"]["args"] = args.iter().map(|a| a.to_string()).collect();
    text["process"]["env"] = serde_json::json!(["PATH=/bin", "HOME=/"]);
    if let Some(mounts) = text["mounts"].as_array_mut() {
        mounts.push(
            serde_json::json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev"]}),
        );
    }
    if let Ok(s) = serde_json::from_value(text) {
        spec = s;
    }
    spec
}

/// `spec` with JSON `patch` merged in (objects merged, other values replaced).
pub fn patched(spec: &Spec, patch: serde_json::Value) -> Result<Spec> {
    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }
    let mut v = serde_json::to_value(spec)?;
    merge(&mut v, patch);
    Ok(serde_json::from_value(v)?)
}

async fn read_all(mut s: UnixStream) -> Result<String> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn out_err() -> Stdio {
    Stdio {
        stdout: true,
        stderr: true,
        ..Default::default()
    }
}

/// Output and status of a container's process.
#[derive(Debug)]
pub struct Ran {
    /// Its stdout.
    pub out: String,
    /// Its stderr.
    pub err: String,
    /// How it ended.
    pub status: ExitStatus,
}

/// Creates container `id`, returning its exec id.
pub async fn create(c: &AgentClient, place: &Place, id: &str, spec: &Spec) -> Result<u64> {
    let spec = place.spec_for(id, spec)?;
    let created = c
        .create_container(CreateContainer {
            container_id: id.into(),
            spec,
            stdio: out_err(),
            builtin_pause: false,
        })
        .await;
    match created {
        Ok(Started { exec_id, .. }) => Ok(exec_id),
        Err(e) => {
            place.remove(id);
            Err(e.into())
        }
    }
}

/// Creates, starts and waits for container `id`, then deletes it.
pub async fn run(c: &AgentClient, place: &Place, id: &str, spec: &Spec) -> Result<Ran> {
    let exec_id = create(c, place, id, spec).await?;
    let result = async {
        let out = c.attach(exec_id, StreamKind::Stdout).await?;
        let err = c.attach(exec_id, StreamKind::Stderr).await?;
        c.start_container(id).await?;
        let (out, err) = tokio::try_join!(read_all(out), read_all(err))?;
        let status = c.wait(exec_id).await?;
        Ok::<_, anyhow::Error>(Ran { out, err, status })
    }
    .await;
    let deleted = c.delete_container(id, true).await;
    place.remove(id);
    let ran = result?;
    deleted?;
    Ok(ran)
}

/// Runs `sh -c script` in an exec of running container `id`.
pub async fn exec_sh(c: &AgentClient, id: &str, script: &str) -> Result<Ran> {
    let process: Process = serde_json::from_value(serde_json::json!({
        "args": ["sh", "-c", script], "cwd": "/", "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0}
    }))?;
    let Started { exec_id, .. } = c
        .exec_in_container(ExecInContainer {
            container_id: id.into(),
            process,
            stdio: out_err(),
        })
        .await?;
    let out = c.attach(exec_id, StreamKind::Stdout).await?;
    let err = c.attach(exec_id, StreamKind::Stderr).await?;
    let (out, err) = tokio::try_join!(read_all(out), read_all(err))?;
    let status = c.wait(exec_id).await?;
    Ok(Ran { out, err, status })
}

fn expect_ok(r: &Ran) -> Result<()> {
    ensure!(
        r.status == ExitStatus::Code(0),
        "exit {:?}; stdout {:?}; stderr {:?}",
        r.status,
        r.out,
        r.err
    );
    Ok(())
}

/// The process's identity, capabilities, hostname, root, env, cwd and
/// rlimits arrive as the spec says.
pub async fn process_settings(c: &AgentClient, place: &Place) -> Result<()> {
    let spec = patched(
        &base_spec(&[
            "sh",
            "-c",
            "id; hostname; ls /; grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; \
             echo env=$FOO; pwd; ulimit -n; cat /proc/self/oom_score_adj; echo pid=$$",
        ]),
        serde_json::json!({
            "hostname": "ctr-one",
            "process": {
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000]},
                "env": ["PATH=/bin", "FOO=bar baz"],
                "cwd": "/home/app",
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}],
                "oomScoreAdj": 123,
                "capabilities": {
                    "bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN"],
                    "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                    "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                    "inheritable": ["CAP_KILL"],
                    "ambient": ["CAP_KILL"]
                }
            }
        }),
    )?;
    let r = run(c, place, "settings", &spec).await?;
    expect_ok(&r)?;
    let o = &r.out;
    ensure!(
        o.contains("uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)")
            || o.contains("uid=1000(app) gid=1000(app) groups=2000(extra)"),
        "id: {o}"
    );
    ensure!(o.contains("\nctr-one\n"), "hostname: {o}");
    ensure!(
        o.contains("rtv-bundle-marker"),
        "ls / shows the bundle: {o}"
    );
    // CAP_KILL = 5, CAP_NET_BIND_SERVICE = 10, CAP_CHOWN = 0. A process
    // that is not root keeps only its ambient capabilities across execve.
    ensure!(o.contains("CapEff:\t0000000000000020"), "CapEff: {o}");
    ensure!(o.contains("CapPrm:\t0000000000000020"), "CapPrm: {o}");
    ensure!(o.contains("CapBnd:\t0000000000000421"), "CapBnd: {o}");
    ensure!(o.contains("CapAmb:\t0000000000000020"), "CapAmb: {o}");
    ensure!(o.contains("NoNewPrivs:\t1"), "NoNewPrivs: {o}");
    ensure!(o.contains("env=bar baz"), "env: {o}");
    ensure!(o.contains("\n/home/app\n"), "cwd: {o}");
    ensure!(o.contains("\n321\n"), "rlimit: {o}");
    ensure!(o.contains("\n123\n"), "oom_score_adj: {o}");
    ensure!(o.contains("pid=1"), "init is pid 1 of its namespace: {o}");
    Ok(())
}

/// A username resolves through the rootfs's /etc/passwd.
pub async fn username(c: &AgentClient, place: &Place) -> Result<()> {
    let spec = patched(
        &base_spec(&["id"]),
        serde_json::json!({"process": {"user": {"uid": 0, "gid": 0, "username": "app"}}}),
    )?;
    let r = run(c, place, "username", &spec).await?;
    expect_ok(&r)?;
    ensure!(
        r.out.contains("uid=1000(app) gid=1000(app)") && r.out.contains("2000(extra)"),
        "{}",
        r.out
    );
    Ok(())
}

/// A read-only rootfs refuses writes; masked and read-only paths hold.
pub async fn readonly_and_masked(c: &AgentClient, place: &Place) -> Result<()> {
    let spec = base_spec(&[
        "sh",
        "-c",
        "touch /x && echo wrote-root; touch /tmp/y && echo wrote-tmp; \
         echo 1 > /proc/sys/kernel/shmmax && echo wrote-proc-sys; \
         cat /proc/kcore 2>/dev/null | wc -c; ls /sys/firmware | wc -l; \
         grep CapEff /proc/self/status; echo done",
    ]);
    let r = run(c, place, "readonly", &spec).await?;
    expect_ok(&r)?;
    ensure!(!r.out.contains("wrote-root"), "rootfs writable: {r:?}");
    ensure!(r.err.contains("Read-only file system"), "{r:?}");
    ensure!(r.out.contains("wrote-tmp"), "tmpfs /tmp: {r:?}");
    ensure!(
        !r.out.contains("wrote-proc-sys"),
        "/proc/sys writable: {r:?}"
    );
    ensure!(r.out.contains("\n0\n0\n"), "masked paths: {r:?}");
    // Root with the default spec's AUDIT_WRITE (29), KILL and NET_BIND_SERVICE.
    ensure!(
        r.out.contains("CapEff:\t0000000020000420"),
        "caps of root: {r:?}"
    );
    Ok(())
}

/// Two containers do not see each other's processes; exec joins the
/// container; signals and exit statuses are reported.
pub async fn isolation_exec_and_signals(c: &AgentClient, place: &Place) -> Result<()> {
    let a = base_spec(&["sleep", "600"]);
    let a = patched(&a, serde_json::json!({"hostname": "ctr-a"}))?;
    let exec_a = create(c, place, "iso-a", &a).await?;
    let result = async {
        let st = c.container_state("iso-a").await?;
        ensure!(st.status == ContainerStatus::Created, "{st:?}");
        c.start_container("iso-a").await?;
        let st = c.container_state("iso-a").await?;
        ensure!(st.status == ContainerStatus::Running, "{st:?}");
        // Starting again is refused and changes nothing.
        match c.start_container("iso-a").await {
            Err(ClientError::Agent {
                kind: ErrorKind::InvalidState,
                ..
            }) => {}
            other => bail!("second start: {other:?}"),
        }
        let b = run(
            c,
            place,
            "iso-b",
            &base_spec(&["sh", "-c", "ps -o pid,comm; echo $$"]),
        )
        .await?;
        expect_ok(&b)?;
        ensure!(!b.out.contains("sleep"), "B sees A's sleep: {}", b.out);
        let e = exec_sh(
            c,
            "iso-a",
            "hostname; ps -o pid,comm; cat /rtv-bundle-marker",
        )
        .await?;
        expect_ok(&e)?;
        ensure!(e.out.starts_with("ctr-a\n"), "exec hostname: {}", e.out);
        ensure!(e.out.contains("1 sleep"), "exec sees A's init: {}", e.out);
        ensure!(e.out.contains("bundle"), "exec sees A's rootfs: {}", e.out);
        let pids = c.container_pids("iso-a").await?;
        ensure!(!pids.is_empty(), "pids of a running container");
        // Deleting a running container without force is refused.
        match c.delete_container("iso-a", false).await {
            Err(ClientError::Agent {
                kind: ErrorKind::InvalidState,
                ..
            }) => {}
            other => bail!("delete of a running container: {other:?}"),
        }
        c.signal_container("iso-a", libc::SIGKILL, false).await?;
        let status = c.wait(exec_a).await?;
        ensure!(status == ExitStatus::Signal(libc::SIGKILL), "{status:?}");
        let st = c.container_state("iso-a").await?;
        ensure!(
            st.status == ContainerStatus::Stopped && st.exit == Some(ExitStatus::Signal(9)),
            "{st:?}"
        );
        match c.signal_container("iso-a", libc::SIGTERM, false).await {
            Err(ClientError::Agent {
                kind: ErrorKind::InvalidState,
                ..
            }) => {}
            other => bail!("signal to a stopped container: {other:?}"),
        }
        Ok(())
    }
    .await;
    let deleted = c.delete_container("iso-a", true).await;
    place.remove("iso-a");
    result?;
    deleted?;
    match c.container_state("iso-a").await {
        Err(ClientError::Agent {
            kind: ErrorKind::NoSuchContainer,
            ..
        }) => Ok(()),
        other => bail!("state after delete: {other:?}"),
    }
}

/// seccomp: a denied syscall fails with the profile's errno.
pub async fn seccomp(c: &AgentClient, place: &Place) -> Result<()> {
    let spec = patched(
        &base_spec(&["sh", "-c", "mkdir /tmp/d && echo made; echo after"]),
        serde_json::json!({"linux": {"seccomp": {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        }}}),
    )?;
    let r = run(c, place, "seccomp", &spec).await?;
    expect_ok(&r)?;
    ensure!(!r.out.contains("made"), "{r:?}");
    ensure!(r.err.contains("Operation not permitted"), "{r:?}");
    ensure!(r.out.contains("after"), "{r:?}");

    // Docker's shape (and Kubernetes' RuntimeDefault): a filter,
    // noNewPrivileges off, no CAP_SYS_ADMIN. The kernel takes the filter
    // only before the capabilities drop; the process then runs under it
    // without no_new_privs, and so does an exec in it (whose process has no
    // capabilities at all).
    let docker_caps = serde_json::json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    let probe =
        "mkdir /tmp/d && echo made; grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status";
    let docker = patched(
        &spec,
        serde_json::json!({"process": {
            "args": ["sh", "-c", format!("{probe}; sleep 600")],
            "noNewPrivileges": false,
            "capabilities": {"bounding": docker_caps, "effective": docker_caps,
                "permitted": docker_caps}
        }}),
    )?;
    create(c, place, "seccomp-nnp-off", &docker).await?;
    let result = async {
        c.start_container("seccomp-nnp-off").await?;
        let e = exec_sh(c, "seccomp-nnp-off", probe).await?;
        ensure!(e.status == ExitStatus::Code(0), "exec: {e:?}");
        ensure!(!e.out.contains("made"), "exec: {e:?}");
        ensure!(e.err.contains("Operation not permitted"), "exec: {e:?}");
        ensure!(e.out.contains("NoNewPrivs:\t0"), "exec: {e:?}");
        ensure!(e.out.contains("Seccomp:\t2"), "exec: {e:?}");
        ensure!(e.out.contains("CapEff:\t0000000000000000"), "exec: {e:?}");
        Ok(())
    }
    .await;
    let deleted = c.delete_container("seccomp-nnp-off", true).await;
    place.remove("seccomp-nnp-off");
    result?;
    deleted?;
    // The container's own process, run to its end.
    let once = patched(
        &docker,
        serde_json::json!({"process": {"args": ["sh", "-c", probe]}}),
    )?;
    let r = run(c, place, "seccomp-nnp-off", &once).await?;
    expect_ok(&r)?;
    ensure!(!r.out.contains("made"), "{r:?}");
    ensure!(r.err.contains("Operation not permitted"), "{r:?}");
    ensure!(r.out.contains("NoNewPrivs:\t0"), "{r:?}");
    ensure!(r.out.contains("Seccomp:\t2"), "{r:?}");
    ensure!(r.out.contains("CapEff:\t00000000a80425fb"), "{r:?}");
    Ok(())
}

/// sysctl and a bind mount from the share arrive.
pub async fn sysctl_and_binds(c: &AgentClient, place: &Place, bind_src: &Path) -> Result<()> {
    std::fs::write(bind_src.join("data.txt"), "from-the-host\n")?;
    let spec = patched(
        &base_spec(&[
            "sh",
            "-c",
            "cat /proc/sys/kernel/shmmax; cat /data/data.txt; touch /data/x && echo bind-writable; true",
        ]),
        serde_json::json!({"linux": {"sysctl": {"kernel.shmmax": "123456789"}}}),
    )?;
    let mut v = serde_json::to_value(&spec)?;
    if let Some(m) = v["mounts"].as_array_mut() {
        m.push(serde_json::json!({"destination": "/data", "type": "bind",
            "source": bind_src, "options": ["rbind", "ro"]}));
    }
    let spec: Spec = serde_json::from_value(v)?;
    let r = run(c, place, "sysctl", &spec).await?;
    expect_ok(&r)?;
    ensure!(r.out.contains("123456789"), "{r:?}");
    ensure!(r.out.contains("from-the-host"), "{r:?}");
    ensure!(!r.out.contains("bind-writable"), "ro bind: {r:?}");
    Ok(())
}

/// Bad specs fail with the field named and leave no container behind.
pub async fn bad_specs(c: &AgentClient, place: &Place) -> Result<()> {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "bad-user",
            serde_json::json!({"process": {"user": {"username": "nobody-here"}}}),
            "process.user.username",
        ),
        (
            "bad-seccomp",
            serde_json::json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["no_such_syscall"], "action": "SCMP_ACT_ERRNO"}]}}}),
            "linux.seccomp.syscalls[0].names[0]",
        ),
        (
            "bad-user-ns",
            serde_json::json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "user"}]}}),
            "linux.namespaces[1]",
        ),
        (
            "bad-cwd",
            serde_json::json!({"process": {"cwd": "/does/not/exist"}}),
            "process.cwd",
        ),
        (
            "bad-exe",
            serde_json::json!({"process": {"args": ["no-such-program"]}}),
            "process.args[0]",
        ),
        // Not executable: refused at create, as runc does (Docker cannot
        // clean up after a start that fails).
        (
            "not-executable",
            serde_json::json!({"process": {"args": ["/etc/passwd"]}}),
            "process.args[0]: cannot execute \"/etc/passwd\": permission denied",
        ),
    ];
    for (id, patch, field) in cases {
        let spec = patched(&base_spec(&["true"]), patch)?;
        match create(c, place, id, &spec).await {
            Ok(_) => bail!("{id}: created"),
            Err(e) => {
                let msg = format!("{e:#}");
                ensure!(
                    msg.contains(field),
                    "{id}: error does not name {field}: {msg}"
                );
            }
        }
        match c.container_state(id).await {
            Err(ClientError::Agent {
                kind: ErrorKind::NoSuchContainer,
                ..
            }) => {}
            other => bail!("{id}: left behind: {other:?}"),
        }
    }
    // A bind mount whose source does not exist.
    let mut v = serde_json::to_value(base_spec(&["true"]))?;
    if let Some(m) = v["mounts"].as_array_mut() {
        m.push(serde_json::json!({"destination": "/data", "type": "bind",
            "source": "/nonexistent/rtv-source", "options": ["rbind"]}));
    }
    let spec: Spec = serde_json::from_value(v)?;
    let n = spec.mounts().as_ref().map(Vec::len).unwrap_or(0) - 1;
    match create(c, place, "bad-mount", &spec).await {
        Ok(_) => bail!("bad-mount: created"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains(&format!("mounts[{n}].source"))
                    && msg.contains("/nonexistent/rtv-source"),
                "{msg}"
            );
        }
    }
    if c.container_state("bad-mount").await.is_ok() {
        bail!("bad-mount left behind");
    }
    // Duplicate and malformed ids.
    let exec = create(c, place, "dup", &base_spec(&["true"])).await?;
    let dup = create(c, place, "dup", &base_spec(&["true"])).await;
    c.delete_container("dup", true).await?;
    let _ = c.wait(exec).await;
    place.remove("dup");
    match dup {
        Err(e) if format!("{e:#}").contains("already exists") => {}
        other => bail!("duplicate id: {other:?}"),
    }
    for bad in ["", "..", "a/b"] {
        let r = c
            .create_container(CreateContainer {
                container_id: bad.into(),
                spec: base_spec(&["true"]),
                stdio: Stdio::default(),
                builtin_pause: false,
            })
            .await;
        ensure!(r.is_err(), "id {bad:?} accepted");
    }
    Ok(())
}

/// A pod sandbox's built-in pause (`builtin_pause`): it holds the pod's
/// uts and ipc namespaces (the spec's hostname, an ipc sysctl) from the
/// create on without running the spec's program (which does not exist
/// here), takes no exec, and exits 0 on SIGTERM; a member container that
/// joins its namespaces sees them.
pub async fn builtin_pause(c: &AgentClient, place: &Place) -> Result<()> {
    let spec = patched(
        &base_spec(&["/no/such/pause"]),
        serde_json::json!({"hostname": "pod-h",
            "linux": {"sysctl": {"kernel.shm_rmid_forced": "1"}}}),
    )?;
    let spec = place.spec_for("sandbox", &spec)?;
    let Started { exec_id, pid, .. } = c
        .create_container(CreateContainer {
            container_id: "sandbox".into(),
            spec,
            stdio: Stdio::default(),
            builtin_pause: true,
        })
        .await
        .inspect_err(|_| place.remove("sandbox"))?;
    let result = async {
        c.start_container("sandbox").await?;
        let st = c.container_state("sandbox").await?;
        ensure!(st.status == ContainerStatus::Running, "{st:?}");
        match exec_sh(c, "sandbox", "true").await {
            Err(e) if e.to_string().contains("built-in pause") => {}
            other => bail!("an exec in the pause: {other:?}"),
        }
        let member = patched(
            &base_spec(&["sh", "-c", "hostname; cat /proc/sys/kernel/shm_rmid_forced"]),
            serde_json::json!({"hostname": null, "linux": {"namespaces": [
                {"type": "pid"}, {"type": "mount"},
                {"type": "ipc", "path": format!("/proc/{pid}/ns/ipc")},
                {"type": "uts", "path": format!("/proc/{pid}/ns/uts")}]}}),
        )?;
        let r = run(c, place, "member", &member).await?;
        expect_ok(&r)?;
        ensure!(r.out == "pod-h\n1\n", "the member sees {:?}", r.out);
        c.signal_container("sandbox", libc::SIGTERM, false).await?;
        let status = c.wait(exec_id).await?;
        ensure!(status == ExitStatus::Code(0), "the pause ended {status:?}");
        Ok(())
    }
    .await;
    let deleted = c.delete_container("sandbox", true).await;
    place.remove("sandbox");
    result?;
    deleted?;
    Ok(())
}

/// A container with a terminal: its stdio is a TTY.
pub async fn terminal(c: &AgentClient, place: &Place) -> Result<()> {
    let spec = base_spec(&["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; tty"]);
    let spec = patched(&spec, serde_json::json!({"process": {"terminal": true}}))?;
    let spec = place.spec_for("tty", &spec)?;
    let Started { exec_id, .. } = c
        .create_container(CreateContainer {
            container_id: "tty".into(),
            spec,
            stdio: Stdio {
                tty: Some(rtv_protocol::WindowSize { rows: 24, cols: 80 }),
                stdin: true,
                stdout: true,
                stderr: false,
            },
            builtin_pause: false,
        })
        .await?;
    let out = c.attach(exec_id, StreamKind::Stdout).await?;
    c.start_container("tty").await?;
    let out = read_all(out).await.unwrap_or_default();
    let status = c.wait(exec_id).await?;
    c.delete_container("tty", true).await?;
    place.remove("tty");
    ensure!(status == ExitStatus::Code(0), "{status:?}: {out}");
    ensure!(out.contains("is-a-tty"), "{out}");
    Ok(())
}

/// VM only: `WaitOom` answers when the OOM killer kills a process of a
/// container that goes on running (the shell survives its `dd`), and again
/// when the container's processes are gone, with no new kill.
async fn oom_reported(c: &AgentClient, place: &Place) -> Result<()> {
    let id = "oom-watch";
    let spec = patched(
        &base_spec(&[
            "sh",
            "-c",
            "exec 2>/dev/null; dd if=/dev/zero of=/dev/null bs=8M count=1; sleep 60",
        ]),
        serde_json::json!({"linux": {"resources": {"memory": {"limit": 4194304}}}}),
    )?;
    let exec_id = create(c, place, id, &spec).await?;
    let result = async {
        // The wait is armed before the agent reads the start.
        let oom = c.send_wait_oom(id, 0).await?;
        c.start_container(id).await?;
        let oom = oom.result().await?;
        ensure!(
            oom.oom_kills >= 1 && oom.status == ContainerStatus::Running,
            "WaitOom after the OOM kill: {oom:?}"
        );
        let gone = c.send_wait_oom(id, oom.oom_kills).await?;
        c.signal_container(id, 9, true).await?;
        let gone = gone.result().await?;
        ensure!(
            gone.oom_kills == oom.oom_kills,
            "WaitOom when the container's processes were killed: {gone:?} (before: {oom:?})"
        );
        let status = c.wait(exec_id).await?;
        ensure!(status.code() == 137, "the killed container: {status:?}");
        Ok(())
    }
    .await;
    let deleted = c.delete_container(id, true).await;
    place.remove(id);
    result?;
    deleted?;
    Ok(())
}

/// VM only: cgroup v2 limits in the guest.
pub async fn cgroup_limits(c: &AgentClient, place: &Place) -> Result<()> {
    // Memory: a process over the limit is OOM-killed (137), the VM goes on.
    let spec = patched(
        &base_spec(&["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"]),
        serde_json::json!({"linux": {"resources": {"memory": {"limit": 4194304}}}}),
    )?;
    let r = run(c, place, "oom", &spec).await?;
    ensure!(r.status.code() == 137, "over the memory limit: {r:?}");
    oom_reported(c, place).await?;
    // pids.max, cpu.max and memory.max as the container sees them.
    let spec = patched(
        &base_spec(&[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max; \
             for i in 1 2 3 4 5 6; do sleep 30 & done; echo started; sleep 1; ps -o pid | wc -l",
        ]),
        serde_json::json!({"linux": {"resources": {
            "memory": {"limit": 67108864},
            "cpu": {"quota": 90000, "period": 100000},
            "pids": {"limit": 4}
        }}}),
    )?;
    let r = run(c, place, "limits", &spec).await?;
    ensure!(r.out.contains("90000 100000"), "cpu.max: {r:?}");
    ensure!(r.out.contains("67108864"), "memory.max: {r:?}");
    ensure!(r.out.contains("\n4\n"), "pids.max: {r:?}");
    ensure!(
        r.err.contains("fork") || r.err.contains("Resource temporarily unavailable"),
        "pids.max did not stop forks: {r:?}"
    );
    // The VM is still there.
    let r = run(c, place, "after-oom", &base_spec(&["true"])).await?;
    expect_ok(&r)
}

/// Every container scenario for `place`, in order; returns the failures.
pub async fn run_all(c: &AgentClient, place: &Place, scratch: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    macro_rules! check {
        ($name:literal, $e:expr) => {
            let started = Instant::now();
            match $e.await {
                Ok(()) => eprintln!("ok   {} ({:.2} s)", $name, started.elapsed().as_secs_f64()),
                Err(e) => {
                    eprintln!("FAIL {}: {e:#}", $name);
                    failures.push(format!("{}: {e:#}", $name));
                }
            }
        };
    }
    check!("process_settings", process_settings(c, place));
    check!("username", username(c, place));
    check!("readonly_and_masked", readonly_and_masked(c, place));
    check!(
        "isolation_exec_and_signals",
        isolation_exec_and_signals(c, place)
    );
    check!("seccomp", seccomp(c, place));
    check!("sysctl_and_binds", sysctl_and_binds(c, place, scratch));
    check!("terminal", terminal(c, place));
    check!("builtin_pause", builtin_pause(c, place));
    check!("bad_specs", bad_specs(c, place));
    if place.in_vm() {
        check!("cgroup_limits", cgroup_limits(c, place));
    }
    failures
}

/// Context for errors from the runtime's share.
pub fn share_at(dir: &Path, rootfs: &Path) -> Result<Place> {
    Ok(Place::Vm {
        rootfs: rootfs.to_owned(),
        share: Share::new(dir).context("the sandbox's share")?,
    })
}
