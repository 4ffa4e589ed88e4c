//! The wire protocol between the host runtime and the guest agent, and
//! the names both sides (and the VMM, and the tests) share.
//!
//! Every connection goes to the agent's port ([`AGENT_PORT`] on vsock, or a
//! Unix socket when the agent runs on the host for tests) and starts with a
//! [`Hello`] frame, answered by a [`HelloReply`]. A `Hello::Control`
//! connection then carries [`Request`]s and [`Response`]s, matched by id, so
//! a blocking `Wait` never holds up other requests. A `Hello::Stream`
//! connection becomes one process's stdin, stdout or stderr as a raw byte
//! stream, so bulk output never blocks control messages.
//!
//! Frames are a 4-byte big-endian length followed by that many bytes of
//! JSON. A frame longer than [`MAX_FRAME`] is refused before it is read.

use std::io::{self, Read, Write};

use oci_spec::runtime::{LinuxResources, Process, Spec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of this protocol. Peers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 2;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The line the agent prints when it accepts connections: on the guest's
/// console (followed by ` uptime=<seconds>s`), where the VMM watches for it
/// to snapshot a template, or on stderr when it runs on the host.
pub const READY_LINE: &str = "rtv-agent: ready";
/// Longest container id.
pub const MAX_CONTAINER_ID: usize = 1024;

/// Whether `id` is a container id as runc accepts them (letters, digits,
/// `_`, `-`, `.`, `+`; not `.` or `..`; 1 to [`MAX_CONTAINER_ID`] bytes),
/// which makes it safe in paths on both sides.
pub fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CONTAINER_ID
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'))
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The connection ended inside a frame.
    #[error("truncated frame: connection ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// An I/O error.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hello {
    /// A control connection.
    Control {
        /// The client's protocol version.
        version: u32,
    },
    /// A stdio stream of a process started by `Exec`.
    Stream {
        /// The client's protocol version.
        version: u32,
        /// The process.
        exec_id: u64,
        /// Which stream.
        stream: StreamKind,
    },
}

impl Hello {
    /// The protocol version the peer speaks.
    pub fn version(&self) -> u32 {
        match self {
            Hello::Control { version } | Hello::Stream { version, .. } => *version,
        }
    }
}

/// The agent's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelloReply {
    /// Accepted.
    Ok {
        /// The agent's protocol version.
        version: u32,
    },
    /// Refused, with the reason (a version mismatch, an unknown process).
    Refused {
        /// Why.
        reason: String,
    },
}

/// One of a process's standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Standard input (to the terminal, with a TTY).
    Stdin,
    /// Standard output (the terminal's output, with a TTY).
    Stdout,
    /// Standard error (unused with a TTY).
    Stderr,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How to start a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Program and arguments; a program without `/` is looked up in PATH.
    pub argv: Vec<String>,
    /// Environment, `KEY=VALUE` each; nothing else is inherited.
    pub env: Vec<String>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// A terminal of this size instead of pipes.
    pub tty: Option<WindowSize>,
    /// Whether stdin will be attached (otherwise /dev/null).
    pub stdin: bool,
    /// Whether stdout will be attached (otherwise /dev/null).
    pub stdout: bool,
    /// Whether stderr will be attached (otherwise /dev/null; ignored with a TTY).
    pub stderr: bool,
}

/// The stdio of a container's process: pipes or a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Stdio {
    /// A terminal of this size instead of pipes.
    pub tty: Option<WindowSize>,
    /// Whether stdin will be attached (otherwise /dev/null).
    pub stdin: bool,
    /// Whether stdout will be attached (otherwise /dev/null).
    pub stdout: bool,
    /// Whether stderr will be attached (otherwise /dev/null; ignored with a TTY).
    pub stderr: bool,
}

/// Where the virtio-fs share (tag [`SHARE_TAG`]) is mounted in the guest.
pub const SHARE_MOUNTPOINT: &str = "/run/rtv/share";
/// The virtio-fs tag of a sandbox's shared directory.
pub const SHARE_TAG: &str = "rtvfs";

/// Create a container: its init process is set up and waits for
/// [`RequestBody::StartContainer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateContainer {
    /// The container's id (unique in the sandbox).
    pub container_id: String,
    /// Its OCI runtime spec. `root.path` is the root file system's path as
    /// the agent sees it (under [`SHARE_MOUNTPOINT`] in a guest); bind
    /// mount sources and namespace paths are guest paths too.
    pub spec: Spec,
    /// The init process's stdio.
    pub stdio: Stdio,
    /// Run the agent's built-in pause instead of the spec's process (a CRI
    /// pod's sandbox container, whose process only holds the pod's
    /// namespaces): of the spec only the namespaces, hostname, domainname,
    /// sysctls, oomScoreAdj and cgroup apply; no root file system or mount
    /// is set up, the pause runs from the create on (start only marks it
    /// started), and nothing can be exec'd in it. It ends on SIGTERM or
    /// SIGINT and reaps the orphans of the pod's pid namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub builtin_pause: bool,
}

/// The program name (`argv[0]`) that makes the agent's binary the
/// built-in pause (see [`CreateContainer::builtin_pause`]).
pub const PAUSE_ARGV0: &str = "rtv-pause";

/// Run another process in a running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInContainer {
    /// The container.
    pub container_id: String,
    /// The process, as in the OCI spec's `process`.
    pub process: Process,
    /// Its stdio.
    pub stdio: Stdio,
}

/// A container's state, as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    /// Set up; the init process waits to be started.
    Created,
    /// The init process runs.
    Running,
    /// Frozen (cgroup freezer).
    Paused,
    /// The init process has ended.
    Stopped,
}

/// What [`RequestBody::ContainerState`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    /// The container's id.
    pub container_id: String,
    /// Its status.
    pub status: ContainerStatus,
    /// The init process's pid in the guest (0 once reaped).
    pub pid: i32,
    /// The init process's exec id, for `Wait`, `Signal` and streams.
    pub exec_id: u64,
    /// How the init process ended, once it has.
    pub exit: Option<ExitStatus>,
    /// Processes of this container the kernel's OOM killer has killed.
    pub oom_kills: u64,
}

/// Resource usage of a container (from its cgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerStats {
    /// memory.current, in bytes.
    pub memory_bytes: u64,
    /// memory.max, in bytes (`None` for no limit).
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used, in microseconds.
    pub cpu_usage_usec: u64,
    /// pids.current.
    pub pids: u64,
    /// OOM kills (memory.events oom_kill).
    pub oom_kills: u64,
}

/// A request on a control connection.
///
/// Requests on one container are ordered, not refused for timing. A change
/// (create, start, pause, resume, update, delete) has the container to
/// itself; any other request on the container that arrives meanwhile waits
/// for it (at most `wait_ms`) and then acts on the state it left, so a
/// request that waited for a delete fails with `NoSuchContainer`. Execs run
/// side by side, and a change waits for those in progress. `WaitOom` waits
/// for no change and delays none; it is armed before the agent reads the
/// next request on the same connection, so a request sent after it (a
/// start, a signal) cannot cause a kill that it misses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What is asked.
    pub body: RequestBody,
    /// How long the request may wait for other requests on its container
    /// before it fails with `TimedOut` (default [`DEFAULT_WAIT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// How long a request waits for others on its container when it does not
/// say (see [`Request::wait_ms`]).
pub const DEFAULT_WAIT_MS: u64 = 120_000;

/// What a request asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestBody {
    /// The agent's version.
    Version,
    /// Start a process.
    Exec(ExecRequest),
    /// Wait for a process to end.
    Wait {
        /// The process.
        exec_id: u64,
    },
    /// Send a signal to a process.
    Signal {
        /// The process.
        exec_id: u64,
        /// Signal number.
        signal: i32,
    },
    /// Change a process's terminal size.
    ResizeTty {
        /// The process.
        exec_id: u64,
        /// New size.
        size: WindowSize,
    },
    /// Close a process's stdin.
    CloseStdin {
        /// The process.
        exec_id: u64,
    },
    /// Facts about the guest.
    GuestInfo,
    /// Power the VM off.
    Shutdown,
    /// Give the guest its own identity (a VM restored from a template has
    /// the template's): hostname, entropy credited to the kernel's RNG (which
    /// is then reseeded), and the wall clock. Only PID 1 of a guest does
    /// this; an agent on the host refuses (`InvalidRequest`).
    SetIdentity(Identity),
    /// Create a container; answered with `Started` for its init process.
    CreateContainer(Box<CreateContainer>),
    /// Let a created container's init process run its program.
    StartContainer {
        /// The container.
        container_id: String,
    },
    /// Start another process in a running container; answered with `Started`.
    ExecInContainer(Box<ExecInContainer>),
    /// Send a signal to a container's init process, or to all its processes.
    SignalContainer {
        /// The container.
        container_id: String,
        /// Signal number.
        signal: i32,
        /// Every process in the container, not only init.
        all: bool,
    },
    /// A container's state.
    ContainerState {
        /// The container.
        container_id: String,
    },
    /// The guest pids of a container's processes; answered with `Pids`.
    ContainerPids {
        /// The container.
        container_id: String,
    },
    /// Freeze a running container.
    PauseContainer {
        /// The container.
        container_id: String,
    },
    /// Thaw a paused container.
    ResumeContainer {
        /// The container.
        container_id: String,
    },
    /// Change a container's cgroup limits.
    UpdateContainer {
        /// The container.
        container_id: String,
        /// The new limits (fields left out are unchanged).
        resources: Box<LinuxResources>,
    },
    /// Waits until the OOM killer has killed more than `seen` processes of
    /// a container, or its processes are all gone; answered with
    /// `ContainerState` then. This replaces polling `ContainerState`:
    /// the agent sleeps until the kernel reports a change in the
    /// container's cgroup. A container without a cgroup is refused
    /// (`InvalidRequest`).
    WaitOom {
        /// The container.
        container_id: String,
        /// The OOM kills the caller has already seen.
        seen: u64,
    },
    /// A container's resource usage; answered with `Stats`.
    ContainerStats {
        /// The container.
        container_id: String,
    },
    /// Remove a container. It must be created or stopped unless `force`,
    /// which kills its processes first.
    DeleteContainer {
        /// The container.
        container_id: String,
        /// Kill it if it runs.
        force: bool,
    },
    /// Configure the guest's network from the pod's network namespace on
    /// the host: each NIC's MAC, MTU and addresses, then the routes and
    /// neighbour entries. Only PID 1 of a guest does this; an agent on the
    /// host refuses (`InvalidRequest`). Answered with `Ok`.
    ConfigureNetwork(NetworkConfig),
}

/// The guest's network, as the pod's network namespace on the host has it
/// (see [`RequestBody::ConfigureNetwork`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The NICs to configure.
    pub interfaces: Vec<NetInterface>,
    /// Routes, added in order after every interface is up (the sender puts
    /// routes without a gateway before routes through one).
    pub routes: Vec<NetRoute>,
    /// Neighbour (ARP/NDP) entries to seed, such as the gateway's.
    pub neighbours: Vec<NetNeighbour>,
}

/// One guest NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The MAC the VMM gave the NIC (a template's placeholder): how the
    /// agent finds it.
    pub device_mac: String,
    /// Its name in the guest (`eth0`).
    pub name: String,
    /// The MAC it takes: the host-side interface's, which the pod's network
    /// (a bridge) has learned.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses.
    pub addresses: Vec<IpNet>,
}

/// An address with its prefix length (`10.88.0.5/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    /// The address.
    pub addr: std::net::IpAddr,
    /// The prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix_len: u8,
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A route in the guest's main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// The destination; `None` is the default route of the gateway's
    /// family.
    pub dest: Option<IpNet>,
    /// The next hop, for a route through a gateway.
    pub gateway: Option<std::net::IpAddr>,
    /// The guest interface (by its name in [`NetInterface::name`]).
    pub interface: String,
    /// The preferred source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<std::net::IpAddr>,
    /// The route's metric (priority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// A permanent neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetNeighbour {
    /// The neighbour's address.
    pub ip: std::net::IpAddr,
    /// Its MAC.
    pub mac: String,
    /// The guest interface (by name).
    pub interface: String,
}

/// Parses a MAC written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Writes a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC of the NIC in rtv's VM templates, until the agent gives it the
/// pod's (locally administered: `02:` then "rtv" and 1).
pub const PLACEHOLDER_MAC: &str = "02:72:74:76:00:01";

/// A sandbox's identity, set by [`RequestBody::SetIdentity`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The guest's hostname (1 to [`MAX_HOSTNAME`] bytes).
    pub hostname: String,
    /// Random bytes from the host (at least [`MIN_ENTROPY`], at most
    /// [`MAX_ENTROPY`]), credited to the guest's RNG in full.
    pub entropy: Vec<u8>,
    /// The host's wall clock when the request was made, in nanoseconds since
    /// the Unix epoch.
    pub unix_time_ns: u64,
}

/// Longest hostname the guest kernel takes.
pub const MAX_HOSTNAME: usize = 64;
/// Fewest entropy bytes a `SetIdentity` must carry.
pub const MIN_ENTROPY: usize = 32;
/// Most entropy bytes a `SetIdentity` may carry.
pub const MAX_ENTROPY: usize = 4096;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl ExitStatus {
    /// The status as a shell reports it: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Facts about the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// `uname -r`.
    pub kernel: String,
    /// MemTotal in KiB.
    pub mem_total_kib: u64,
    /// Seconds since boot.
    pub uptime_secs: f64,
    /// The agent's version string.
    pub agent_version: String,
    /// The guest's wall clock, in nanoseconds since the Unix epoch (0 from
    /// an agent that does not report it).
    #[serde(default)]
    pub unix_time_ns: u64,
}

/// The kind of a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The program (or working directory) does not exist.
    NotFound,
    /// The program exists but cannot be run.
    PermissionDenied,
    /// No process with that exec id.
    NoSuchProcess,
    /// The request is not valid (empty argv, no TTY for a resize, a spec
    /// field the agent cannot honour, ...).
    InvalidRequest,
    /// No container with that id.
    NoSuchContainer,
    /// A container with that id exists already.
    AlreadyExists,
    /// The container is not in a state that allows the request.
    InvalidState,
    /// The request waited longer than its `wait_ms` for another request on
    /// its container to finish.
    TimedOut,
    /// Anything else.
    Other,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The result.
    pub body: ResponseBody,
}

/// The result of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseBody {
    /// For `Version`.
    Version {
        /// Protocol version.
        protocol: u32,
        /// Agent build version.
        agent: String,
    },
    /// For `Exec`, `CreateContainer` and `ExecInContainer`: the process
    /// started.
    Started {
        /// Its handle for later requests.
        exec_id: u64,
        /// Its pid in the guest.
        pid: i32,
        /// Fields of the spec that were accepted but not applied in the
        /// guest, each with the reason (an AppArmor profile of the host,
        /// a kernel memory limit cgroup v2 does not have, ...), for the
        /// runtime's log.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        not_applied: Vec<String>,
    },
    /// For `Wait`.
    Exited(ExitStatus),
    /// For `GuestInfo`.
    GuestInfo(GuestInfo),
    /// For `ContainerState`.
    ContainerState(ContainerState),
    /// For `ContainerPids`.
    Pids(Vec<i32>),
    /// For `ContainerStats`.
    Stats(ContainerStats),
    /// Done (signal, resize, close, shutdown, set identity).
    Ok,
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// A message naming the thing.
        message: String,
    },
}

/// Serialises `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a length prefix.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        Err(FrameError::TooLarge(len))
    } else {
        Ok(len)
    }
}

/// Parses a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    match read_full(r, &mut prefix)? {
        0 => return Err(FrameError::Closed),
        4 => {}
        got => return Err(FrameError::Truncated { got, want: 4 }),
    }
    let len = frame_len(prefix)?;
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(FrameError::Truncated { got, want: len });
    }
    decode(&body)
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frames_round_trip() {
        let req = Request {
            wait_ms: Some(5),
            id: 7,
            body: RequestBody::Exec(ExecRequest {
                argv: vec!["echo".into(), "hi".into()],
                tty: Some(WindowSize { rows: 24, cols: 80 }),
                ..Default::default()
            }),
        };
        let bytes = encode(&req).unwrap();
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        let back: Request = read_frame(&mut Cursor::new(bytes)).unwrap();
        assert_eq!(back, req);
        let hello = Hello::Stream {
            version: PROTOCOL_VERSION,
            exec_id: 3,
            stream: StreamKind::Stderr,
        };
        let back: Hello = read_frame(&mut Cursor::new(encode(&hello).unwrap())).unwrap();
        assert_eq!(back, hello);
    }

    #[test]
    fn truncated_oversized_and_garbage_frames() {
        let frame = encode(&Hello::Control { version: 1 }).unwrap();
        for cut in 1..frame.len() {
            let err = read_frame::<_, Hello>(&mut Cursor::new(&frame[..cut])).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
        let err = read_frame::<_, Hello>(&mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, FrameError::Closed));
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let err = read_frame::<_, Hello>(&mut Cursor::new(huge.to_vec())).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n == MAX_FRAME + 1));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{{{{{");
        let err = read_frame::<_, Hello>(&mut Cursor::new(garbage)).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
    }

    #[test]
    fn set_identity_round_trips_and_old_guest_info_parses() {
        let req = Request {
            wait_ms: None,
            id: 9,
            body: RequestBody::SetIdentity(Identity {
                hostname: "sb-1".into(),
                entropy: vec![0, 255, 7],
                unix_time_ns: 1_700_000_000_123_456_789,
            }),
        };
        let back: Request = read_frame(&mut Cursor::new(encode(&req).unwrap())).unwrap();
        assert_eq!(back, req);
        let old = r#"{"kernel":"6.1","mem_total_kib":1,"uptime_secs":1.5,"agent_version":"0.1.0"}"#;
        let info: GuestInfo = decode(old.as_bytes()).unwrap();
        assert_eq!(info.unix_time_ns, 0);
    }

    #[test]
    fn network_config_round_trips_and_macs_parse() {
        let req = Request {
            wait_ms: None,
            id: 4,
            body: RequestBody::ConfigureNetwork(NetworkConfig {
                interfaces: vec![NetInterface {
                    device_mac: PLACEHOLDER_MAC.into(),
                    name: "eth0".into(),
                    mac: "0a:58:0a:58:00:05".into(),
                    mtu: 1500,
                    addresses: vec![IpNet {
                        addr: "10.88.0.5".parse().unwrap(),
                        prefix_len: 16,
                    }],
                }],
                routes: vec![NetRoute {
                    dest: None,
                    gateway: Some("10.88.0.1".parse().unwrap()),
                    interface: "eth0".into(),
                    source: None,
                    metric: None,
                }],
                neighbours: vec![],
            }),
        };
        let back: Request = read_frame(&mut Cursor::new(encode(&req).unwrap())).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            parse_mac("0a:58:0A:58:00:05"),
            Some([0x0a, 0x58, 0x0a, 0x58, 0, 5])
        );
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0x0a, 0x58, 0, 5]),
            "0a:58:0a:58:00:05"
        );
        for bad in [
            "",
            "0a:58",
            "0a:58:0a:58:00:05:01",
            "0a:58:0a:58:00:5",
            "zz:58:0a:58:00:05",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert!(parse_mac(PLACEHOLDER_MAC).is_some());
    }

    #[test]
    fn exit_status_codes() {
        assert_eq!(ExitStatus::Code(1).code(), 1);
        assert_eq!(ExitStatus::Signal(9).code(), 137);
    }

    /// Streams of frames a hostile peer might send: valid frames of every
    /// message type with bytes flipped, inserted, removed or cut, random
    /// bytes, lengths at and past the limit. Reading never panics, a frame
    /// error is a `FrameError`, and valid frames still parse after garbage
    /// frames on the same stream. A fixed seed; `RTV_FUZZ_SEED` and
    /// `RTV_FUZZ_CASES` for longer runs by hand.
    #[test]
    fn random_and_mutated_frames_never_panic() {
        fn seeded(var: &str, default: u64) -> u64 {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        }
        let cases = seeded("RTV_FUZZ_CASES", 3000);
        let mut x = seeded("RTV_FUZZ_SEED", 0x7274_7670).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rng = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let samples: Vec<Vec<u8>> = vec![
            encode(&Request {
                wait_ms: Some(5),
                id: 7,
                body: RequestBody::Exec(ExecRequest {
                    argv: vec!["echo".into(), "hi".into()],
                    tty: Some(WindowSize { rows: 24, cols: 80 }),
                    ..Default::default()
                }),
            })
            .unwrap(),
            encode(&Hello::Control { version: 2 }).unwrap(),
            encode(&Response {
                id: 7,
                body: ResponseBody::Error {
                    kind: ErrorKind::NotFound,
                    message: "no container x".into(),
                },
            })
            .unwrap(),
            encode(&Response {
                id: 8,
                body: ResponseBody::Pids(vec![1, 2, 3]),
            })
            .unwrap(),
        ];
        let good = encode(&Hello::Control { version: 9 }).unwrap();
        for _ in 0..cases {
            let mut f = samples[(rng() % samples.len() as u64) as usize].clone();
            match rng() % 6 {
                0 => {
                    for _ in 0..1 + rng() % 8 {
                        let i = (rng() % f.len() as u64) as usize;
                        f[i] ^= 1 << (rng() % 8);
                    }
                }
                1 => {
                    let i = (rng() % f.len() as u64) as usize;
                    f.insert(i, rng() as u8);
                }
                2 => {
                    let i = (rng() % f.len() as u64) as usize;
                    f.remove(i);
                }
                3 => f.truncate((rng() % f.len() as u64) as usize),
                4 => {
                    f = (0..rng() % 64).map(|_| rng() as u8).collect();
                }
                _ => {
                    let len =
                        [MAX_FRAME as u32, MAX_FRAME as u32 + 1, u32::MAX, 0][(rng() % 4) as usize];
                    f[..4].copy_from_slice(&len.to_be_bytes());
                }
            }
            // The mutated frame, then a good one: the mutated one either
            // parses, or fails without panicking; when its length prefix
            // is intact and within the limit, the good frame after it
            // parses too.
            let mut stream = f.clone();
            stream.extend_from_slice(&good);
            let mut r = Cursor::new(stream);
            let first = read_frame::<_, Request>(&mut r);
            let _ = read_frame::<_, Response>(&mut Cursor::new(f.clone()));
            let _ = read_frame::<_, Hello>(&mut Cursor::new(f.clone()));
            let _ = read_frame::<_, HelloReply>(&mut Cursor::new(f.clone()));
            let _ = read_frame::<_, NetworkConfig>(&mut Cursor::new(f.clone()));
            let prefix_ok = f.len() >= 4
                && u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize == f.len() - 4;
            if prefix_ok && !matches!(first, Err(FrameError::Io(_))) {
                let next: Hello = read_frame(&mut r).expect("the good frame after a bad one");
                assert_eq!(next, Hello::Control { version: 9 });
            }
        }
    }
}
