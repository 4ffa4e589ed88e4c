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
