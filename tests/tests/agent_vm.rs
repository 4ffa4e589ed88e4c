//! The agent as PID 1 of a booted VM, reached through the VMM's hybrid
//! vsock socket: every scenario of tests/src/scenarios.rs in one shared VM,
//! and one test that boots a VM of its own, talks to it and powers it off.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use rtv_runtime::{AgentClient, Endpoint};
use rtv_tests::{
    one_vm_at_a_time, scenarios, test_initramfs, BootSpec, VmProcess, BOOT_TIMEOUT, READY_LINE,
};

/// The VMM command for a test VM with a vsock device on `uds`.
fn vm_command(uds: &std::path::Path, cid: u32) -> Command {
    let spec = BootSpec {
        append: String::new(),
        ..Default::default()
    };
    let mut cmd =
        rtv_tests::rtv_vmm_command_with_initrd(&spec, &test_initramfs().unwrap()).unwrap();
    cmd.arg("--vsock-cid")
        .arg(cid.to_string())
        .arg("--vsock-uds")
        .arg(uds);
    // SAFETY: prctl is async-signal-safe and touches no parent memory. The
    // VMM gets SIGTERM (and cleans up) when the thread that started it, a
    // thread that lives as long as the test process, goes away.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rtv-test-{tag}-{}.vsock", std::process::id()))
}

/// One VM for this test binary, booted on first use; it lives until the
/// test process exits.
fn shared_vm() -> &'static Result<PathBuf, String> {
    static VM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VM.get_or_init(|| {
        let uds = socket_path("shared");
        let (tx, rx) = mpsc::channel();
        let path = uds.clone();
        std::thread::spawn(move || {
            let _one = one_vm_at_a_time();
            let mut vm = match VmProcess::spawn(vm_command(&path, 3)) {
                Ok(vm) => vm,
                Err(e) => return tx.send(Err(format!("{e:#}"))),
            };
            let ready = vm.wait_for_line(READY_LINE, BOOT_TIMEOUT);
            let ok = ready.is_ok();
            let _ = tx.send(
                ready
                    .map(|l| eprintln!("shared VM ready after {:.2}s", l.at.as_secs_f64()))
                    .map_err(|e| format!("{e:#}")),
            );
            drop(_one);
            if ok {
                // Keep the VM (and this thread, its parent for PDEATHSIG)
                // alive, and show what the guest says (agent warnings).
                loop {
                    match vm.next_line(Duration::from_secs(3600)) {
                        Some(line) => {
                            eprintln!("[shared VM {:8.2}s] {}", line.at.as_secs_f64(), line.text)
                        }
                        None => {
                            if let Ok(status) = vm.wait_exit(Duration::from_millis(10)) {
                                eprintln!(
                                    "[shared VM] exited: {status}; stderr: {}",
                                    vm.take_stderr()
                                );
                                loop {
                                    std::thread::park();
                                }
                            }
                        }
                    }
                }
            }
            Ok(())
        });
        rx.recv()
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map(|()| uds)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_scenario_in_a_vm() {
    let uds = shared_vm().as_ref().expect("shared VM");
    let endpoint = Endpoint::vm(uds);
    scenarios::connect_and_run_all(endpoint, Duration::from_secs(60)).await;
}

#[test]
fn a_vm_of_its_own_handshakes_and_powers_off() {
    let uds = socket_path("own");
    // Boots one at a time; the guard is held in this thread, not across
    // an await of a shared runtime.
    let _one = one_vm_at_a_time();
    let mut vm = VmProcess::spawn(vm_command(&uds, 4)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The client dials while the guest boots, retrying until its deadline.
        let client = AgentClient::connect(Endpoint::vm(&uds), BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", vm.transcript()));
        let (protocol, _) = client.version().await.unwrap();
        assert_eq!(protocol, rtv_agent::protocol::PROTOCOL_VERSION);
        let info = client.guest_info().await.unwrap();
        assert!(info.kernel.contains("rtv"), "{info:?}");
        assert!(
            info.mem_total_kib > 64 * 1024 && info.mem_total_kib <= 128 * 1024,
            "{info:?}"
        );
        client.shutdown().await.unwrap();
        let status = vm.wait_exit(Duration::from_secs(120)).unwrap();
        assert_eq!(status.code(), Some(0), "stderr: {}", vm.take_stderr());
        assert!(!uds.exists(), "the VMM left its vsock socket behind");
    });
}
