//! Docker (Debian's docker.io 20.10) and Podman (4.3) as clients of a
//! runtime, each started by the test with its own data, exec and run roots
//! under a temporary directory.
//!
//! dockerd runs inside a network namespace the harness makes (`ip netns
//! add`), so nothing it does touches the host's interfaces, routes or
//! iptables; `ip netns exec` gives it a private mount namespace with a
//! fresh /sys, where the harness mounts the host's cgroup hierarchies again
//! before dockerd starts. dockerd starts its own containerd under its exec
//! root. Containers get their host cgroups under a parent of their own
//! (`--cgroup-parent`). Podman runs in the same network namespace
//! (`nsenter --net`), with `--root`/`--runroot`/`--tmpdir` of its own.
//!
//! [`Dockerd::stop`] stops dockerd and checks that nothing of the instance
//! is left: no process whose command line names its directory, no host
//! cgroup under its parent, and it removes the namespace and the directory.
//! The scenarios are checked against runc first (tests/tests/docker.rs),
//! then against rtv.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::containerd::{describe, run_on_pty, run_with_timeout};

/// Debian's Docker client (the one that matches dockerd 20.10; a newer
/// client elsewhere on PATH may be there too).
const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const PODMAN: &str = "/usr/bin/podman";
/// The image the scenarios run, made with `docker import`.
pub const IMAGE: &str = "rtv-busybox:test";
/// How long one client command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The private subnet of the default bridge (docker0) of a dockerd started
/// with [`Network::Bridge`]; docker0 and the subnet live in dockerd's own
/// network namespace only.
pub const BRIDGE_IP: &str = "172.31.250.1";
/// [`BRIDGE_IP`]'s prefix length.
pub const BRIDGE_PREFIX: u8 = 24;

/// dockerd's default network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// `--bridge none`: containers get only `--network none` or `host`.
    None,
    /// Docker's default bridge, docker0, at [`BRIDGE_IP`]/[`BRIDGE_PREFIX`]
    /// (`--bip`), still with `--iptables=false`: containers on one bridge
    /// reach each other over L2 without NAT or filter rules, and the
    /// namespace's empty tables accept all.
    Bridge,
}

/// A dockerd of the test's own.
pub struct Dockerd {
    dir: PathBuf,
    netns: String,
    sock: PathBuf,
    cgroup_parent: String,
    child: Option<Child>,
}

/// The host's cgroup mounts: (mount point, fstype, super options).
pub(crate) fn cgroup_mounts() -> Result<Vec<(String, String, String)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        let (fstype, _source, opts) = (
            r.next().unwrap_or_default(),
            r.next().unwrap_or_default(),
            r.next().unwrap_or_default(),
        );
        if fstype == "cgroup" || fstype == "cgroup2" {
            let mount = left.split(' ').nth(4).unwrap_or_default();
            out.push((mount.to_owned(), fstype.to_owned(), opts.to_owned()));
        }
    }
    Ok(out)
}

impl Dockerd {
    /// Starts dockerd in a network namespace of its own with `rtv` as the
    /// runtime `rtv` (`--add-runtime`) and no bridge (`--bridge none`);
    /// waits until it answers.
    pub fn start(name: &str, rtv: &Path) -> Result<Dockerd> {
        Self::start_with(name, rtv, Network::None)
    }

    /// [`Dockerd::start`] with Docker's default bridge network (docker0 at
    /// [`BRIDGE_IP`], in dockerd's network namespace).
    pub fn start_with_bridge(name: &str, rtv: &Path) -> Result<Dockerd> {
        Self::start_with(name, rtv, Network::Bridge)
    }

    /// [`Dockerd::start`] with `network` as dockerd's default network.
    pub fn start_with(name: &str, rtv: &Path, network: Network) -> Result<Dockerd> {
        for b in [DOCKER, DOCKERD] {
            ensure!(
                Path::new(b).exists(),
                "{b} is missing: scripts/install-deps.sh installs docker.io"
            );
        }
        let tag = format!("{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("rtv-docker-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let netns = format!("rtv-dk-{tag}");
        let status = Command::new("ip").args(["netns", "add", &netns]).status()?;
        ensure!(status.success(), "ip netns add {netns}: {status}");
        let mut d = Dockerd {
            sock: dir.join("docker.sock"),
            cgroup_parent: format!("rtv-docker-{tag}"),
            dir,
            netns,
            child: None,
        };
        // A failure from here on leaves cleanup to Drop.
        let mut script =
            String::from("set -e\nmount -t tmpfs -o mode=755 rtv-cgroup-root /sys/fs/cgroup\n");
        for (mount, fstype, opts) in cgroup_mounts()? {
            let opts: Vec<&str> = opts
                .split(',')
                .filter(|o| *o != "rw" && *o != "ro")
                .collect();
            script.push_str(&format!("mkdir -p '{mount}'\n"));
            if fstype == "cgroup2" {
                script.push_str(&format!("mount -t cgroup2 none '{mount}'\n"));
            } else {
                script.push_str(&format!(
                    "mount -t cgroup -o '{}' cgroup '{mount}'\n",
                    opts.join(",")
                ));
            }
        }
        script.push_str("ip link set lo up\n");
        let dir = d.dir.display().to_string();
        let bridge = match network {
            Network::None => "--bridge none".to_owned(),
            // No forwarding either: the bridge carries the containers'
            // traffic at L2, and nothing leaves the namespace.
            Network::Bridge => format!("--bip {BRIDGE_IP}/{BRIDGE_PREFIX} --ip-forward=false"),
        };
        script.push_str(&format!(
            "exec {DOCKERD} --data-root '{dir}/data' --exec-root '{dir}/exec' \
             --pidfile '{dir}/docker.pid' -H 'unix://{dir}/docker.sock' \
             {bridge} --iptables=false --ip6tables=false --ip-masq=false \
             --userland-proxy=false --cgroup-parent '{cg}' \
             --add-runtime 'rtv={rtv}' --log-level warn\n",
            cg = d.cgroup_parent,
            rtv = rtv.display()
        ));
        std::fs::write(d.dir.join("start.sh"), script)?;
        let log = std::fs::File::create(d.dir.join("dockerd.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &d.netns, "sh"])
            .arg(d.dir.join("start.sh"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        d.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = d.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("dockerd exited ({status}): {}", d.log_tail());
                }
            }
            if d.sock.exists() && d.docker(&["version"]).is_ok_and(|o| o.status.success()) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s: {}",
                d.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
    }

    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network namespace dockerd runs in (`ip netns` name).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `ip ARGS` in dockerd's network namespace (`nsenter --net`), which
    /// must succeed; its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("ip")
            .args(args);
        let out = run_with_timeout(c, None, COMMAND_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "ip {args:?} in {}: {}",
            self.netns,
            describe(&out)
        );
        Ok(text(&out))
    }

    /// The addresses, links and routes of dockerd's network namespace.
    pub fn net_state(&self) -> Result<NetState> {
        let lines = |s: String| s.lines().map(str::to_owned).collect::<Vec<_>>();
        Ok(NetState {
            addrs: lines(self.ip(&["-o", "addr"])?)
                .into_iter()
                // The kernel gives docker0 its IPv6 link-local address the
                // first time it has carrier (a port): dockerd's doing, not
                // a runtime's, and there for good.
                .filter(|l| !(l.contains(" docker0 ") && l.contains(" inet6 fe80::")))
                .collect(),
            links: lines(self.ip(&["-o", "link"])?),
            routes: lines(self.ip(&["route"])?),
        })
    }

    /// The ends of the runtime logs under dockerd's exec root: each
    /// bundle's `log.json` (the shim's `--log`) and, under rtv's root,
    /// each guest's `console.log`.
    pub fn runtime_logs(&self) -> String {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let (p, t) = (e.path(), e.file_type());
                if t.as_ref().is_ok_and(|t| t.is_dir()) {
                    walk(&p, out);
                } else if t.is_ok_and(|t| t.is_file())
                    && matches!(
                        p.file_name().and_then(|n| n.to_str()),
                        Some("log.json" | "console.log")
                    )
                {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.dir.join("exec"), &mut files);
        let mut out = String::new();
        for f in files {
            let bytes = std::fs::read(&f).unwrap_or_default();
            let start = bytes.len().saturating_sub(3000);
            out.push_str(&format!(
                "== {}:\n{}\n",
                f.display(),
                String::from_utf8_lossy(&bytes[start..])
            ));
        }
        out
    }

    /// The end of dockerd's log.
    pub fn log_tail(&self) -> String {
        let bytes = std::fs::read(self.dir.join("dockerd.log")).unwrap_or_default();
        let start = bytes.len().saturating_sub(4000);
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H").arg(format!("unix://{}", self.sock.display()));
        c
    }

    /// `docker ARGS`.
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.command();
        c.args(args);
        run_with_timeout(c, None, COMMAND_TIMEOUT)
    }

    /// `docker ARGS` with `input` on its stdin.
    pub fn docker_input(&self, args: &[&str], input: &[u8]) -> Result<Output> {
        let mut c = self.command();
        c.args(args);
        run_with_timeout(c, Some(input), COMMAND_TIMEOUT)
    }

    /// `docker ARGS`, which must succeed; its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args)?;
        ensure!(out.status.success(), "docker {args:?}: {}", describe(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `docker ARGS` on a terminal of `rows` x `cols`: its status and output.
    pub fn docker_tty(&self, args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
        let mut c = self.command();
        c.args(args);
        run_on_pty(c, 24, 80, COMMAND_TIMEOUT)
    }

    /// Imports a busybox root file system as [`IMAGE`] (`docker import`).
    pub fn import_busybox(&self) -> Result<()> {
        let tar = busybox_tar(&self.dir)?;
        self.docker_ok(&[
            "import",
            "-c",
            "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "-c",
            "CMD [\"sh\"]",
            &tar.to_string_lossy(),
            IMAGE,
        ])?;
        Ok(())
    }

    /// Podman, in dockerd's network namespace, with roots of its own under
    /// the instance's directory and `runtime` as its OCI runtime.
    pub fn podman(&self, runtime: &Path, args: &[&str]) -> Result<Output> {
        ensure!(
            Path::new(PODMAN).exists(),
            "{PODMAN} is missing: scripts/install-deps.sh installs podman"
        );
        let p = self.dir.join("podman");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg(PODMAN)
            .arg("--root")
            .arg(p.join("root"))
            .arg("--runroot")
            .arg(p.join("run"))
            .arg("--tmpdir")
            .arg(p.join("tmp"))
            .arg("--runtime")
            .arg(runtime)
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .args(["--storage-driver", "overlay"]);
        match args.split_first() {
            Some((&"run", rest)) => {
                // Podman raises RLIMIT_NOFILE and RLIMIT_NPROC beyond this
                // machine's hard limits for root, which lacks
                // CAP_SYS_RESOURCE here and cannot (runc fails alike):
                // limits below them instead.
                c.args([
                    "run",
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=4096:4096",
                ]);
                c.args(rest);
            }
            _ => {
                c.args(args);
            }
        }
        run_with_timeout(c, None, COMMAND_TIMEOUT)
    }

    /// Every host cgroup hierarchy (named and hybrid ones too: runc joins
    /// them all).
    fn all_hierarchies() -> Vec<PathBuf> {
        cgroup_mounts()
            .unwrap_or_default()
            .into_iter()
            .map(|(m, _, _)| PathBuf::from(m))
            .collect()
    }

    /// Host cgroup directories left under the instance's parent.
    pub fn cgroups_left(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for h in Self::all_hierarchies() {
            let parent = h.join(&self.cgroup_parent);
            if let Ok(entries) = std::fs::read_dir(&parent) {
                left.extend(
                    entries
                        .flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path()),
                );
            }
        }
        left
    }

    /// Processes whose command line names the instance's directory (the
    /// runtime's, its shims, its VMMs), dockerd and its containerd aside.
    pub fn processes_left(&self, with_daemon: bool) -> Vec<String> {
        let dir = self.dir.display().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if !cmd.contains(&dir) {
                continue;
            }
            let daemon = cmd.starts_with(DOCKERD)
                || cmd.starts_with("containerd --config")
                || cmd.starts_with("ip netns exec")
                || cmd.starts_with("sh ") && cmd.contains("start.sh");
            if with_daemon || !daemon {
                out.push(format!("{pid}: {cmd}"));
            }
        }
        out
    }

    /// Stops dockerd (SIGTERM, then its exit), then checks that nothing of
    /// the instance is left and removes it.
    pub fn stop(mut self) -> Result<()> {
        let result = self.stop_inner();
        self.cleanup();
        result
    }

    fn stop_inner(&mut self) -> Result<()> {
        let leftover = self.processes_left(false);
        if let Some(pid) = std::fs::read_to_string(self.dir.join("docker.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) on the pid dockerd wrote.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("dockerd did not stop within 30 s: {}", self.log_tail());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // dockerd's containerd and shims end with it.
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.processes_left(true).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let after = self.processes_left(true);
        let cgroups = self.cgroups_left();
        let mounts = self.mounts_left();
        ensure!(
            leftover.is_empty() && after.is_empty() && cgroups.is_empty() && mounts.is_empty(),
            "left behind: processes while dockerd ran {leftover:#?}, after it stopped {after:#?}, cgroups {cgroups:#?}, mounts {mounts:#?}"
        );
        Ok(())
    }

    /// Mounts under the instance's directory in the test's mount namespace
    /// (Podman's; dockerd's are in its own namespace, gone with it).
    pub fn mounts_left(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&dir))
            .map(str::to_owned)
            .collect()
    }

    fn cleanup(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in self.processes_left(true) {
            if let Some(pid) = p.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) of a leftover process of this instance.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for m in self.mounts_left().iter().rev() {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for h in Self::all_hierarchies() {
            let parent = h.join(&self.cgroup_parent);
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
        let _ = rtv_runtime::remove_tree(&self.dir);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.is_some() || self.dir.exists() {
            self.cleanup();
        }
    }
}

/// The addresses (`ip -o addr`), links (`ip -o link`) and routes (`ip
/// route`) of a network namespace, one line each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    /// `ip -o addr`, without docker0's IPv6 link-local address.
    pub addrs: Vec<String>,
    /// `ip -o link`.
    pub links: Vec<String>,
    /// `ip route`.
    pub routes: Vec<String>,
}

impl NetState {
    /// What differs from `before`: lines gone (-) and lines new (+).
    pub fn diff(&self, before: &NetState) -> String {
        let mut out = String::new();
        for (what, b, a) in [
            ("addr", &before.addrs, &self.addrs),
            ("link", &before.links, &self.links),
            ("route", &before.routes, &self.routes),
        ] {
            for l in b.iter().filter(|l| !a.contains(l)) {
                out.push_str(&format!("{what} - {l}\n"));
            }
            for l in a.iter().filter(|l| !b.contains(l)) {
                out.push_str(&format!("{what} + {l}\n"));
            }
        }
        out
    }
}

/// Applets the network scenarios use, linked in the image besides the
/// usual ones.
const NET_APPLETS: &[&str] = &["httpd", "wget", "timeout", "ip", "ifconfig", "nc", "sed"];

/// A tar of a busybox root file system (tests' usual applets), for
/// `docker import` and `podman import`.
pub fn busybox_tar(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("image-rootfs");
    crate::containers::busybox_rootfs(&rootfs)?;
    for a in NET_APPLETS {
        let link = rootfs.join("bin").join(a);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    // Executable, but its interpreter does not exist: the lookup at create
    // passes and the execve at start fails.
    let bad = rootfs.join("bin/bad-interpreter");
    std::fs::write(&bad, "#!/no/such/interpreter\n")?;
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let tar = dir.join("busybox.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar of the busybox rootfs: {status}");
    Ok(tar)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CAP_SYS_RESOURCE's number.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process's bounding set has capability `cap`.
fn host_has_cap(cap: u32) -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("CapBnd in /proc/self/status")?;
    Ok(bnd & (1 << cap) != 0)
}

/// A shell line printing the container's own cgroup v2 file `f` (the
/// guest's, under rtv) or, on a cgroup v1 host (runc here), `v1`.
fn cgroup_file(v1: &str, f: &str) -> String {
    format!(
        "cat /sys/fs/cgroup/{v1} 2>/dev/null || cat /sys/fs/cgroup$(busybox sed -n 's/^0:://p' /proc/self/cgroup)/{f}"
    )
}

/// Every Docker scenario with `--runtime runtime` (`--privileged` among
/// them), each with no wrapper
/// and no extra `--security-opt` (Docker's default spec: its seccomp
/// profile, AppArmor, no no-new-privileges).
pub fn docker_scenarios(d: &Dockerd, runtime: &str) -> Result<()> {
    let rt = ["--runtime", runtime, "--network", "none"];
    let run = |extra: &[&str], cmd: &[&str]| -> Result<Output> {
        let mut args = vec!["run", "--rm"];
        args.extend(rt);
        args.extend(extra);
        args.push(IMAGE);
        args.extend(cmd);
        d.docker(&args)
    };

    // run --rm: output and exit code; the default spec's security.
    let out = run(
        &[],
        &[
            "sh",
            "-c",
            "echo hello; grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status; \
             cat /sys/class/net/lo/flags; exit 3",
        ],
    )?;
    let o = text(&out);
    ensure!(
        out.status.code() == Some(3)
            && o.starts_with("hello\n")
            && o.contains("CapEff:\t00000000a80425fb")
            && o.contains("NoNewPrivs:\t0")
            && o.contains("Seccomp:\t2")
            // --network none: lo up, as runc leaves it.
            && o.contains("0x9\n"),
        "run --rm: {}",
        describe(&out)
    );

    // --privileged: the host's devices in the spec (on rtv the guest's
    // devices instead), every capability, no seccomp, and a mount works.
    // Docker gives every capability, CAP_SYS_RESOURCE too (it ignores
    // --cap-drop with --privileged), which this host's root lacks: runc
    // fails to apply it here; in rtv's VM the guest's root has it.
    let out = run(
        &["--privileged"],
        &[
            "sh",
            "-c",
            "grep -E '^Seccomp:' /proc/self/status; test -c /dev/fuse && test -c /dev/kmsg && \
             mkdir -p /mnt/t && mount -t tmpfs none /mnt/t && touch /mnt/t/x && umount /mnt/t && \
             echo mounted",
        ],
    )?;
    let o = text(&out);
    if runtime == "runc" && !host_has_cap(CAP_SYS_RESOURCE)? {
        ensure!(
            out.status.code() == Some(125)
                && String::from_utf8_lossy(&out.stderr).contains("unable to apply caps"),
            "run --privileged on runc without CAP_SYS_RESOURCE: want runc's refusal: {}",
            describe(&out)
        );
    } else {
        ensure!(
            out.status.success() && o.contains("Seccomp:\t0") && o.contains("mounted\n"),
            "run --privileged: {}",
            describe(&out)
        );
    }

    // -i with piped stdin.
    let mut args = vec!["run", "--rm", "-i"];
    args.extend(rt);
    args.extend([IMAGE, "sh", "-c", "read a; read b; echo \"got $a $b\""]);
    let out = d.docker_input(&args, b"one\ntwo\n")?;
    ensure!(
        out.status.success() && text(&out) == "got one two\n",
        "run -i: {}",
        describe(&out)
    );

    // -t: a terminal, lines as runc's.
    let mut args = vec!["run", "--rm", "-t"];
    args.extend(rt);
    args.extend([
        IMAGE,
        "sh",
        "-c",
        "test -t 1 && echo tty-ok; sleep 0.3; exit 4",
    ]);
    let (status, t) = d.docker_tty(&args)?;
    ensure!(
        status.code() == Some(4) && t.contains("tty-ok\r") && !t.contains("\r\r\r\n"),
        "run -t: {status}, {t:?}"
    );

    // -d, exec, pause/unpause, stop, rm.
    let mut args = vec!["run", "-d"];
    args.extend(rt);
    args.extend([IMAGE, "sleep", "1000"]);
    let id = d.docker_ok(&args)?.trim().to_owned();
    let lifecycle = (|| -> Result<()> {
        let out = d.docker(&["exec", &id, "sh", "-c", "echo exec-ok; exit 5"])?;
        ensure!(
            out.status.code() == Some(5) && text(&out) == "exec-ok\n",
            "exec: {}",
            describe(&out)
        );
        let state = |want: &str| -> Result<()> {
            let s = d.docker_ok(&["inspect", "-f", "{{.State.Status}}", &id])?;
            ensure!(s.trim() == want, "state {s:?}, want {want}");
            Ok(())
        };
        d.docker_ok(&["pause", &id])?;
        state("paused")?;
        d.docker_ok(&["unpause", &id])?;
        state("running")?;
        // sleep ignores SIGTERM as PID 1: stop kills it after -t.
        d.docker_ok(&["stop", "-t", "1", &id])?;
        state("exited")?;
        let code = d.docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &id])?;
        ensure!(code.trim() == "137", "exit code after stop: {code}");
        d.docker_ok(&["rm", &id])?;
        Ok(())
    })();
    if lifecycle.is_err() {
        let _ = d.docker(&["rm", "-f", &id]);
    }
    lifecycle.context("run -d / exec / pause / unpause / stop / rm")?;

    // -m 64m: a process over the limit is killed; the limit is there.
    let script = format!(
        "{}; dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; echo dd=$?",
        cgroup_file("memory/memory.limit_in_bytes", "memory.max")
    );
    let out = run(&["-m", "64m"], &["sh", "-c", &script])?;
    let o = text(&out);
    ensure!(
        out.status.success() && o.starts_with("67108864\n") && o.contains("dd=137"),
        "run -m 64m: {}",
        describe(&out)
    );

    // --cpus 1: a quota of one CPU.
    let script = cgroup_file("cpu/cpu.cfs_quota_us", "cpu.max");
    let out = run(&["--cpus", "1"], &["sh", "-c", &script])?;
    ensure!(
        out.status.success() && text(&out).starts_with("100000"),
        "run --cpus 1: {}",
        describe(&out)
    );

    // A volume written in the container, read on the host.
    let vol = d.dir().join(format!("volume-{runtime}"));
    std::fs::create_dir_all(&vol)?;
    let bind = format!("{}:/data", vol.display());
    let out = run(
        &["-v", &bind],
        &["sh", "-c", "echo written-inside > /data/f"],
    )?;
    let got = std::fs::read_to_string(vol.join("f")).unwrap_or_default();
    ensure!(
        out.status.success() && got == "written-inside\n",
        "run -v: {}; the file holds {got:?}",
        describe(&out)
    );

    // Starts that fail: exit codes as Docker gives them for runc (126 not
    // executable, 127 not found), and nothing left behind.
    for (cmd, code) in [("/etc/passwd", 126), ("/no/such/program", 127)] {
        let out = run(&[], &[cmd])?;
        ensure!(
            out.status.code() == Some(code),
            "run {cmd}: want exit {code}: {}",
            describe(&out)
        );
    }
    // A program whose execve fails after the lookup (its interpreter is
    // missing): with runc the container starts, says why on its stderr and
    // exits 1.
    let out = run(&[], &["/bin/bad-interpreter"])?;
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("/bin/bad-interpreter"),
        "run /bin/bad-interpreter: want exit 1 and the reason: {}",
        describe(&out)
    );
    let ps = d.docker_ok(&["ps", "-aq"])?;
    ensure!(ps.trim().is_empty(), "containers left: {ps}");
    wait_until_clean(d)?;
    Ok(())
}

/// A container on docker0 as Docker sees it (`docker inspect`).
struct OnBridge {
    name: &'static str,
    ip: std::net::Ipv4Addr,
    mac: String,
}

/// Docker's bridge network with `--runtime runtime` on a dockerd started
/// with [`Network::Bridge`]: containers `net-a` and `net-b` of `runtime`
/// and `net-c` of runc, each serving `/x` (`from-NAME`) with busybox httpd
/// on port 8080;
/// each has on eth0 the address, MAC and routes Docker gave it; they reach
/// one another over TCP (a and b both ways, the runc container and a both
/// ways); once they are removed dockerd's network namespace is as before
/// (no veth left, no address moved into it) and nothing of them is left;
/// `--network none` gives a container only loopback up.
pub fn bridge_scenarios(d: &Dockerd, runtime: &str) -> Result<()> {
    let before = d.net_state()?;
    let bridge = format!("inet {BRIDGE_IP}/{BRIDGE_PREFIX} ");
    ensure!(
        before
            .addrs
            .iter()
            .any(|l| l.contains(" docker0 ") && l.contains(&bridge)),
        "docker0 with {BRIDGE_IP}/{BRIDGE_PREFIX} in dockerd's namespace: {before:#?}"
    );

    // On failure, the runtimes' logs and the guests' consoles, before the
    // containers (and their bundles and state) go.
    let traffic = bridge_traffic(d, runtime)
        .map_err(|e| e.context(format!("the runtimes' logs:\n{}", d.runtime_logs())));
    let rm = d.docker(&["rm", "-f", "net-a", "net-b", "net-c"]);
    traffic?;
    let rm = rm?;
    ensure!(rm.status.success(), "docker rm -f: {}", describe(&rm));
    let ps = d.docker_ok(&["ps", "-aq"])?;
    ensure!(ps.trim().is_empty(), "containers left: {ps}");

    // dockerd's namespace as before: the veths gone with the containers'
    // namespaces, nothing of theirs configured here.
    wait_for_net_state(d, &before).context("after docker rm -f of the bridge's containers")?;
    wait_until_clean(d)?;

    // --network none: loopback, up, is the only interface with an address
    // and the only one up.
    let out = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "ip -o addr && echo --- && ip -o link",
    ])?;
    let o = text(&out);
    let (addrs, links) = o.split_once("---\n").unwrap_or((&o, ""));
    let not_lo: Vec<&str> = addrs
        .lines()
        .filter(|l| l.split_whitespace().nth(1) != Some("lo"))
        .collect();
    let up: Vec<&str> = links
        .lines()
        .filter(|l| link_flags(l).contains(&"UP"))
        .filter_map(link_name)
        .collect();
    ensure!(
        out.status.success()
            && addrs.contains("inet 127.0.0.1/8")
            && not_lo.is_empty()
            && up == ["lo"],
        "run --network none: want only lo with addresses and up: {}",
        describe(&out)
    );
    eprintln!("{runtime}: ip -o addr / ip -o link with --network none:\n{o}");
    wait_for_net_state(d, &before).context("after run --network none")?;
    wait_until_clean(d)?;
    Ok(())
}

/// Waits (up to 20 s) until dockerd's network namespace is as `before`.
fn wait_for_net_state(d: &Dockerd, before: &NetState) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = d.net_state()?;
        if now == *before {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "dockerd's network namespace {} differs from before the containers \
             (- before only, + now only):\n{}",
            d.netns(),
            now.diff(before)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The interface an `ip -o link` line is about (`eth0` of `2: eth0@if7:
/// <...>`).
fn link_name(line: &str) -> Option<&str> {
    let name = line.split_whitespace().nth(1)?.trim_end_matches(':');
    name.split('@').next()
}

/// The flags of an `ip -o link` line (`<BROADCAST,MULTICAST,UP,...>`).
fn link_flags(line: &str) -> Vec<&str> {
    line.split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f.split(',').collect())
        .unwrap_or_default()
}

/// The containers and traffic of [`bridge_scenarios`]; leaves net-a, net-b
/// and net-c for the caller to remove.
fn bridge_traffic(d: &Dockerd, runtime: &str) -> Result<()> {
    let subnet = |ip: std::net::Ipv4Addr| u32::from(ip) >> (32 - BRIDGE_PREFIX);
    let gateway: std::net::Ipv4Addr = BRIDGE_IP.parse()?;
    let mut on_bridge = Vec::new();
    // (Docker wants names of two characters at least.)
    for (name, rt) in [("net-a", runtime), ("net-b", runtime), ("net-c", "runc")] {
        let serve =
            format!("mkdir -p /www && echo from-{name} > /www/x && exec httpd -f -p 8080 -h /www");
        d.docker_ok(&[
            "run",
            "-d",
            "--runtime",
            rt,
            "--name",
            name,
            IMAGE,
            "sh",
            "-c",
            &serve,
        ])
        .with_context(|| format!("starting {name} ({rt})"))?;
        let inspect = d.docker_ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.IPPrefixLen}} \
             {{.NetworkSettings.MacAddress}} {{.NetworkSettings.Gateway}}",
            name,
        ])?;
        let f: Vec<&str> = inspect.split_whitespace().collect();
        ensure!(f.len() == 4, "docker inspect {name}: {inspect:?}");
        let ip: std::net::Ipv4Addr = f[0]
            .parse()
            .with_context(|| format!("{name}'s IP {inspect:?}"))?;
        ensure!(
            subnet(ip) == subnet(gateway)
                && ip != gateway
                && f[1] == BRIDGE_PREFIX.to_string()
                && f[3] == BRIDGE_IP,
            "{name} ({rt}): docker inspect gives {inspect:?}, not an address in docker0's \
             {BRIDGE_IP}/{BRIDGE_PREFIX} with it as the gateway"
        );
        let c = OnBridge {
            name,
            ip,
            mac: f[2].to_owned(),
        };
        check_eth0(d, &c).with_context(|| format!("{name} ({rt})"))?;
        on_bridge.push(c);
    }
    let ips: Vec<_> = on_bridge.iter().map(|c| c.ip).collect();
    ensure!(
        ips[0] != ips[1] && ips[1] != ips[2] && ips[0] != ips[2],
        "addresses not distinct: {ips:?}"
    );
    // Each server answers in its own container first (httpd may still be
    // starting), then the others over docker0. (`timeout`, not wget's
    // -T, which crashes Debian's static busybox 1.35.)
    for c in &on_bridge {
        let wait = "i=0; until timeout 5 wget -q -O- http://127.0.0.1:8080/x; do \
                    i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done";
        let out = d.docker(&["exec", c.name, "sh", "-c", wait])?;
        ensure!(
            out.status.success() && text(&out) == format!("from-{}\n", c.name),
            "{}'s httpd does not answer on 127.0.0.1:8080: {}; {}",
            c.name,
            describe(&out),
            container_report(d, c.name)
        );
    }
    let [a, b, c] = [&on_bridge[0], &on_bridge[1], &on_bridge[2]];
    for (from, to) in [(a, b), (b, a), (c, a), (a, c)] {
        let url = format!("http://{}:8080/x", to.ip);
        let out = d.docker(&[
            "exec", from.name, "timeout", "10", "wget", "-q", "-O-", &url,
        ])?;
        ensure!(
            out.status.success() && text(&out) == format!("from-{}\n", to.name),
            "{} fetching {url} from {}: {}",
            from.name,
            to.name,
            describe(&out)
        );
    }
    Ok(())
}

/// A container's state and output, for an error message.
fn container_report(d: &Dockerd, name: &str) -> String {
    let state = d
        .docker(&["inspect", "-f", "{{json .State}}", name])
        .map(|o| describe(&o))
        .unwrap_or_else(|e| format!("{e:#}"));
    let logs = d
        .docker(&["logs", name])
        .map(|o| describe(&o))
        .unwrap_or_else(|e| format!("{e:#}"));
    format!("its state: {state}; its logs: {logs}")
}

/// Inside `c`: eth0 up with Docker's MAC, Docker's address the only one
/// besides loopback's, and the routes of docker0's subnet and the default
/// through the bridge.
fn check_eth0(d: &Dockerd, c: &OnBridge) -> Result<()> {
    let out = d.docker(&[
        "exec",
        c.name,
        "sh",
        "-c",
        "ip -o addr && echo --- && ip -o link && echo --- && ip route",
    ])?;
    let o = text(&out);
    ensure!(
        out.status.success(),
        "ip in the container: {}",
        describe(&out)
    );
    let parts: Vec<&str> = o.split("---\n").collect();
    ensure!(parts.len() == 3, "ip in the container: {o:?}");
    let (addrs, links, routes) = (parts[0], parts[1], parts[2]);
    let mut inet: Vec<(String, String)> = addrs
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() > 3 && w[2] == "inet").then(|| (w[1].to_owned(), w[3].to_owned()))
        })
        .collect();
    inet.sort();
    let want = vec![
        ("eth0".to_owned(), format!("{}/{BRIDGE_PREFIX}", c.ip)),
        ("lo".to_owned(), "127.0.0.1/8".to_owned()),
    ];
    ensure!(
        inet == want,
        "IPv4 addresses {inet:?}, want {want:?} (docker inspect's): {o}"
    );
    let eth0 = links
        .lines()
        .find(|l| link_name(l) == Some("eth0"))
        .with_context(|| format!("no eth0 in ip -o link: {o}"))?;
    ensure!(
        link_flags(eth0).contains(&"UP") && eth0.contains(&format!("link/ether {} ", c.mac)),
        "eth0 not up with {} (docker inspect's MAC): {eth0}",
        c.mac
    );
    let net = std::net::Ipv4Addr::from(u32::from(c.ip) & (u32::MAX << (32 - BRIDGE_PREFIX)));
    let routes: Vec<String> = routes
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    ensure!(
        routes
            .iter()
            .any(|r| r.starts_with(&format!("default via {BRIDGE_IP} dev eth0")))
            && routes
                .iter()
                .any(|r| r.starts_with(&format!("{net}/{BRIDGE_PREFIX} dev eth0"))),
        "routes {routes:?}: want the default via {BRIDGE_IP} and {net}/{BRIDGE_PREFIX} on eth0"
    );
    Ok(())
}

/// Waits (up to 20 s) until no process of the instance but the daemons
/// runs and no host cgroup is left under its parent.
fn wait_until_clean(d: &Dockerd) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (p, c) = (d.processes_left(false), d.cgroups_left());
        if p.is_empty() && c.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "left behind: processes {p:#?}, cgroups {c:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Links the guest kernels and the initramfs the tests use next to the
/// rtv binary `rtv` (`rtv-vmlinux`, `rtv-vmlinux-up`,
/// `rtv-initramfs.cpio`), where rtv looks for them without environment
/// variables, as `scripts/build.sh` does for the release build: Podman's
/// conmon starts the runtime with an environment of its own.
pub fn link_artifacts_beside(rtv: &Path) -> Result<()> {
    let dir = rtv.parent().context("the rtv binary's directory")?;
    let a = crate::artifacts()?;
    let mut links = vec![
        (a.kernel.clone(), "rtv-vmlinux"),
        (a.initramfs.clone(), "rtv-initramfs.cpio"),
    ];
    if let Some(up) = &a.kernel_up {
        links.push((up.clone(), "rtv-vmlinux-up"));
    }
    for (target, name) in links {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

/// Podman with `--runtime runtime`: run, then -d / exec / stop / rm.
pub fn podman_scenarios(d: &Dockerd, runtime: &Path) -> Result<()> {
    let tar = busybox_tar(d.dir())?;
    let p = |args: &[&str]| d.podman(runtime, args);
    let ok = |args: &[&str]| -> Result<String> {
        let out = p(args)?;
        ensure!(out.status.success(), "podman {args:?}: {}", describe(&out));
        Ok(text(&out))
    };
    ok(&[
        "import",
        "--change",
        "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        &tar.to_string_lossy(),
        IMAGE,
    ])?;
    let out = p(&[
        "run",
        "--rm",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "echo podman-ok; exit 6",
    ])?;
    ensure!(
        out.status.code() == Some(6) && text(&out) == "podman-ok\n",
        "podman run: {}",
        describe(&out)
    );
    let id = ok(&["run", "-d", "--network", "none", IMAGE, "sleep", "1000"])?
        .trim()
        .to_owned();
    let lifecycle = (|| -> Result<()> {
        let o = ok(&["exec", &id, "echo", "podman-exec-ok"])?;
        ensure!(o == "podman-exec-ok\n", "podman exec: {o:?}");
        ok(&["stop", "-t", "1", &id])?;
        ok(&["rm", &id])?;
        Ok(())
    })();
    if lifecycle.is_err() {
        let _ = p(&["rm", "-f", &id]);
    }
    lifecycle.context("podman run -d / exec / stop / rm")?;
    let left = ok(&["ps", "-aq"])?;
    ensure!(left.trim().is_empty(), "podman containers left: {left}");
    Ok(())
}
