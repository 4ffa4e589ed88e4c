//! The agent's request handling, on the host: `rtv-agent --listen unix:...`
//! driven through the same protocol and client as in a VM. Fast, so every
//! scenario runs here on every change; tests/tests/agent_vm.rs runs them
//! again through a booted guest.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rtv_runtime::{AgentClient, ClientError, Endpoint};
use rtv_tests::scenarios;

struct Agent {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_agent(tag: &str) -> (Agent, Endpoint) {
    let dir = std::env::temp_dir().join(format!("rtv-agent-host-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let child = Command::new(rtv_tests::agent_binary().unwrap())
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    (Agent { child, dir }, Endpoint::Unix(sock))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_scenario_on_the_host() {
    let (_agent, endpoint) = start_agent("all");
    scenarios::connect_and_run_all(endpoint, Duration::from_secs(30), scenarios::Load::HOST).await;
}

#[tokio::test]
async fn shutdown_ends_the_agent() {
    let (mut agent, endpoint) = start_agent("shutdown");
    let client = AgentClient::connect(endpoint, Duration::from_secs(30))
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn an_agent_that_never_comes_up_is_an_error_within_the_deadline() {
    let started = Instant::now();
    let err = AgentClient::connect(
        Endpoint::vm("/nonexistent/vsock.sock"),
        Duration::from_millis(500),
    )
    .await
    .err()
    .expect("connected to nothing");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/vsock.sock"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_vmm_whose_guest_never_answers_is_an_error_within_the_deadline() {
    // A hybrid socket that accepts and hangs up, as a VMM does while the
    // guest has nobody listening on the port.
    let dir = std::env::temp_dir().join(format!("rtv-fake-vmm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vsock.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let started = Instant::now();
    let err = AgentClient::connect(Endpoint::vm(&sock), Duration::from_millis(500))
        .await
        .err()
        .expect("connected to a guest that is not there");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent that stops answering (here: the real agent, stopped with
/// SIGSTOP) trips the client's watchdog: a request unanswered for the
/// timeout fails with `NoAnswer` naming it, the watchdog's action runs
/// once however many requests go unanswered, and a wait for a process is
/// not timed (a process may rightly run for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_trips_the_watchdog_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let (agent, endpoint) = start_agent("silent");
    let client = Arc::new(
        AgentClient::connect(endpoint, Duration::from_secs(30))
            .await
            .unwrap(),
    );
    let trips = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (t, s) = (trips.clone(), seen.clone());
    assert!(client.set_watchdog(rtv_runtime::agent_client::Watchdog {
        timeout: Duration::from_secs(1),
        on_silence: Box::new(move |request| {
            t.fetch_add(1, Ordering::SeqCst);
            s.lock().unwrap().push(request.to_owned());
        }),
    }));
    client.version().await.expect("an answering agent");
    let (exec_id, _) = client
        .exec(rtv_protocol::ExecRequest {
            argv: vec!["sleep".into(), "30".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.wait(exec_id).await })
    };
    let pid = agent.child.id() as i32;
    // SAFETY: a signal to the agent this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // The stop is asynchronous: wait until every thread is stopped.
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("status"))
                    .is_ok_and(|s| s.contains("State:\tT"))
            })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stopped() {
        assert!(Instant::now() < deadline, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    match client.version().await {
        Err(ClientError::NoAnswer { request, after }) => {
            assert_eq!(request, "Version");
            assert_eq!(after, Duration::from_secs(1));
        }
        other => panic!("a stopped agent's answer: {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    match client.guest_info().await {
        Err(ClientError::NoAnswer { request, .. }) => assert_eq!(request, "GuestInfo"),
        other => panic!("a stopped agent's second answer: {other:?}"),
    }
    assert_eq!(trips.load(Ordering::SeqCst), 1, "the action ran once");
    assert_eq!(*seen.lock().unwrap(), vec!["Version".to_string()]);
    assert!(
        !waiting.is_finished(),
        "the wait for a running process was timed out"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    waiting.abort();
}
