//! Containers through the agent on the host (`rtv-agent --listen unix:`),
//! as root: namespaces, mounts, pivot_root, identity, capabilities,
//! seccomp and bad specs on a busybox bundle, in a few seconds; and every
//! kind of request at once on containers, beside a CPU hog. The host's
//! cgroup v2 has no controllers, so limits are tested in a VM
//! (containers_vm.rs), which runs these scenarios too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use oci_spec::runtime::LinuxResources;
use rtv_runtime::{AgentClient, Endpoint};
use rtv_tests::containers::{self, Place};
use rtv_tests::stress::{self, CpuHog, StressConfig};

/// An agent on the host with a busybox rootfs, in a directory of its own.
struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    async fn start(name: &str) -> (Agent, AgentClient) {
        let dir = std::env::temp_dir().join(format!("rtv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("scratch")).unwrap();
        containers::busybox_rootfs(&dir.join("rootfs")).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(rtv_tests::agent_binary().unwrap())
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .spawn()
            .unwrap();
        let agent = Agent { child, dir };
        let client = AgentClient::connect(Endpoint::Unix(sock), Duration::from_secs(30))
            .await
            .unwrap();
        (agent, client)
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_scenario_on_the_host() {
    let (agent, client) = Agent::start("containers-host").await;
    let place = Place::Host(agent.dir().join("rootfs"));
    let failures = containers::run_all(&client, &place, &agent.dir().join("scratch")).await;
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

/// Every kind of request at once on four containers, beside two busy
/// threads: each succeeds or fails as its container's lifecycle says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_the_host_are_ordered() {
    let (agent, client) = Agent::start("stress-host").await;
    let place = Place::Host(agent.dir().join("rootfs"));
    let _hog = CpuHog::start(2);
    let cfg = StressConfig {
        containers: 4,
        execs: 6,
        // Well below the agent's 30 s WaitOom recheck: a missed wake-up
        // fails the test.
        hang: Duration::from_secs(20),
        // The host's cgroup2 has no controllers to limit.
        update: LinuxResources::default(),
    };
    stress::stress(&client, &place, &cfg).await.unwrap();
}

/// The pod layer's container lifecycle over the agent on the host: hooks,
/// undo of failed creates, membership, nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_layer_over_the_host_agent() {
    let (agent, _client) = Agent::start("pod-host").await;
    let dir = agent.dir().join("pod");
    let pod = rtv_runtime::Pod::on_host_agent("pod-host", &dir, &agent.dir().join("agent.sock"))
        .await
        .unwrap();
    let rootfs = agent.dir().join("rootfs");
    let scratch = agent.dir().join("scratch");
    let failed = rtv_tests::pod::failed_creates(&pod, &rootfs, &scratch).await;
    let lifecycle = rtv_tests::pod::lifecycle(&pod, &rootfs, &scratch).await;
    pod.stop().await;
    assert!(!dir.exists(), "the pod's directory is left");
    failed.unwrap();
    lifecycle.unwrap();
}
