//! The host side of the agent protocol (`rtv_protocol`), on tokio.
//!
//! The agent is reached through the VMM's hybrid vsock socket (write
//! `CONNECT <port>\n`, read `OK <hostport>\n`, then the byte stream), or
//! through a plain Unix socket when the agent runs on the host in tests.
//! Dialling retries until a deadline, so a client can be started while the
//! guest is still booting.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;
use rtv_protocol::{
    decode, encode, frame_len, ContainerState, ContainerStats, CreateContainer, ErrorKind,
    ExecInContainer, ExecRequest, ExitStatus, FrameError, GuestInfo, Hello, HelloReply, Request,
    RequestBody, Response, ResponseBody, StreamKind, WindowSize, AGENT_PORT, PROTOCOL_VERSION,
};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// How often a dial is retried while the agent is not reachable yet.
const DIAL_RETRY: Duration = Duration::from_millis(10);
/// How long one hybrid handshake or hello may take once connected (a busy
/// guest whose kernel code is emulated can take seconds to answer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long attaching a stream may take.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Through a VMM's hybrid vsock Unix socket, to a guest port.
    Hybrid {
        /// The VMM's vsock socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
    },
    /// A Unix socket the agent listens on directly.
    Unix(PathBuf),
}

impl Endpoint {
    /// The agent of the VM whose vsock socket is `uds`.
    pub fn vm(uds: impl Into<PathBuf>) -> Self {
        Endpoint::Hybrid {
            uds: uds.into(),
            port: AGENT_PORT,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Hybrid { uds, port } => write!(f, "vsock port {port} via {}", uds.display()),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached before the deadline.
    #[error("agent at {endpoint} not reachable within {waited:?}: {last}")]
    Unreachable {
        /// Where.
        endpoint: String,
        /// How long we tried.
        waited: Duration,
        /// The last error seen.
        last: String,
    },
    /// The agent refused the connection (version mismatch, unknown process).
    #[error("agent refused: {0}")]
    Refused(String),
    /// A frame could not be read or written.
    #[error("agent protocol: {0}")]
    Frame(#[from] FrameError),
    /// The agent answered a request with an error.
    #[error("agent: {message}")]
    Agent {
        /// The kind of failure.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
    /// The control connection ended.
    #[error("the agent's control connection closed")]
    Disconnected,
    /// The agent left a request unanswered past the client's watchdog
    /// ([`AgentClient::set_watchdog`]): the guest is taken as hung.
    #[error("the agent did not answer {request} within {} s", after.as_secs())]
    NoAnswer {
        /// The request's kind.
        request: String,
        /// How long it waited.
        after: Duration,
    },
    /// The agent answered with something that does not fit the request.
    #[error("unexpected reply from the agent: {0}")]
    Unexpected(String),
    /// An I/O error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame from an async stream.
pub async fn read_frame_async<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]).await? {
            0 if got == 0 => return Err(FrameError::Closed),
            0 => return Err(FrameError::Truncated { got, want: 4 }),
            n => got += n,
        }
    }
    let len = frame_len(prefix)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut body[got..]).await? {
            0 => return Err(FrameError::Truncated { got, want: len }),
            n => got += n,
        }
    }
    decode(&body)
}

/// One connection attempt; the VMM's reply to `CONNECT` may take up to
/// `handshake`.
async fn connect_once(endpoint: &Endpoint, handshake: Duration) -> Result<UnixStream, String> {
    match endpoint {
        Endpoint::Unix(path) => UnixStream::connect(path).await.map_err(|e| e.to_string()),
        Endpoint::Hybrid { uds, port } => {
            let mut s = UnixStream::connect(uds).await.map_err(|e| e.to_string())?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            // Read the reply a byte at a time: what follows it is the stream.
            let mut line = Vec::new();
            let read_line = async {
                loop {
                    let mut b = [0u8; 1];
                    match s.read(&mut b).await {
                        Ok(0) => {
                            return Err(
                                "connection closed by the VMM (nobody listening on the port?)"
                                    .to_string(),
                            )
                        }
                        Ok(_) if b[0] == b'\n' => return Ok(()),
                        Ok(_) if line.len() < 64 => line.push(b[0]),
                        Ok(_) => return Err("overlong reply from the VMM".to_string()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
            };
            tokio::time::timeout(handshake, read_line)
                .await
                .map_err(|_| "no reply to CONNECT".to_string())??;
            let reply = String::from_utf8_lossy(&line);
            if reply.starts_with("OK ") {
                Ok(s)
            } else {
                Err(format!("VMM answered {reply:?} to CONNECT {port}"))
            }
        }
    }
}

/// Connects to the agent, retrying until `deadline` while nobody answers,
/// and exchanges hellos. Once the guest has accepted the connection the
/// hello is not sent again: attaching a stream is not idempotent, and a
/// busy guest may take long to answer: each answer may take `handshake`
/// even past the deadline.
async fn dial(
    endpoint: &Endpoint,
    hello: &Hello,
    deadline: Instant,
    handshake: Duration,
) -> Result<UnixStream, ClientError> {
    let started = Instant::now();
    let mut s = loop {
        match connect_once(endpoint, handshake).await {
            Ok(s) => break s,
            Err(last) if Instant::now() >= deadline => {
                return Err(ClientError::Unreachable {
                    endpoint: endpoint.to_string(),
                    waited: started.elapsed(),
                    last,
                })
            }
            Err(_) => tokio::time::sleep(DIAL_RETRY).await,
        }
    };
    s.write_all(&encode(hello)?).await?;
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(handshake);
    match tokio::time::timeout(wait, read_frame_async::<_, HelloReply>(&mut s)).await {
        Ok(Ok(HelloReply::Ok { .. })) => Ok(s),
        Ok(Ok(HelloReply::Refused { reason })) => Err(ClientError::Refused(reason)),
        Ok(Err(e)) => Err(ClientError::Frame(e)),
        Err(_) => Err(ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            waited: started.elapsed(),
            last: format!("no answer to the hello within {wait:?}"),
        }),
    }
}

/// A request's kind, as its variant's name (`CreateContainer`).
fn request_kind(body: &RequestBody) -> String {
    let text = format!("{body:?}");
    let end = text
        .find(|c: char| !c.is_alphanumeric() && c != '_')
        .unwrap_or(text.len());
    text[..end].to_owned()
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<ResponseBody>>>>>;

/// A container's process started by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Its handle for later requests.
    pub exec_id: u64,
    /// Its pid in the guest.
    pub pid: i32,
    /// The spec's fields the agent accepted but did not apply, each with
    /// the reason, for the log.
    pub not_applied: Vec<String>,
}

/// The answer to a request sent with [`AgentClient::send`], to come.
pub struct Reply(oneshot::Receiver<ResponseBody>);

impl Reply {
    /// Waits for the answer; an agent error is `ClientError::Agent`.
    pub async fn get(self) -> Result<ResponseBody, ClientError> {
        match self.0.await.map_err(|_| ClientError::Disconnected)? {
            ResponseBody::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            other => Ok(other),
        }
    }
}

/// A `WaitOom` in flight ([`AgentClient::send_wait_oom`]).
pub struct OomWait(Reply);

impl OomWait {
    /// Waits for its answer: the container's state.
    pub async fn result(self) -> Result<ContainerState, ClientError> {
        match self.0.get().await? {
            ResponseBody::ContainerState(s) => Ok(s),
            other => AgentClient::unexpected(other),
        }
    }
}

/// What a client does about an agent that stops answering: when a request
/// (other than a wait for a process or an OOM kill, which may rightly take
/// forever) is unanswered for `timeout`, the client asks the agent for its
/// version; answered, it goes on waiting (the agent is alive, the request
/// slow); unanswered for `timeout` again, the request fails with
/// [`ClientError::NoAnswer`], after `on_silence` ran once with the
/// request's kind (the pod's stops the hung VM, so everything waiting on
/// it ends too).
pub struct Watchdog {
    /// How long an answer may take.
    pub timeout: Duration,
    /// Run once, off the async runtime, at the first unanswered request.
    pub on_silence: Box<dyn Fn(&str) + Send + Sync>,
}

/// A control connection to the agent.
pub struct AgentClient {
    endpoint: Endpoint,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    watchdog: std::sync::OnceLock<Arc<Watchdog>>,
    silenced: std::sync::atomic::AtomicBool,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl AgentClient {
    /// Opens a connection to the agent without a hello (for tests of the
    /// agent's input handling), retrying for up to `timeout`.
    pub async fn connect_raw(
        endpoint: &Endpoint,
        timeout: Duration,
    ) -> Result<UnixStream, ClientError> {
        let started = Instant::now();
        loop {
            match connect_once(endpoint, HANDSHAKE_TIMEOUT).await {
                Ok(s) => return Ok(s),
                Err(last) if started.elapsed() >= timeout => {
                    return Err(ClientError::Unreachable {
                        endpoint: endpoint.to_string(),
                        waited: started.elapsed(),
                        last,
                    })
                }
                Err(_) => tokio::time::sleep(DIAL_RETRY).await,
            }
        }
    }

    /// Opens a connection and sends `hello`; the stream after an accepted
    /// hello is returned as it is.
    pub async fn connect_with_hello(
        endpoint: &Endpoint,
        hello: &Hello,
        timeout: Duration,
    ) -> Result<UnixStream, ClientError> {
        dial(endpoint, hello, Instant::now() + timeout, HANDSHAKE_TIMEOUT).await
    }

    /// Connects to the agent at `endpoint`, retrying for up to `timeout`
    /// (the agent may then take a minute more to answer: a booting guest).
    pub async fn connect(endpoint: Endpoint, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_within(endpoint, timeout, HANDSHAKE_TIMEOUT).await
    }

    /// Connects to the agent of a running guest, which must answer within
    /// `timeout` (connecting and exchanging hellos included).
    pub async fn connect_answering(
        endpoint: Endpoint,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::connect_within(endpoint, timeout, timeout).await
    }

    async fn connect_within(
        endpoint: Endpoint,
        timeout: Duration,
        handshake: Duration,
    ) -> Result<Self, ClientError> {
        let hello = Hello::Control {
            version: PROTOCOL_VERSION,
        };
        let stream = dial(&endpoint, &hello, Instant::now() + timeout, handshake).await?;
        let (mut read, writer) = stream.into_split();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let table = pending.clone();
        let reader = tokio::spawn(async move {
            loop {
                match read_frame_async::<_, Response>(&mut read).await {
                    Ok(resp) => {
                        let tx = table
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_mut()
                            .and_then(|m| m.remove(&resp.id));
                        match tx {
                            Some(tx) => {
                                let _ = tx.send(resp.body);
                            }
                            None => tracing::warn!(
                                id = resp.id,
                                "agent reply to no pending request: {:?}",
                                resp.body
                            ),
                        }
                    }
                    Err(e) => {
                        if !matches!(e, FrameError::Closed) {
                            tracing::warn!("agent control connection: {e}");
                        }
                        // Fail every pending and future request.
                        table.lock().unwrap_or_else(|p| p.into_inner()).take();
                        return;
                    }
                }
            }
        });
        Ok(Self {
            endpoint,
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            reader,
            watchdog: std::sync::OnceLock::new(),
            silenced: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Watches this connection's requests from now on (the first watchdog
    /// set stays; `false` if one was set already).
    pub fn set_watchdog(&self, w: Watchdog) -> bool {
        self.watchdog.set(Arc::new(w)).is_ok()
    }

    /// Sends a request and waits for its response, within the watchdog's
    /// timeout unless it waits for a process or an OOM kill.
    pub async fn call(&self, body: RequestBody) -> Result<ResponseBody, ClientError> {
        let watchdog = match body {
            RequestBody::Wait { .. } | RequestBody::WaitOom { .. } => None,
            _ => self.watchdog.get().cloned(),
        };
        let Some(w) = watchdog else {
            return self.send(body, None).await?.get().await;
        };
        let request = request_kind(&body);
        let reply = match tokio::time::timeout(w.timeout, self.send(body, None)).await {
            Ok(sent) => sent?,
            Err(_) => return Err(self.silent(&w, request).await),
        };
        let answer = reply.get();
        tokio::pin!(answer);
        loop {
            if let Ok(r) = tokio::time::timeout(w.timeout, &mut answer).await {
                return r;
            }
            // Slow, or hung? A request may rightly take long (a container's
            // creation in a loaded guest), but a live agent answers a
            // version request at once, from its connection's thread.
            let ping = async { self.send(RequestBody::Version, None).await?.get().await };
            match tokio::time::timeout(w.timeout, ping).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(self.silent(&w, request).await),
            }
        }
    }

    /// The watchdog's verdict on an agent that left `request` (and a
    /// version request after it) unanswered: its action, once per client.
    async fn silent(&self, w: &Arc<Watchdog>, request: String) -> ClientError {
        if !self.silenced.swap(true, Ordering::SeqCst) {
            let (w, request) = (w.clone(), request.clone());
            let _ = tokio::task::spawn_blocking(move || (w.on_silence)(&request)).await;
        }
        ClientError::NoAnswer {
            request,
            after: w.timeout,
        }
    }

    /// Sends a request and returns once it is written, before the answer
    /// comes: requests sent later on this client reach the agent after it.
    /// `wait` bounds how long the agent lets it wait for other requests on
    /// its container (the agent's default without).
    pub async fn send(
        &self,
        body: RequestBody,
        wait: Option<Duration>,
    ) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(m) => m.insert(id, tx),
            None => return Err(ClientError::Disconnected),
        };
        let frame = encode(&Request {
            id,
            body,
            wait_ms: wait.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
        })?;
        let sent = self.writer.lock().await.write_all(&frame).await;
        if let Err(e) = sent {
            if let Some(m) = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                m.remove(&id);
            }
            return Err(e.into());
        }
        Ok(Reply(rx))
    }

    fn unexpected<T>(body: ResponseBody) -> Result<T, ClientError> {
        Err(ClientError::Unexpected(format!("{body:?}")))
    }

    /// The agent's protocol and build versions.
    pub async fn version(&self) -> Result<(u32, String), ClientError> {
        match self.call(RequestBody::Version).await? {
            ResponseBody::Version { protocol, agent } => Ok((protocol, agent)),
            other => Self::unexpected(other),
        }
    }

    /// Starts a process; returns its exec id and guest pid.
    pub async fn exec(&self, req: ExecRequest) -> Result<(u64, i32), ClientError> {
        match self.call(RequestBody::Exec(req)).await? {
            ResponseBody::Started { exec_id, pid, .. } => Ok((exec_id, pid)),
            other => Self::unexpected(other),
        }
    }

    /// Waits for a process to end.
    pub async fn wait(&self, exec_id: u64) -> Result<ExitStatus, ClientError> {
        match self.call(RequestBody::Wait { exec_id }).await? {
            ResponseBody::Exited(status) => Ok(status),
            other => Self::unexpected(other),
        }
    }

    async fn expect_ok(&self, body: RequestBody) -> Result<(), ClientError> {
        match self.call(body).await? {
            ResponseBody::Ok => Ok(()),
            other => Self::unexpected(other),
        }
    }

    /// Sends a signal to a process.
    pub async fn signal(&self, exec_id: u64, signal: i32) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::Signal { exec_id, signal })
            .await
    }

    /// Resizes a process's terminal.
    pub async fn resize(&self, exec_id: u64, size: WindowSize) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::ResizeTty { exec_id, size })
            .await
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, exec_id: u64) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::CloseStdin { exec_id }).await
    }

    /// Facts about the guest.
    pub async fn guest_info(&self) -> Result<GuestInfo, ClientError> {
        match self.call(RequestBody::GuestInfo).await? {
            ResponseBody::GuestInfo(info) => Ok(info),
            other => Self::unexpected(other),
        }
    }

    /// Asks the agent to power the VM off. The agent answers and powers
    /// off at once, so the answer can be lost with the VM (its last vsock
    /// packet is not always carried out before the VMM exits): a
    /// connection that ends instead of answering is the VM going away,
    /// which is what was asked.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        match self.expect_ok(RequestBody::Shutdown).await {
            Err(ClientError::Disconnected) => Ok(()),
            other => other,
        }
    }

    /// A `Started` answer, or an unexpected one.
    fn started(body: ResponseBody) -> Result<Started, ClientError> {
        match body {
            ResponseBody::Started {
                exec_id,
                pid,
                not_applied,
            } => Ok(Started {
                exec_id,
                pid,
                not_applied,
            }),
            other => Self::unexpected(other),
        }
    }

    /// Creates a container; returns its init process's exec id and pid,
    /// and the spec's fields the agent accepted but did not apply.
    pub async fn create_container(&self, req: CreateContainer) -> Result<Started, ClientError> {
        Self::started(
            self.call(RequestBody::CreateContainer(Box::new(req)))
                .await?,
        )
    }

    /// Configures the guest's network (its NIC, routes and neighbours).
    pub async fn configure_network(
        &self,
        config: rtv_protocol::NetworkConfig,
    ) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::ConfigureNetwork(config)).await
    }

    /// Starts a created container.
    pub async fn start_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::StartContainer {
            container_id: container_id.into(),
        })
        .await
    }

    /// Runs another process in a running container.
    pub async fn exec_in_container(&self, req: ExecInContainer) -> Result<Started, ClientError> {
        Self::started(
            self.call(RequestBody::ExecInContainer(Box::new(req)))
                .await?,
        )
    }

    /// Signals a container's init, or all its processes.
    pub async fn signal_container(
        &self,
        container_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::SignalContainer {
            container_id: container_id.into(),
            signal,
            all,
        })
        .await
    }

    /// A container's state.
    pub async fn container_state(&self, container_id: &str) -> Result<ContainerState, ClientError> {
        match self
            .call(RequestBody::ContainerState {
                container_id: container_id.into(),
            })
            .await?
        {
            ResponseBody::ContainerState(s) => Ok(s),
            other => Self::unexpected(other),
        }
    }

    /// Waits until the OOM killer has killed more than `seen` processes of
    /// a container, or the container has no process left; its state then
    /// (`oom_kills` tells which). Other calls on this client go on
    /// meanwhile.
    pub async fn wait_oom(
        &self,
        container_id: &str,
        seen: u64,
    ) -> Result<ContainerState, ClientError> {
        self.send_wait_oom(container_id, seen).await?.result().await
    }

    /// Sends a [`AgentClient::wait_oom`] and returns once it is sent. The
    /// agent arms the wait before it reads the next request on this
    /// client's connection, so a kill that a later call causes is reported.
    pub async fn send_wait_oom(
        &self,
        container_id: &str,
        seen: u64,
    ) -> Result<OomWait, ClientError> {
        let body = RequestBody::WaitOom {
            container_id: container_id.into(),
            seen,
        };
        Ok(OomWait(self.send(body, None).await?))
    }

    /// The guest pids of a container's processes.
    pub async fn container_pids(&self, container_id: &str) -> Result<Vec<i32>, ClientError> {
        match self
            .call(RequestBody::ContainerPids {
                container_id: container_id.into(),
            })
            .await?
        {
            ResponseBody::Pids(p) => Ok(p),
            other => Self::unexpected(other),
        }
    }

    /// Freezes (`true`) or thaws a container.
    pub async fn pause_container(
        &self,
        container_id: &str,
        pause: bool,
    ) -> Result<(), ClientError> {
        let container_id = container_id.into();
        self.expect_ok(if pause {
            RequestBody::PauseContainer { container_id }
        } else {
            RequestBody::ResumeContainer { container_id }
        })
        .await
    }

    /// Changes a container's cgroup limits.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources: LinuxResources,
    ) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::UpdateContainer {
            container_id: container_id.into(),
            resources: Box::new(resources),
        })
        .await
    }

    /// A container's resource usage.
    pub async fn container_stats(&self, container_id: &str) -> Result<ContainerStats, ClientError> {
        match self
            .call(RequestBody::ContainerStats {
                container_id: container_id.into(),
            })
            .await?
        {
            ResponseBody::Stats(s) => Ok(s),
            other => Self::unexpected(other),
        }
    }

    /// Removes a container (`force` kills it first).
    pub async fn delete_container(
        &self,
        container_id: &str,
        force: bool,
    ) -> Result<(), ClientError> {
        self.expect_ok(RequestBody::DeleteContainer {
            container_id: container_id.into(),
            force,
        })
        .await
    }

    /// Opens one of a process's stdio streams on its own connection.
    pub async fn attach(
        &self,
        exec_id: u64,
        stream: StreamKind,
    ) -> Result<UnixStream, ClientError> {
        let hello = Hello::Stream {
            version: PROTOCOL_VERSION,
            exec_id,
            stream,
        };
        dial(
            &self.endpoint,
            &hello,
            Instant::now() + ATTACH_TIMEOUT,
            HANDSHAKE_TIMEOUT,
        )
        .await
    }
}
