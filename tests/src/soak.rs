//! Soak: many lifecycles in a row, and what each tenth leaves on the host.
//!
//! [`rtv_cycle`] is one container's life through the `rtv` binary (create,
//! start, exec, kill, delete); [`cri_cycle`] one pod's through containerd's
//! CRI plugin (run, create + start a container, exec, stop, remove).
//! [`Census`] counts what such lives could leak: processes of the runtime
//! (VMMs, their keepers, shims), mounts, Unix sockets, network links and
//! namespaces, cgroups, state directories, the open descriptors of the
//! long-lived processes (containerd, this process), the template cache,
//! and the host's available memory. [`Census::leaks`] compares a census
//! with the one taken after the first cycle (the template is made then):
//! any count above it is a leak. Memory is reported, not judged (the page
//! cache moves it).
//!
//! `scripts/bench.sh soak --cycles N` runs both for N cycles and prints a
//! census after every tenth; `tests/tests/soak.rs` runs a few in CI and
//! fails on any leak.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::containerd::{self, Containerd};
use crate::cri::{self, CriClient};

/// What is counted on the host, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Processes whose name starts with `rtv` (the VMMs, their keepers,
    /// rtv itself) or `containerd-shim`, this process aside.
    pub runtime_processes: usize,
    /// Mounts in this process's mount namespace.
    pub mounts: usize,
    /// Bound Unix sockets whose path holds `rtv` or `containerd`.
    pub sockets: usize,
    /// Network links in the host's namespace and, when given, in the
    /// namespace of the CRI instance's containerd.
    pub links: usize,
    /// Named network namespaces (`/run/netns`).
    pub netns: usize,
    /// Cgroup directories whose path holds `rtv` or a containerd namespace
    /// name of the tests (`k8s.io`, `rtv-test`), in every hierarchy.
    pub cgroups: usize,
    /// Entries in rtv's state directories (the `--root` given, the shim's
    /// `/run/rtv-shim`) and the template cache's templates.
    pub state_entries: usize,
    /// Open descriptors of each long-lived process (name, count).
    pub fds: Vec<(String, usize)>,
    /// The template cache's size on disk, KiB (reported).
    pub template_kib: u64,
    /// The host's MemAvailable, KiB (reported).
    pub mem_available_kib: u64,
}

/// Where a census looks, besides the host-wide places.
pub struct Places<'a> {
    /// rtv's `--root`.
    pub rtv_root: Option<&'a Path>,
    /// The template cache.
    pub templates: Option<&'a Path>,
    /// The CRI instance (its containerd's descriptors and network
    /// namespace).
    pub containerd: Option<&'a Containerd>,
}

impl Census {
    /// Counts now.
    pub fn take(places: &Places<'_>) -> Census {
        let mut fds = vec![("soak".to_owned(), count_entries(Path::new("/proc/self/fd")))];
        let mut links = count_entries(Path::new("/sys/class/net"));
        if let Some(c) = places.containerd {
            fds.push((
                "containerd".to_owned(),
                count_entries(&PathBuf::from(format!("/proc/{}/fd", c.pid()))),
            ));
            links += c
                .in_netns("ip")
                .ok()
                .and_then(|mut ip| ip.args(["-o", "link"]).output().ok())
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
                .unwrap_or(0);
        }
        let mut state_entries = count_entries(Path::new(containerd::RTV_SHIM_STATE_ROOT));
        if let Some(root) = places.rtv_root {
            state_entries += count_entries(root);
        }
        let mut template_kib = 0;
        if let Some(dir) = places.templates {
            state_entries += count_entries(dir);
            template_kib = disk_kib(dir);
        }
        Census {
            runtime_processes: runtime_processes(),
            mounts: std::fs::read_to_string("/proc/self/mountinfo")
                .map(|m| m.lines().count())
                .unwrap_or(0),
            sockets: std::fs::read_to_string("/proc/net/unix")
                .map(|t| {
                    t.lines()
                        .skip(1)
                        .filter(|l| l.contains("rtv") || l.contains("containerd"))
                        .count()
                })
                .unwrap_or(0),
            links,
            netns: count_entries(Path::new("/run/netns")),
            cgroups: cgroup_dirs(),
            state_entries,
            fds,
            template_kib,
            mem_available_kib: mem_available_kib(),
        }
    }

    /// What grew since `base`, one line per count.
    pub fn leaks(&self, base: &Census) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |what: &str, now: usize, then: usize| {
            if now > then {
                out.push(format!("{what}: {then} -> {now}"));
            }
        };
        check(
            "runtime processes",
            self.runtime_processes,
            base.runtime_processes,
        );
        check("mounts", self.mounts, base.mounts);
        check("unix sockets", self.sockets, base.sockets);
        check("network links", self.links, base.links);
        check("network namespaces", self.netns, base.netns);
        check("cgroups", self.cgroups, base.cgroups);
        check("state entries", self.state_entries, base.state_entries);
        for (name, n) in &self.fds {
            if let Some((_, then)) = base.fds.iter().find(|(b, _)| b == name) {
                check(&format!("descriptors of {name}"), *n, *then);
            }
        }
        out
    }

    /// The table's header, for [`Census::row`].
    pub fn header() -> String {
        "| cycle | runtime procs | mounts | sockets | links | netns | cgroups | state | fds | templates | MemAvailable |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
            .to_owned()
    }

    /// One line of the table.
    pub fn row(&self, cycle: usize) -> String {
        let fds: Vec<String> = self.fds.iter().map(|(n, c)| format!("{n} {c}")).collect();
        format!(
            "| {cycle} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} MiB | {:.0} MiB |",
            self.runtime_processes,
            self.mounts,
            self.sockets,
            self.links,
            self.netns,
            self.cgroups,
            self.state_entries,
            fds.join(", "),
            self.template_kib as f64 / 1024.0,
            self.mem_available_kib as f64 / 1024.0,
        )
    }
}

fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn runtime_processes() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .parse::<u32>()
                .is_ok_and(|pid| pid != me)
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|comm| {
                let comm = comm.trim_end();
                comm.starts_with("rtv") || comm.starts_with("containerd-shim")
            })
        })
        .count()
}

fn cgroup_dirs() -> usize {
    fn walk(dir: &Path, depth: usize, n: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            let s = path.to_string_lossy();
            if s.contains("rtv") || s.contains("k8s.io") || s.contains("rtv-test") {
                *n += 1;
            }
            if depth < 6 {
                walk(&path, depth + 1, n);
            }
        }
    }
    let mut n = 0;
    walk(Path::new("/sys/fs/cgroup"), 0, &mut n);
    n
}

fn disk_kib(dir: &Path) -> u64 {
    Command::new("du")
        .arg("-sk")
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Runs `rtv --root <root> <args>`: its stdout, or an error naming the
/// command with its stderr. The container's stdio is what `create` is
/// given, and the container (its waiter) keeps it: a `create` gets no
/// pipe, only a file for its errors.
fn rtv(rtv: &Path, root: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(rtv);
    cmd.arg("--root").arg(root).args(args).stdin(Stdio::null());
    let failed = |status: std::process::ExitStatus, err: &str| {
        anyhow::anyhow!("rtv {}: {status}: {}", args.join(" "), err.trim())
    };
    if args.first() == Some(&"create") {
        let errors = root.with_extension("create-errors");
        let file = std::fs::File::create(&errors)
            .with_context(|| format!("creating {}", errors.display()))?;
        let status = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .with_context(|| format!("running {}", rtv.display()))?;
        let err = std::fs::read_to_string(&errors).unwrap_or_default();
        let _ = std::fs::remove_file(&errors);
        return if status.success() {
            Ok(String::new())
        } else {
            Err(failed(status, &err))
        };
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", rtv.display()))?;
    if !out.status.success() {
        return Err(failed(out.status, &String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One container's life through `rtv`: `create` of `bundle` (a process
/// that sleeps), `start`, `exec` of `echo` (its output checked), `kill
/// KILL`, until `state` says stopped, `delete`. Nothing of it may be left
/// under `root`.
pub fn rtv_cycle(rtv_bin: &Path, root: &Path, bundle: &Path, id: &str) -> Result<()> {
    let b = bundle.to_string_lossy();
    rtv(rtv_bin, root, &["create", "--bundle", &b, id])?;
    let result = (|| {
        rtv(rtv_bin, root, &["start", id])?;
        let out = rtv(rtv_bin, root, &["exec", id, "echo", "soak"])?;
        ensure!(out == "soak\n", "exec in {id} printed {out:?}");
        rtv(rtv_bin, root, &["kill", id, "KILL"])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = rtv(rtv_bin, root, &["state", id])?;
            if state.contains("\"stopped\"") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{id} not stopped 30 s after kill: {state}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })();
    let deleted = rtv(rtv_bin, root, &["delete", "--force", id]);
    result?;
    deleted?;
    if root.join(id).exists() {
        bail!("{} left after delete", root.join(id).display());
    }
    Ok(())
}

/// One pod's life through CRI on `handler`: `RunPodSandbox`, a container
/// that sleeps created and started, `ExecSync` of `echo` (its output
/// checked), `StopPodSandbox`, `RemovePodSandbox`; then no pod or
/// container is listed.
pub fn cri_cycle(c: &Containerd, client: &CriClient, handler: &str, n: usize) -> Result<()> {
    let pod_cfg = cri::pod_config(c, &format!("soak-{n}"))?;
    let pod = client.run_pod(&pod_cfg, handler)?;
    let result = (|| {
        let cfg = cri::container_config("sleeper", &["sleep", "1000"], &[]);
        let id = client.create_container(&pod, &cfg, &pod_cfg)?;
        client.start(&id)?;
        let r = client.exec_sync(&id, &["echo", "soak"], 30)?;
        ensure!(
            r.exit_code == 0 && r.stdout == "soak\n",
            "ExecSync in pod {n}: {} {:?} {:?}",
            r.exit_code,
            r.stdout,
            r.stderr
        );
        Ok(())
    })();
    let stopped = client.stop_pod(&pod).and_then(|()| client.remove_pod(&pod));
    result?;
    stopped?;
    ensure!(
        client.list_pods()?.is_empty() && client.list_containers(None)?.is_empty(),
        "pods or containers listed after RemovePodSandbox of pod {n}"
    );
    Ok(())
}

/// Runs `cycle` `cycles` times (numbered from 1), taking a census with
/// `census` after the first and after every `every`th (and the last);
/// `report` gets each (cycle, census, leaks against the first). Returns the
/// leaks of the last census (empty: nothing leaked). Processes and shims
/// end a moment after the call that stops them: a census with leaks is
/// taken again, for up to 10 s, before it counts.
pub fn soak(
    cycles: usize,
    every: usize,
    mut cycle: impl FnMut(usize) -> Result<()>,
    census: impl Fn() -> Census,
    mut report: impl FnMut(usize, &Census, &[String]),
) -> Result<Vec<String>> {
    ensure!(
        cycles >= 2,
        "a soak needs 2 cycles or more: a first, then one to compare"
    );
    let mut base: Option<Census> = None;
    let mut last = Vec::new();
    for n in 1..=cycles {
        cycle(n).with_context(|| format!("cycle {n}"))?;
        if n != 1 && n % every.max(1) != 0 && n != cycles {
            continue;
        }
        let Some(first) = &base else {
            let c = census();
            report(n, &c, &[]);
            base = Some(c);
            continue;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let (now, leaks) = loop {
            let now = census();
            let leaks = now.leaks(first);
            if leaks.is_empty() || Instant::now() >= deadline {
                break (now, leaks);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        report(n, &now, &leaks);
        last = leaks;
    }
    Ok(last)
}
