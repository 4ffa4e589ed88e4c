//! The pod layer's container lifecycle (`rtv_runtime::pod`), written once
//! and run against a pod over the agent on the host (containers_host.rs)
//! and a pod in a VM (containers_vm.rs): create with its hooks and its
//! undo, start, exec, signal, state, delete, membership, and nothing left
//! behind.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use oci_spec::runtime::{Process, Spec};
use rtv_protocol::{ContainerStatus, ExitStatus, Stdio};
use rtv_runtime::pod::{ContainerHooks, ErrorClass, NewContainer, Pod, PodError};

use crate::containers::{base_spec, patched};

/// A bundle for container `id` in `scratch`: `config.json` from `spec`,
/// with hooks that record their state JSON in `<bundle>/hook-<list>.json`
/// (and a prestart hook that fails, with `failing`).
fn bundle(scratch: &Path, id: &str, spec: &Spec, failing: bool) -> Result<(PathBuf, Spec)> {
    let dir = scratch.join(format!("bundle-{id}"));
    std::fs::create_dir_all(&dir)?;
    let hook = |list: &str| {
        serde_json::json!({"path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {}/hook-{list}.json", dir.display())]})
    };
    let mut hooks = serde_json::Map::new();
    for list in [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ] {
        hooks.insert(list.into(), serde_json::json!([hook(list)]));
    }
    if failing {
        hooks.insert(
            "prestart".into(),
            serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", "echo no >&2; exit 7"]}]),
        );
    }
    let spec = patched(spec, serde_json::json!({ "hooks": hooks }))?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&spec)?)?;
    Ok((dir, spec))
}

/// The state JSON hook `list` of `bundle` received.
fn hook_state(bundle: &Path, list: &str) -> Result<serde_json::Value> {
    let path = bundle.join(format!("hook-{list}.json"));
    let text = std::fs::read(&path).with_context(|| format!("hook {list} did not run"))?;
    Ok(serde_json::from_slice(&text)?)
}

fn no_guest_pids(_: i32) -> Option<i32> {
    None
}

/// Creates container `id` in `pod` and finishes the create with `pid`.
async fn create(
    pod: &Pod,
    id: &str,
    bundle: &Path,
    spec: &Spec,
    rootfs: &Path,
    pid: i32,
) -> Result<(u64, ContainerHooks), PodError> {
    let creating = pod
        .create_container(NewContainer {
            id,
            bundle,
            spec,
            rootfs,
            stdio: Stdio::default(),
            guest_pid: &no_guest_pids,
        })
        .await?;
    let exec_id = creating.exec_id;
    let hooks = ContainerHooks::of(id, bundle, spec);
    creating.finish(&hooks, pid).await?;
    Ok((exec_id, hooks))
}

/// Whether container `id` has anything left in the pod's share.
fn in_share(pod: &Pod, id: &str) -> bool {
    !rtv_runtime::share::container_dirs(&pod.dir().join("share"), id).is_empty()
}

fn expect_class<T: std::fmt::Debug>(
    r: Result<T, PodError>,
    class: ErrorClass,
    what: &str,
) -> Result<PodError> {
    match r {
        Err(e) if e.class() == class => Ok(e),
        other => bail!("{what}: expected a {class:?} error, got {other:?}"),
    }
}

/// Two containers through the pod layer: hooks see the front end's pid
/// and each status, an exec and a signal reach the container, the first
/// delete leaves the pod running, the last says so, and the pod then takes
/// no new container.
pub async fn lifecycle(pod: &Pod, rootfs: &Path, scratch: &Path) -> Result<()> {
    let spec = base_spec(&["sleep", "60"]);
    let (b1, spec1) = bundle(scratch, "pod-c1", &spec, false)?;
    let (c1_init, hooks) = create(pod, "pod-c1", &b1, &spec1, rootfs, 4242).await?;
    for list in ["prestart", "createRuntime", "createContainer"] {
        let st = hook_state(&b1, list)?;
        ensure!(
            st["id"] == "pod-c1" && st["status"] == "created" && st["pid"] == 4242,
            "{list} got {st}"
        );
        ensure!(
            st["bundle"] == b1.display().to_string(),
            "{list}'s bundle: {st}"
        );
    }
    ensure!(pod.member_ids()? == ["pod-c1"], "{:?}", pod.member_ids());
    pod.start_container(&hooks, 4242).await?;
    ensure!(hook_state(&b1, "startContainer")?["status"] == "created");
    ensure!(hook_state(&b1, "poststart")?["status"] == "running");
    let st = pod.state("pod-c1").await?;
    ensure!(st.status == ContainerStatus::Running, "{st:?}");

    let process: Process = serde_json::from_value(serde_json::json!({
        "args": ["sh", "-c", "exit 3"], "cwd": "/", "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0}
    }))?;
    let (exec, _) = pod.exec("pod-c1", process, Stdio::default()).await?;
    ensure!(
        pod.wait(exec).await? == ExitStatus::Code(3),
        "the exec's exit"
    );

    let (b2, spec2) = bundle(scratch, "pod-c2", &spec, false)?;
    create(pod, "pod-c2", &b2, &spec2, rootfs, 4343).await?;
    ensure!(pod.member_ids()? == ["pod-c1", "pod-c2"]);

    pod.signal("pod-c1", libc::SIGKILL, false).await?;
    ensure!(pod.wait(c1_init).await? == ExitStatus::Signal(9));
    ensure!(
        !pod.delete_container("pod-c1", Some(&hooks)).await?,
        "pod-c1 was not the last container"
    );
    let st = hook_state(&b1, "poststop")?;
    ensure!(st["status"] == "stopped", "poststop got {st}");
    ensure!(!in_share(pod, "pod-c1"), "pod-c1 left in the share");
    expect_class(pod.state("pod-c1").await, ErrorClass::NotFound, "deleted")?;
    // pod-c2 was created, never started: the delete ends its init.
    ensure!(
        pod.delete_container("pod-c2", None).await?,
        "pod-c2 was the last container"
    );
    ensure!(pod.member_ids()?.is_empty());
    let (b3, spec3) = bundle(scratch, "pod-c3", &spec, false)?;
    let late = expect_class(
        create(pod, "pod-c3", &b3, &spec3, rootfs, 1).await,
        ErrorClass::InvalidState,
        "a create in a stopping pod",
    )?;
    ensure!(late.to_string().contains("stopping"), "{late}");
    ensure!(!in_share(pod, "pod-c3"));
    Ok(())
}

/// Creates that fail leave nothing: a failing prestart hook (the
/// container is gone from the guest, the share and the members), a bind
/// mount whose source is missing (the error names the file and field), and
/// a create dropped before it finished.
pub async fn failed_creates(pod: &Pod, rootfs: &Path, scratch: &Path) -> Result<()> {
    let spec = base_spec(&["true"]);
    let (b, s) = bundle(scratch, "pod-hookfail", &spec, true)?;
    let e = expect_class(
        create(pod, "pod-hookfail", &b, &s, rootfs, 1).await,
        ErrorClass::Internal,
        "a failing prestart hook",
    )?;
    ensure!(
        matches!(e, PodError::Hook(_)) && e.to_string().contains("hooks.prestart[0]"),
        "{e}"
    );
    let bad = patched(
        &spec,
        serde_json::json!({"mounts": [{"destination": "/x", "type": "bind",
            "source": "/nonexistent/rtv-src", "options": ["rbind"]}]}),
    )?;
    let (b2, s2) = bundle(scratch, "pod-badbind", &bad, false)?;
    let e = expect_class(
        create(pod, "pod-badbind", &b2, &s2, rootfs, 1).await,
        ErrorClass::InvalidArgument,
        "a missing bind mount source",
    )?;
    let config = b2.join("config.json").display().to_string();
    ensure!(
        e.to_string()
            .starts_with(&format!("{config}: mounts[0].source")),
        "{e}"
    );
    let (b3, s3) = bundle(scratch, "pod-dropped", &spec, false)?;
    let creating = pod
        .create_container(NewContainer {
            id: "pod-dropped",
            bundle: &b3,
            spec: &s3,
            rootfs,
            stdio: Stdio::default(),
            guest_pid: &no_guest_pids,
        })
        .await?;
    ensure!(pod.member_ids()? == ["pod-dropped"]);
    drop(creating);
    for id in ["pod-hookfail", "pod-badbind", "pod-dropped"] {
        ensure!(!in_share(pod, id), "{id} left in the share");
    }
    ensure!(pod.member_ids()?.is_empty(), "{:?}", pod.member_ids());
    expect_class(
        pod.state("pod-hookfail").await,
        ErrorClass::NotFound,
        "the container of the failed hook",
    )?;
    // The dropped create's container goes from the guest in the
    // background.
    for _ in 0..600 {
        if pod.state("pod-dropped").await.is_err() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bail!("the dropped create's container stayed in the guest")
}
