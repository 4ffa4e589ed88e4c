//! Concurrent requests on containers, through the agent: every kind of
//! request at once on one container and across containers, each of which
//! must succeed or fail with the error its container's lifecycle dictates
//! (never `TimedOut`, never "busy", never a hang). Run against the agent
//! on the host (containers_host.rs) and in a VM (containers_vm.rs), beside
//! a CPU hog ([`CpuHog`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use oci_spec::runtime::{LinuxResources, Process};
use rtv_protocol::{
    ContainerStatus, CreateContainer, ErrorKind, ExecInContainer, ExitStatus, Stdio,
};
use rtv_runtime::agent_client::Started;
use rtv_runtime::{AgentClient, ClientError};

use crate::containers::{base_spec, Place};

/// Busy threads in the test process, stopped when dropped.
pub struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHog {
    /// Starts `threads` threads that spin until the hog is dropped.
    pub fn start(threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How hard to push.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// Containers stressed at once.
    pub containers: usize,
    /// Execs sent at once to a running container.
    pub execs: usize,
    /// How long any one request may take before it counts as hung.
    pub hang: Duration,
    /// The limits an update sets (what the agent's cgroups can apply).
    pub update: LinuxResources,
}

/// What a request ended with: `Ok`, or the agent's error kind.
type Outcome = std::result::Result<(), ErrorKind>;

/// One request's outcome, checked against what the lifecycle allows.
struct Checked {
    what: String,
    outcome: Outcome,
}

/// Runs `fut`, failing on a hang or on anything but an agent error.
async fn attempt<T>(
    what: String,
    hang: Duration,
    fut: impl Future<Output = std::result::Result<T, ClientError>>,
) -> Result<(Checked, Option<T>)> {
    match tokio::time::timeout(hang, fut).await {
        Err(_) => bail!("{what}: no answer within {hang:?}"),
        Ok(Ok(v)) => Ok((
            Checked {
                what,
                outcome: Ok(()),
            },
            Some(v),
        )),
        Ok(Err(ClientError::Agent { kind, message })) => {
            ensure!(
                !matches!(kind, ErrorKind::TimedOut | ErrorKind::Other),
                "{what}: {kind:?}: {message}"
            );
            Ok((
                Checked {
                    what,
                    outcome: Err(kind),
                },
                None,
            ))
        }
        Ok(Err(e)) => Err(anyhow::Error::new(e).context(what)),
    }
}

/// Checks `outcomes` against the allowed error kinds.
fn allow(outcomes: &[Checked], allowed: &[ErrorKind]) -> Result<()> {
    for c in outcomes {
        if let Err(kind) = c.outcome {
            ensure!(
                allowed.contains(&kind),
                "{}: failed with {kind:?}, which its container's lifecycle does not explain \
                 (allowed: {allowed:?})",
                c.what
            );
        }
    }
    Ok(())
}

fn oks(outcomes: &[Checked]) -> usize {
    outcomes.iter().filter(|c| c.outcome.is_ok()).count()
}

fn true_process() -> Result<Process> {
    Ok(serde_json::from_value(serde_json::json!({
        "args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    }))?)
}

/// Sends `n` execs of `true` to `id` at once; the exec ids of those that
/// started, and every outcome.
async fn execs(
    c: &AgentClient,
    id: &str,
    n: usize,
    cfg: &StressConfig,
) -> Result<(Vec<u64>, Vec<Checked>)> {
    let process = true_process()?;
    let calls = (0..n).map(|i| {
        attempt(format!("{id}: exec {i}"), cfg.hang, async {
            c.exec_in_container(ExecInContainer {
                container_id: id.into(),
                process: process.clone(),
                stdio: Stdio::default(),
            })
            .await
        })
    });
    let mut started = Vec::new();
    let mut outcomes = Vec::new();
    for r in futures_join_all(calls).await {
        let (checked, v) = r?;
        if let Some(Started { exec_id, .. }) = v {
            started.push(exec_id);
        }
        outcomes.push(checked);
    }
    Ok((started, outcomes))
}

/// `join_all` for a handful of futures, polled concurrently in one task.
async fn futures_join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = (0..handles.len()).map(|_| None).collect();
    let mut handles: Vec<_> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, out) in handles.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = h {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *h = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// One request of a batch, its value dropped.
type Attempt<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Checked>> + 'a>>;

/// `$e` (a call on the agent client) as an [`Attempt`] named `$what`.
macro_rules! call {
    ($cfg:expr, $what:expr, $e:expr) => {{
        let what = $what;
        Box::pin(async move {
            attempt(what, $cfg.hang, async { $e.await.map(|_| ()) })
                .await
                .map(|(c, _)| c)
        }) as Attempt<'_>
    }};
}

/// Runs a batch of [`Attempt`]s at once; their outcomes.
async fn batch(attempts: Vec<Attempt<'_>>) -> Result<Vec<Checked>> {
    futures_join_all(attempts).await.into_iter().collect()
}

/// Every kind of request at once on container `id`, in three rounds: while
/// it is created, while it runs, while it is deleted.
async fn one_container(c: &AgentClient, place: &Place, id: &str, cfg: &StressConfig) -> Result<()> {
    use ErrorKind::{InvalidState, NoSuchContainer};
    let spec = place.spec_for(id, &base_spec(&["sleep", "1000"]))?;
    let Started { exec_id: init, .. } = c
        .create_container(CreateContainer {
            container_id: id.into(),
            spec,
            stdio: Stdio::default(),
            builtin_pause: false,
        })
        .await
        .with_context(|| format!("creating {id}"))?;
    // Armed before the next request: it answers when the container's
    // processes are gone, or finds the container deleted.
    let oom = c.send_wait_oom(id, 0).await?;

    // Round 1, created: one of three starts wins; execs may come too early.
    let starts = batch(
        (0..3)
            .map(|i| call!(cfg, format!("{id}: start {i}"), c.start_container(id)))
            .collect(),
    );
    let others = batch(vec![
        call!(cfg, format!("{id}: state"), c.container_state(id)),
        call!(cfg, format!("{id}: pids"), c.container_pids(id)),
        call!(cfg, format!("{id}: stats"), c.container_stats(id)),
        call!(
            cfg,
            format!("{id}: SIGCONT"),
            c.signal_container(id, libc::SIGCONT, false)
        ),
    ]);
    let ((started_execs, exec_outcomes), starts, others) =
        tokio::try_join!(execs(c, id, 2, cfg), starts, others)?;
    ensure!(
        oks(&starts) == 1,
        "{id}: {} of 3 starts succeeded",
        oks(&starts)
    );
    allow(&starts, &[InvalidState])?;
    allow(&exec_outcomes, &[InvalidState])?;
    allow(&others, &[])?;
    let mut exec_ids = started_execs;

    // Round 2, running: execs, signals, queries, pause, resume and update.
    let pauses = batch(vec![
        call!(cfg, format!("{id}: pause 1"), c.pause_container(id, true)),
        call!(cfg, format!("{id}: resume 1"), c.pause_container(id, false)),
        call!(cfg, format!("{id}: pause 2"), c.pause_container(id, true)),
        call!(cfg, format!("{id}: resume 2"), c.pause_container(id, false)),
    ]);
    let queries = batch(vec![
        call!(
            cfg,
            format!("{id}: update 1"),
            c.update_container(id, cfg.update.clone())
        ),
        call!(
            cfg,
            format!("{id}: update 2"),
            c.update_container(id, cfg.update.clone())
        ),
        call!(cfg, format!("{id}: state"), c.container_state(id)),
        call!(cfg, format!("{id}: pids"), c.container_pids(id)),
        call!(cfg, format!("{id}: stats"), c.container_stats(id)),
        call!(
            cfg,
            format!("{id}: SIGCONT"),
            c.signal_container(id, libc::SIGCONT, true)
        ),
    ]);
    let ((started_execs, exec_outcomes), pauses, queries) =
        tokio::try_join!(execs(c, id, cfg.execs, cfg), pauses, queries)?;
    allow(&pauses, &[InvalidState])?;
    allow(&exec_outcomes, &[InvalidState])?;
    allow(&queries, &[])?;
    exec_ids.extend(started_execs);
    let resumed = attempt(
        format!("{id}: resume"),
        cfg.hang,
        c.pause_container(id, false),
    )
    .await?;
    allow(&[resumed.0], &[InvalidState])?;
    let state = c.container_state(id).await?;
    ensure!(
        state.status == ContainerStatus::Running,
        "{id} after round 2: {state:?}"
    );
    for e in exec_ids {
        let status = tokio::time::timeout(cfg.hang, c.wait(e))
            .await
            .with_context(|| format!("{id}: exec {e} did not end"))??;
        ensure!(
            status == ExitStatus::Code(0),
            "{id}: exec {e} ended {status:?}"
        );
    }

    // Round 3: two deletes (one wins) race with everything else.
    let deletes = batch(
        (0..2)
            .map(|i| {
                call!(
                    cfg,
                    format!("{id}: delete {i}"),
                    c.delete_container(id, true)
                )
            })
            .collect(),
    );
    let others = batch(vec![
        call!(cfg, format!("{id}: state"), c.container_state(id)),
        call!(cfg, format!("{id}: stats"), c.container_stats(id)),
        call!(
            cfg,
            format!("{id}: SIGCONT"),
            c.signal_container(id, libc::SIGCONT, false)
        ),
        call!(cfg, format!("{id}: pause"), c.pause_container(id, true)),
        call!(
            cfg,
            format!("{id}: update"),
            c.update_container(id, cfg.update.clone())
        ),
    ]);
    let ((_, exec_outcomes), deletes, others) =
        tokio::try_join!(execs(c, id, 1, cfg), deletes, others)?;
    ensure!(
        oks(&deletes) == 1,
        "{id}: {} of 2 deletes succeeded",
        oks(&deletes)
    );
    allow(&deletes, &[NoSuchContainer])?;
    allow(&exec_outcomes, &[InvalidState, NoSuchContainer])?;
    allow(&others, &[InvalidState, NoSuchContainer])?;
    let (oom, _) = attempt(format!("{id}: WaitOom"), cfg.hang, oom.result()).await?;
    allow(&[oom], &[NoSuchContainer])?;
    match c.container_state(id).await {
        Err(ClientError::Agent {
            kind: NoSuchContainer,
            ..
        }) => {}
        other => bail!("{id} after its delete: {other:?}"),
    }
    match c.wait(init).await {
        Err(ClientError::Agent {
            kind: ErrorKind::NoSuchProcess,
            ..
        }) => {}
        other => bail!("{id}'s init after the delete: {other:?}"),
    }
    Ok(())
}

/// The stress run: creates of one id racing (one wins), then
/// [`one_container`] on `cfg.containers` containers at once.
pub async fn stress(c: &AgentClient, place: &Place, cfg: &StressConfig) -> Result<()> {
    let dup = "stress-dup";
    let spec = place.spec_for(dup, &base_spec(&["true"]))?;
    let creates = batch(
        (0..3)
            .map(|i| {
                let spec = spec.clone();
                call!(
                    cfg,
                    format!("{dup}: create {i}"),
                    c.create_container(CreateContainer {
                        container_id: dup.into(),
                        spec,
                        stdio: Stdio::default(),
                        builtin_pause: false,
                    })
                )
            })
            .collect(),
    )
    .await?;
    let deleted = c.delete_container(dup, true).await;
    place.remove(dup);
    ensure!(
        oks(&creates) == 1,
        "{} of 3 creates of one id succeeded",
        oks(&creates)
    );
    allow(&creates, &[ErrorKind::AlreadyExists])?;
    deleted?;

    let ids: Vec<String> = (0..cfg.containers).map(|i| format!("stress-{i}")).collect();
    let results = futures_join_all(ids.iter().map(|id| one_container(c, place, id, cfg))).await;
    let mut failures = Vec::new();
    for (id, r) in ids.iter().zip(results) {
        if let Err(e) = r {
            failures.push(format!("{e:#}"));
            let _ = c.delete_container(id, true).await;
        }
        place.remove(id);
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
