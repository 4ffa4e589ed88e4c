//! Kubernetes CRI tests on a private containerd 1.6: a CRI client, the
//! images a pod needs when there is no registry, and the pod scenarios
//! rtv must pass the way runc does, generic over the runtime handler.
//!
//! The client is `tests/cri/cri.py` (Python, grpcio; the messages are
//! generated from `tests/cri/api.proto`, the CRI `runtime.v1` API, at first
//! use): [`CriClient`] runs it once per test in its `session` mode, one JSON
//! request a line on its stdin, one answer a line on its stdout, so a call
//! costs a round trip on the socket rather than a Python start.
//!
//! A CRI pod needs its sandbox ("pause") image locally: [`pause_image_tar`]
//! builds one from busybox (its Cmd blocks until SIGTERM) with the busybox
//! image's builder, and [`import_cri_images`] imports it and the busybox
//! image into containerd's `k8s.io` namespace. The lifecycle scenarios'
//! pods use the node's network namespace, so no CNI plugin is needed;
//! their containers' cgroups are `/k8s.io/<id>` (the pod's
//! `cgroup_parent`), where the harness looks for leftovers.
//!
//! [`run_net_scenario`] runs [`scenario_pod_network`]: pods with networks
//! of their own through Debian's CNI plugins (bridge `cni0`, host-local,
//! portmap, loopback), with containerd in a network namespace of the
//! instance ([`cri_net_options`]), so the bridge, the veths and the
//! iptables rules never touch the host's network.
//!
//! [`run_pod_scenario`] is what a runtime's test calls: a private
//! containerd with the CRI plugin and one handler (and, for a shim v2
//! runtime such as `io.containerd.rtv.v2`, a directory put in front of
//! containerd's `PATH` where it finds `containerd-shim-<name>-v2`), then
//! [`scenario_pod_lifecycle`], then the check that nothing is left.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::containerd::{
    self, with_containerd_opts, CniNetwork, Containerd, ContainerdOptions, CriConfig, CriRuntime,
    BUSYBOX_REF,
};

/// The containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The sandbox image [`cri_options`] configures and [`import_cri_images`]
/// imports.
pub const PAUSE_REF: &str = "rtv.local/pause:rtv-test";
/// The pause image's Cmd: blocks, and exits 0 on SIGTERM (a shell that is
/// PID 1 of its PID namespace ignores signals it has no trap for).
pub const PAUSE_CMD: [&str; 3] = [
    "sh",
    "-c",
    "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done",
];
/// The pods' cgroup parent: containers get `/k8s.io/<id>`, the path the
/// harness checks for a container of namespace `k8s.io`.
pub const CGROUP_PARENT: &str = "/k8s.io";
/// How long one CRI call may take in the scenarios: the kubelet's default
/// `--runtime-request-timeout` (2 min). Ten pods starting at once on the
/// 2 cores of a PVM host take ~50 s for StartContainer alone.
pub const CRI_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the Rust side waits beyond a call's own gRPC deadline before it
/// gives up on the client process.
const CLIENT_SLACK: Duration = Duration::from_secs(15);

/// The CRI client script.
pub fn client_script() -> PathBuf {
    crate::repo_root().join("tests/cri/cri.py")
}

/// The Python that runs the client: `$RTV_PYTHON`, or Debian's
/// `/usr/bin/python3` (where apt's python3-grpcio goes: a `python3` earlier
/// on `PATH`, e.g. pyenv's, may lack it), or `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("RTV_PYTHON") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/bin/python3");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// `python cri.py <args>` with the CRI socket of `c` in
/// `CONTAINER_RUNTIME_ENDPOINT` (not on the command line: the harness takes
/// processes naming the instance's directory for the instance's own).
pub fn client_command(c: &Containerd, args: &[&str]) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(client_script())
        .args(args)
        .env("CONTAINER_RUNTIME_ENDPOINT", c.address());
    cmd
}

/// A gRPC error from the CRI server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriError {
    /// The gRPC status code's name (`NOT_FOUND`, `UNKNOWN`...), or
    /// `CLIENT` for a request the client could not encode.
    pub code: String,
    /// The server's message.
    pub message: String,
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// What `ExecSync` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The command's stdout (as UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Its exit code.
    pub exit_code: i32,
}

struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    broken: Option<String>,
}

impl Session {
    fn stderr_text(&self) -> String {
        let buf = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn kill(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CRI client session on a [`Containerd`] with the CRI plugin (one
/// `cri.py session` process). The ids of the pods and containers it
/// creates are remembered by the instance ([`Containerd::remember`]), so
/// that what they leave is cleaned and checked.
pub struct CriClient<'a> {
    c: &'a Containerd,
    session: Mutex<Session>,
}

impl<'a> CriClient<'a> {
    /// Starts the client for `c`'s socket.
    pub fn connect(c: &'a Containerd) -> Result<CriClient<'a>> {
        let mut cmd = client_command(c, &["session"]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let stdin = child.stdin.take().context("the client's stdin")?;
        let stdout = child.stdout.take().context("the client's stdout")?;
        let mut stderr_pipe = child.stderr.take().context("the client's stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Ok(CriClient {
            c,
            session: Mutex::new(Session {
                child,
                stdin: Some(stdin),
                lines: rx,
                stderr,
                broken: None,
            }),
        })
    }

    /// The client process's id.
    pub fn pid(&self) -> u32 {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .child
            .id()
    }

    /// Calls `method` (`RuntimeService/Version`, `ImageService/ListImages`...)
    /// with `request` (api.proto's field names); the answer is the response
    /// (every field, see cri.py) or the server's gRPC error. Fails when the
    /// client itself fails or does not answer within `timeout` (plus some
    /// slack); the session is unusable after that.
    pub fn try_call(
        &self,
        method: &str,
        request: Value,
        timeout: Duration,
    ) -> Result<std::result::Result<Value, CriError>> {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &s.broken {
            bail!("the CRI client is unusable: {why}");
        }
        let line = json!({
            "method": method,
            "request": request,
            "timeout": timeout.as_secs_f64(),
        })
        .to_string();
        let sent = match s.stdin.as_mut() {
            Some(w) => w
                .write_all(line.as_bytes())
                .and_then(|()| w.write_all(b"\n"))
                .and_then(|()| w.flush()),
            None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        };
        if let Err(e) = sent {
            let why = format!(
                "writing to the client: {e}; its stderr:\n{}",
                s.stderr_text()
            );
            s.broken = Some(why.clone());
            s.kill();
            bail!("{method}: {why}");
        }
        let answer = match s.lines.recv_timeout(timeout + CLIENT_SLACK) {
            Ok(a) => a,
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("no answer within {:?}", timeout + CLIENT_SLACK)
                    }
                    mpsc::RecvTimeoutError::Disconnected => "the client exited".to_owned(),
                };
                s.kill();
                let why = format!("{why}; its stderr:\n{}", s.stderr_text());
                s.broken = Some(why.clone());
                bail!("{method}: {why}");
            }
        };
        let v: Value = serde_json::from_str(&answer)
            .with_context(|| format!("{method}: the client's answer {answer:?}"))?;
        if let Some(ok) = v.get("ok") {
            return Ok(Ok(ok.clone()));
        }
        let err = v
            .get("error")
            .with_context(|| format!("{method}: neither ok nor error in {answer:?}"))?;
        Ok(Err(CriError {
            code: err["code"].as_str().unwrap_or("UNKNOWN").to_owned(),
            message: err["message"].as_str().unwrap_or_default().to_owned(),
        }))
    }

    /// [`CriClient::try_call`] with [`CRI_TIMEOUT`], failing on a gRPC
    /// error.
    pub fn call(&self, method: &str, request: Value) -> Result<Value> {
        match self.try_call(method, request, CRI_TIMEOUT)? {
            Ok(v) => Ok(v),
            Err(e) => bail!("{method}: {e}"),
        }
    }

    /// `Version`.
    pub fn version(&self) -> Result<Value> {
        self.call("RuntimeService/Version", json!({"version": "v1"}))
    }

    /// `RunPodSandbox` with `config` on `handler`; returns the pod's id.
    pub fn run_pod(&self, config: &Value, handler: &str) -> Result<String> {
        self.run_pod_within(config, handler, CRI_TIMEOUT)
    }

    /// [`CriClient::run_pod`] with a deadline of `timeout`.
    pub fn run_pod_within(
        &self,
        config: &Value,
        handler: &str,
        timeout: Duration,
    ) -> Result<String> {
        let r = match self.try_call(
            "RuntimeService/RunPodSandbox",
            json!({"config": config, "runtime_handler": handler}),
            timeout,
        )? {
            Ok(r) => r,
            Err(e) => bail!("RuntimeService/RunPodSandbox: {}: {}", e.code, e.message),
        };
        let id = str_field(&r, "pod_sandbox_id")?;
        self.c.remember(CRI_NAMESPACE, &id);
        // A pod with a network of its own (only an instance with a network
        // namespace of its own has a CNI network): CRI made the pod's
        // namespace (and ran CNI in it) before the sandbox; remembered for
        // the cleanup.
        if self.c.netns().is_some() {
            if let Some(ns) = self.pod_netns_path(&id)? {
                self.c.remember_netns(&ns)?;
            }
        }
        Ok(id)
    }

    /// The pod's network namespace file (`/var/run/netns/cni-<uuid>`) as
    /// the sandbox's runtime spec names it (verbose `PodSandboxStatus`),
    /// or `None` (a pod in the node's network).
    pub fn pod_netns_path(&self, id: &str) -> Result<Option<PathBuf>> {
        let st = self.pod_status(id)?;
        let info = st["info"]["info"]
            .as_str()
            .with_context(|| format!("no verbose info of pod {id}: {st}"))?;
        let info: Value = serde_json::from_str(info)
            .with_context(|| format!("pod {id}'s verbose info {info:?}"))?;
        let namespaces = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .with_context(|| format!("no namespaces in pod {id}'s runtime spec: {info}"))?;
        Ok(namespaces
            .iter()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from))
    }

    /// `PodSandboxStatus` (verbose): the whole response (`status`, `info`).
    pub fn pod_status(&self, id: &str) -> Result<Value> {
        self.call(
            "RuntimeService/PodSandboxStatus",
            json!({"pod_sandbox_id": id, "verbose": true}),
        )
    }

    /// `StopPodSandbox`.
    pub fn stop_pod(&self, id: &str) -> Result<()> {
        self.call(
            "RuntimeService/StopPodSandbox",
            json!({"pod_sandbox_id": id}),
        )
        .map(drop)
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        self.call(
            "RuntimeService/RemovePodSandbox",
            json!({"pod_sandbox_id": id}),
        )
        .map(drop)
    }

    /// `ListPodSandbox`: the pods.
    pub fn list_pods(&self) -> Result<Vec<Value>> {
        let r = self.call("RuntimeService/ListPodSandbox", json!({}))?;
        Ok(r["items"].as_array().cloned().unwrap_or_default())
    }

    /// `CreateContainer` in pod `pod` (whose config is `pod_config`);
    /// returns the container's id.
    pub fn create_container(
        &self,
        pod: &str,
        config: &Value,
        pod_config: &Value,
    ) -> Result<String> {
        let r = self.call(
            "RuntimeService/CreateContainer",
            json!({"pod_sandbox_id": pod, "config": config, "sandbox_config": pod_config}),
        )?;
        let id = str_field(&r, "container_id")?;
        self.c.remember(CRI_NAMESPACE, &id);
        Ok(id)
    }

    /// `StartContainer`.
    pub fn start(&self, id: &str) -> Result<()> {
        self.call("RuntimeService/StartContainer", json!({"container_id": id}))
            .map(drop)
    }

    /// `StopContainer`: the stop signal, then SIGKILL after `timeout_s`
    /// seconds.
    pub fn stop(&self, id: &str, timeout_s: i64) -> Result<()> {
        self.call(
            "RuntimeService/StopContainer",
            json!({"container_id": id, "timeout": timeout_s}),
        )
        .map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove(&self, id: &str) -> Result<()> {
        self.call(
            "RuntimeService/RemoveContainer",
            json!({"container_id": id}),
        )
        .map(drop)
    }

    /// `ContainerStatus` (verbose): the whole response (`status`, `info`).
    pub fn container_status(&self, id: &str) -> Result<Value> {
        self.call(
            "RuntimeService/ContainerStatus",
            json!({"container_id": id, "verbose": true}),
        )
    }

    /// `ListContainers`, of pod `pod` if given.
    pub fn list_containers(&self, pod: Option<&str>) -> Result<Vec<Value>> {
        let req = match pod {
            Some(p) => json!({"filter": {"pod_sandbox_id": p}}),
            None => json!({}),
        };
        let r = self.call("RuntimeService/ListContainers", req)?;
        Ok(r["containers"].as_array().cloned().unwrap_or_default())
    }

    /// `ExecSync` of `cmd` in container `id` (`timeout_s` 0: no limit).
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout_s: i64) -> Result<ExecResult> {
        let r = self.call(
            "RuntimeService/ExecSync",
            json!({"container_id": id, "cmd": cmd, "timeout": timeout_s}),
        )?;
        Ok(ExecResult {
            stdout: str_field(&r, "stdout")?,
            stderr: str_field(&r, "stderr")?,
            exit_code: r["exit_code"]
                .as_i64()
                .and_then(|c| i32::try_from(c).ok())
                .with_context(|| format!("ExecSync: exit_code in {r}"))?,
        })
    }

    /// `ImageStatus` of `reference`: the image, or `None` when the CRI
    /// plugin does not know it.
    pub fn image_status(&self, reference: &str) -> Result<Option<Value>> {
        let r = self.call(
            "ImageService/ImageStatus",
            json!({"image": {"image": reference}}),
        )?;
        Ok(match &r["image"] {
            Value::Null => None,
            img => Some(img.clone()),
        })
    }

    /// Polls `ContainerStatus` until the container's state is `state`
    /// (`CONTAINER_EXITED`...); returns the status.
    pub fn wait_container_state(&self, id: &str, state: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.container_status(id)?;
            if st["status"]["state"] == state {
                return Ok(st["status"].clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {id} is not {state} after {timeout:?}: {}",
                    st["status"]
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for CriClient<'_> {
    fn drop(&mut self) {
        let s = self.session.get_mut().unwrap_or_else(|p| p.into_inner());
        // EOF ends the session; kill it if it lingers.
        s.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = s.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        s.kill();
    }
}

fn str_field(v: &Value, name: &str) -> Result<String> {
    v.get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no string {name:?} in {v}"))
}

// ---------------------------------------------------------------------------
// Images and configuration.

/// The pause image ([`PAUSE_REF`], Cmd [`PAUSE_CMD`]): the busybox image
/// with another name and Cmd, cached under `target/rtv-containerd/` keyed
/// by its content.
pub fn pause_image_tar() -> Result<PathBuf> {
    static CACHED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CACHED
        .get_or_init(|| {
            let make = || -> Result<PathBuf> {
                let busybox = std::fs::read("/bin/busybox")
                    .context("reading /bin/busybox (apt-get install busybox-static)")?;
                let mut key_input = busybox;
                key_input.extend_from_slice(PAUSE_REF.as_bytes());
                for a in PAUSE_CMD {
                    key_input.push(0);
                    key_input.extend_from_slice(a.as_bytes());
                }
                let key = &containerd::sha256_hex(&key_input)[..16];
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| crate::repo_root().join("target"));
                let dir = target.join("rtv-containerd");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(format!("pause-oci-{key}.tar"));
                if !path.exists() {
                    containerd::busybox_image_tar_with(&path, PAUSE_REF, &PAUSE_CMD)?;
                }
                Ok(path)
            };
            make().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// containerd options with the CRI plugin: the handlers `runtimes` (the
/// first is the default), [`PAUSE_REF`] as the sandbox image, and
/// `path_prepend` in front of containerd's `PATH`.
pub fn cri_options(runtimes: Vec<CriRuntime>, path_prepend: Option<PathBuf>) -> ContainerdOptions {
    let default_runtime = runtimes.first().map(|r| r.name.clone()).unwrap_or_default();
    ContainerdOptions {
        cri: Some(CriConfig {
            sandbox_image: PAUSE_REF.into(),
            runtimes,
            default_runtime,
            cni_bin_dir: "/usr/lib/cni".into(),
            cni_conf_dir: None,
        }),
        path_prepend,
        ..Default::default()
    }
}

/// [`cri_options`] for pods with networks of their own: containerd in a
/// network namespace of the instance ([`ContainerdOptions::private_netns`])
/// with the CNI network [`CniNetwork::default`] (bridge `cni0` on
/// 10.88.0.0/16, portmap), Debian's CNI plugins from `/usr/lib/cni`.
pub fn cri_net_options(
    runtimes: Vec<CriRuntime>,
    path_prepend: Option<PathBuf>,
) -> ContainerdOptions {
    ContainerdOptions {
        private_netns: true,
        cni_network: Some(CniNetwork::default()),
        ..cri_options(runtimes, path_prepend)
    }
}

/// Imports the pause and busybox images into the `k8s.io` namespace and
/// waits until the CRI plugin lists both (it learns of images from
/// containerd's events).
pub fn import_cri_images(c: &Containerd, cri: &CriClient) -> Result<()> {
    let pause = pause_image_tar()?;
    let busybox = containerd::cached_busybox_image_tar()?;
    for (tar, reference) in [(&pause, PAUSE_REF), (&busybox, BUSYBOX_REF)] {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(c.address())
            .args(["--namespace", CRI_NAMESPACE, "images", "import"])
            .arg(tar);
        let out = containerd::run_with_timeout(cmd, None, containerd::CTR_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "ctr -n {CRI_NAMESPACE} images import {}: {}",
            tar.display(),
            containerd::describe(&out)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while cri.image_status(reference)?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "the CRI plugin does not list {reference} after its import"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Waits until the CRI plugin answers `Status` with `RuntimeReady` (it
/// initializes after containerd's own API is up).
pub fn wait_cri_ready(cri: &CriClient, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = cri.try_call("RuntimeService/Status", json!({}), Duration::from_secs(5))?;
        let ready = r.as_ref().is_ok_and(|v| {
            v["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "RuntimeReady" && c["status"] == true)
            })
        });
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the CRI plugin is not ready after {timeout:?}: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pod's configuration: the node's network namespace (no hostname: CRI
/// refuses one there), its own IPC namespace shared by its containers,
/// a PID namespace per container (as the kubelet asks), cgroups under
/// [`CGROUP_PARENT`], and container logs in `<instance>/pods/<name>/`.
pub fn pod_config(c: &Containerd, name: &str) -> Result<Value> {
    pod_config_in(c, name, Network::Node)
}

/// A pod's network, as the kubelet asks for it (`NamespaceOption.network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// `NODE`: `hostNetwork: true`.
    Node,
    /// `POD`: a network namespace of the pod's own, set up by CNI.
    Pod,
}

impl Network {
    fn mode(self) -> &'static str {
        match self {
            Network::Node => "NODE",
            Network::Pod => "POD",
        }
    }
}

/// [`pod_config`] with the pod's network `network`; a pod with a network
/// of its own gets its name as hostname, as the kubelet gives.
pub fn pod_config_in(c: &Containerd, name: &str, network: Network) -> Result<Value> {
    let logs = c.dir().join("pods").join(name);
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut cfg = json!({
        "metadata": {"name": name, "uid": format!("{name}-uid"), "namespace": "rtv-test", "attempt": 0},
        "log_directory": logs.to_string_lossy(),
        "labels": {"rtv-test": name},
        "linux": {
            "cgroup_parent": CGROUP_PARENT,
            "security_context": {"namespace_options": namespace_options(network)},
        },
    });
    if network == Network::Pod {
        cfg["hostname"] = json!(name);
    }
    Ok(cfg)
}

fn namespace_options(network: Network) -> Value {
    json!({"network": network.mode(), "pid": "CONTAINER", "ipc": "POD"})
}

/// A busybox container's configuration: `cmd` is its whole command line,
/// its log is `<name>.log` in the pod's log directory, `envs` its
/// environment.
pub fn container_config(name: &str, cmd: &[&str], envs: &[(&str, &str)]) -> Value {
    container_config_in(name, cmd, envs, Network::Node)
}

/// [`container_config`] for a pod whose network is `network`.
pub fn container_config_in(
    name: &str,
    cmd: &[&str],
    envs: &[(&str, &str)],
    network: Network,
) -> Value {
    let envs: Vec<Value> = envs
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
    json!({
        "metadata": {"name": name, "attempt": 0},
        "image": {"image": BUSYBOX_REF},
        "command": cmd,
        "envs": envs,
        "log_path": format!("{name}.log"),
        "labels": {"rtv-test-container": name},
        // The kubelet's `seccompProfile: RuntimeDefault` (containerd's
        // default profile, no no-new-privileges: allowPrivilegeEscalation
        // is left at its default).
        "linux": {"security_context": {
            "namespace_options": namespace_options(network),
            "seccomp": {"profile_type": "RuntimeDefault"},
        }},
    })
}

/// The lines a container wrote to stdout, from its CRI log
/// (`<time> stdout F <text>`).
pub fn stdout_log_lines(log: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            let (_time, stream, _tag, rest) = (f.next()?, f.next()?, f.next()?, f.next()?);
            (stream == "stdout").then(|| rest.to_owned())
        })
        .collect())
}

// ---------------------------------------------------------------------------
// Scenarios.

/// Starts a containerd with `opts` (see [`cri_options`]), waits for its CRI
/// plugin, imports the images, runs `f` with a client, then shuts the
/// instance down and asserts that `f` passed and nothing is left behind
/// ([`with_containerd_opts`]).
pub fn with_cri(
    name: &str,
    opts: &ContainerdOptions,
    f: impl FnOnce(&Containerd, &CriClient) -> Result<()>,
) {
    with_containerd_opts(name, opts, |c| {
        let t = Instant::now();
        let cri = CriClient::connect(c)?;
        wait_cri_ready(&cri, Duration::from_secs(30))?;
        import_cri_images(c, &cri)?;
        eprintln!(
            "[{name}] CRI ready and images imported in {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        f(c, &cri)
    });
}

/// The pod scenario on one handler in a private containerd: `runtime` is
/// the handler (its `runtime_type`, and for runc's shim the runtime
/// binary), `path_prepend` a directory in front of containerd's `PATH`
/// (where a shim v2 binary is found), `shim_binary` the file name of the
/// shim the pod must run under (`containerd-shim-runc-v2`,
/// `containerd-shim-rtv-v2`). See [`scenario_pod_lifecycle`].
pub fn run_pod_scenario(
    test: &str,
    runtime: CriRuntime,
    path_prepend: Option<PathBuf>,
    shim_binary: &str,
) {
    let handler = runtime.name.clone();
    let opts = cri_options(vec![runtime], path_prepend);
    with_cri(test, &opts, |c, cri| {
        let t = scenario_pod_lifecycle(c, cri, &handler, shim_binary)?;
        eprintln!("[{test}] {t}");
        Ok(())
    });
}

/// How long the steps of [`scenario_pod_lifecycle`] took.
#[derive(Debug, Default, Clone)]
pub struct PodTimings {
    /// `RunPodSandbox`.
    pub run_pod: Duration,
    /// `CreateContainer` + `StartContainer`, for each container.
    pub create_start: Vec<Duration>,
    /// One `ExecSync` of `echo hi`.
    pub exec_sync: Duration,
    /// `StopContainer` of a container that exits on SIGTERM.
    pub stop_container: Duration,
    /// `StopPodSandbox`.
    pub stop_pod: Duration,
    /// `RemovePodSandbox`.
    pub remove_pod: Duration,
    /// The whole scenario.
    pub total: Duration,
}

impl std::fmt::Display for PodTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: &Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let cs: Vec<String> = self.create_start.iter().map(ms).collect();
        write!(
            f,
            "RunPodSandbox {}, create+start [{}], ExecSync {}, StopContainer {}, \
             StopPodSandbox {}, RemovePodSandbox {}, scenario {}",
            ms(&self.run_pod),
            cs.join(", "),
            ms(&self.exec_sync),
            ms(&self.stop_container),
            ms(&self.stop_pod),
            ms(&self.remove_pod),
            ms(&self.total)
        )
    }
}

/// A pod's life through CRI on `handler`:
/// - `RunPodSandbox`: the pod is `SANDBOX_READY` on `handler`, in the node's
///   network namespace, served by a shim named `shim_binary`;
/// - two busybox containers (`worker`: loops, exits 7 on SIGTERM; `exiter`:
///   exits 5 once `/tmp/go` exists in it), created and started: both
///   `CONTAINER_RUNNING`, listed in the pod, with the environment given,
///   in the pod's IPC namespace, every shim of the pod serving its id;
/// - `ExecSync` in `worker`: `echo hi` gives `hi` and 0; stdout and stderr
///   apart and the exit code (3) of `sh -c '...; exit 3'`; `sleep 30` with
///   a timeout of 1 s fails with `DEADLINE_EXCEEDED` and is killed;
/// - `ExecSync touch /tmp/go` in `exiter`: it ends, `CONTAINER_EXITED` with
///   exit code 5 and reason `Error`, and its log holds what it printed;
/// - `StopContainer` of `worker` (timeout 30 s): it exits 7 (the SIGTERM
///   trap), well before the timeout;
/// - `StopPodSandbox` (`SANDBOX_NOTREADY`), `RemovePodSandbox`: the pod and
///   its containers are gone from CRI and from containerd, and nothing of
///   them is left (no shim, process, mount, cgroup, socket or runtime
///   state: [`live_leftovers`]).
pub fn scenario_pod_lifecycle(
    c: &Containerd,
    cri: &CriClient,
    handler: &str,
    shim_binary: &str,
) -> Result<PodTimings> {
    let t0 = Instant::now();
    let mut t = PodTimings::default();
    let v = cri.version()?;
    ensure!(
        v["runtime_api_version"] == "v1" && v["runtime_name"] == "containerd",
        "Version: {v}"
    );

    let pod_cfg = pod_config(c, "lifecycle")?;
    let s = Instant::now();
    let pod = cri.run_pod(&pod_cfg, handler)?;
    t.run_pod = s.elapsed();
    let st = cri.pod_status(&pod)?;
    ensure!(
        st["status"]["state"] == "SANDBOX_READY"
            && st["status"]["runtime_handler"] == handler
            && st["status"]["metadata"]["name"] == "lifecycle"
            && st["status"]["linux"]["namespaces"]["options"]["network"] == "NODE",
        "PodSandboxStatus after RunPodSandbox: {}",
        st["status"]
    );
    let pods = cri.list_pods()?;
    ensure!(
        pods.len() == 1 && pods[0]["id"] == pod.as_str() && pods[0]["state"] == "SANDBOX_READY",
        "ListPodSandbox: {pods:?}"
    );
    check_shims(c, &pod, shim_binary)?;

    let worker_cmd = [
        "sh",
        "-c",
        "echo worker-started; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; \
         trap 'echo worker-stopping; exit 7' TERM; \
         while :; do sleep 3600 & wait; done",
    ];
    let exiter_cmd = [
        "sh",
        "-c",
        "echo exiter-started; until [ -e /tmp/go ]; do sleep 0.05; done; \
         echo exiter-done; exit 5",
    ];
    let mut ids = Vec::new();
    for (name, cmd) in [("worker", &worker_cmd), ("exiter", &exiter_cmd)] {
        let cfg = container_config(name, cmd, &[("RTV_CRI_ENV", "from-cri")]);
        let s = Instant::now();
        let id = cri.create_container(&pod, &cfg, &pod_cfg)?;
        let st = cri.container_status(&id)?;
        ensure!(
            st["status"]["state"] == "CONTAINER_CREATED",
            "{name} after CreateContainer: {}",
            st["status"]
        );
        cri.start(&id)?;
        t.create_start.push(s.elapsed());
        ids.push(id);
    }
    let (worker, exiter) = (ids[0].clone(), ids[1].clone());
    for (name, id) in [("worker", &worker), ("exiter", &exiter)] {
        let st = cri.container_status(id)?;
        let s = &st["status"];
        ensure!(
            s["state"] == "CONTAINER_RUNNING"
                && s["metadata"]["name"] == name
                && s["started_at"].as_i64().unwrap_or(0) > 0
                && s["finished_at"] == 0,
            "{name} after StartContainer: {s}"
        );
    }
    let listed = cri.list_containers(Some(&pod))?;
    let mut listed_ids: Vec<&str> = listed.iter().filter_map(|c| c["id"].as_str()).collect();
    listed_ids.sort_unstable();
    let mut want = vec![worker.as_str(), exiter.as_str()];
    want.sort_unstable();
    ensure!(listed_ids == want, "ListContainers of the pod: {listed:?}");
    check_shims(c, &pod, shim_binary)?;

    // ExecSync: output, exit codes, stderr apart, the container's env.
    let s = Instant::now();
    let r = cri.exec_sync(&worker, &["echo", "hi"], 30)?;
    t.exec_sync = s.elapsed();
    ensure!(
        r == ExecResult {
            stdout: "hi\n".into(),
            stderr: String::new(),
            exit_code: 0
        },
        "ExecSync echo hi: {r:?}"
    );
    let r = cri.exec_sync(
        &worker,
        &["sh", "-c", "echo $RTV_CRI_ENV; echo to-stderr >&2; exit 3"],
        30,
    )?;
    ensure!(
        r.stdout == "from-cri\n" && r.stderr == "to-stderr\n" && r.exit_code == 3,
        "ExecSync sh -c '...; exit 3': {r:?}"
    );
    // An exec that outlives its timeout: DEADLINE_EXCEEDED, the process is
    // killed, the container goes on.
    let s = Instant::now();
    let r = cri.try_call(
        "RuntimeService/ExecSync",
        json!({"container_id": worker, "cmd": ["sleep", "30"], "timeout": 1}),
        CRI_TIMEOUT,
    )?;
    let waited = s.elapsed();
    match r {
        Err(e) if e.code == "DEADLINE_EXCEEDED" => {}
        other => bail!("ExecSync sleep 30 with a 1 s timeout: {other:?}"),
    }
    // No bound on the wall time (a VM runtime's exec starts slowly on this
    // host): what matters is the error above and the process gone below.
    eprintln!("ExecSync with a 1 s timeout returned after {waited:?}");
    let r = cri.exec_sync(
        &worker,
        &["sh", "-c", "ps -o args | grep -c '^sleep 30' || true"],
        30,
    )?;
    ensure!(
        r.stdout.trim() == "0",
        "the timed-out exec is still running in worker: {r:?}"
    );
    // The pod's containers share its IPC namespace.
    let ipc: Vec<String> = [&worker, &exiter]
        .iter()
        .map(|id| {
            let r = cri.exec_sync(id, &["readlink", "/proc/self/ns/ipc"], 30)?;
            ensure!(r.exit_code == 0, "readlink /proc/self/ns/ipc: {r:?}");
            Ok(r.stdout.trim().to_owned())
        })
        .collect::<Result<_>>()?;
    ensure!(
        ipc[0] == ipc[1] && ipc[0].starts_with("ipc:["),
        "the pod's containers are in different IPC namespaces: {ipc:?}"
    );

    // A container that ends by itself, with an exit code.
    let r = cri.exec_sync(&exiter, &["touch", "/tmp/go"], 30)?;
    ensure!(r.exit_code == 0, "ExecSync touch /tmp/go: {r:?}");
    let st = cri.wait_container_state(&exiter, "CONTAINER_EXITED", Duration::from_secs(30))?;
    ensure!(
        st["exit_code"] == 5
            && st["reason"] == "Error"
            && st["finished_at"].as_i64().unwrap_or(0)
                >= st["started_at"].as_i64().unwrap_or(i64::MAX),
        "exiter after it ended: {st}"
    );
    let log_dir = c.dir().join("pods/lifecycle");
    let lines = stdout_log_lines(&log_dir.join("exiter.log"))?;
    ensure!(
        lines == ["exiter-started", "exiter-done"],
        "exiter's log: {lines:?}"
    );
    let st = cri.container_status(&worker)?;
    ensure!(
        st["status"]["state"] == "CONTAINER_RUNNING",
        "worker after exiter ended: {}",
        st["status"]
    );

    // StopContainer: SIGTERM, which the worker traps (exit 7).
    let s = Instant::now();
    cri.stop(&worker, 30)?;
    t.stop_container = s.elapsed();
    let st = cri.container_status(&worker)?;
    ensure!(
        st["status"]["state"] == "CONTAINER_EXITED" && st["status"]["exit_code"] == 7,
        "worker after StopContainer: {}",
        st["status"]
    );
    ensure!(
        t.stop_container < Duration::from_secs(20),
        "StopContainer took {:?}: SIGTERM was not delivered (SIGKILL after the timeout?)",
        t.stop_container
    );
    let lines = stdout_log_lines(&log_dir.join("worker.log"))?;
    ensure!(
        // RuntimeDefault: the filter is on, no_new_privs off.
        lines
            == [
                "worker-started",
                "NoNewPrivs:\t0",
                "Seccomp:\t2",
                "worker-stopping"
            ],
        "worker's log: {lines:?}"
    );

    // Stop and remove the pod.
    let s = Instant::now();
    cri.stop_pod(&pod)?;
    t.stop_pod = s.elapsed();
    let st = cri.pod_status(&pod)?;
    ensure!(
        st["status"]["state"] == "SANDBOX_NOTREADY",
        "PodSandboxStatus after StopPodSandbox: {}",
        st["status"]
    );
    for c in cri.list_containers(Some(&pod))? {
        ensure!(
            c["state"] == "CONTAINER_EXITED",
            "a container of the stopped pod: {c}"
        );
    }
    let s = Instant::now();
    cri.remove_pod(&pod)?;
    t.remove_pod = s.elapsed();
    check_pod_gone(c, cri, &pod)?;
    t.total = t0.elapsed();
    Ok(t)
}

/// `RemovePodSandbox` of a pod whose containers still run (no stop before):
/// CRI stops the pod and removes everything, and nothing is left.
pub fn scenario_remove_running_pod(c: &Containerd, cri: &CriClient, handler: &str) -> Result<()> {
    let pod_cfg = pod_config(c, "remove-running")?;
    let pod = cri.run_pod(&pod_cfg, handler)?;
    let cfg = container_config("sleeper", &["sleep", "1000"], &[]);
    let id = cri.create_container(&pod, &cfg, &pod_cfg)?;
    cri.start(&id)?;
    let st = cri.container_status(&id)?;
    ensure!(
        st["status"]["state"] == "CONTAINER_RUNNING",
        "sleeper: {}",
        st["status"]
    );
    cri.remove_pod(&pod)?;
    check_pod_gone(c, cri, &pod)
}

/// Privileged containers and devices on `handler`, in a privileged pod
/// (host network: run it in a containerd of its own network namespace,
/// [`cri_net_options`], so that the bridge below is made there on runc):
/// - a privileged container (containerd's defaults: the host's devices
///   listed, `privileged_without_host_devices` false) has every capability
///   (0-37 in CapEff but CAP_SYS_RESOURCE, which containerd, as this host's
///   root, does not have to give), no seccomp, /proc read-write, the kernel's
///   `/dev/fuse` and `/dev/kmsg` (on rtv, the guest's: host devices the guest
///   lacks are left out), and can mount a tmpfs;
/// - a container given CAP_NET_ADMIN adds a bridge (`brctl addbr`) and
///   removes it;
/// - a container given the host's `/dev/kvm`: with runc it has the node;
///   with `in_vm` (rtv) StartContainer fails with an error naming the device
///   as a host device the VM does not have;
/// - then the pod is removed and nothing of it is left.
pub fn scenario_privileged(
    c: &Containerd,
    cri: &CriClient,
    handler: &str,
    in_vm: bool,
) -> Result<()> {
    let mut pod_cfg = pod_config(c, "privileged")?;
    pod_cfg["linux"]["security_context"]["privileged"] = json!(true);
    let pod = cri.run_pod(&pod_cfg, handler)?;
    let result = (|| {
        let mut priv_cfg = container_config("priv", &["sleep", "1000"], &[]);
        priv_cfg["linux"]["security_context"] = json!({
            "privileged": true,
            "namespace_options": namespace_options(Network::Node),
        });
        let privileged = cri.create_container(&pod, &priv_cfg, &pod_cfg)?;
        cri.start(&privileged)
            .context("StartContainer of the privileged container")?;
        let status = exec_ok(cri, &privileged, &["cat", "/proc/self/status"])?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let cap_eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0);
        // Capabilities 0-37 but CAP_SYS_RESOURCE (24): containerd gives a
        // privileged container the capabilities it has itself, and this
        // host's root lacks that one.
        let all_known = ((1u64 << 38) - 1) & !(1 << 24);
        ensure!(
            cap_eff & all_known == all_known && field("Seccomp:") == "0",
            "privileged: want every capability and no seccomp: CapEff {:#x}, Seccomp {:?}",
            cap_eff,
            field("Seccomp:")
        );
        let mounts = exec_ok(cri, &privileged, &["cat", "/proc/mounts"])?;
        ensure!(
            mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some("/proc") && l.contains(" rw,")),
            "privileged: /proc is not read-write:\n{mounts}"
        );
        // (The CRI plugin asks for /sys read-only in a hostNetwork pod,
        // privileged or not; runc and rtv both mount it as asked.)
        exec_ok(
            cri,
            &privileged,
            &[
                "sh",
                "-c",
                "test -c /dev/fuse && test -c /dev/kmsg && mkdir -p /mnt/t && \
                 mount -t tmpfs none /mnt/t && touch /mnt/t/x && umount /mnt/t",
            ],
        )
        .context("privileged: the kernel's devices and a mount")?;

        let mut admin_cfg = container_config("netadmin", &["sleep", "1000"], &[]);
        admin_cfg["linux"]["security_context"]["capabilities"] =
            json!({"add_capabilities": ["NET_ADMIN"]});
        let admin = cri.create_container(&pod, &admin_cfg, &pod_cfg)?;
        cri.start(&admin)
            .context("StartContainer of the NET_ADMIN container")?;
        exec_ok(
            cri,
            &admin,
            &[
                "sh",
                "-c",
                "brctl addbr rtvtestbr0 && ip link show rtvtestbr0 && brctl delbr rtvtestbr0",
            ],
        )
        .context("CAP_NET_ADMIN: a bridge")?;

        let mut kvm_cfg = container_config("hostdev", &["sleep", "1000"], &[]);
        kvm_cfg["devices"] = json!([{
            "container_path": "/dev/kvm", "host_path": "/dev/kvm", "permissions": "rw",
        }]);
        let kvm = cri.create_container(&pod, &kvm_cfg, &pod_cfg)?;
        let started = cri.try_call(
            "RuntimeService/StartContainer",
            json!({"container_id": kvm}),
            Duration::from_secs(120),
        )?;
        match (in_vm, started) {
            (false, Ok(_)) => {
                exec_ok(cri, &kvm, &["test", "-c", "/dev/kvm"]).context("runc: /dev/kvm")?;
            }
            (false, Err(e)) => bail!("runc: a container with /dev/kvm: {e}"),
            (true, Ok(_)) => bail!("a container with the host's /dev/kvm started in the VM"),
            (true, Err(e)) => ensure!(
                e.message.contains("/dev/kvm")
                    && e.message
                        .contains("device of the host that the VM does not have"),
                "a container with the host's /dev/kvm: want the device named as the host's: {e}"
            ),
        }
        anyhow::Ok(())
    })();
    let stop = cri.stop_pod(&pod).and_then(|()| cri.remove_pod(&pod));
    result?;
    stop?;
    check_pod_gone(c, cri, &pod)
}

/// A pod's VM as its container sees it: MemTotal in kB and the CPUs.
fn pod_vm(
    c: &Containerd,
    cri: &CriClient,
    handler: &str,
    name: &str,
    annotations: Value,
) -> Result<(u64, u64)> {
    pod_vm_within(c, cri, handler, name, annotations, CRI_TIMEOUT)
}

/// [`pod_vm`] whose RunPodSandbox may take `run_timeout`.
fn pod_vm_within(
    c: &Containerd,
    cri: &CriClient,
    handler: &str,
    name: &str,
    annotations: Value,
    run_timeout: Duration,
) -> Result<(u64, u64)> {
    let mut pod_cfg = pod_config(c, name)?;
    pod_cfg["annotations"] = annotations;
    let pod = cri.run_pod_within(&pod_cfg, handler, run_timeout)?;
    let result = (|| {
        let cfg = container_config(name, &["sleep", "1000"], &[]);
        let id = cri.create_container(&pod, &cfg, &pod_cfg)?;
        cri.start(&id)
            .with_context(|| format!("StartContainer in pod {name}"))?;
        let out = exec_ok(
            cri,
            &id,
            &[
                "sh",
                "-c",
                "grep MemTotal /proc/meminfo; grep -c ^processor /proc/cpuinfo",
            ],
        )?;
        let mut words = out.split_whitespace();
        let kb = words.nth(1).and_then(|v| v.parse().ok());
        let cpus = words.nth(1).and_then(|v| v.parse().ok());
        match (kb, cpus) {
            (Some(kb), Some(cpus)) => Ok((kb, cpus)),
            _ => bail!("pod {name}: no MemTotal and CPU count in {out:?}"),
        }
    })();
    let stop = cri.stop_pod(&pod).and_then(|()| cri.remove_pod(&pod));
    let vm = result?;
    stop?;
    check_pod_gone(c, cri, &pod)?;
    Ok(vm)
}

/// A pod on `handler`, whose `ConfigPath` is the shipped
/// config/config.toml (every key commented out), gets the default pod
/// size under containerd 1.6: a 2048 MiB VM (MemTotal less what the guest
/// kernel keeps) with 2 vCPUs, capped at the host's CPUs. Its
/// RunPodSandbox may take 5 minutes: on an empty cache it makes the 2 GiB
/// template, ~50 s of cold boot on an idle PVM host (the guest kernel's
/// setup of 2 GiB of `struct page`s is emulated), longer beside the rest
/// of the suite.
pub fn scenario_shipped_size(c: &Containerd, cri: &CriClient, handler: &str) -> Result<()> {
    let (kb, cpus) = pod_vm_within(
        c,
        cri,
        handler,
        "shipped",
        json!({}),
        Duration::from_secs(300),
    )?;
    let want_cpus = u64::from(rtv_runtime::spec::host_cpus().min(2));
    ensure!(
        (1900 * 1024..2048 * 1024).contains(&kb) && cpus == want_cpus,
        "MemTotal {kb} kB and {cpus} CPUs in a pod of the shipped configuration \
         (want ~2048 MiB and {want_cpus})"
    );
    Ok(())
}

/// The handler's `ConfigPath` is the shim's configuration file: a pod on
/// `sized` (a file with `vm.default_memory_mib = 256`) gets a VM of that
/// size; with containerd 1.7's pod-level annotations (given by hand here,
/// passed by the handler's `pod_annotations`) the VM takes the pod's size
/// instead; a pod on `broken` (a file with a bad value) fails
/// RunPodSandbox with the file, line and key, and leaves no pod.
pub fn scenario_config_path(
    c: &Containerd,
    cri: &CriClient,
    sized: &str,
    broken: &str,
    broken_file: &Path,
) -> Result<()> {
    let (kb, _) = pod_vm(c, cri, sized, "configured", json!({}))?;
    ensure!(
        (200 * 1024..256 * 1024).contains(&kb),
        "MemTotal {kb} kB in a pod whose handler's file says 256 MiB (the suite's tiny.toml default is 128)"
    );
    // 600 MiB and 2 CPUs for the pod: a VM of 600 + 64 MiB, 2 vCPUs.
    let (kb, cpus) = pod_vm(
        c,
        cri,
        sized,
        "pod-sized",
        json!({
            rtv_runtime::spec::SANDBOX_MEMORY: (600u64 << 20).to_string(),
            rtv_runtime::spec::SANDBOX_CPU_QUOTA: "200000",
            rtv_runtime::spec::SANDBOX_CPU_PERIOD: "100000",
        }),
    )?;
    ensure!(
        (600 * 1024..664 * 1024).contains(&kb) && cpus == 2,
        "MemTotal {kb} kB and {cpus} CPUs in a pod whose annotations ask for 600 MiB and 2 CPUs"
    );

    pod_fit(c, cri, sized)?;

    let bad_cfg = pod_config(c, "misconfigured")?;
    let r = cri.try_call(
        "RuntimeService/RunPodSandbox",
        json!({"config": bad_cfg, "runtime_handler": broken}),
        CRI_TIMEOUT,
    )?;
    match r {
        Ok(v) => bail!("RunPodSandbox with a broken configuration file succeeded: {v}"),
        Err(e) => ensure!(
            e.message.contains(&format!(
                "{}:3: vm.default_memory_mib",
                broken_file.display()
            )),
            "RunPodSandbox with a broken configuration file: want its name, line and key: {e}"
        ),
    }
    let pods = cri.list_pods()?;
    ensure!(
        pods.is_empty(),
        "pods after a failed RunPodSandbox: {pods:?}"
    );
    Ok(())
}

/// How a pod's VM fails in [`scenario_vm_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmFault {
    /// The VMM is killed (SIGKILL), as the host's OOM killer or an
    /// operator would.
    Killed,
    /// The VMM is stopped (SIGSTOP): the guest answers nothing; an
    /// `ExecSync` then waits out the handler's `agent.answer_timeout_secs`
    /// twice (the request, then a version request) and the shim kills the
    /// VMM.
    Hung,
    /// The guest kernel panics: a privileged container sets the guest's
    /// `vm.panic_on_oom = 2` and a container with a 4 MiB limit is then
    /// OOM-killed in the guest.
    Panicked,
}

/// A pod's VM fails under two running containers (`fault`): containerd
/// gets a TaskExit for each container and for the sandbox, CRI shows both
/// containers `CONTAINER_EXITED` with exit code 137 (128 + SIGKILL, the
/// shim's status for a process whose VM is gone) and the pod
/// `SANDBOX_NOTREADY`, and `StopPodSandbox` + `RemovePodSandbox` remove it
/// with nothing left.
pub fn scenario_vm_fault(
    c: &Containerd,
    cri: &CriClient,
    handler: &str,
    fault: VmFault,
) -> Result<()> {
    let mut pod_cfg = pod_config(c, &format!("vm-{fault:?}").to_lowercase())?;
    if fault == VmFault::Panicked {
        pod_cfg["linux"]["security_context"]["privileged"] = json!(true);
    }
    let pod = cri.run_pod(&pod_cfg, handler)?;
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let mut cfg = container_config(name, &["sleep", "1000"], &[]);
        if fault == VmFault::Panicked {
            // The first writes the guest's sysctl (/proc/sys is writable
            // in a privileged container); the second is the one OOM-killed.
            if name == "first" {
                cfg["linux"]["security_context"] = json!({
                    "privileged": true,
                    "namespace_options": namespace_options(Network::Node),
                });
            } else {
                cfg["linux"]["resources"] = json!({"memory_limit_in_bytes": 4u64 << 20});
            }
        }
        let id = cri.create_container(&pod, &cfg, &pod_cfg)?;
        cri.start(&id)?;
        ids.push(id);
    }
    // The VMM: the process named rtv-vmm under the pod's shim (its keeper,
    // rtv-vmm-keeper, stays outside the VMM's pid namespace).
    let procs = containerd::processes();
    let shims = c.shims();
    let vmms: Vec<i32> = shims
        .iter()
        .flat_map(|(pid, _)| containerd::descendants(&procs, *pid as i32))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "rtv-vmm")
        })
        .collect();
    let [vmm] = vmms[..] else {
        bail!("want one rtv-vmm under the pod's shims {shims:?}, found {vmms:?}");
    };
    match fault {
        VmFault::Killed | VmFault::Hung => {
            let signal = if fault == VmFault::Killed {
                libc::SIGKILL
            } else {
                libc::SIGSTOP
            };
            // SAFETY: kill(2) takes plain integers and touches none of our memory.
            if unsafe { libc::kill(vmm, signal) } != 0 {
                bail!("kill -{signal} {vmm}: {}", std::io::Error::last_os_error());
            }
        }
        VmFault::Panicked => {
            exec_ok(
                cri,
                &ids[0],
                &["sh", "-c", "echo 2 > /proc/sys/vm/panic_on_oom"],
            )?;
        }
    }
    // What ends the VM: nothing more (killed), an exec the hung guest does
    // not answer, or the OOM kill that panics the guest.
    let provoke = match fault {
        VmFault::Killed => None,
        VmFault::Hung => Some((&ids[0], vec!["true"])),
        VmFault::Panicked => Some((
            &ids[1],
            vec!["sh", "-c", "head -c 8388608 /dev/zero | tail"],
        )),
    };
    if let Some((id, cmd)) = provoke {
        // It fails, or ends as killed with its VM (137).
        if let Ok(Ok(r)) = cri.try_call(
            "RuntimeService/ExecSync",
            json!({"container_id": id, "cmd": cmd, "timeout": 60}),
            CRI_TIMEOUT + Duration::from_secs(60),
        ) {
            ensure!(
                r["exit_code"] == 137,
                "an exec that should end the VM ({fault:?}): {r}"
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        loop {
            let st = cri.container_status(id)?;
            if st["status"]["state"] == "CONTAINER_EXITED" {
                ensure!(
                    st["status"]["exit_code"] == 137,
                    "container {id} after its VM failed ({fault:?}): {}",
                    st["status"]
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "container {id} not exited 60 s after its VM failed ({fault:?}): {}",
                st["status"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    loop {
        let st = cri.pod_status(&pod)?;
        if st["status"]["state"] == "SANDBOX_NOTREADY" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "pod not NOTREADY 60 s after its VM failed ({fault:?}): {}",
            st["status"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        !crate::conformance::pid_running(vmm),
        "the VMM {vmm} outlived its failed VM ({fault:?})"
    );
    cri.stop_pod(&pod)?;
    cri.remove_pod(&pod)?;
    check_pod_gone(c, cri, &pod)
}

/// `n` pods started at once (each from its own CRI client, so containerd
/// runs the `RunPodSandbox`s together) on a handler whose template cache
/// (`templates`) is empty: each pod's shim, a process of its own, needs
/// the same template; one makes it while the others wait on its lock and
/// restore it, so the cache holds exactly one template afterwards. Every
/// pod starts a container (the first also answers an exec); each pod's
/// times are printed; then all are removed and nothing is left.
pub fn scenario_pods_at_once(
    c: &Containerd,
    cri: &CriClient,
    handler: &str,
    templates: &Path,
    n: usize,
) -> Result<()> {
    let started: Vec<Result<String>> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || -> Result<String> {
                    let t0 = Instant::now();
                    let mut took = Vec::new();
                    let mut lap = |what: &str| took.push(format!("{what} {:.1?}", t0.elapsed()));
                    let result = (|| -> Result<String> {
                        let client = CriClient::connect(c)?;
                        let pod_cfg = pod_config(c, &format!("at-once-{i}"))?;
                        let pod = client
                            .run_pod(&pod_cfg, handler)
                            .with_context(|| format!("RunPodSandbox {i} of {n}"))?;
                        lap("run");
                        let cfg = container_config("c", &["sleep", "1000"], &[]);
                        let id = client.create_container(&pod, &cfg, &pod_cfg)?;
                        lap("create");
                        client.start(&id)?;
                        lap("start");
                        // One exec shows the stdio of a pod started in the
                        // crowd (ten execs at once cost ~40 s of the suite).
                        if i == 0 {
                            let said = exec_ok(&client, &id, &["echo", "pod 0"])?;
                            lap("exec");
                            ensure!(said.trim() == "pod 0", "pod 0 answered {said:?}");
                        }
                        Ok(pod)
                    })();
                    eprintln!(
                        "[pods at once] pod {i}: {} {}",
                        took.join(", "),
                        if result.is_ok() { "ok" } else { "failed" }
                    );
                    result
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| bail!("a pod's thread panicked"))
            })
            .collect()
    });
    let made: Vec<String> = std::fs::read_dir(templates)
        .with_context(|| format!("the template cache {}", templates.display()))?
        .flatten()
        .filter(|e| e.path().join("snapshot").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for pod in cri.list_pods()? {
        let id = str_field(&pod, "id")?;
        cri.stop_pod(&id)?;
        cri.remove_pod(&id)?;
    }
    let failed: Vec<String> = started
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    ensure!(
        failed.is_empty(),
        "pods started at once failed: {failed:#?}"
    );
    ensure!(
        made.len() == 1,
        "{n} pods at once on an empty cache made {} templates: {made:?}",
        made.len()
    );
    ensure!(cri.list_pods()?.is_empty(), "pods left after removal");
    wait_nothing_left(c, cri, Duration::from_secs(30))
}

/// When [`scenario_containerd_restart_mid_start`] restarts containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartAt {
    /// As soon as containerd has started the pod's shim (before or while
    /// it sends Create).
    ShimStarted,
    /// Once the pod's VMM runs (the shim is inside Create, or already in
    /// Start).
    VmStarted,
    /// A second after the pod's VMM started: its guest is up and the
    /// sandbox is being started or already is (containerd may have recorded
    /// the pod as ready).
    VmUp,
    /// Once `RunPodSandbox` has returned the pod: containerd has it as
    /// ready, with its shim and VM running.
    PodReady,
}

/// containerd restarted (SIGTERM, started again) while a pod is starting,
/// at `at`: the `RunPodSandbox` in flight ends (an error, or the pod),
/// nothing hangs; the restarted containerd lists whatever pod it had
/// recorded, and stopping and removing each leaves nothing (no shim, VMM,
/// mount or state). [`scenario_next_pod_runs`] then shows the next pod
/// works.
pub fn scenario_containerd_restart_mid_start(
    c: &Containerd,
    cri: &CriClient,
    handler: &str,
    at: RestartAt,
) -> Result<()> {
    let t0 = Instant::now();
    let in_flight = std::thread::scope(|s| -> Result<std::result::Result<String, String>> {
        let run = s.spawn(move || -> Result<std::result::Result<String, String>> {
            let client = CriClient::connect(c)?;
            let pod_cfg = pod_config(c, "mid-start")?;
            let r = client.try_call(
                "RuntimeService/RunPodSandbox",
                json!({"config": pod_cfg, "runtime_handler": handler}),
                CRI_TIMEOUT,
            )?;
            Ok(match r {
                Ok(v) => Ok(str_field(&v, "pod_sandbox_id")?),
                Err(e) => Err(format!("{}: {}", e.code, e.message)),
            })
        });
        if at == RestartAt::PodReady {
            let ran = run
                .join()
                .unwrap_or_else(|_| bail!("the RunPodSandbox thread panicked"))?;
            eprintln!(
                "[restart mid-start] {at:?} after {:.1?}: restarting containerd",
                t0.elapsed()
            );
            c.restart()?;
            return Ok(ran);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let shims = c.shims();
            let ready = match at {
                RestartAt::ShimStarted => !shims.is_empty(),
                RestartAt::VmStarted | RestartAt::VmUp | RestartAt::PodReady => {
                    let procs = containerd::processes();
                    shims.iter().any(|(pid, _)| {
                        containerd::descendants(&procs, *pid as i32)
                            .iter()
                            .any(|d| {
                                procs.iter().any(|p| {
                                    p.pid == *d
                                        && p.cmdline.first().is_some_and(|a| a.ends_with("rtv-vmm"))
                                })
                            })
                    })
                }
            };
            if ready {
                if at == RestartAt::VmUp {
                    std::thread::sleep(Duration::from_secs(1));
                }
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no {at:?} within 60 s of RunPodSandbox"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "[restart mid-start] {at:?} after {:.1?}: restarting containerd",
            t0.elapsed()
        );
        c.restart()?;
        run.join()
            .unwrap_or_else(|_| bail!("the RunPodSandbox thread panicked"))
    })?;
    eprintln!(
        "[restart mid-start] {at:?}: RunPodSandbox gave {in_flight:?} after {:.1?}",
        t0.elapsed()
    );
    // The client's channel broke with the old containerd: the first calls
    // may fail UNAVAILABLE until it has connected again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pods = loop {
        match cri.try_call("RuntimeService/ListPodSandbox", json!({}), CRI_TIMEOUT)? {
            Ok(r) => break r["items"].as_array().cloned().unwrap_or_default(),
            Err(e) if e.code == "UNAVAILABLE" && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => bail!(
                "ListPodSandbox after the restart: {}: {}",
                e.code,
                e.message
            ),
        }
    };
    if let Ok(pod) = &in_flight {
        ensure!(
            pods.iter().any(|p| p["id"] == pod.as_str()),
            "the pod RunPodSandbox returned ({pod}) is not listed after the restart: {pods:?}"
        );
    }
    for pod in &pods {
        let id = str_field(pod, "id")?;
        let state = pod["state"].as_str().unwrap_or("?").to_owned();
        let t = Instant::now();
        cri.stop_pod(&id)
            .with_context(|| format!("StopPodSandbox of pod {id} ({state}) after the restart"))?;
        cri.remove_pod(&id)?;
        eprintln!(
            "[restart mid-start] {at:?}: pod {id} ({state}) stopped and removed in {:.1?}",
            t.elapsed()
        );
    }
    ensure!(cri.list_pods()?.is_empty(), "pods left after removal");
    wait_nothing_left(c, cri, Duration::from_secs(30))
        .with_context(|| format!("after a restart mid-start ({at:?}, {in_flight:?})"))?;
    // Which path the shim took, for the reader: the restarted containerd
    // asked for the task while its create still ran (the create undone).
    let undone = c.log_tail(1 << 20).matches("the create is undone").count();
    eprintln!("[restart mid-start] {at:?}: creates undone by the shim so far: {undone}");
    Ok(())
}

/// A new pod runs a container and an exec in it, then goes (after faults
/// such as [`scenario_containerd_restart_mid_start`]).
pub fn scenario_next_pod_runs(c: &Containerd, cri: &CriClient, handler: &str) -> Result<()> {
    let pod_cfg = pod_config(c, "after-restart")?;
    let pod = cri.run_pod(&pod_cfg, handler)?;
    let id = cri.create_container(
        &pod,
        &container_config("c", &["sleep", "1000"], &[]),
        &pod_cfg,
    )?;
    cri.start(&id)?;
    let said = exec_ok(cri, &id, &["echo", "after"])?;
    ensure!(
        said.trim() == "after",
        "a pod after the restart answered {said:?}"
    );
    cri.stop_pod(&pod)?;
    cri.remove_pod(&pod)?;
    check_pod_gone(c, cri, &pod)
}

/// A pod sized by containerd 1.7's annotations for 600 MiB (a VM of 664
/// MiB) holds two containers with 300 MiB memory limits, each limited to
/// its own 300 MiB in the guest (its cgroup's `memory.max`); a third with
/// a limit of 16 MiB does not fit what is left, and its start (where
/// containerd asks the shim to create it) fails with both sizes named.
fn pod_fit(c: &Containerd, cri: &CriClient, handler: &str) -> Result<()> {
    let mut pod_cfg = pod_config(c, "fit")?;
    pod_cfg["annotations"] = json!({
        rtv_runtime::spec::SANDBOX_MEMORY: (600u64 << 20).to_string(),
    });
    let pod = cri.run_pod(&pod_cfg, handler)?;
    let result = (|| {
        let limited = |name: &str, mib: u64| {
            let mut cfg = container_config(name, &["sleep", "1000"], &[]);
            cfg["linux"]["resources"] = json!({"memory_limit_in_bytes": mib << 20});
            cfg
        };
        for name in ["first", "second"] {
            let id = cri.create_container(&pod, &limited(name, 300), &pod_cfg)?;
            cri.start(&id)
                .with_context(|| format!("StartContainer {name}"))?;
            // The container's own cgroup, wherever its cgroup namespace
            // (if any) roots /sys/fs/cgroup.
            let max = exec_ok(
                cri,
                &id,
                &[
                    "sh",
                    "-c",
                    "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
                ],
            )?;
            ensure!(
                max.trim() == (300u64 << 20).to_string(),
                "{name}'s memory.max in the guest: {max:?}"
            );
        }
        // CRI's CreateContainer only records the container: containerd
        // asks the shim for it at StartContainer.
        let third = cri.create_container(&pod, &limited("third", 16), &pod_cfg)?;
        let r = cri.try_call(
            "RuntimeService/StartContainer",
            json!({"container_id": third}),
            CRI_TIMEOUT,
        )?;
        match r {
            Ok(v) => bail!("a third container of 16 MiB in a full pod started: {v}"),
            Err(e) => ensure!(
                e.message
                    .contains("memory limit of 16 MiB does not fit in the pod's VM of 664 MiB")
                    && e.message.contains("0 MiB are left"),
                "StartContainer of a container that does not fit: {e}"
            ),
        }
        Ok(())
    })();
    let stop = cri.stop_pod(&pod).and_then(|()| cri.remove_pod(&pod));
    result?;
    stop?;
    check_pod_gone(c, cri, &pod)
}

/// `RunPodSandbox` on a handler containerd does not have fails, and
/// leaves no pod.
pub fn scenario_unknown_handler(c: &Containerd, cri: &CriClient) -> Result<()> {
    let pod_cfg = pod_config(c, "no-handler")?;
    let r = cri.try_call(
        "RuntimeService/RunPodSandbox",
        json!({"config": pod_cfg, "runtime_handler": "no-such-handler"}),
        CRI_TIMEOUT,
    )?;
    match r {
        Ok(v) => bail!("RunPodSandbox on an unknown handler succeeded: {v}"),
        Err(e) => ensure!(
            e.message.contains("no-such-handler"),
            "RunPodSandbox on an unknown handler: {e}"
        ),
    }
    let pods = cri.list_pods()?;
    ensure!(
        pods.is_empty(),
        "pods after a failed RunPodSandbox: {pods:?}"
    );
    Ok(())
}

/// Every shim of the instance serves `pod` (containerd groups a pod's
/// containers under the sandbox's shim) and is `shim_binary`.
fn check_shims(c: &Containerd, pod: &str, shim_binary: &str) -> Result<()> {
    let shims = c.shims();
    ensure!(!shims.is_empty(), "no shim process for pod {pod}");
    for (pid, id) in &shims {
        ensure!(
            id == pod,
            "shim {pid} serves {id}, not the pod's sandbox {pod}: {shims:?}"
        );
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("the shim {pid}'s executable"))?;
        ensure!(
            exe.file_name().is_some_and(|n| n == shim_binary),
            "the pod's shim {pid} is {}, not {shim_binary}",
            exe.display()
        );
    }
    Ok(())
}

/// After `RemovePodSandbox`: CRI answers NOT_FOUND for the pod and lists
/// neither it nor its containers, containerd has no container left in
/// `k8s.io`, and [`live_leftovers`] finds nothing (shims may take a moment
/// to exit).
fn check_pod_gone(c: &Containerd, cri: &CriClient, pod: &str) -> Result<()> {
    match cri.try_call(
        "RuntimeService/PodSandboxStatus",
        json!({"pod_sandbox_id": pod}),
        CRI_TIMEOUT,
    )? {
        Err(e) if e.code == "NOT_FOUND" => {}
        other => bail!("PodSandboxStatus of a removed pod: {other:?}"),
    }
    let pods = cri.list_pods()?;
    ensure!(pods.is_empty(), "pods after RemovePodSandbox: {pods:?}");
    let ctrs = cri.list_containers(None)?;
    ensure!(
        ctrs.is_empty(),
        "containers after RemovePodSandbox: {ctrs:?}"
    );
    let mut ctr = Command::new("ctr");
    ctr.arg("--address").arg(c.address()).args([
        "--namespace",
        CRI_NAMESPACE,
        "containers",
        "ls",
        "-q",
    ]);
    let out = containerd::run_with_timeout(ctr, None, containerd::CTR_TIMEOUT)?;
    let listed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        out.status.success() && listed.is_empty(),
        "containerd's {CRI_NAMESPACE} containers after RemovePodSandbox: {}",
        containerd::describe(&out)
    );
    wait_nothing_left(c, cri, Duration::from_secs(10))
        .with_context(|| format!("after RemovePodSandbox of pod {pod}"))
}

/// Waits up to `timeout` until [`live_leftovers`] (less the client) finds
/// nothing: shims exit a moment after containerd shuts them down.
pub fn wait_nothing_left(c: &Containerd, cri: &CriClient, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = live_leftovers(c, &[cri.pid()]);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("left behind: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`containerd::Footprint::leftovers`] of a running instance, less the
/// instance itself (containerd's process, its directory and its network
/// namespace's file) and the
/// processes `except` (e.g. the CRI client): the shims, processes, mounts,
/// cgroups, sockets and runtime state of every container and pod the
/// instance knew.
pub fn live_leftovers(c: &Containerd, except: &[u32]) -> Vec<String> {
    let own: Vec<String> = std::iter::once(c.pid())
        .chain(except.iter().copied())
        .map(|pid| format!("process {pid} "))
        .collect();
    let dir = format!("directory {}", c.dir().display());
    let netns = c
        .netns_path()
        .map(|p| format!("netns {}", p.display()))
        .unwrap_or_default();
    c.footprint()
        .leftovers()
        .into_iter()
        .filter(|l| *l != dir && *l != netns && !own.iter().any(|p| l.starts_with(p.as_str())))
        .collect()
}

// ---------------------------------------------------------------------------
// Pod networking.

/// What a `hostNetwork` pod (`NamespaceOption.network = NODE`) of a runtime
/// gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostNetwork {
    /// The node's network namespace: containerd's (runc).
    NodeNamespace,
    /// A network of its own with loopback only: a VM runtime cannot give
    /// a VM the node's namespace (Kata refuses such pods); no NIC is up,
    /// no address but 127.0.0.1, the pods are not reachable.
    LoopbackOnly,
}

/// The pod-network scenario's parameters ([`scenario_pod_network`]).
#[derive(Debug, Clone)]
pub struct NetScenario {
    /// The handler under test: two pods with networks of their own, and a
    /// `hostNetwork` one.
    pub handler: String,
    /// Another handler with a pod on the same bridge (runc, to check rtv
    /// against), if any.
    pub peer_handler: Option<String>,
    /// What the handler's `hostNetwork` pod gets.
    pub host_network: HostNetwork,
}

/// The port the pods' web servers listen on.
const POD_PORT: u16 = 8080;
/// Pod `a`'s hostPort (portmap), on the node's addresses.
const HOST_PORT: u16 = 30080;
/// The port of the node's web server, on the bridge's address.
const NODE_PORT: u16 = 8081;
/// The size of the file the pods serve, to move more than a segment.
const BLOB_KIB: u32 = 2048;

/// One pod of the scenario: its name, id, web container and address.
struct NetPod {
    name: String,
    id: String,
    ctr: String,
    ip: String,
    netns: Option<PathBuf>,
}

/// How long the phases of [`scenario_pod_network`] took.
#[derive(Debug, Default, Clone)]
pub struct NetTimings {
    /// RunPodSandbox (with CNI) of each pod, by name.
    pub run_pod: Vec<(String, Duration)>,
    /// Every pod up, its web server answering.
    pub setup: Duration,
    /// The checks on the running pods.
    pub checks: Duration,
    /// StopPodSandbox + RemovePodSandbox of every pod and the checks after.
    pub teardown: Duration,
}

impl std::fmt::Display for NetTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: &Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let pods: Vec<String> = self
            .run_pod
            .iter()
            .map(|(n, d)| format!("{n} {}", ms(d)))
            .collect();
        write!(
            f,
            "RunPodSandbox [{}], pods up {}, checks {}, teardown {}",
            pods.join(", "),
            ms(&self.setup),
            ms(&self.checks),
            ms(&self.teardown)
        )
    }
}

/// `ExecSync` of `cmd` in `id` (timeout 60 s), failing unless it exits 0;
/// its stdout.
fn exec_ok(cri: &CriClient, id: &str, cmd: &[&str]) -> Result<String> {
    let r = cri.exec_sync(id, cmd, 60)?;
    ensure!(
        r.exit_code == 0,
        "ExecSync {cmd:?} in {id}: exit {}, stdout {:?}, stderr {:?}",
        r.exit_code,
        r.stdout,
        r.stderr
    );
    Ok(r.stdout)
}

/// Runs `program args` in containerd's network namespace (the node's
/// network) and returns its stdout, failing unless it exits 0.
fn node_ok(c: &Containerd, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = c.in_netns(program)?;
    cmd.args(args);
    let out = containerd::run_with_timeout(cmd, None, Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "{program} {} in containerd's network namespace: {}",
        args.join(" "),
        containerd::describe(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An IPv4 subnet `a.b.c.d/n`.
fn parse_subnet(s: &str) -> Result<(std::net::Ipv4Addr, u32)> {
    let (ip, len) = s.split_once('/').with_context(|| format!("subnet {s:?}"))?;
    let len: u32 = len.parse().with_context(|| format!("subnet {s:?}"))?;
    ensure!(len <= 32, "subnet {s:?}");
    Ok((ip.parse().with_context(|| format!("subnet {s:?}"))?, len))
}

fn in_subnet(ip: std::net::Ipv4Addr, (net, len): (std::net::Ipv4Addr, u32)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// The IPv4 addresses `ip -o -4 addr` lists: (interface, address/prefix).
fn ipv4_addrs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            Some((f.get(1)?.to_string(), f.get(i + 1)?.to_string()))
        })
        .collect()
}

/// The web servers' directory: in the container's own `/dev` tmpfs, so
/// writing and hashing the blob costs no trips through the VM's shared
/// file system (those took over a minute on a loaded PVM host).
const WWW: &str = "/dev/www";

/// A pod's web server: `WWW/id` holds the pod's name, `WWW/blob`
/// [`BLOB_KIB`] KiB of the pod's own text (its name on each numbered
/// line, made by `seq` and `sed` in user space: `/dev/urandom` is kernel
/// work, emulated under PVM, and 2 MiB of it took minutes on a loaded
/// host) and `WWW/blob.md5` their MD5;
/// busybox httpd on [`POD_PORT`]; exits 0 on SIGTERM.
fn web_command(name: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "mkdir -p {WWW} && echo {name} > {WWW}/id && \
             seq 1 {} | sed 's/$/ {name}/' | head -c {} > {WWW}/blob && \
             md5sum {WWW}/blob | cut -d' ' -f1 > {WWW}/blob.md5 || exit 1; \
             trap 'exit 0' TERM; httpd -f -p {POD_PORT} -h {WWW} & wait",
            // Lines from 1000 on are 7 bytes or more: enough of them.
            BLOB_KIB * 1024 / 7 + 1000,
            BLOB_KIB * 1024
        ),
    ]
}

/// `wget` of `url` from container `from`: its body.
fn fetch(cri: &CriClient, from: &str, url: &str) -> Result<String> {
    exec_ok(cri, from, &["timeout", "20", "wget", "-q", "-O-", url])
        .with_context(|| format!("fetching {url}"))
}

/// TCP from pod `from` to pod `to`'s address: `/id` names `to`, and
/// `/blob` arrives whole (the MD5 `to` computed).
fn check_tcp(cri: &CriClient, from: &NetPod, to: &NetPod) -> Result<()> {
    let id = fetch(cri, &from.ctr, &format!("http://{}:{POD_PORT}/id", to.ip))
        .with_context(|| format!("{} -> {}", from.name, to.name))?;
    ensure!(
        id.trim() == to.name,
        "{} fetched {}'s /id at {} and got {id:?}",
        from.name,
        to.name,
        to.ip
    );
    let want = exec_ok(cri, &to.ctr, &["cat", &format!("{WWW}/blob.md5")])?;
    let script = format!(
        "timeout 20 wget -q -O- http://{}:{POD_PORT}/blob | md5sum | cut -d' ' -f1",
        to.ip
    );
    let got = exec_ok(cri, &from.ctr, &["sh", "-c", &script])?;
    ensure!(
        got.trim() == want.trim() && !want.trim().is_empty(),
        "{} -> {}: /blob ({BLOB_KIB} KiB) has MD5 {got:?}, not {want:?}",
        from.name,
        to.name
    );
    Ok(())
}

/// A process of the test in containerd's network namespace, killed when
/// dropped.
struct NodeProcess(std::process::Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pod networking through CRI with real CNI plugins, on a containerd from
/// [`cri_net_options`] (bridge `cni0`, host-local, portmap, in a network
/// namespace of the instance). Pods `a` and `b` on `s.handler` with their
/// own networks (`a` with hostPort [`HOST_PORT`]), `r` on
/// `s.peer_handler` if given, each serving files with busybox httpd, and
/// `h`, a `hostNetwork` pod on `s.handler`:
/// - each pod's IP from `PodSandboxStatus` (`status.network.ip`) is in the
///   subnet, differs from the others', and is the address `ip -4 addr`
///   shows inside its container, with the subnet's prefix length;
/// - TCP both ways between `a` and `b`, and between `a` and `r`: the peer's
///   name and a [`BLOB_KIB`] KiB file with the right MD5;
/// - the pods' default route is through the bridge's address (the
///   gateway, `cni0`'s in containerd's namespace); each pod reaches a web
///   server of the test listening on it, and `ping`s it; the node (a
///   command in containerd's namespace, as a kubelet probe) reaches `a`
///   at its address and at hostPort [`HOST_PORT`] of the gateway address
///   (portmap's DNAT);
/// - `h` runs: per `s.host_network`, in containerd's own network namespace
///   (and reaches `a`), or with loopback only (and does not);
/// - after StopPodSandbox + RemovePodSandbox of every pod: the pods'
///   network namespaces are gone from /var/run/netns, no veth is left in
///   containerd's namespace, host-local holds no address (its reservations
///   are in the instance's directory, none in /var/lib/cni), no CNI
///   masquerade chain is left in its nat table, and nothing else of the
///   pods is left ([`wait_nothing_left`]).
pub fn scenario_pod_network(
    c: &Containerd,
    cri: &CriClient,
    s: &NetScenario,
) -> Result<NetTimings> {
    let mut t = NetTimings::default();
    let t0 = Instant::now();
    let net = CniNetwork::default();
    let subnet = parse_subnet(&net.subnet)?;
    let st = cri.call("RuntimeService/Status", json!({}))?;
    let conditions = st["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        conditions
            .iter()
            .any(|c| c["type"] == "NetworkReady" && c["status"] == true),
        "the CRI plugin's network is not ready (the conflist in {}?): {st}",
        c.dir().join("cni/net.d").display()
    );

    // The pods.
    let mut specs: Vec<(&str, &str, Network)> = vec![
        ("a", s.handler.as_str(), Network::Pod),
        ("b", s.handler.as_str(), Network::Pod),
    ];
    if let Some(peer) = &s.peer_handler {
        specs.push(("r", peer.as_str(), Network::Pod));
    }
    specs.push(("h", s.handler.as_str(), Network::Node));
    let mut pods = Vec::new();
    for (name, handler, network) in specs {
        let mut cfg = pod_config_in(c, name, network)?;
        if name == "a" {
            cfg["port_mappings"] = json!([{
                "protocol": "TCP", "container_port": POD_PORT, "host_port": HOST_PORT,
            }]);
        }
        let started = Instant::now();
        let id = cri
            .run_pod(&cfg, handler)
            .with_context(|| format!("RunPodSandbox of pod {name} on {handler}"))?;
        t.run_pod
            .push((format!("{name}/{handler}"), started.elapsed()));
        let st = cri.pod_status(&id)?;
        let status = &st["status"];
        ensure!(
            status["state"] == "SANDBOX_READY"
                && status["runtime_handler"] == handler
                && status["linux"]["namespaces"]["options"]["network"] == network.mode(),
            "pod {name} after RunPodSandbox: {status}"
        );
        let ip = status["network"]["ip"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let netns = cri.pod_netns_path(&id)?;
        if network == Network::Pod {
            let addr: std::net::Ipv4Addr = ip
                .parse()
                .with_context(|| format!("pod {name}'s IP {ip:?} (status {status})"))?;
            ensure!(
                in_subnet(addr, subnet),
                "pod {name}'s IP {ip} is not in the network's {}",
                net.subnet
            );
            let ns = netns
                .as_ref()
                .with_context(|| format!("pod {name} has no network namespace path"))?;
            ensure!(
                ns.starts_with("/var/run/netns") || ns.starts_with("/run/netns"),
                "pod {name}'s network namespace is {}",
                ns.display()
            );
        } else {
            eprintln!(
                "hostNetwork pod {name} on {handler}: PodSandboxStatus network {}, netns {netns:?}",
                status["network"]
            );
        }
        let cmd: Vec<String> = if network == Network::Pod {
            web_command(name)
        } else {
            PAUSE_CMD.iter().map(|a| a.to_string()).collect()
        };
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let ccfg = container_config_in("web", &cmd, &[], network);
        let ctr = cri.create_container(&id, &ccfg, &cfg)?;
        cri.start(&ctr)
            .with_context(|| format!("StartContainer in pod {name}"))?;
        pods.push(NetPod {
            name: name.to_owned(),
            id,
            ctr,
            ip,
            netns,
        });
    }
    let ips: Vec<&str> = pods
        .iter()
        .filter(|p| p.name != "h")
        .map(|p| p.ip.as_str())
        .collect();
    let mut distinct = ips.clone();
    distinct.sort_unstable();
    distinct.dedup();
    ensure!(distinct.len() == ips.len(), "pods share addresses: {ips:?}");
    // Every web server answers on its own loopback.
    for p in pods.iter().filter(|p| p.name != "h") {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            // An exec that overruns CRI's timeout on a loaded host is tried
            // again, like a refused connection, until the deadline.
            let r = cri.exec_sync(
                &p.ctr,
                &[
                    "timeout",
                    "5",
                    "wget",
                    "-q",
                    "-O-",
                    &format!("http://127.0.0.1:{POD_PORT}/id"),
                ],
                60,
            );
            if r.as_ref()
                .is_ok_and(|r| r.exit_code == 0 && r.stdout.trim() == p.name)
            {
                break;
            }
            if Instant::now() >= deadline {
                let ps = cri.exec_sync(&p.ctr, &["sh", "-c", &format!("ps; ls -l {WWW}")], 30);
                bail!(
                    "pod {}'s web server does not answer on 127.0.0.1:{POD_PORT}: {r:?}; \
                     its log: {:?}; its processes and files: {ps:?}",
                    p.name,
                    std::fs::read_to_string(c.dir().join("pods").join(&p.name).join("web.log"))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    t.setup = t0.elapsed();
    let t1 = Instant::now();
    let pod = |name: &str| pods.iter().find(|p| p.name == name);
    let (a, b) = (pod("a").context("pod a")?, pod("b").context("pod b")?);
    let h = pod("h").context("pod h")?;
    let with_ip: Vec<&NetPod> = pods.iter().filter(|p| p.name != "h").collect();

    // The pod's IP is its container's address.
    for p in &with_ip {
        let out = exec_ok(cri, &p.ctr, &["ip", "-o", "-4", "addr", "show"])?;
        let addrs = ipv4_addrs(&out);
        let want = format!("{}/{}", p.ip, subnet.1);
        ensure!(
            addrs.iter().any(|(_, a)| *a == want),
            "pod {}: PodSandboxStatus says {}, `ip -4 addr` inside shows {addrs:?}",
            p.name,
            p.ip
        );
        let ifc = exec_ok(cri, &p.ctr, &["ifconfig"])?;
        ensure!(
            ifc.contains(&format!("inet addr:{} ", p.ip)),
            "pod {}: ifconfig does not show {}: {ifc}",
            p.name,
            p.ip
        );
        eprintln!("pod {} ({}): {addrs:?}", p.name, p.ip);
    }

    // TCP between the pods.
    check_tcp(cri, a, b)?;
    check_tcp(cri, b, a)?;
    if let Some(r) = pod("r") {
        check_tcp(cri, a, r)?;
        check_tcp(cri, r, a)?;
    }

    // The gateway: cni0's address in containerd's namespace.
    let bridge = node_ok(c, "ip", &["-o", "-4", "addr", "show", "dev", &net.bridge])?;
    let gw = ipv4_addrs(&bridge)
        .first()
        .and_then(|(_, a)| a.split('/').next().map(str::to_owned))
        .with_context(|| format!("no IPv4 address on {}: {bridge:?}", net.bridge))?;
    for p in &with_ip {
        let route = exec_ok(cri, &p.ctr, &["ip", "-4", "route", "show", "default"])?;
        ensure!(
            route
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w == ["via", gw.as_str()]),
            "pod {}'s default route is not through the gateway {gw}: {route:?}",
            p.name
        );
    }
    // On a PVM host, a VM's kernel sends 64 KB TCP segments
    // (guest-kernel/cmdline-pvm.txt's sysctl): the pods' namespace is the VM's.
    if s.host_network == HostNetwork::LoopbackOnly && Path::new("/sys/module/kvm_pvm").exists() {
        for p in [a, b] {
            let v = exec_ok(cri, &p.ctr, &["cat", "/proc/sys/net/ipv4/tcp_min_tso_segs"])?;
            ensure!(
                v.trim() == "44",
                "pod {}: net.ipv4.tcp_min_tso_segs is {v:?}, not the PVM command line's 44",
                p.name
            );
        }
    }
    let www = c.dir().join("node-www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("id"), "node\n")?;
    let mut cmd = c.in_netns("busybox")?;
    cmd.args(["httpd", "-f", "-p", &format!("{gw}:{NODE_PORT}"), "-h"])
        .arg(&www)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let node_httpd = NodeProcess(
        cmd.spawn()
            .context("starting busybox httpd in containerd's namespace")?,
    );
    let node_url = format!("http://{gw}:{NODE_PORT}/id");
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_ok(
        c,
        "busybox",
        &["timeout", "2", "busybox", "wget", "-q", "-O-", &node_url],
    )
    .is_err()
    {
        ensure!(
            Instant::now() < deadline,
            "the node's httpd on {node_url} does not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in &with_ip {
        let body = fetch(cri, &p.ctr, &node_url)
            .with_context(|| format!("pod {} -> the gateway {gw}", p.name))?;
        ensure!(
            body.trim() == "node",
            "pod {} fetched {node_url}: {body:?}",
            p.name
        );
        let ping = exec_ok(cri, &p.ctr, &["ping", "-c", "1", "-W", "10", &gw])
            .with_context(|| format!("pod {} pings the gateway {gw}", p.name))?;
        ensure!(
            ping.contains("1 packets received"),
            "pod {} ping {gw}: {ping}",
            p.name
        );
    }
    drop(node_httpd);
    // The node reaches pod a at its address and at its hostPort.
    for url in [
        format!("http://{}:{POD_PORT}/id", a.ip),
        format!("http://{gw}:{HOST_PORT}/id"),
    ] {
        let body = node_ok(
            c,
            "busybox",
            &["timeout", "20", "busybox", "wget", "-q", "-O-", &url],
        )
        .with_context(|| format!("the node -> pod a at {url}"))?;
        ensure!(body.trim() == "a", "the node fetched {url}: {body:?}");
    }

    // The hostNetwork pod.
    let addr = exec_ok(cri, &h.ctr, &["ip", "addr"])?;
    let links = exec_ok(cri, &h.ctr, &["ip", "-o", "link"])?;
    eprintln!("hostNetwork pod h on {}: `ip addr`:\n{addr}", s.handler);
    let to_a = cri.exec_sync(
        &h.ctr,
        &[
            "timeout",
            "5",
            "wget",
            "-q",
            "-O-",
            &format!("http://{}:{POD_PORT}/id", a.ip),
        ],
        60,
    )?;
    match s.host_network {
        HostNetwork::NodeNamespace => {
            let inside = exec_ok(cri, &h.ctr, &["readlink", "/proc/self/ns/net"])?;
            let node = std::fs::read_link(format!("/proc/{}/ns/net", c.pid()))
                .context("containerd's network namespace")?;
            ensure!(
                inside.trim() == node.to_string_lossy(),
                "hostNetwork pod h is in {}, containerd in {}",
                inside.trim(),
                node.display()
            );
            ensure!(
                to_a.exit_code == 0 && to_a.stdout.trim() == "a",
                "hostNetwork pod h does not reach pod a: {to_a:?}"
            );
        }
        HostNetwork::LoopbackOnly => {
            let v4 = ipv4_addrs(&exec_ok(cri, &h.ctr, &["ip", "-o", "-4", "addr"])?);
            ensure!(
                v4 == [("lo".to_owned(), "127.0.0.1/8".to_owned())],
                "hostNetwork pod h: want only 127.0.0.1/8 on lo, `ip -4 addr` shows {v4:?}"
            );
            for l in links.lines() {
                let name = l.split(':').nth(1).unwrap_or_default().trim();
                let flags = l
                    .split('<')
                    .nth(1)
                    .and_then(|f| f.split('>').next())
                    .unwrap_or_default();
                let up = flags.split(',').any(|f| f == "UP");
                ensure!(
                    (name == "lo") == up,
                    "hostNetwork pod h: want lo up and every other link down, got {links}"
                );
            }
            ensure!(
                to_a.exit_code != 0,
                "hostNetwork pod h (loopback only) reached pod a: {to_a:?}"
            );
        }
    }
    t.checks = t1.elapsed();

    // host-local's reservations are in the instance's directory.
    let t2 = Instant::now();
    let ipam = c.cni_ipam_dir().join(&net.name);
    let reserved = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
            .collect()
    };
    let mut held = reserved(&ipam);
    held.sort();
    let mut want: Vec<String> = with_ip.iter().map(|p| p.ip.clone()).collect();
    want.sort();
    ensure!(
        held == want,
        "host-local's reservations in {}: {held:?}, want the pods' {want:?}",
        ipam.display()
    );
    let netns: Vec<PathBuf> = pods.iter().filter_map(|p| p.netns.clone()).collect();
    for p in &pods {
        cri.stop_pod(&p.id)
            .with_context(|| format!("StopPodSandbox of pod {}", p.name))?;
        cri.remove_pod(&p.id)
            .with_context(|| format!("RemovePodSandbox of pod {}", p.name))?;
    }
    let left: Vec<&PathBuf> = netns
        .iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    ensure!(
        left.is_empty(),
        "the pods' network namespaces are left: {left:?}"
    );
    let veths = node_ok(c, "ip", &["-o", "link", "show", "type", "veth"])?;
    ensure!(
        veths.trim().is_empty(),
        "veths left in containerd's namespace: {veths}"
    );
    let held = reserved(&ipam);
    ensure!(
        held.is_empty(),
        "host-local still holds {held:?} in {}",
        ipam.display()
    );
    let system = Path::new("/var/lib/cni/networks").join(&net.name);
    ensure!(!system.exists(), "host-local wrote {}", system.display());
    let nat = node_ok(c, "iptables", &["-t", "nat", "-S"])?;
    let chains: Vec<&str> = nat
        .lines()
        .filter(|l| l.starts_with("-N CNI-") && !l.starts_with("-N CNI-HOSTPORT-"))
        .collect();
    ensure!(
        chains.is_empty(),
        "CNI chains left in the nat table: {chains:?}\n{nat}"
    );
    let hostports: Vec<&str> = nat
        .lines()
        .filter(|l| {
            l.starts_with("-A CNI-DN-")
                || (l.starts_with("-A CNI-HOSTPORT-DNAT") && l.contains("-j CNI-DN-"))
        })
        .collect();
    ensure!(
        hostports.is_empty(),
        "hostPort rules left in the nat table: {hostports:?}"
    );
    wait_nothing_left(c, cri, Duration::from_secs(30))?;
    t.teardown = t2.elapsed();
    Ok(t)
}

/// The link names in the test's (the host's) network namespace.
fn host_links() -> Result<Vec<String>> {
    let out = containerd::run_with_timeout(
        {
            let mut c = Command::new("ip");
            c.args(["-o", "link", "show"]);
            c
        },
        None,
        Duration::from_secs(20),
    )?;
    ensure!(
        out.status.success(),
        "ip -o link show: {}",
        containerd::describe(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_owned())
        .collect())
}

/// [`scenario_pod_network`] in a private containerd ([`cri_net_options`])
/// with `runtimes` (`s`'s handlers among them), then the checks that
/// nothing of the instance is left ([`with_cri`]: its network namespace
/// too), and that the host's network namespace has no `cni0` and no veth
/// it did not have before.
pub fn run_net_scenario(
    test: &str,
    runtimes: Vec<CriRuntime>,
    path_prepend: Option<PathBuf>,
    s: &NetScenario,
) {
    let before = host_links().expect("the host's links");
    let opts = cri_net_options(runtimes, path_prepend);
    let t = Instant::now();
    with_cri(test, &opts, |c, cri| {
        let t = scenario_pod_network(c, cri, s)?;
        eprintln!("[{test}] {t}");
        Ok(())
    });
    eprintln!("[{test}] {:.1} s in all", t.elapsed().as_secs_f64());
    let after = host_links().expect("the host's links");
    let new: Vec<&String> = after
        .iter()
        .filter(|l| !before.contains(l) && (l.as_str() == "cni0" || l.starts_with("veth")))
        .collect();
    assert!(
        new.is_empty() && !after.iter().any(|l| l == "cni0"),
        "{test}: links in the host's network namespace: {new:?} (all: {after:?})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_keep_stdout_text() {
        let dir = std::env::temp_dir().join(format!("rtv-cri-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("c.log");
        std::fs::write(
            &log,
            "2026-01-01T00:00:00.1Z stdout F hello world\n\
             2026-01-01T00:00:00.2Z stderr F oops\n\
             2026-01-01T00:00:00.3Z stdout F \n",
        )
        .unwrap();
        let lines = stdout_log_lines(&log).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(lines, ["hello world", ""]);
    }

    #[test]
    fn subnets_and_ip_addr_output() {
        let net = parse_subnet("10.88.0.0/16").unwrap();
        assert!(in_subnet("10.88.3.4".parse().unwrap(), net));
        assert!(!in_subnet("10.89.0.1".parse().unwrap(), net));
        assert!(parse_subnet("10.88.0.0").is_err());
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                   2: eth0    inet 10.88.0.2/16 brd 10.88.255.255 scope global eth0\n";
        assert_eq!(
            ipv4_addrs(out),
            [
                ("lo".to_owned(), "127.0.0.1/8".to_owned()),
                ("eth0".to_owned(), "10.88.0.2/16".to_owned())
            ]
        );
    }

    #[test]
    fn pod_configs_ask_for_the_network() {
        let net = container_config_in("x", &["true"], &[], Network::Pod);
        assert_eq!(
            net["linux"]["security_context"]["namespace_options"]["network"],
            "POD"
        );
        let node = container_config("x", &["true"], &[]);
        assert_eq!(
            node["linux"]["security_context"]["namespace_options"]["network"],
            "NODE"
        );
        let o = cri_net_options(Vec::new(), None);
        assert!(o.private_netns);
        assert_eq!(o.cni_network.unwrap().bridge, "cni0");
    }

    #[test]
    fn container_config_has_the_command_and_env() {
        let c = container_config("x", &["sh", "-c", "exit 1"], &[("A", "b")]);
        assert_eq!(c["command"], json!(["sh", "-c", "exit 1"]));
        assert_eq!(c["envs"], json!([{"key": "A", "value": "b"}]));
        assert_eq!(c["image"]["image"], BUSYBOX_REF);
        assert_eq!(c["log_path"], "x.log");
    }

    #[test]
    fn cri_options_make_the_first_handler_the_default() {
        let o = cri_options(vec![CriRuntime::rtv()], Some("/opt/rtv/bin".into()));
        let cri = o.cri.as_ref().unwrap();
        assert_eq!(cri.default_runtime, "rtv");
        assert_eq!(cri.sandbox_image, PAUSE_REF);
        assert_eq!(o.path_prepend.as_deref(), Some(Path::new("/opt/rtv/bin")));
        let toml = containerd::config_toml(Path::new("/tmp/x"), Some(cri));
        assert!(toml.contains("runtime_type = \"io.containerd.rtv.v2\""));
    }
}
