//! Containers through the agent on the host (`rtv-agent --listen unix:`),
//! as root: namespaces, mounts, pivot_root, identity, capabilities,
//! seccomp and bad specs on a busybox bundle, in a few seconds. The host's
//! cgroup v2 has no controllers, so limits are tested in a VM
//! (containers_vm.rs), which runs these scenarios too.

use std::process::{Child, Command};
use std::time::Duration;

use rtv_runtime::{AgentClient, Endpoint};
use rtv_tests::containers::{self, Place};
use rtv_tests::workspace_binary;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_scenario_on_the_host() {
    let dir = std::env::temp_dir().join(format!("rtv-containers-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("scratch")).unwrap();
    let rootfs = dir.join("rootfs");
    containers::busybox_rootfs(&rootfs).unwrap();
    let sock = dir.join("agent.sock");
    let child = Command::new(workspace_binary("rtv-agent", "rtv-agent").unwrap())
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    let _agent = Agent {
        child,
        dir: dir.clone(),
    };
    let client = AgentClient::connect(Endpoint::Unix(sock), Duration::from_secs(30))
        .await
        .unwrap();
    let failures = containers::run_all(&client, &Place::Host(rootfs), &dir.join("scratch")).await;
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}
