//! The agent's server: each connection on a worker of the agent's thread
//! pool; control connections run each request that can block on a worker
//! of its own, so a `Wait` never blocks the others.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtv_protocol::{
    read_frame, write_frame, ErrorKind, FrameError, GuestInfo, Hello, HelloReply, Request,
    RequestBody, Response, ResponseBody, StreamKind, AGENT_PORT, DEFAULT_WAIT_MS, PROTOCOL_VERSION,
};

use crate::alog;
use crate::container::{Containers, Deadline, OomWatch};
use crate::pool::Pool;
use crate::process::{Failure, Processes, StreamEnd};
use crate::{identity, net};

/// What the server serves: processes and containers.
pub struct Agent {
    /// Every process the agent started.
    pub procs: Arc<Processes>,
    /// Every container.
    pub containers: Containers,
    /// The threads connections and blocking requests run on.
    pub pool: Pool,
}

/// Workers the agent starts before it reports ready (a VM restored from a
/// template has them), and keeps idle at most.
pub const POOL_PRESTART: usize = 6;
/// Idle workers kept at most.
pub const POOL_KEEP: usize = 16;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the agent accepts connections.
pub enum Listener {
    /// AF_VSOCK, in the guest.
    Vsock(OwnedFd),
    /// A Unix socket, when the agent runs on the host for tests.
    Unix(UnixListener),
}

impl Listener {
    /// Listens on vsock port [`AGENT_PORT`], any CID.
    pub fn vsock() -> std::io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_vm is valid; we set its fields.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = AGENT_PORT;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: `addr` is a valid sockaddr_vm of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        // SAFETY: listen(2) on our socket.
        if rc < 0 || unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Listener::Vsock(fd))
    }

    fn accept(&self) -> std::io::Result<UnixStream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| s),
            Listener::Vsock(fd) => {
                // SAFETY: accept4 on our listening socket; the peer address is not wanted.
                let conn = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if conn < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `conn` is a new connected stream socket we own. UnixStream's
                // read, write, shutdown, try_clone and timeouts are plain socket
                // calls that work on any stream socket; nothing Unix-specific is used.
                Ok(unsafe { UnixStream::from_raw_fd(conn) })
            }
        }
    }
}

/// What to do on a `Shutdown` request (after the reply is sent).
pub type ShutdownFn = fn();

/// Serves connections forever.
pub fn serve(listener: Listener, agent: Arc<Agent>, shutdown: ShutdownFn) -> ! {
    loop {
        match listener.accept() {
            Ok(stream) => {
                let pool = agent.pool.clone();
                let agent = agent.clone();
                if let Err(e) = pool.run(move || handle_connection(stream, agent, shutdown)) {
                    alog!(Error, "cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                alog!(Warn, "accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn refuse(stream: &mut UnixStream, reason: String) {
    alog!(Warn, "refusing a connection: {reason}");
    let _ = write_frame(stream, &HelloReply::Refused { reason });
}

fn handle_connection(mut stream: UnixStream, agent: Arc<Agent>, shutdown: ShutdownFn) {
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let hello: Hello = match read_frame(&mut stream) {
        Ok(h) => h,
        Err(FrameError::Closed) => return,
        Err(e) => return refuse(&mut stream, format!("bad hello: {e}")),
    };
    let _ = stream.set_read_timeout(None);
    if hello.version() != PROTOCOL_VERSION {
        return refuse(
            &mut stream,
            format!(
                "protocol version mismatch: client speaks {}, agent speaks {PROTOCOL_VERSION}",
                hello.version()
            ),
        );
    }
    match hello {
        Hello::Control { .. } => {
            if write_frame(
                &mut stream,
                &HelloReply::Ok {
                    version: PROTOCOL_VERSION,
                },
            )
            .is_ok()
            {
                control(stream, agent, shutdown);
            }
        }
        Hello::Stream {
            exec_id,
            stream: kind,
            ..
        } => match agent.procs.take_stream(exec_id, kind) {
            Ok(end) => {
                if write_frame(
                    &mut stream,
                    &HelloReply::Ok {
                        version: PROTOCOL_VERSION,
                    },
                )
                .is_ok()
                {
                    relay(stream, end, kind);
                }
            }
            Err(f) => refuse(&mut stream, f.message),
        },
    }
}

fn control(mut stream: UnixStream, agent: Arc<Agent>, shutdown: ShutdownFn) {
    let writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => return alog!(Error, "cannot clone a control connection: {e}"),
    };
    loop {
        let req: Request = match read_frame(&mut stream) {
            Ok(r) => r,
            Err(FrameError::Closed) => return,
            Err(e) => {
                // The framing is lost: say why and hang up.
                alog!(Warn, "control connection: {e}");
                let resp = Response {
                    id: 0,
                    body: ResponseBody::Error {
                        kind: ErrorKind::InvalidRequest,
                        message: e.to_string(),
                    },
                };
                let _ = write_frame(
                    &mut *writer.lock().unwrap_or_else(|p| p.into_inner()),
                    &resp,
                );
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        };
        let deadline = Deadline::after(Duration::from_millis(
            req.wait_ms.unwrap_or(DEFAULT_WAIT_MS),
        ));
        // A WaitOom is armed here, before the next request on this
        // connection is read: a kill caused by a later request is seen.
        let job = match req.body {
            RequestBody::WaitOom { container_id, seen } => {
                match agent.containers.arm_oom(&container_id) {
                    Ok(watch) => Job::WaitOom { watch, seen },
                    Err(f) => {
                        reply(&writer, req.id, failure(f));
                        continue;
                    }
                }
            }
            body => Job::Request(body),
        };
        // Requests that can block (a wait, a fork and exec that takes a
        // second in an emulated guest kernel, a request that waits for
        // another on its container) get a thread; the rest are answered
        // at once, sparing the guest a thread's creation.
        let blocking = match &job {
            Job::WaitOom { .. } => true,
            Job::Request(body) => !matches!(
                body,
                RequestBody::Version
                    | RequestBody::Signal { .. }
                    | RequestBody::ResizeTty { .. }
                    | RequestBody::CloseStdin { .. }
                    | RequestBody::GuestInfo
                    | RequestBody::SetIdentity(_)
            ),
        };
        let id = req.id;
        if !blocking {
            answer(&agent, &writer, id, job, deadline, shutdown);
            continue;
        }
        let pool = agent.pool.clone();
        let agent = agent.clone();
        let writer = writer.clone();
        if let Err(e) = pool.run(move || answer(&agent, &writer, id, job, deadline, shutdown)) {
            alog!(Error, "cannot start a request thread: {e}");
        }
    }
}

/// A request to answer.
enum Job {
    Request(RequestBody),
    /// A `WaitOom`, armed when it was read.
    WaitOom {
        watch: OomWatch,
        seen: u64,
    },
}

fn reply(writer: &Mutex<UnixStream>, id: u64, body: ResponseBody) {
    let resp = Response { id, body };
    let sent = write_frame(
        &mut *writer.lock().unwrap_or_else(|p| p.into_inner()),
        &resp,
    );
    if let Err(e) = sent {
        alog!(Info, "reply to request {id}: {e}");
    }
}

/// Handles one request and writes its response.
fn answer(
    agent: &Agent,
    writer: &Mutex<UnixStream>,
    id: u64,
    job: Job,
    deadline: Deadline,
    shutdown: ShutdownFn,
) {
    let (body, is_shutdown) = match job {
        Job::WaitOom { watch, seen } => (
            agent
                .containers
                .wait_oom(watch, seen, deadline)
                .map_or_else(failure, ResponseBody::ContainerState),
            false,
        ),
        Job::Request(body) => {
            let is_shutdown = body == RequestBody::Shutdown;
            (handle_request(agent, body, deadline), is_shutdown)
        }
    };
    reply(writer, id, body);
    if is_shutdown {
        shutdown();
    }
}

fn failure(f: Failure) -> ResponseBody {
    ResponseBody::Error {
        kind: f.kind,
        message: f.message,
    }
}

fn handle_request(agent: &Agent, body: RequestBody, deadline: Deadline) -> ResponseBody {
    let procs = &agent.procs;
    let containers = &agent.containers;
    let result = match body {
        RequestBody::Version => Ok(ResponseBody::Version {
            protocol: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").into(),
        }),
        RequestBody::Exec(req) => procs.spawn(&req).map(|(exec_id, pid)| {
            alog!(
                Debug,
                "started {:?} as exec {exec_id} (pid {pid})",
                req.argv
            );
            ResponseBody::Started {
                exec_id,
                pid,
                not_applied: Vec::new(),
            }
        }),
        RequestBody::Wait { exec_id } => procs.wait(exec_id).map(ResponseBody::Exited),
        RequestBody::Signal { exec_id, signal } => {
            procs.signal(exec_id, signal).map(|()| ResponseBody::Ok)
        }
        RequestBody::ResizeTty { exec_id, size } => {
            procs.resize(exec_id, size).map(|()| ResponseBody::Ok)
        }
        RequestBody::CloseStdin { exec_id } => {
            procs.close_stdin(exec_id).map(|()| ResponseBody::Ok)
        }
        RequestBody::GuestInfo => Ok(ResponseBody::GuestInfo(guest_info())),
        RequestBody::Shutdown => Ok(ResponseBody::Ok),
        RequestBody::SetIdentity(id) => identity::set(&id).map(|()| {
            alog!(Info, "identity set: hostname {:?}", id.hostname);
            ResponseBody::Ok
        }),
        RequestBody::CreateContainer(req) => {
            containers.create(&req).map(|(exec_id, pid, not_applied)| {
                alog!(Info, "created container {} (pid {pid})", req.container_id);
                ResponseBody::Started {
                    exec_id,
                    pid,
                    not_applied,
                }
            })
        }
        RequestBody::StartContainer { container_id } => containers
            .start(&container_id, deadline)
            .map(|()| ResponseBody::Ok),
        RequestBody::ExecInContainer(req) => {
            containers
                .exec(&req, deadline)
                .map(|(exec_id, pid, not_applied)| ResponseBody::Started {
                    exec_id,
                    pid,
                    not_applied,
                })
        }
        RequestBody::SignalContainer {
            container_id,
            signal,
            all,
        } => containers
            .signal(&container_id, signal, all, deadline)
            .map(|()| ResponseBody::Ok),
        RequestBody::ContainerState { container_id } => containers
            .state(&container_id, deadline)
            .map(ResponseBody::ContainerState),
        RequestBody::WaitOom { container_id, seen } => containers
            .arm_oom(&container_id)
            .and_then(|watch| containers.wait_oom(watch, seen, deadline))
            .map(ResponseBody::ContainerState),
        RequestBody::ContainerPids { container_id } => containers
            .pids(&container_id, deadline)
            .map(ResponseBody::Pids),
        RequestBody::PauseContainer { container_id } => containers
            .set_paused(&container_id, true, deadline)
            .map(|()| ResponseBody::Ok),
        RequestBody::ResumeContainer { container_id } => containers
            .set_paused(&container_id, false, deadline)
            .map(|()| ResponseBody::Ok),
        RequestBody::UpdateContainer {
            container_id,
            resources,
        } => containers
            .update(&container_id, &resources, deadline)
            .map(|()| ResponseBody::Ok),
        RequestBody::ContainerStats { container_id } => containers
            .stats(&container_id, deadline)
            .map(ResponseBody::Stats),
        RequestBody::DeleteContainer {
            container_id,
            force,
        } => containers
            .delete(&container_id, force, deadline)
            .map(|()| ResponseBody::Ok),
        RequestBody::ConfigureNetwork(config) => net::configure(&config).map(|()| {
            alog!(
                Info,
                "network configured: {} interface(s), {} route(s)",
                config.interfaces.len(),
                config.routes.len()
            );
            ResponseBody::Ok
        }),
    };
    result.unwrap_or_else(failure)
}

fn relay(mut stream: UnixStream, end: StreamEnd, kind: StreamKind) {
    match end {
        StreamEnd::Output(mut from) => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // A terminal whose last user closed reads EIO: that is its end.
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = stream.shutdown(Shutdown::Write);
            alog!(Debug, "{kind:?} stream ended");
        }
        StreamEnd::Input(to) => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut guard = to.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_mut() {
                    Some(f) => {
                        if f.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    None => break,
                }
            }
            // End of input: close the process's stdin.
            to.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
}

fn guest_info() -> GuestInfo {
    // SAFETY: an all-zero utsname is valid to be filled by uname(2).
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid out-pointer.
    let kernel = if unsafe { libc::uname(&mut uts) } == 0 {
        uts.release
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8 as char)
            .collect()
    } else {
        String::new()
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let uptime_secs = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    GuestInfo {
        kernel,
        mem_total_kib,
        uptime_secs,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        unix_time_ns: identity::now_ns(),
    }
}
