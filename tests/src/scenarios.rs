//! Agent scenarios, written once and run twice: against `rtv-agent
//! --listen unix:...` on the host (fast, every change), and against the
//! agent as PID 1 of a booted VM through the VMM's hybrid vsock socket.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rtv_protocol::{
    encode, ErrorKind, ExecRequest, ExitStatus, Hello, HelloReply, StreamKind, WindowSize,
    PROTOCOL_VERSION,
};
use rtv_runtime::{AgentClient, ClientError, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How much of the load scenarios a run does. On the host the agent takes
/// the full load in a second; in a PVM guest, where every fork, exec and
/// pipe write runs emulated kernel code, the same proof (concurrent
/// processes apart, a stream of many vsock packets intact) takes a fraction
/// of it: the full load there cost 270 s of CI for no other finding
/// (`scripts/bench.sh agent` measures the guest's throughput).
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Processes started at once by `concurrent_processes`.
    pub processes: i32,
    /// Bytes of stdout compared by `large_stdout`.
    pub stdout_bytes: usize,
}

impl Load {
    /// The agent on the host: 50 processes, 10 MiB.
    pub const HOST: Load = Load {
        processes: 50,
        stdout_bytes: 10 << 20,
    };
    /// The agent in a VM: 8 processes, 512 KiB (8 vsock packets' worth of
    /// the largest window and more).
    pub const VM: Load = Load {
        processes: 8,
        stdout_bytes: 512 << 10,
    };
}

/// A plain environment for test processes.
fn env() -> Vec<String> {
    vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into(), "HOME=/".into()]
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: env(),
        stdout: true,
        stderr: true,
        ..Default::default()
    }
}

async fn read_all(mut s: UnixStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// Runs `argv`, returning (stdout, stderr, status).
pub async fn run(c: &AgentClient, argv: &[&str]) -> Result<(String, String, ExitStatus)> {
    let (id, _) = c.exec(exec(argv)).await?;
    let out = c.attach(id, StreamKind::Stdout).await?;
    let err = c.attach(id, StreamKind::Stderr).await?;
    let (out, err) = tokio::try_join!(read_all(out), read_all(err))?;
    let status = c.wait(id).await?;
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        status,
    ))
}

/// The version call answers with this protocol version.
pub async fn version(c: &AgentClient) -> Result<()> {
    let (protocol, agent) = c.version().await?;
    ensure!(protocol == PROTOCOL_VERSION, "protocol {protocol}");
    ensure!(!agent.is_empty());
    Ok(())
}

/// A peer speaking another protocol version is refused, clearly.
pub async fn version_mismatch_is_refused(endpoint: &Endpoint) -> Result<()> {
    let err = AgentClient::connect_with_hello(
        endpoint,
        &Hello::Control {
            version: PROTOCOL_VERSION + 1,
        },
        Duration::from_secs(30),
    )
    .await
    .err()
    .context("a mismatched version was accepted")?;
    match err {
        ClientError::Refused(reason) => {
            ensure!(reason.contains("version mismatch"), "{reason}");
            Ok(())
        }
        other => bail!("expected a refusal, got {other}"),
    }
}

/// `echo` prints and exits 0.
pub async fn echo(c: &AgentClient) -> Result<()> {
    let (out, err, status) = run(c, &["echo", "hello from the guest"]).await?;
    ensure!(
        out == "hello from the guest\n",
        "stdout {out:?} stderr {err:?}"
    );
    ensure!(status == ExitStatus::Code(0), "{status:?}");
    Ok(())
}

/// Exit codes arrive as they are.
pub async fn exit_codes(c: &AgentClient) -> Result<()> {
    for (argv, want) in [
        (&["true"][..], 0),
        (&["false"][..], 1),
        (&["sh", "-c", "exit 3"][..], 3),
    ] {
        let (_, _, status) = run(c, argv).await?;
        ensure!(status == ExitStatus::Code(want), "{argv:?}: {status:?}");
    }
    Ok(())
}

/// A SIGKILLed process reports signal 9, which a shell calls 137.
pub async fn sigkill_is_137(c: &AgentClient) -> Result<()> {
    let (id, _) = c.exec(exec(&["sleep", "1000"])).await?;
    c.signal(id, libc::SIGKILL).await?;
    let status = c.wait(id).await?;
    ensure!(status == ExitStatus::Signal(libc::SIGKILL), "{status:?}");
    ensure!(status.code() == 137);
    // A second signal to the dead process is a clear error.
    match c.signal(id, libc::SIGTERM).await {
        Err(ClientError::Agent {
            kind: ErrorKind::NoSuchProcess,
            ..
        }) => Ok(()),
        other => bail!("signal to an exited process: {other:?}"),
    }
}

/// The expected output of `seq 1 N`.
fn seq_output(n: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.extend_from_slice(format!("{i}\n").as_bytes());
    }
    v
}

/// `size` bytes on stdout arrive intact, compared byte for byte.
pub async fn large_stdout(c: &AgentClient, size: usize) -> Result<()> {
    const SIZE_MIB: f64 = (1 << 20) as f64;
    // `seq` prints at least 6 bytes a line from 10000 on: enough lines.
    let lines = (size / 5).max(10_000) as u32;
    let expected = seq_output(lines);
    ensure!(expected.len() > size);
    let script = format!("seq 1 {lines} | head -c {size}");
    let (id, _) = c.exec(exec(&["sh", "-c", &script])).await?;
    let started = Instant::now();
    let out = read_all(c.attach(id, StreamKind::Stdout).await?).await?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(out.len() == size, "got {} bytes", out.len());
    if let Some(at) = out.iter().zip(&expected).position(|(a, b)| a != b) {
        bail!("stdout differs at byte {at}");
    }
    ensure!(c.wait(id).await? == ExitStatus::Code(0));
    let mib = size as f64 / SIZE_MIB;
    eprintln!(
        "{mib:.2} MiB stdout in {secs:.2} s ({:.1} MiB/s)",
        mib / secs
    );
    Ok(())
}

/// A process reads its stdin to EOF.
pub async fn stdin_to_eof(c: &AgentClient) -> Result<()> {
    let mut req = exec(&["wc", "-c"]);
    req.stdin = true;
    let (id, _) = c.exec(req).await?;
    let mut input = c.attach(id, StreamKind::Stdin).await?;
    let out = c.attach(id, StreamKind::Stdout).await?;
    let data = vec![b'x'; 100_000];
    input.write_all(&data).await?;
    input.shutdown().await?;
    drop(input);
    let out = read_all(out).await?;
    let text = String::from_utf8_lossy(&out);
    ensure!(text.trim() == "100000", "wc said {text:?}");
    ensure!(c.wait(id).await? == ExitStatus::Code(0));
    Ok(())
}

/// `CloseStdin` ends a process's input without a stream.
pub async fn close_stdin(c: &AgentClient) -> Result<()> {
    let mut req = exec(&["cat"]);
    req.stdin = true;
    let (id, _) = c.exec(req).await?;
    let out = c.attach(id, StreamKind::Stdout).await?;
    c.close_stdin(id).await?;
    ensure!(read_all(out).await?.is_empty());
    ensure!(c.wait(id).await? == ExitStatus::Code(0));
    Ok(())
}

/// `n` processes started at once each get their own output and status.
pub async fn concurrent_processes(c: &AgentClient, n: i32) -> Result<()> {
    let runs = (0..n).map(|i| async move {
        let code = i % 7;
        let script = format!("echo process {i}; exit {code}");
        let (out, _, status) = run(c, &["sh", "-c", &script]).await?;
        ensure!(
            out == format!("process {i}\n"),
            "process {i} printed {out:?}"
        );
        ensure!(status == ExitStatus::Code(code), "process {i}: {status:?}");
        Ok(())
    });
    for r in futures_join_all(runs).await {
        r?;
    }
    Ok(())
}

async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out = Vec::with_capacity(futs.len());
    let mut pending: Vec<_> = futs.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

async fn read_until(s: &mut UnixStream, needle: &str, seen: &mut String) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut buf))
            .await
            .with_context(|| format!("no {needle:?} on the terminal; saw {seen:?}"))??;
        if n == 0 {
            bail!("terminal closed before {needle:?}; saw {seen:?}");
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}

/// A process on a terminal sees its window size, and the change.
pub async fn tty_resize(c: &AgentClient) -> Result<()> {
    let mut req = exec(&["sh", "-c", "stty size; read x; stty size"]);
    req.tty = Some(WindowSize { rows: 24, cols: 80 });
    req.stdin = true;
    let (id, _) = c.exec(req).await?;
    let mut out = c.attach(id, StreamKind::Stdout).await?;
    let mut input = c.attach(id, StreamKind::Stdin).await?;
    let mut seen = String::new();
    read_until(&mut out, "24 80", &mut seen).await?;
    c.resize(
        id,
        WindowSize {
            rows: 40,
            cols: 100,
        },
    )
    .await?;
    input.write_all(b"go\n").await?;
    read_until(&mut out, "40 100", &mut seen).await?;
    ensure!(c.wait(id).await? == ExitStatus::Code(0));
    // A process without a terminal cannot be resized.
    let (plain, _) = c.exec(exec(&["true"])).await?;
    let err = c.resize(plain, WindowSize { rows: 1, cols: 1 }).await.err();
    ensure!(
        matches!(
            err,
            Some(ClientError::Agent {
                kind: ErrorKind::InvalidRequest,
                ..
            })
        ),
        "{err:?}"
    );
    c.wait(plain).await?;
    Ok(())
}

/// A binary that does not exist is a clear error naming it.
pub async fn missing_binary(c: &AgentClient) -> Result<()> {
    for program in ["/no/such/binary", "no-such-command"] {
        match c.exec(exec(&[program])).await {
            Err(ClientError::Agent {
                kind: ErrorKind::NotFound,
                message,
            }) => ensure!(message.contains(program), "{message}"),
            other => bail!("{program}: expected NotFound, got {other:?}"),
        }
    }
    // The agent goes on serving.
    echo(c).await
}

/// Opens a control connection, sends `bytes` after the hello, and returns
/// everything the agent answers until it hangs up.
async fn control_reply_to(endpoint: &Endpoint, bytes: &[u8]) -> Result<String> {
    let hello = Hello::Control {
        version: PROTOCOL_VERSION,
    };
    let mut s = AgentClient::connect_with_hello(endpoint, &hello, Duration::from_secs(30)).await?;
    s.write_all(bytes).await?;
    Ok(String::from_utf8_lossy(&read_all(s).await?).into_owned())
}

/// Truncated, oversized and garbage frames get a clear error (or a closed
/// connection) and the agent keeps serving other connections.
pub async fn bad_frames(endpoint: &Endpoint, c: &AgentClient) -> Result<()> {
    // Oversized length prefix after a good hello.
    let text = control_reply_to(endpoint, &u32::MAX.to_be_bytes()).await?;
    ensure!(
        text.contains("exceeds"),
        "oversized frame answered {text:?}"
    );
    // Garbage JSON.
    let mut frame = 9u32.to_be_bytes().to_vec();
    frame.extend_from_slice(b"not json!");
    let text = control_reply_to(endpoint, &frame).await?;
    ensure!(text.contains("malformed"), "garbage answered {text:?}");
    // A truncated hello, then hang up.
    let mut raw = AgentClient::connect_raw(endpoint, Duration::from_secs(30)).await?;
    let hello = encode(&Hello::Control {
        version: PROTOCOL_VERSION,
    })?;
    raw.write_all(&hello[..hello.len() / 2]).await?;
    drop(raw);
    // A garbage hello is refused.
    let mut raw = AgentClient::connect_raw(endpoint, Duration::from_secs(30)).await?;
    raw.write_all(&[0, 0, 0, 3, b'{', b'{', b'{']).await?;
    let reply: HelloReply = rtv_runtime::agent_client::read_frame_async(&mut raw).await?;
    ensure!(matches!(reply, HelloReply::Refused { .. }), "{reply:?}");
    // Unknown process streams are refused.
    let err = c.attach(999_999, StreamKind::Stdout).await.err();
    ensure!(matches!(err, Some(ClientError::Refused(_))), "{err:?}");
    // Still serving.
    echo(c).await
}

/// Guest facts.
pub async fn guest_info(c: &AgentClient) -> Result<()> {
    let info = c.guest_info().await?;
    ensure!(
        !info.kernel.is_empty() && info.mem_total_kib > 0 && info.uptime_secs > 0.0,
        "{info:?}"
    );
    Ok(())
}

/// Connects to the agent at `endpoint` and runs every shared scenario;
/// panics listing the failed ones.
pub async fn connect_and_run_all(endpoint: Endpoint, timeout: Duration, load: Load) {
    let client = AgentClient::connect(endpoint.clone(), timeout)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let failures = run_shared(&endpoint, &client, load).await;
    assert!(
        failures.is_empty(),
        "failed scenarios:\n{}",
        failures.join("\n")
    );
}

/// Every scenario that shares one agent, in order; returns the failures.
pub async fn run_shared(endpoint: &Endpoint, c: &AgentClient, load: Load) -> Vec<String> {
    let mut failures = Vec::new();
    macro_rules! check {
        ($name:literal, $e:expr) => {
            let started = Instant::now();
            match $e.await {
                Ok(()) => eprintln!("ok   {} ({:.2} s)", $name, started.elapsed().as_secs_f64()),
                Err(e) => {
                    eprintln!("FAIL {}: {e:#}", $name);
                    failures.push(format!("{}: {e:#}", $name));
                }
            }
        };
    }
    check!("version", version(c));
    check!(
        "version_mismatch_is_refused",
        version_mismatch_is_refused(endpoint)
    );
    check!("echo", echo(c));
    check!("exit_codes", exit_codes(c));
    check!("sigkill_is_137", sigkill_is_137(c));
    check!("stdin_to_eof", stdin_to_eof(c));
    check!("close_stdin", close_stdin(c));
    check!("missing_binary", missing_binary(c));
    check!("bad_frames", bad_frames(endpoint, c));
    check!("tty_resize", tty_resize(c));
    check!(
        "concurrent_processes",
        concurrent_processes(c, load.processes)
    );
    check!("large_stdout", large_stdout(c, load.stdout_bytes));
    check!("guest_info", guest_info(c));
    failures
}
