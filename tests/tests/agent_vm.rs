//! The agent as PID 1 of a VM, reached through the VMM's hybrid vsock
//! socket: every scenario of tests/src/scenarios.rs in one shared sandbox
//! started from a VM template, and one test that cold boots a VM of its
//! own, dials it while it boots, talks to it and powers it off.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use rtv_runtime::sandbox::{Sandbox, SandboxConfig, VSOCK_FILE};
use rtv_runtime::{AgentClient, Endpoint};
use rtv_tests::{one_vm_at_a_time, scenarios, test_initramfs, BootSpec, VmProcess, BOOT_TIMEOUT};

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

/// The shared sandbox's state directory, removed when the test process exits.
static SHARED_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_shared_dir() {
    if let Some(dir) = SHARED_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One sandbox for this test binary, started on first use from a VM
/// template (made by a cold boot the first time, then cached), as rtv's
/// sandboxes start; it lives until the test process exits.
fn shared_vm() -> &'static Result<PathBuf, String> {
    static VM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VM.get_or_init(|| {
        let dir = SHARED_DIR
            .get_or_init(|| {
                std::env::temp_dir().join(format!("rtv-test-shared-{}", std::process::id()))
            })
            .clone();
        // SAFETY: registers a plain function with no arguments to run at exit.
        unsafe { libc::atexit(remove_shared_dir) };
        let (tx, rx) = mpsc::channel();
        // The sandbox's VMM is started from this thread (it gets SIGTERM
        // when its parent thread ends), which therefore lives as long as
        // the test process.
        std::thread::spawn(move || {
            let started = (|| -> anyhow::Result<(tokio::runtime::Runtime, Sandbox)> {
                let cfg = SandboxConfig::new(
                    rtv_tests::kernel()?,
                    test_initramfs()?,
                    rtv_tests::vmm_binary()?,
                    &dir,
                    "shared",
                    3,
                );
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let _one = one_vm_at_a_time();
                let sandbox = rt.block_on(Sandbox::start(cfg))?;
                Ok((rt, sandbox))
            })();
            match started {
                Ok((rt, sandbox)) => {
                    eprintln!(
                        "shared sandbox ready after {:.2}s ({:?})",
                        sandbox.ready_after().as_secs_f64(),
                        sandbox.origin()
                    );
                    let _ = tx.send(Ok(sandbox.state_dir().join(VSOCK_FILE)));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
            }
        });
        rx.recv().map_err(|e| e.to_string()).and_then(|r| r)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_scenario_in_a_vm() {
    let uds = shared_vm().as_ref().expect("shared VM");
    let endpoint = Endpoint::vm(uds);
    scenarios::connect_and_run_all(endpoint, Duration::from_secs(60), scenarios::Load::VM).await;
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
        assert_eq!(protocol, rtv_protocol::PROTOCOL_VERSION);
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
