//! `containerd-shim-rtv-v2` driven by the real containerd 1.6 through `ctr`
//! (`--runtime io.containerd.rtv.v2`, found on containerd's PATH), each
//! scenario in a private containerd, each followed by the check that
//! nothing is left behind: containerd's own footprint, and the shim's VMs
//! and state directories. Every pod (a lone container is a pod of one) is
//! a micro-VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rtv_tests::containerd::{
    container_ids, describe, rtv_shim_leftovers, run_on_pty, task_state, wait_task_status,
    with_containerd, Containerd, CTR_TIMEOUT, RTV_SHIM_STATE_ROOT,
};
use rtv_tests::containers::busybox_rootfs;
use rtv_tests::{initramfs, one_vm_at_a_time, vmm_binary};
use serde_json::{json, Value};

const RUNTIME: &str = "io.containerd.rtv.v2";

/// Puts the shim first on the PATH that containerd (and so the shim)
/// inherits, with the guest kernel, initramfs and VMM in the environment.
fn setup() {
    rtv_tests::export_kernels().expect("guest kernels");
    std::env::set_var("RTV_INITRAMFS", initramfs().expect("initramfs"));
    std::env::set_var("RTV_VMM", vmm_binary().expect("rtv-vmm"));
    let shim = Path::new(env!("CARGO_BIN_EXE_containerd-shim-rtv-v2"));
    let dir = shim.parent().expect("the shim's directory");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if dirs.first().map(PathBuf::as_path) != Some(dir) {
        dirs.insert(0, dir.to_path_buf());
        std::env::set_var(
            "PATH",
            std::env::join_paths(dirs).expect("a PATH with the shim"),
        );
    }
}

/// `ctr run` flags for the shim, with ctr's FIFOs in the instance.
fn flags(c: &Containerd) -> Vec<String> {
    vec![
        "--runtime".into(),
        RUNTIME.into(),
        "--fifo-dir".into(),
        c.fifo_dir().to_string_lossy().into_owned(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The shim's VMMs of pods `ids`, and their state directories and the
/// mounts under them (the share's), if still there.
fn vm_leftovers(namespace: &str, ids: &[String]) -> Vec<String> {
    ids.iter()
        .flat_map(|id| rtv_shim_leftovers(namespace, id))
        .collect()
}

/// The VMs among `left` (from [`vm_leftovers`]): the VMM processes
/// (`rtv-vmm`), not their keepers (`rtv-vmm-keeper`, the jail's process
/// outside the VMM's pid namespace, with the same command line).
fn vms_running(left: &[String]) -> usize {
    left.iter()
        .filter_map(|l| l.strip_prefix("process ")?.split_whitespace().next())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "rtv-vmm")
        })
        .count()
}

/// Runs `f` in a private containerd (see `with_containerd`), then checks
/// that no VM or state of pods `ids` is left.
fn scenario(
    name: &str,
    ids: &mut Vec<String>,
    f: impl FnOnce(&Containerd, &mut Vec<String>) -> Result<()>,
) {
    setup();
    let _one = one_vm_at_a_time();
    let mut namespace = String::new();
    with_containerd(name, |c| {
        namespace = c.namespace().to_owned();
        f(c, ids)
    });
    // The VMs stop when their last container is deleted; give a killed
    // shim's VMM its SIGTERM's worth of time.
    let mut left = vm_leftovers(&namespace, ids);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = vm_leftovers(&namespace, ids);
    }
    assert!(left.is_empty(), "{name} left behind: {left:#?}");
}

#[test]
fn ctr_run_rm_prints_and_returns_the_exit_code() {
    scenario("shim-run-rm", &mut Vec::new(), |c, ids| {
        let image = c.import_busybox()?;
        let id = c.new_id("run-rm");
        ids.push(id.clone());
        let flags = flags(c);
        let mut args = vec!["run", "--rm"];
        args.extend(strs(&flags));
        args.extend([
            image.as_str(),
            &id,
            "sh",
            "-c",
            "echo hi; echo oops >&2; exit 3",
        ]);
        let out = c.ctr(&args, CTR_TIMEOUT)?;
        ensure!(
            out.status.code() == Some(3)
                && String::from_utf8_lossy(&out.stdout) == "hi\n"
                && String::from_utf8_lossy(&out.stderr).contains("oops"),
            "ctr run --rm: want `hi`, `oops` on stderr and exit 3, got {}",
            describe(&out)
        );
        ensure!(
            !container_ids(c)?.contains(&id),
            "container {id} still exists after ctr run --rm"
        );
        Ok(())
    });
}

#[test]
fn ctr_run_with_stdin() {
    scenario("shim-stdin", &mut Vec::new(), |c, ids| {
        let image = c.import_busybox()?;
        let id = c.new_id("stdin");
        ids.push(id.clone());
        let flags = flags(c);
        let mut args = vec!["run", "--rm"];
        args.extend(strs(&flags));
        args.extend([image.as_str(), &id, "cat"]);
        let out = c.ctr_with_stdin(&args, b"line one\nline two\n", "line two\n", CTR_TIMEOUT)?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout) == "line one\nline two\n",
            "ctr run cat: want the input back and exit 0, got {}",
            describe(&out)
        );
        Ok(())
    });
}

/// `ctr run -d`, `task exec` (output, exit code, a terminal), `pause` and
/// `resume`, `task ps` (guest pids, the init's among them), `task metrics`,
/// `task kill`, `task delete`, `container delete`; then a second task
/// whose shim is killed with SIGKILL: containerd's cleanup (the shim's
/// `delete`) stops its VM and removes its state.
#[test]
fn ctr_detached_exec_ps_kill_delete() {
    scenario("shim-detached", &mut Vec::new(), |c, ids| {
        let image = c.import_busybox()?;
        let id = c.new_id("detached");
        ids.push(id.clone());
        let flags = flags(c);
        let mut args = vec!["run", "-d"];
        args.extend(strs(&flags));
        args.extend([image.as_str(), &id, "sleep", "1000"]);
        let out = c.ctr(&args, CTR_TIMEOUT)?;
        ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
        let (pid, status) =
            task_state(c, &id)?.with_context(|| format!("task {id} not in ctr task ls"))?;
        ensure!(
            status == "RUNNING" && pid > 0,
            "task {id}: {status}, pid {pid}"
        );

        let fifo = c.fifo_dir().to_string_lossy().into_owned();
        let exec = |exec_id: &str, cmd: &[&str]| {
            let mut a = vec![
                "tasks",
                "exec",
                "--fifo-dir",
                &fifo,
                "--exec-id",
                exec_id,
                &id,
            ];
            a.extend(cmd);
            c.ctr(&a, CTR_TIMEOUT)
        };
        let out = exec("e1", &["echo", "exec-ok"])?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout) == "exec-ok\n",
            "ctr task exec echo: {}",
            describe(&out)
        );
        let out = exec("e2", &["sh", "-c", "exit 7"])?;
        ensure!(
            out.status.code() == Some(7),
            "ctr task exec 'exit 7': {}",
            describe(&out)
        );
        // A terminal: ctr sizes it after the start, hence the wait.
        let script = "test -t 0 && echo exec-tty-ok; i=0; \
                      until stty size | grep -q '^30 90' || [ $i -ge 100 ]; do sleep 0.05; i=$((i+1)); done; \
                      printf size=; stty size; sleep 0.3; exit 4";
        let t = [
            "tasks",
            "exec",
            "-t",
            "--fifo-dir",
            &fifo,
            "--exec-id",
            "e3",
            &id,
            "sh",
            "-c",
            script,
        ];
        let (status, text) = run_on_pty(c.ctr_command(&t), 30, 90, CTR_TIMEOUT)?;
        let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
        ensure!(
            status.code() == Some(4)
                && lines.contains(&"exec-tty-ok")
                && lines.contains(&"size=30 90"),
            "ctr task exec -t: want exec-tty-ok, size=30 90 and exit 4; got {status}, {text:?}"
        );

        c.ctr_ok(&["tasks", "pause", &id])?;
        wait_task_status(c, &id, "PAUSED", Duration::from_secs(20))?;
        c.ctr_ok(&["tasks", "resume", &id])?;
        wait_task_status(c, &id, "RUNNING", Duration::from_secs(20))?;

        let ps = c.ctr_ok(&["tasks", "ps", &id])?;
        let pids: Vec<u32> = ps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        ensure!(
            pids.contains(&pid),
            "ctr task ps {id} does not list the init pid {pid}:\n{ps}"
        );
        let metrics = c.ctr_ok(&["tasks", "metrics", &id])?;
        ensure!(
            metrics.contains("memory") && metrics.contains(&id),
            "ctr task metrics {id}:\n{metrics}"
        );

        c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id])?;
        wait_task_status(c, &id, "STOPPED", Duration::from_secs(20))?;
        let out = c.ctr(&["tasks", "delete", &id], CTR_TIMEOUT)?;
        ensure!(out.status.success(), "ctr task delete: {}", describe(&out));
        ensure!(
            task_state(c, &id)?.is_none(),
            "task {id} still listed after ctr task delete"
        );
        c.ctr_ok(&["containers", "delete", &id])?;

        // The shim killed (SIGKILL) under a running task: containerd sees
        // its connection close and runs `containerd-shim-rtv-v2 delete`,
        // which stops the VM and removes its mounts and state (`scenario`
        // checks that none is left once the instance ends).
        let killed = c.new_id("killed-shim");
        ids.push(killed.clone());
        let mut args = vec!["run", "-d"];
        args.extend(strs(&flags));
        args.extend([image.as_str(), &killed, "sleep", "1000"]);
        let out = c.ctr(&args, CTR_TIMEOUT)?;
        ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
        let shim = c
            .shims()
            .into_iter()
            .find(|(_, served)| *served == killed)
            .map(|(pid, _)| pid)
            .with_context(|| format!("no shim serves {killed}: {:?}", c.shims()))?;
        // SAFETY: kill(2) takes plain integers and touches none of our memory.
        if unsafe { libc::kill(shim as i32, libc::SIGKILL) } != 0 {
            bail!("kill -9 {shim}: {}", std::io::Error::last_os_error());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let task = task_state(c, &killed)?;
            let vms = vms_running(&vm_leftovers(c.namespace(), std::slice::from_ref(&killed)));
            if vms == 0 && task.as_ref().is_none_or(|(_, s)| s == "STOPPED") {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "30 s after its shim was killed: task {task:?}, {vms} VM(s) of it running"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // What containerd still lists of it goes as usual.
        let _ = c.ctr(&["tasks", "delete", &killed], CTR_TIMEOUT);
        c.ctr_ok(&["containers", "delete", &killed])?;
        Ok(())
    });
}

/// A pod without CRI: containers annotated as CRI annotates them share one
/// shim and one VM; the member joins the sandbox's IPC and UTS namespaces
/// by the paths CRI would give (`/proc/<sandbox task pid>/ns/...`); the VM
/// outlives the member and ends with the sandbox.
#[test]
fn ctr_pod_shares_one_shim_and_vm() {
    scenario("shim-pod", &mut Vec::new(), |c, ids| {
        let image = c.import_busybox()?;
        let pod = c.new_id("pod");
        let member = c.new_id("member");
        ids.push(pod.clone());
        ids.push(member.clone());
        let flags = flags(c);
        let kind = |k: &str| format!("io.kubernetes.cri.container-type={k}");
        let sandbox = format!("io.kubernetes.cri.sandbox-id={pod}");
        let sb_kind = kind("sandbox");
        let mut args = vec![
            "run",
            "-d",
            "--annotation",
            &sb_kind,
            "--annotation",
            &sandbox,
        ];
        args.extend(strs(&flags));
        args.extend([image.as_str(), &pod, "sleep", "1000"]);
        let out = c.ctr(&args, CTR_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "ctr run the sandbox: {}",
            describe(&out)
        );
        let (pid, _) = task_state(c, &pod)?.context("the sandbox's task")?;

        let ipc = format!("ipc:/proc/{pid}/ns/ipc");
        let uts = format!("uts:/proc/{pid}/ns/uts");
        let m_kind = kind("container");
        // A member of the pod: `ctr run` joining the sandbox's IPC and UTS
        // namespaces, with `rest` (`-d` or `--rm`) and `cmd`.
        let run_member = |id: &str, rest: &str, cmd: &[&str]| -> Result<String> {
            let mut args = vec![
                "run",
                rest,
                "--annotation",
                &m_kind,
                "--annotation",
                &sandbox,
                "--with-ns",
                &ipc,
                "--with-ns",
                &uts,
            ];
            args.extend(strs(&flags));
            args.extend([image.as_str(), id]);
            args.extend(cmd);
            let out = c.ctr(&args, CTR_TIMEOUT)?;
            ensure!(
                out.status.success(),
                "ctr run the member {id}: {}",
                describe(&out)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        run_member(&member, "-d", &["sleep", "1000"])?;
        wait_task_status(c, &member, "RUNNING", Duration::from_secs(20))?;

        let shims = c.shims();
        ensure!(shims.len() == 1, "want one shim for the pod, got {shims:?}");
        let vms = vm_leftovers(c.namespace(), std::slice::from_ref(&pod));
        ensure!(
            vms_running(&vms) == 1,
            "want one VM for the pod, got {vms:#?}"
        );
        // The sandbox runs rtv's built-in pause: nothing is exec'd in it.
        let fifo = c.fifo_dir().to_string_lossy().into_owned();
        let exec = |task: &str, exec_id: &str, cmd: &[&str]| {
            let mut args = vec![
                "tasks",
                "exec",
                "--fifo-dir",
                &fifo,
                "--exec-id",
                exec_id,
                task,
            ];
            args.extend(cmd);
            c.ctr(&args, CTR_TIMEOUT)
        };
        let refused = exec(&pod, "n1", &["true"])?;
        ensure!(
            !refused.status.success()
                && String::from_utf8_lossy(&refused.stderr).contains("built-in pause"),
            "an exec in the sandbox: {}",
            describe(&refused)
        );
        // Members are in the sandbox's IPC and UTS namespaces (the same
        // inodes for both), each in a PID namespace of its own.
        let stat = [
            "stat",
            "-L",
            "-c",
            "%i",
            "/proc/self/ns/ipc",
            "/proc/self/ns/uts",
            "/proc/self/ns/pid",
        ];
        let a = exec(&member, "n2", &stat)?;
        ensure!(a.status.success(), "stat in the member: {}", describe(&a));
        let a = String::from_utf8_lossy(&a.stdout).into_owned();
        let second = c.new_id("member");
        ids.push(second.clone());
        let b = run_member(&second, "--rm", &stat)?;
        let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
        ensure!(
            a.len() == 3 && b.len() == 3 && a[0] == b[0] && a[1] == b[1] && a[2] != b[2],
            "namespaces: member {a:?}, second member {b:?}"
        );

        // The member goes; the VM stays for the sandbox, which takes a
        // new member.
        c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &member])?;
        wait_task_status(c, &member, "STOPPED", Duration::from_secs(20))?;
        c.ctr_ok(&["tasks", "delete", &member])?;
        c.ctr_ok(&["containers", "delete", &member])?;
        let third = c.new_id("member");
        ids.push(third.clone());
        let out = run_member(&third, "--rm", &["echo", "still-here"])?;
        ensure!(
            out == "still-here\n",
            "a member after the first left: {out:?}"
        );

        c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &pod])?;
        wait_task_status(c, &pod, "STOPPED", Duration::from_secs(20))?;
        c.ctr_ok(&["tasks", "delete", &pod])?;
        c.ctr_ok(&["containers", "delete", &pod])?;
        let left = vm_leftovers(c.namespace(), std::slice::from_ref(&pod));
        ensure!(
            left.is_empty(),
            "the pod's VM after its last container: {left:#?}"
        );
        Ok(())
    });
}

/// The hook lists, in the order the shim runs them for `ctr run --rm`.
const HOOKS: [&str; 6] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// A scratch directory for one test (root file systems, specs, what the
/// hooks write), removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rtv-shim-{name}-{}", std::process::id()));
        let _ = rtv_runtime::remove_tree(&dir);
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Unmounts anything mounted in it first, never deletes through a mount.
        if let Err(e) = rtv_runtime::remove_tree(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A hook that writes its stdin (the state JSON) to `<dir>/<name>.json` and
/// appends its name to `<dir>/order`, on the host.
fn capture_hook(dir: &Path, name: &str) -> Value {
    let d = dir.display();
    json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("cat > {d}/{name}.json; echo {name} >> {d}/order")],
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "timeout": 30
    })
}

/// Writes `<dir>/config.json` for `ctr run --config`: `ctr oci spec`'s
/// default spec with `args`, a busybox root file system in `<dir>/rootfs`
/// (no image, so no snapshot: the shim uses the directory as it is), the
/// instance's cgroup for `id`, the annotation `org.rtv.hook=yes` and
/// `annotations`, and `hooks`.
fn write_spec(
    c: &Containerd,
    dir: &Path,
    id: &str,
    args: &[&str],
    hooks: Value,
    annotations: &[(&str, &str)],
) -> Result<String> {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs)?;
    let text = c.ctr_ok(&["oci", "spec"])?;
    let mut spec: Value = serde_json::from_str(&text).context("parsing ctr oci spec")?;
    spec["process"]["args"] = json!(args);
    spec["process"]["env"] = json!(["PATH=/bin", "HOME=/"]);
    spec["root"] = json!({"path": rootfs});
    spec["linux"]["cgroupsPath"] = json!(format!("/{}/{id}", c.namespace()));
    let mut a = serde_json::Map::new();
    a.insert("org.rtv.hook".into(), "yes".into());
    for (k, v) in annotations {
        a.insert((*k).into(), (*v).into());
    }
    spec["annotations"] = a.into();
    spec["hooks"] = hooks;
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(path.to_string_lossy().into_owned())
}

/// `ctr run --config <config> [extra] <id>` with the shim.
fn ctr_run_config(
    c: &Containerd,
    config: &str,
    extra: &[&str],
    id: &str,
) -> Result<std::process::Output> {
    let flags = flags(c);
    let mut args = vec!["run", "--config", config];
    args.extend(extra);
    args.extend(strs(&flags));
    args.push(id);
    c.ctr(&args, CTR_TIMEOUT)
}

/// `ctr run --rm --config` of a spec with every hook list: each hook runs
/// on the host, in the order of the lifecycle, with the container's state
/// on stdin (its id, bundle, annotations; status created at create and
/// startContainer, running at poststart with the task's pid, stopped at
/// poststop); the run's output and exit code are the container's.
#[test]
fn ctr_run_runs_the_specs_hooks_on_the_host() {
    let scratch = Scratch::new("hooks");
    let out_dir = scratch.0.join("out");
    scenario("shim-hooks", &mut Vec::new(), |c, ids| {
        std::fs::create_dir_all(&out_dir)?;
        let id = c.new_id("hooks");
        ids.push(id.clone());
        let hooks: serde_json::Map<String, Value> = HOOKS
            .iter()
            .map(|n| (n.to_string(), json!([capture_hook(&out_dir, n)])))
            .collect();
        let config = write_spec(
            c,
            &scratch.0.join(&id),
            &id,
            &["sh", "-c", "echo hooked; exit 5"],
            hooks.into(),
            &[],
        )?;
        let out = ctr_run_config(c, &config, &["--rm"], &id)?;
        ensure!(
            out.status.code() == Some(5) && String::from_utf8_lossy(&out.stdout) == "hooked\n",
            "ctr run --config: want `hooked` and exit 5, got {}",
            describe(&out)
        );
        let order = std::fs::read_to_string(out_dir.join("order")).unwrap_or_default();
        ensure!(
            order.lines().eq(HOOKS),
            "the hooks ran in the order {order:?}, want {HOOKS:?}"
        );
        let bundle = c
            .dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(c.namespace())
            .join(&id);
        let mut pids = Vec::new();
        for name in HOOKS {
            let path = out_dir.join(format!("{name}.json"));
            let text = std::fs::read(&path)
                .with_context(|| format!("the {name} hook wrote no {}", path.display()))?;
            let v: Value = serde_json::from_slice(&text)
                .with_context(|| format!("{name}: {}", String::from_utf8_lossy(&text)))?;
            let want = match name {
                "poststart" => "running",
                "poststop" => "stopped",
                _ => "created",
            };
            ensure!(
                v["id"] == id.as_str()
                    && v["status"] == want
                    && v["bundle"] == bundle.to_string_lossy().as_ref()
                    && v["annotations"]["org.rtv.hook"] == "yes"
                    && v["ociVersion"].is_string(),
                "{name}: want id {id}, status {want}, bundle {}: got {v}",
                bundle.display()
            );
            if name != "poststop" {
                let Some(pid) = v["pid"].as_i64().filter(|p| *p > 0) else {
                    bail!("{name}: no pid: {v}");
                };
                pids.push(pid);
            }
        }
        ensure!(
            pids.windows(2).all(|w| w[0] == w[1]),
            "the hooks got different pids: {pids:?}"
        );
        ensure!(
            !container_ids(c)?.contains(&id),
            "container {id} still exists after ctr run --rm"
        );
        Ok(())
    });
}

/// A prestart hook that fails makes `ctr run` fail with an error naming
/// the hook; the hooks after it do not run, and the create is undone. A
/// lone container: its VM, share mounts and state directory are gone and
/// its shim ended. A member of a pod: its share mounts and its container
/// in the guest are gone (the same id runs in the pod afterwards), the
/// pod's VM is untouched; the pod's sandbox ran its own hooks.
#[test]
fn ctr_run_fails_on_a_failing_prestart_hook_and_leaves_nothing() {
    let scratch = Scratch::new("hook-fails");
    let out_dir = scratch.0.join("out");
    scenario("shim-hook-fails", &mut Vec::new(), |c, ids| {
        std::fs::create_dir_all(&out_dir)?;
        let failing = |name: &str| {
            json!({
                "prestart": [{
                    "path": "/bin/sh",
                    "args": ["sh", "-c", "echo nope >&2; exit 3"],
                }],
                "createRuntime": [capture_hook(&out_dir, name)],
            })
        };
        let check_failed = |out: &std::process::Output, what: &str| {
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                !out.status.success()
                    && stderr.contains("hooks.prestart[0] (/bin/sh) failed")
                    && stderr.contains("nope")
                    && !String::from_utf8_lossy(&out.stdout).contains("never"),
                "ctr run of {what} with a failing prestart hook: want a failure naming \
                 the hook, got {}",
                describe(out)
            );
            ensure!(
                !out_dir.join(format!("{what}.json")).exists(),
                "{what}: the createRuntime hook ran after prestart failed"
            );
            Ok(())
        };

        // A lone container (a pod of its own).
        let id = c.new_id("hook-fails");
        ids.push(id.clone());
        let config = write_spec(
            c,
            &scratch.0.join(&id),
            &id,
            &["echo", "never"],
            failing("lone"),
            &[],
        )?;
        let out = ctr_run_config(c, &config, &["--rm"], &id)?;
        check_failed(&out, "lone")?;
        ensure!(
            !container_ids(c)?.contains(&id),
            "container {id} still exists after the failed ctr run --rm"
        );
        // Before the instance's teardown, which would kill what is left: the
        // failed create stopped the VM it started and removed its state, and
        // the shim, serving nothing, ended.
        let mut left = Vec::new();
        for _ in 0..100 {
            left = vm_leftovers(c.namespace(), std::slice::from_ref(&id));
            left.extend(
                c.shims()
                    .into_iter()
                    .map(|(pid, cmd)| format!("shim {pid} {cmd}")),
            );
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(left.is_empty(), "the failed create left: {left:#?}");

        // A pod: its sandbox runs, with a hook of its own.
        let pod = c.new_id("hook-pod");
        let member = c.new_id("hook-member");
        ids.push(pod.clone());
        ids.push(member.clone());
        let sandbox_ann = ("io.kubernetes.cri.sandbox-id", pod.as_str());
        let config = write_spec(
            c,
            &scratch.0.join(&pod),
            &pod,
            &["sleep", "1000"],
            json!({"createContainer": [capture_hook(&out_dir, "sandbox")]}),
            &[("io.kubernetes.cri.container-type", "sandbox"), sandbox_ann],
        )?;
        let out = ctr_run_config(c, &config, &["-d"], &pod)?;
        ensure!(
            out.status.success(),
            "ctr run the sandbox: {}",
            describe(&out)
        );
        let (pid, _) = task_state(c, &pod)?.context("the sandbox's task")?;
        let v: Value = serde_json::from_slice(
            &std::fs::read(out_dir.join("sandbox.json")).context("the sandbox's hook")?,
        )?;
        ensure!(
            v["id"] == pod.as_str() && v["status"] == "created" && v["pid"] == pid,
            "the sandbox's createContainer hook got {v}, want its id, created, pid {pid}"
        );

        // Its member fails to create.
        let member_ann = [
            ("io.kubernetes.cri.container-type", "container"),
            sandbox_ann,
        ];
        let config = write_spec(
            c,
            &scratch.0.join(&member),
            &member,
            &["echo", "never"],
            failing("member"),
            &member_ann,
        )?;
        let out = ctr_run_config(c, &config, &["--rm"], &member)?;
        check_failed(&out, "member")?;
        let share = Path::new(RTV_SHIM_STATE_ROOT)
            .join(c.namespace())
            .join(&pod)
            .join("share");
        let mounts: Vec<_> = rtv_runtime::share::mounts_under(&share)
            .into_iter()
            .filter(|m| {
                m.strip_prefix(&share)
                    .ok()
                    .and_then(|rel| rel.iter().next())
                    .and_then(|first| first.to_str())
                    .is_some_and(|first| first.starts_with(&format!("{member}@")))
            })
            .collect();
        let dirs = rtv_runtime::share::container_dirs(&share, &member);
        ensure!(
            mounts.is_empty() && dirs.is_empty(),
            "the failed member left in its pod's share {}: directories {dirs:?}, mounts {mounts:?}",
            share.display()
        );
        let vms = vm_leftovers(c.namespace(), std::slice::from_ref(&pod));
        ensure!(
            vms_running(&vms) == 1,
            "want the pod's VM still running, got {vms:#?}"
        );
        // The same id runs in the pod: nothing of it was left in the guest.
        let config = write_spec(
            c,
            &scratch.0.join(format!("{member}-again")),
            &member,
            &["echo", "member-ok"],
            json!({}),
            &member_ann,
        )?;
        let out = ctr_run_config(c, &config, &["--rm"], &member)?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout) == "member-ok\n",
            "ctr run of the member after its failed create: {}",
            describe(&out)
        );

        c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &pod])?;
        wait_task_status(c, &pod, "STOPPED", Duration::from_secs(20))?;
        c.ctr_ok(&["tasks", "delete", &pod])?;
        c.ctr_ok(&["containers", "delete", &pod])?;
        Ok(())
    });
}

/// `ctr events` of an instance, read line by line on a thread; killed
/// when dropped.
struct EventStream {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl EventStream {
    /// Starts `ctr events` and returns once it is subscribed: it has seen a
    /// probe event (a label set on the test's namespace).
    fn start(c: &Containerd) -> Result<EventStream> {
        let stream = Self::spawn(c)?;
        let ns = c.namespace();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for i in 0.. {
            c.ctr_ok(&["namespaces", "label", ns, &format!("rtv-events-probe={i}")])?;
            if stream
                .wait_for("/namespaces/update", ns, Duration::from_millis(500))
                .is_ok()
            {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "ctr events saw none of {i} namespace updates"
            );
        }
        c.ctr_ok(&["namespaces", "label", ns, "rtv-events-probe="])?;
        Ok(stream)
    }

    fn spawn(c: &Containerd) -> Result<EventStream> {
        let mut cmd = c.ctr_command(&["events"]);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().context("starting ctr events")?;
        let stdout = child.stdout.take().context("ctr events' stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(EventStream { child, lines })
    }

    /// Waits up to `timeout` for an event of `topic` naming `id`; returns
    /// its line and the events before it.
    fn wait_for(&self, topic: &str, id: &str, timeout: Duration) -> Result<(String, Vec<String>)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(topic) && line.contains(id) => return Ok((line, seen)),
                Ok(line) => seen.push(line),
                Err(_) => bail!("no {topic} for {id} within {timeout:?}; events: {seen:#?}"),
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kill by the OOM killer is published (`/tasks/oom`) while the task
/// goes on running: the shell survives its `dd`, which the 8 MiB limit
/// kills. The shim hears of it from the agent (`WaitOom`), not at exit.
#[test]
fn ctr_oom_kill_is_published_while_the_task_runs() {
    scenario("shim-oom", &mut Vec::new(), |c, ids| {
        let image = c.import_busybox()?;
        let id = c.new_id("oom");
        ids.push(id.clone());
        let events = EventStream::start(c)?;
        let result = (|| {
            let flags = flags(c);
            let mut args = vec!["run", "-d", "--memory-limit", "8388608"];
            args.extend(strs(&flags));
            args.extend([
                image.as_str(),
                &id,
                "sh",
                "-c",
                "exec 2>/dev/null; dd if=/dev/zero of=/dev/null bs=16M count=1; sleep 1000",
            ]);
            let out = c.ctr(&args, CTR_TIMEOUT)?;
            ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
            let (oom, seen) = events.wait_for("/tasks/oom", &id, Duration::from_secs(120))?;
            ensure!(
                !seen
                    .iter()
                    .any(|l| l.contains("/tasks/exit") && l.contains(&id)),
                "the task exited before its OOM event: {seen:#?}, then {oom}"
            );
            let (_, status) =
                task_state(c, &id)?.with_context(|| format!("task {id} not in ctr task ls"))?;
            ensure!(
                status == "RUNNING",
                "task {id} is {status} after the OOM kill of its dd"
            );
            c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id])?;
            wait_task_status(c, &id, "STOPPED", CTR_TIMEOUT)?;
            c.ctr_ok(&["tasks", "delete", &id])?;
            c.ctr_ok(&["containers", "delete", &id])?;
            Ok(())
        })();
        drop(events);
        result
    });
}

/// containerd restarts (SIGTERM, then started again) under a running task:
/// the same shim and VM go on serving it, the new containerd reaches them
/// (`task ls`, `task exec`), and the task's exit reaches the new containerd
/// as an event (the shim's publisher connects anew).
#[test]
fn ctr_task_survives_a_containerd_restart() {
    scenario("shim-restart", &mut Vec::new(), |c, ids| {
        let image = c.import_busybox()?;
        let id = c.new_id("restart");
        ids.push(id.clone());
        let flags = flags(c);
        let mut args = vec!["run", "-d"];
        args.extend(strs(&flags));
        args.extend([image.as_str(), &id, "sleep", "1000"]);
        let out = c.ctr(&args, CTR_TIMEOUT)?;
        ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
        let shims = c.shims();
        ensure!(shims.len() == 1, "shims before the restart: {shims:?}");
        c.restart()?;
        ensure!(
            c.shims() == shims,
            "the shim changed over the restart: {shims:?}, then {:?}",
            c.shims()
        );
        let (_, status) = task_state(c, &id)?
            .with_context(|| format!("task {id} not in ctr task ls after the restart"))?;
        ensure!(status == "RUNNING", "task {id} after the restart: {status}");
        let fifo = c.fifo_dir().to_string_lossy().into_owned();
        let exec = [
            "tasks",
            "exec",
            "--fifo-dir",
            &fifo,
            "--exec-id",
            "e1",
            &id,
            "echo",
            "after-restart",
        ];
        let out = c.ctr(&exec, CTR_TIMEOUT)?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout) == "after-restart\n",
            "ctr task exec after the restart: {}",
            describe(&out)
        );
        let events = EventStream::start(c)?;
        let result = (|| {
            c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id])?;
            events
                .wait_for("/tasks/exit", &id, Duration::from_secs(60))
                .context("after the restart")?;
            wait_task_status(c, &id, "STOPPED", CTR_TIMEOUT)?;
            c.ctr_ok(&["tasks", "delete", &id])?;
            c.ctr_ok(&["containers", "delete", &id])?;
            Ok(())
        })();
        drop(events);
        result
    });
}
