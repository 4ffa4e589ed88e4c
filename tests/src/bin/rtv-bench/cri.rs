//! `rtv-bench cri`: pods through containerd 1.6's CRI plugin, driven by the
//! repo's CRI client (tests/cri/), on three handlers of one containerd:
//! `runc` and `crun` (runc's shim, `io.containerd.runc.v2`) and `rtv`
//! (`io.containerd.rtv.v2`, one VM per pod). Per pod: the time from
//! `RunPodSandbox` to its first container running, the host memory and CPU
//! of what the pod costs beside its containers (the shim, and rtv's VMM or
//! the pause container), and the time to stop and remove it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rtv_tests::containerd::{self, Containerd, CriRuntime};
use rtv_tests::cri::{self, CriClient};

use super::{
    host_type, mem_usage, oci_bundle, oci_crun, oci_loadavg, oci_wait_for_quiet_host,
    print_runtime_header, rss_pss, rtv_and_shim, seconds,
};

/// One pod's start and stop, timed.
struct PodRun {
    /// `RunPodSandbox`.
    run_pod: Duration,
    /// `RunPodSandbox` + `CreateContainer` + `StartContainer` of the first
    /// container (its state is then `CONTAINER_RUNNING`).
    first_running: Duration,
    /// CPU time of the pod's own host processes (not the container's)
    /// from their start until the container runs.
    start_cpu: Duration,
    /// `StopPodSandbox` + `RemovePodSandbox`.
    stop_remove: Duration,
}

/// What a pod costs on the host beside its container.
#[derive(Default)]
struct PodCost {
    /// (role, pid, RSS KiB, PSS KiB) of every process of the pod outside
    /// its app container.
    procs: Vec<(String, u32, u64, u64)>,
    /// rtv: the VMM's resident memory outside guest RAM (KiB).
    vmm_overhead_kib: Option<u64>,
    /// CPU of those processes while the pod idles, in millicores.
    idle_millicores: f64,
    /// The same, per process (as in `procs`).
    idle_per_proc: Vec<f64>,
}

impl PodCost {
    fn pss_of(&self, role: &str) -> Option<u64> {
        let v: Vec<u64> = self
            .procs
            .iter()
            .filter(|p| p.0.starts_with(role))
            .map(|p| p.3)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }

    fn pss_total(&self) -> u64 {
        self.procs.iter().map(|p| p.3).sum()
    }
}

/// A handler under test: its name, and whether it was set up.
struct Handler {
    name: &'static str,
    label: String,
}

/// Clock ticks per second, for /proc/PID/stat's CPU times.
pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant; no memory is shared.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A process's CPU time (user + system, with that of its reaped children
/// when `children`) in clock ticks.
pub(crate) fn cpu_ticks(pid: u32, children: bool) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces: state (3), ... utime (14), stime (15), cutime (16),
    // cstime (17).
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    let mut ticks = num(14)? + num(15)?;
    if children {
        ticks += num(16)? + num(17)?;
    }
    Some(ticks)
}

/// The host processes of pod `pod` other than those of container `app`,
/// each with its role: the pod's shim, everything the shim started (rtv's
/// VMM, the pause container's processes), and processes naming the pod's
/// rtv state directory.
pub(crate) fn pod_processes(c: &Containerd, pod: &str, app: &str) -> Result<Vec<(String, u32)>> {
    let shim = c
        .shims()
        .into_iter()
        .find(|(_, id)| id == pod)
        .map(|(pid, _)| pid)
        .with_context(|| format!("no shim serves pod {pod}"))?;
    let state_dir = format!(
        "{}/",
        Path::new(containerd::RTV_SHIM_STATE_ROOT)
            .join(cri::CRI_NAMESPACE)
            .join(pod)
            .display()
    );
    let procs = containerd::processes();
    let children = containerd::descendants(&procs, shim as i32);
    let app_cgroup = format!("/{app}");
    let mut out = vec![("shim".to_owned(), shim)];
    for p in &procs {
        let named = p.cmdline.iter().any(|a| a.contains(&state_dir));
        if p.pid as u32 == shim || p.state == 'Z' || !(children.contains(&p.pid) || named) {
            continue;
        }
        if p.cgroup.lines().any(|l| l.ends_with(&app_cgroup)) {
            continue;
        }
        let name = p
            .cmdline
            .first()
            .and_then(|a| a.rsplit('/').next())
            .unwrap_or("?")
            .to_owned();
        let role = if name == "rtv-vmm" {
            "VMM".to_owned()
        } else {
            format!("pause container ({name})")
        };
        out.push((role, p.pid as u32));
    }
    Ok(out)
}

/// CPU ticks of `pids` (with reaped children's when `children`).
fn ticks_of(pids: &[(String, u32)], children: bool) -> u64 {
    pids.iter()
        .filter_map(|(_, p)| cpu_ticks(*p, children))
        .sum()
}

/// A pod named `name` with one `sleep` container on `handler`; returns
/// the pod's and the container's ids and the timings up to running.
fn start_pod(
    c: &Containerd,
    client: &CriClient,
    handler: &str,
    name: &str,
) -> Result<(String, String, serde_json::Value, Duration, Duration)> {
    let pod_cfg = cri::pod_config(c, name)?;
    let t = Instant::now();
    let pod = client.run_pod(&pod_cfg, handler)?;
    let run_pod = t.elapsed();
    let cfg = cri::container_config("app", &["sleep", "1000"], &[]);
    let app = client.create_container(&pod, &cfg, &pod_cfg)?;
    client.start(&app)?;
    let running = t.elapsed();
    let st = client.container_status(&app)?;
    ensure!(
        st["status"]["state"] == "CONTAINER_RUNNING",
        "{handler}: the container is not running after StartContainer: {}",
        st["status"]
    );
    Ok((pod, app, pod_cfg, run_pod, running))
}

fn stop_pod(client: &CriClient, pod: &str) -> Result<Duration> {
    let t = Instant::now();
    client.stop_pod(pod)?;
    client.remove_pod(pod)?;
    Ok(t.elapsed())
}

/// One timed pod on `handler`.
fn one_pod(c: &Containerd, client: &CriClient, handler: &str, name: &str) -> Result<PodRun> {
    let (pod, app, _, run_pod, first_running) = match start_pod(c, client, handler, name) {
        Ok(p) => p,
        Err(e) => {
            // Whatever got made goes again.
            if let Ok(pods) = client.list_pods() {
                for p in pods {
                    if p["metadata"]["name"] == name {
                        if let Some(id) = p["id"].as_str() {
                            let _ = stop_pod(client, id);
                        }
                    }
                }
            }
            return Err(e);
        }
    };
    let cpu = pod_processes(c, &pod, &app).map(|p| ticks_of(&p, true));
    let stop_remove = stop_pod(client, &pod)?;
    Ok(PodRun {
        run_pod,
        first_running,
        start_cpu: Duration::from_secs_f64(cpu? as f64 / clock_ticks()),
        stop_remove,
    })
}

/// Memory and idle CPU of one running pod per handler, all running at
/// once: memory after 5 s, CPU over the next `idle` seconds.
fn pod_costs(
    c: &Containerd,
    client: &CriClient,
    handlers: &[Handler],
    idle: Duration,
) -> Vec<Result<PodCost, String>> {
    let mut pods: Vec<Result<(String, String), String>> = Vec::new();
    for h in handlers {
        let name = format!("cost-{}", h.name);
        eprintln!("  footprint: a pod on {}", h.name);
        pods.push(
            start_pod(c, client, h.name, &name)
                .map(|(pod, app, ..)| (pod, app))
                .map_err(|e| format!("{e:#}")),
        );
    }
    std::thread::sleep(Duration::from_secs(5));
    let mut costs: Vec<Result<Measured, String>> = Vec::new();
    for p in &pods {
        let cost = p.clone().and_then(|(pod, app)| {
            let procs = pod_processes(c, &pod, &app).map_err(|e| format!("{e:#}"))?;
            let mut cost = PodCost::default();
            for (role, pid) in &procs {
                let (rss, pss) = rss_pss(*pid).map_err(|e| format!("{role}: {e:#}"))?;
                cost.procs.push((role.clone(), *pid, rss, pss));
                if role == "VMM" {
                    let mem_mib = vmm_mem_mib(*pid).unwrap_or(0);
                    cost.vmm_overhead_kib =
                        mem_usage(*pid, mem_mib * 1024).ok().map(|m| m.overhead_kib);
                }
            }
            Ok((cost, procs))
        });
        costs.push(cost);
    }
    let per_proc = |procs: &[(String, u32)]| -> Vec<u64> {
        procs
            .iter()
            .map(|(_, p)| cpu_ticks(*p, false).unwrap_or(0))
            .collect()
    };
    let before: Vec<Vec<u64>> = costs
        .iter()
        .map(|c| c.as_ref().map_or(Vec::new(), |(_, p)| per_proc(p)))
        .collect();
    eprintln!("  footprint: {} s of idle CPU", idle.as_secs());
    let t = Instant::now();
    std::thread::sleep(idle);
    let window = t.elapsed().as_secs_f64();
    let out = costs
        .into_iter()
        .zip(before)
        .map(|(c, b)| {
            c.map(|(mut cost, procs)| {
                let millicores = |ticks: u64| ticks as f64 / clock_ticks() / window * 1000.0;
                cost.idle_per_proc = per_proc(&procs)
                    .iter()
                    .zip(&b)
                    .map(|(after, before)| millicores(after.saturating_sub(*before)))
                    .collect();
                cost.idle_millicores = cost.idle_per_proc.iter().sum();
                cost
            })
        })
        .collect();
    for (pod, _) in pods.iter().flatten() {
        if let Err(e) = stop_pod(client, pod) {
            eprintln!("  stopping pod {pod}: {e:#}");
        }
    }
    out
}

/// A pod's cost so far, and its processes (role, pid).
type Measured = (PodCost, Vec<(String, u32)>);

/// The guest memory (`--mem`, MiB) on a VMM's command line.
fn vmm_mem_mib(pid: u32) -> Option<u64> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|&b| b == 0);
    args.find(|a| *a == b"--mem")?;
    std::str::from_utf8(args.next()?).ok()?.parse().ok()
}

/// `rtv-bench cri`.
pub(crate) fn cri_bench(runs: usize, idle: Duration, max_wait: Duration) -> Result<()> {
    let (_, shim) = rtv_and_shim()?;
    let work = std::env::temp_dir().join(format!("rtv-bench-cri-{}", std::process::id()));
    if work.exists() {
        rtv_runtime::remove_tree(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let result = cri_measure(&work, &shim, runs, idle, max_wait);
    if let Err(e) = rtv_runtime::remove_tree(&work) {
        eprintln!("removing {}: {e}", work.display());
    }
    result
}

fn cri_measure(
    work: &Path,
    shim: &Path,
    runs: usize,
    idle: Duration,
    max_wait: Duration,
) -> Result<()> {
    let runc = containerd::find_binary("runc").context("runc (apt-get install runc)")?;
    let mut runtimes = vec![CriRuntime {
        name: "runc".into(),
        runtime_type: containerd::RUNC_SHIM.into(),
        binary_name: Some(runc),
        root: None,
        config_path: None,
        pod_annotations: Vec::new(),
    }];
    let mut handlers = vec![Handler {
        name: "runc",
        label: "runc".into(),
    }];
    // crun as it runs here: itself, or through the script that hides the
    // host's cgroup2 mount from it (see the `oci` bench).
    let bundle = work.join("crun-probe-bundle");
    oci_bundle(&bundle, &["true"])?;
    let (crun, crun_note) = oci_crun(work, &bundle)?;
    if let Some(crun) = &crun {
        runtimes.push(CriRuntime {
            name: "crun".into(),
            runtime_type: containerd::RUNC_SHIM.into(),
            binary_name: Some(crun.bin.clone()),
            root: Some(work.join("crun-root")),
            config_path: None,
            pod_annotations: Vec::new(),
        });
        handlers.push(Handler {
            name: "crun",
            label: crun.label.into(),
        });
    } else {
        eprintln!("{crun_note}: leaving crun out");
    }
    runtimes.push(CriRuntime::rtv());
    handlers.push(Handler {
        name: "rtv",
        label: "rtv".into(),
    });
    let shim_dir = shim.parent().context("the shim's directory")?.to_path_buf();
    let opts = cri::cri_options(runtimes, Some(shim_dir));
    let c = Containerd::start_with("bench-cri", &opts)?;
    let measured = (|| {
        let client = CriClient::connect(&c)?;
        cri::wait_cri_ready(&client, Duration::from_secs(30))?;
        cri::import_cri_images(&c, &client)?;
        // One untimed pod each: unpacks the images' snapshots, and makes
        // rtv's VM template for a pod.
        let mut warmups = Vec::new();
        for h in &handlers {
            eprintln!("  warm-up pod on {}", h.name);
            match one_pod(&c, &client, h.name, &format!("warm-{}", h.name)) {
                Ok(r) => warmups.push(format!("{} {:.2} s", h.name, r.first_running.as_secs_f64())),
                Err(e) => warmups.push(format!("{} failed ({e:#})", h.name)),
            }
        }
        let start = oci_wait_for_quiet_host(max_wait)?;
        eprintln!("{start}");
        let mut rows: Vec<Result<Vec<PodRun>, String>> =
            handlers.iter().map(|_| Ok(Vec::new())).collect();
        for run in 0..runs {
            for (i, h) in handlers.iter().enumerate() {
                let Ok(done) = &mut rows[i] else { continue };
                match one_pod(&c, &client, h.name, &format!("b-{}-{run}", h.name)) {
                    Ok(r) => {
                        eprintln!(
                            "  pod on {}, run {}: first container running after {:.3} s (RunPodSandbox {:.3} s), stop + remove {:.3} s",
                            h.name,
                            run + 1,
                            r.first_running.as_secs_f64(),
                            r.run_pod.as_secs_f64(),
                            r.stop_remove.as_secs_f64()
                        );
                        done.push(r);
                    }
                    Err(e) => {
                        eprintln!("  pod on {}, run {}: {e:#}", h.name, run + 1);
                        rows[i] = Err(format!("{e:#}"));
                    }
                }
            }
        }
        let costs = pod_costs(&c, &client, &handlers, idle);
        cri::wait_nothing_left(&c, &client, Duration::from_secs(10))
            .context("after the pods were removed")?;
        let end = oci_loadavg()?.1;
        print_tables(&handlers, &rows, &costs, runs, idle, &start, &end, &warmups);
        anyhow::Ok(())
    })();
    let shutdown = c.shutdown();
    measured?;
    shutdown.context("shutting containerd down")
}

#[allow(clippy::too_many_arguments)]
fn print_tables(
    handlers: &[Handler],
    rows: &[Result<Vec<PodRun>, String>],
    costs: &[Result<PodCost, String>],
    runs: usize,
    idle: Duration,
    start: &str,
    end: &str,
    warmups: &[String],
) {
    println!(
        "Pods through CRI: containerd 1.6's CRI plugin with the handlers {} ({runs} pods each, median (min), wall time on the host), host: {}; {start}, {end} at the end",
        handlers.iter().map(|h| h.name).collect::<Vec<_>>().join(", "),
        host_type()
    );
    println!();
    print_runtime_header(handlers.iter().map(|h| h.label.as_str()));
    let last = handlers.len() - 1;
    let time_row = |label: &str, pick: &dyn Fn(&PodRun) -> Duration| {
        let mut line = format!("| {label} |");
        let mut medians = Vec::new();
        for r in rows {
            match r {
                Ok(v) if !v.is_empty() => {
                    let t: Vec<Duration> = v.iter().map(pick).collect();
                    let (median, min, _) = seconds(&t);
                    medians.push(Some(median));
                    line.push_str(&format!(" {median:.3} s ({min:.3} s) |"));
                }
                Ok(_) => {
                    medians.push(None);
                    line.push_str(" — |");
                }
                Err(_) => {
                    medians.push(None);
                    line.push_str(" failed (below) |");
                }
            }
        }
        line.push_str(&match (medians[last], medians[0]) {
            (Some(r), Some(c)) if c > 0.0 => format!(" {:.0}x |", r / c),
            _ => " — |".into(),
        });
        println!("{line}");
    };
    time_row(
        "pod start: `RunPodSandbox` → first container running",
        &|r| r.first_running,
    );
    time_row("of which `RunPodSandbox`", &|r| r.run_pod);
    time_row(
        "host CPU time to start the pod (shim, VMM or pause)",
        &|r| r.start_cpu,
    );
    time_row("`StopPodSandbox` + `RemovePodSandbox`", &|r| r.stop_remove);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mem_row = |label: &str, pick: &dyn Fn(&PodCost) -> Option<u64>| {
        let mut line = format!("| {label} |");
        let mut vals = Vec::new();
        for c in costs {
            let v = c.as_ref().ok().and_then(pick);
            vals.push(v);
            line.push_str(&match (c, v) {
                (Err(_), _) => " failed (below) |".into(),
                (Ok(_), Some(k)) => format!(" {:.1} MiB |", mib(k)),
                (Ok(_), None) => " — |".into(),
            });
        }
        line.push_str(&match (vals[last], vals[0]) {
            (Some(r), Some(c)) if c > 0 => format!(" {:.1}x |", r as f64 / c as f64),
            _ => " — |".into(),
        });
        println!("{line}");
    };
    mem_row("the shim's memory per pod, PSS", &|c| c.pss_of("shim"));
    mem_row(
        "the VMM's memory per pod, PSS (guest RAM touched included)",
        &|c| c.pss_of("VMM"),
    );
    mem_row("the VMM's memory outside guest RAM, RSS", &|c| {
        c.vmm_overhead_kib
    });
    mem_row("the pause container's memory, PSS", &|c| {
        c.pss_of("pause container")
    });
    mem_row(
        "the pod's overhead on the host (all of the above), PSS",
        &|c| Some(c.pss_total()),
    );
    let mut line = format!(
        "| idle CPU of the pod's overhead over {} s, millicores |",
        idle.as_secs()
    );
    for c in costs {
        line.push_str(&match c {
            Ok(c) => format!(" {:.1} |", c.idle_millicores),
            Err(_) => " failed (below) |".into(),
        });
    }
    line.push_str(" — |");
    println!("{line}");
    println!();
    println!(
        "Each pod: `RunPodSandbox` (host network, the busybox-based pause image), then `CreateContainer` + `StartContainer` of busybox `sleep 1000`, timed from before `RunPodSandbox` until `StartContainer` returned (its state is then CONTAINER_RUNNING), then `StopPodSandbox` + `RemovePodSandbox`; within each round the handlers alternate. One untimed warm-up pod per handler first ({}), which unpacks the images and makes rtv's VM template; every timed rtv pod restores its VM from it.",
        warmups.join(", ")
    );
    println!(
        "Host CPU time to start: user + system time of the pod's shim (with the runtime processes it reaped) and rtv's VMM or the pause container, when the first container runs. The app container's processes are left out of every figure."
    );
    println!(
        "Memory and idle CPU: one pod per handler running at once; memory after 5 s from /proc/PID/smaps_rollup (PSS counts a page shared by n processes as 1/n), then CPU over {} s. rtv's pause container lives in the VM, so the VMM's figure holds it.",
        idle.as_secs()
    );
    if handlers.iter().any(|h| h.label != h.name) {
        println!(
            "† crun refuses this host's hybrid cgroups and runs through a script that execs it under `unshare -m` with the cgroup2 mount hidden (see `rtv-bench oci`)."
        );
    }
    for (h, c) in handlers.iter().zip(costs) {
        match c {
            Ok(c) => {
                let procs: Vec<String> = c
                    .procs
                    .iter()
                    .zip(&c.idle_per_proc)
                    .map(|((role, pid, rss, pss), mc)| {
                        format!(
                            "{role} {pid} (PSS {:.1} MiB, RSS {:.1} MiB, idle {mc:.1} millicores)",
                            mib(*pss),
                            mib(*rss)
                        )
                    })
                    .collect();
                println!("- {}: {}.", h.name, procs.join(" + "));
            }
            Err(e) => println!("- the footprint on {} failed: {e}", h.name),
        }
    }
    for (h, r) in handlers.iter().zip(rows) {
        if let Err(e) = r {
            println!("- pods on {} failed: {e}", h.name);
        }
    }
}
