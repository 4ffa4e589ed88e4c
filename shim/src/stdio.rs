//! A process's stdio: the FIFOs (or files) containerd names on the host,
//! relayed to and from the process's stream connections to the guest agent.
//!
//! Nothing here blocks a thread: output FIFOs are opened read-write (which
//! never waits for a reader, and keeps the FIFO whole while containerd's
//! reader comes and goes, as containerd's own shims do), and the stdin FIFO
//! is opened read-only without blocking and read only when epoll says a
//! writer wrote or left, so a writer that has not connected yet is not
//! taken for end-of-file.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rtv_protocol::{Stdio, StreamKind, WindowSize};
use rtv_runtime::{AgentClient, ClientError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The terminal size a process starts with, until containerd resizes it.
const INITIAL_WINDOW: WindowSize = WindowSize { rows: 24, cols: 80 };

/// Stdio errors.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A stdio URI the shim does not handle.
    #[error("{what} {uri:?}: only FIFOs and files (a path or file://) are supported")]
    Unsupported {
        /// stdin, stdout or stderr.
        what: &'static str,
        /// The URI.
        uri: String,
    },
    /// A FIFO or file could not be opened.
    #[error("opening {what} {path}: {source}")]
    Open {
        /// stdin, stdout or stderr.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stream to the guest could not be attached.
    #[error("attaching the process's {what} in the guest: {source}")]
    Attach {
        /// stdin, stdout or stderr.
        what: &'static str,
        /// Why.
        source: ClientError,
    },
}

/// A process's stdio as containerd gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// The stdin FIFO (empty: none).
    pub stdin: String,
    /// The stdout FIFO or file (empty: none); the terminal with `terminal`.
    pub stdout: String,
    /// The stderr FIFO or file (empty: none; unused with `terminal`).
    pub stderr: String,
    /// The process has a terminal.
    pub terminal: bool,
}

impl StdioPaths {
    /// The stdio to ask the agent for.
    pub fn agent(&self) -> Stdio {
        Stdio {
            tty: self.terminal.then_some(INITIAL_WINDOW),
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.terminal && !self.stderr.is_empty(),
        }
    }
}

/// The host path of a stdio URI: a plain path or `file://PATH`.
fn host_path(what: &'static str, uri: &str) -> Result<PathBuf, StdioError> {
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if uri.contains("://") || !uri.starts_with('/') {
        return Err(StdioError::Unsupported {
            what,
            uri: uri.to_owned(),
        });
    }
    Ok(PathBuf::from(uri))
}

fn is_fifo(path: &std::path::Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// Opens an output: a FIFO read-write (never blocks), else a file for
/// appending (created if missing).
async fn open_output(what: &'static str, path: PathBuf) -> Result<Writer, StdioError> {
    let err = |source| StdioError::Open {
        what,
        path: path.clone(),
        source,
    };
    if is_fifo(&path) {
        let tx = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&path)
            .map_err(err)?;
        return Ok(Box::new(tx));
    }
    let f = tokio::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .await
        .map_err(err)?;
    Ok(Box::new(f))
}

/// The host side of stdin: a FIFO (read without blocking), or a file.
enum Input {
    Fifo(pipe::Receiver),
    File(Reader),
}

async fn open_input(path: PathBuf) -> Result<Input, StdioError> {
    let err = |source| StdioError::Open {
        what: "stdin",
        path: path.clone(),
        source,
    };
    if is_fifo(&path) {
        return Ok(Input::Fifo(
            pipe::OpenOptions::new().open_receiver(&path).map_err(err)?,
        ));
    }
    let f = tokio::fs::File::open(&path).await.map_err(err)?;
    Ok(Input::File(Box::new(f)))
}

/// The relays of one process.
#[derive(Debug, Default)]
pub struct Relays {
    /// Its stdin relay, if it has stdin.
    pub stdin: Option<StdinRelay>,
    /// Its output relays (stdout, stderr): each ends when the guest closes
    /// the stream (the process and everything sharing its output ended).
    pub outputs: Vec<JoinHandle<()>>,
}

/// Control of a stdin relay.
#[derive(Debug)]
pub struct StdinRelay {
    close: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl StdinRelay {
    /// containerd's CloseIO: forward what is already in the FIFO, then end
    /// the process's input (end-of-file; `^D` to a terminal).
    pub fn close(&mut self) {
        if let Some(tx) = self.close.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for StdinRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for output relays to finish, at most `timeout` (a process that
/// left a child holding its stdout would hold its exit back forever).
pub async fn drain(outputs: Vec<JoinHandle<()>>, timeout: Duration) {
    let all = async {
        for h in outputs {
            let _ = h.await;
        }
    };
    if tokio::time::timeout(timeout, all).await.is_err() {
        tracing::debug!("output still open {timeout:?} after the process ended");
    }
}

/// Attaches process `exec_id`'s streams in the guest and starts relaying
/// them to and from `paths` on the host. The host ends are opened first,
/// so a bad path fails before anything is attached.
pub async fn attach(
    client: &Arc<AgentClient>,
    exec_id: u64,
    paths: &StdioPaths,
) -> Result<Relays, StdioError> {
    let want = paths.agent();
    let input = match want.stdin {
        true => Some(open_input(host_path("stdin", &paths.stdin)?).await?),
        false => None,
    };
    let stdout = match want.stdout {
        true => Some(open_output("stdout", host_path("stdout", &paths.stdout)?).await?),
        false => None,
    };
    let stderr = match want.stderr {
        true => Some(open_output("stderr", host_path("stderr", &paths.stderr)?).await?),
        false => None,
    };
    let stream = |what: &'static str, kind| async move {
        client
            .attach(exec_id, kind)
            .await
            .map_err(|source| StdioError::Attach { what, source })
    };
    let mut relays = Relays::default();
    if let Some(input) = input {
        let s = stream("stdin", StreamKind::Stdin).await?;
        let (tx, rx) = oneshot::channel();
        relays.stdin = Some(StdinRelay {
            close: Some(tx),
            task: tokio::spawn(relay_stdin(input, s, rx, paths.terminal)),
        });
    }
    for (what, kind, out) in [
        ("stdout", StreamKind::Stdout, stdout),
        ("stderr", StreamKind::Stderr, stderr),
    ] {
        if let Some(mut out) = out {
            let mut s = stream(what, kind).await?;
            relays.outputs.push(tokio::spawn(async move {
                if let Err(e) = tokio::io::copy(&mut s, &mut out).await {
                    tracing::debug!("{what} relay: {e}");
                }
                let _ = out.shutdown().await;
            }));
        }
    }
    Ok(relays)
}

/// A read(2) of a non-blocking descriptor (`WouldBlock` when it is empty).
fn read_now(fd: &impl AsRawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a writable buffer of `buf.len()` bytes, and the
    // descriptor stays open for the call (the caller holds its owner).
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Copies stdin from the host to the guest until the host side ends, or
/// until CloseIO (`close`), after which what the FIFO already holds is
/// still forwarded.
async fn relay_stdin(
    input: Input,
    mut to: UnixStream,
    mut close: oneshot::Receiver<()>,
    terminal: bool,
) {
    let mut buf = vec![0u8; 32 * 1024];
    match input {
        Input::File(mut f) => {
            if let Err(e) = tokio::io::copy(&mut f, &mut to).await {
                tracing::debug!("stdin relay: {e}");
            }
        }
        Input::Fifo(rx) => {
            let closed = loop {
                tokio::select! {
                    r = rx.readable() => {
                        if let Err(e) = r {
                            tracing::debug!("stdin relay: {e}");
                            break false;
                        }
                    }
                    _ = &mut close => break true,
                };
                match rx.try_read(&mut buf) {
                    Ok(0) => break false,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::debug!("stdin relay: {e}");
                        break false;
                    }
                }
            };
            if closed {
                // Forward what was written before CloseIO (read directly:
                // tokio's readiness may not have caught up with it yet).
                loop {
                    match read_now(&rx, &mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
                if terminal {
                    // End-of-file to a terminal is VEOF at the start of a
                    // line, in order after the input.
                    let _ = to.write_all(b"\x04").await;
                }
            }
        }
    }
    // For pipes, the guest closes the process's stdin when the stream ends.
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn uris_are_paths_or_files() {
        assert_eq!(
            host_path("stdout", "/run/x/fifo").unwrap(),
            PathBuf::from("/run/x/fifo")
        );
        assert_eq!(
            host_path("stdout", "file:///var/log/c.log").unwrap(),
            PathBuf::from("/var/log/c.log")
        );
        let e = host_path("stdout", "binary:///bin/logger?x=1").unwrap_err();
        assert!(e.to_string().starts_with("stdout \"binary://"), "{e}");
        assert!(host_path("stdin", "relative").is_err());
    }

    #[test]
    fn the_agent_gets_the_streams_that_have_paths() {
        let p = StdioPaths {
            stdin: String::new(),
            stdout: "/a".into(),
            stderr: "/b".into(),
            terminal: false,
        };
        assert_eq!(
            p.agent(),
            Stdio {
                tty: None,
                stdin: false,
                stdout: true,
                stderr: true
            }
        );
        let t = StdioPaths {
            stdin: "/i".into(),
            terminal: true,
            ..p
        };
        assert_eq!(
            t.agent(),
            Stdio {
                tty: Some(INITIAL_WINDOW),
                stdin: true,
                stdout: true,
                stderr: false
            }
        );
    }

    fn mkfifo(path: &std::path::Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// The stdin relay waits for a writer that comes late, forwards its
    /// input, and on close forwards what is left, then ends the stream.
    #[tokio::test]
    async fn stdin_waits_for_a_late_writer_and_drains_on_close() {
        let dir = std::env::temp_dir().join(format!("rtv-shim-stdin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stdin");
        mkfifo(&fifo);
        let input = open_input(fifo.clone()).await.unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(relay_stdin(input, ours, rx, false));
        // No writer yet: no end-of-file either.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished());
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        std::io::Write::write_all(&mut w, b"one\n").unwrap();
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one\n");
        std::io::Write::write_all(&mut w, b"two\n").unwrap();
        tx.send(()).unwrap();
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"two\n");
        task.await.unwrap();
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A writer that leaves ends the process's input.
    #[tokio::test]
    async fn stdin_ends_when_the_writer_leaves() {
        let dir = std::env::temp_dir().join(format!("rtv-shim-eof-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stdin");
        mkfifo(&fifo);
        let input = open_input(fifo.clone()).await.unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (_tx, rx) = oneshot::channel();
        let task = tokio::spawn(relay_stdin(input, ours, rx, false));
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        std::io::Write::write_all(&mut w, b"all").unwrap();
        drop(w);
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"all");
        task.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Output goes to a FIFO whose reader comes late, and to a file.
    #[tokio::test]
    async fn outputs_reach_fifos_and_files() {
        let dir = std::env::temp_dir().join(format!("rtv-shim-out-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stdout");
        mkfifo(&fifo);
        let mut w = open_output("stdout", fifo.clone()).await.unwrap();
        w.write_all(b"early").await.unwrap();
        let mut r = std::fs::File::open(&fifo).unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut got).unwrap();
        assert_eq!(got, b"early");
        let file = dir.join("log");
        let mut w = open_output("stderr", file.clone()).await.unwrap();
        w.write_all(b"x").await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
