//! `rtv-bench`: rtv's benchmarks, printed as tables.
//!
//! `rtv-bench boot` boots the same kernel and initramfs N times with rtv's
//! VMM and with QEMU's microvm machine, and reports the time from process
//! start to the agent's readiness line, and memory. `rtv-bench template`
//! compares sandboxes restored from a VM template with cold-booted ones.

use std::process::Command;
use std::time::{Duration, Instant};

use rtv_agent::protocol::{ExecRequest, StreamKind};
use rtv_runtime::{AgentClient, Endpoint};
use rtv_tests::workspace_binary;
use tokio::io::AsyncReadExt;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rtv_tests::{
    initramfs, kernel, mem_usage, rtv_vmm_command, BootSpec, MemUsage, VmProcess, BOOT_TIMEOUT,
    READY_LINE,
};

#[derive(Parser)]
#[command(name = "rtv-bench", about = "rtv benchmarks")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Boot to agent readiness: rtv-vmm (PVH and 64-bit entry) against QEMU microvm.
    Boot {
        /// Boots per VMM.
        #[arg(long, short = 'n', default_value_t = 5)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u64,
        /// Leave QEMU out.
        #[arg(long)]
        no_qemu: bool,
    },
    /// The agent over vsock in a booted VM (and, for reference, on the host):
    /// round trips of the version call and of exec `true`, stdout throughput.
    Agent {
        /// Round trips per figure.
        #[arg(long, short = 'n', default_value_t = 20)]
        runs: usize,
    },
    /// Sandboxes from a VM template against cold boots: start to agent ready
    /// (identity set), and the memory of idle sandboxes (RSS and PSS sums).
    Template {
        /// Template starts timed one after another.
        #[arg(long, short = 'n', default_value_t = 5)]
        runs: usize,
        /// Cold-booted sandboxes (booted one after another, timed, then
        /// measured idle together).
        #[arg(long, default_value_t = 10)]
        cold: usize,
        /// Sandboxes restored from the template at once, measured idle together.
        #[arg(long, default_value_t = 10)]
        idle: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u64,
    },
}

struct Sample {
    ready: Duration,
    mem: MemUsage,
}

fn one_boot(cmd: Command, guest_kib: u64) -> Result<Sample> {
    let mut vm = VmProcess::spawn(cmd)?;
    let line = vm.wait_for_line(READY_LINE, BOOT_TIMEOUT)?;
    let mem = mem_usage(vm.pid(), guest_kib).unwrap_or_default();
    vm.kill();
    Ok(Sample {
        ready: line.at,
        mem,
    })
}

fn qemu_command(mem: u64, cmdline: &str) -> Result<Command> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off,x-option-roms=off,rtc=off,pic=on,pit=on,isa-serial=on",
        "-enable-kvm",
        "-cpu",
        // QEMU aborts setting IA32_ARCH_CAPABILITIES on PVM hosts otherwise.
        "host,-arch-capabilities",
        "-m",
        &format!("{mem}M"),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(kernel()?)
    .arg("-initrd")
    .arg(initramfs()?)
    .args(["-append", cmdline]);
    Ok(cmd)
}

fn stats(samples: &[Sample]) -> (f64, f64, f64, u64, u64) {
    let mut t: Vec<f64> = samples.iter().map(|s| s.ready.as_secs_f64()).collect();
    t.sort_by(|a, b| a.total_cmp(b));
    let median = if t.len() % 2 == 1 {
        t[t.len() / 2]
    } else {
        (t[t.len() / 2 - 1] + t[t.len() / 2]) / 2.0
    };
    let peak = samples
        .iter()
        .map(|s| s.mem.peak_rss_kib)
        .max()
        .unwrap_or(0);
    let overhead = samples
        .iter()
        .map(|s| s.mem.overhead_kib)
        .max()
        .unwrap_or(0);
    (median, t[0], t[t.len() - 1], peak, overhead)
}

fn host_type() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kvm = match rtv_vmm_platform() {
        true => "PVM (kvm_pvm, guest kernel in native/emulated mode)",
        false => "hardware KVM",
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {kvm}")
}

fn rtv_vmm_platform() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The command line rtv-vmm gives the guest, so QEMU boots with the same.
fn rtv_cmdline() -> Result<String> {
    let out = Command::new(rtv_tests::vmm_binary()?)
        .arg("--print-cmdline")
        .output()
        .context("asking rtv-vmm for its command line")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn boot(runs: usize, mem: u64, no_qemu: bool) -> Result<()> {
    let guest_kib = mem * 1024;
    let cmdline = rtv_cmdline()?;
    let mut rows: Vec<(&str, Vec<Sample>)> =
        vec![("rtv-vmm (PVH)", vec![]), ("rtv-vmm (64-bit)", vec![])];
    if !no_qemu {
        rows.push(("QEMU microvm (PVH)", vec![]));
    }
    eprintln!("booting {runs} times per VMM, {mem} MiB, command line: {cmdline}");
    for run in 0..runs {
        for (name, samples) in rows.iter_mut() {
            let cmd = match *name {
                "rtv-vmm (PVH)" => rtv_vmm_command(&BootSpec {
                    mem_mib: mem,
                    protocol: "pvh",
                    append: String::new(),
                })?,
                "rtv-vmm (64-bit)" => rtv_vmm_command(&BootSpec {
                    mem_mib: mem,
                    protocol: "linux64",
                    append: String::new(),
                })?,
                _ => qemu_command(mem, &cmdline)?,
            };
            let s = one_boot(cmd, guest_kib).with_context(|| format!("{name}, run {}", run + 1))?;
            eprintln!(
                "  run {} {name}: ready after {:.2}s",
                run + 1,
                s.ready.as_secs_f64()
            );
            samples.push(s);
        }
    }
    println!(
        "Boot to agent readiness ({runs} runs each, {mem} MiB guest, 1 vCPU), host: {}",
        host_type()
    );
    println!();
    println!("| VMM | median | min | max | peak RSS | RSS outside guest RAM |");
    println!("|---|---|---|---|---|---|");
    for (name, samples) in &rows {
        let (median, min, max, peak, overhead) = stats(samples);
        println!(
            "| {name} | {median:.2} s | {min:.2} s | {max:.2} s | {:.1} MiB | {:.1} MiB |",
            peak as f64 / 1024.0,
            overhead as f64 / 1024.0
        );
    }
    Ok(())
}

struct AgentFigures {
    version_ms: f64,
    exec_true_ms: f64,
    stdout_mib_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn agent_figures(endpoint: Endpoint, runs: usize) -> Result<AgentFigures> {
    let client = AgentClient::connect(endpoint, BOOT_TIMEOUT).await?;
    let mut version = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        client.version().await?;
        version.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut exec_true = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let (id, _) = client
            .exec(ExecRequest {
                argv: vec!["true".into()],
                env: vec!["PATH=/bin:/usr/bin".into()],
                ..Default::default()
            })
            .await?;
        client.wait(id).await?;
        exec_true.push(t.elapsed().as_secs_f64() * 1e3);
    }
    const MIB: usize = 32;
    let (id, _) = client
        .exec(ExecRequest {
            argv: vec![
                "head".into(),
                "-c".into(),
                format!("{}", MIB << 20),
                "/dev/zero".into(),
            ],
            env: vec!["PATH=/bin:/usr/bin".into()],
            stdout: true,
            ..Default::default()
        })
        .await?;
    let t = Instant::now();
    let mut out = client.attach(id, StreamKind::Stdout).await?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0usize;
    loop {
        let n = out.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let secs = t.elapsed().as_secs_f64();
    client.wait(id).await?;
    anyhow::ensure!(total == MIB << 20, "read {total} bytes");
    Ok(AgentFigures {
        version_ms: median(version),
        exec_true_ms: median(exec_true),
        stdout_mib_s: MIB as f64 / secs,
    })
}

fn agent(runs: usize) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    // On the host: the agent's own cost, without VM or vsock.
    let dir = std::env::temp_dir().join(format!("rtv-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("agent.sock");
    let mut host_agent = Command::new(workspace_binary("rtv-agent", "rtv-agent")?)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let host = rt.block_on(agent_figures(Endpoint::Unix(sock), runs));
    let _ = host_agent.kill();
    let _ = host_agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let host = host?;
    // In a VM, through virtio-vsock.
    let uds = std::env::temp_dir().join(format!("rtv-bench-{}.vsock", std::process::id()));
    let mut cmd = rtv_tests::rtv_vmm_command_with_initrd(
        &BootSpec {
            append: String::new(),
            ..Default::default()
        },
        &rtv_tests::test_initramfs()?,
    )?;
    cmd.arg("--vsock-cid").arg("3").arg("--vsock-uds").arg(&uds);
    let mut vm = VmProcess::spawn(cmd)?;
    vm.wait_for_line(READY_LINE, BOOT_TIMEOUT)?;
    let guest = rt.block_on(agent_figures(Endpoint::vm(&uds), runs));
    vm.kill();
    let _ = std::fs::remove_file(&uds);
    let guest = guest?;
    println!("Agent over vsock (median of {runs}), host: {}", host_type());
    println!();
    println!("| figure | rtv VM (virtio-vsock) | agent on the host (Unix socket) |");
    println!("|---|---|---|");
    println!(
        "| version call round trip | {:.2} ms | {:.2} ms |",
        guest.version_ms, host.version_ms
    );
    println!(
        "| exec `true` and wait | {:.1} ms | {:.1} ms |",
        guest.exec_true_ms, host.exec_true_ms
    );
    println!(
        "| stdout throughput | {:.1} MiB/s | {:.1} MiB/s |",
        guest.stdout_mib_s, host.stdout_mib_s
    );
    Ok(())
}

/// RSS and PSS of a process in KiB, from /proc/PID/smaps_rollup.
fn rss_pss(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Pss:")))
}

/// Sums of RSS and PSS (KiB) over the sandboxes' VMM processes.
fn memory_of(sandboxes: &[rtv_runtime::Sandbox]) -> Result<(u64, u64)> {
    let mut sum = (0, 0);
    for sb in sandboxes {
        let (rss, pss) = rss_pss(sb.pid())?;
        sum.0 += rss;
        sum.1 += pss;
    }
    Ok(sum)
}

fn seconds(samples: &[Duration]) -> (f64, f64, f64) {
    let mut t: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    t.sort_by(|a, b| a.total_cmp(b));
    let median = if t.len() % 2 == 1 {
        t[t.len() / 2]
    } else {
        (t[t.len() / 2 - 1] + t[t.len() / 2]) / 2.0
    };
    (median, t[0], t[t.len() - 1])
}

async fn stop_all(sandboxes: Vec<rtv_runtime::Sandbox>) {
    for sb in sandboxes {
        let name = sb.hostname().to_owned();
        if let Err(e) = sb.stop(Duration::from_secs(60)).await {
            eprintln!("  stopping {name}: {e}");
        }
    }
}

async fn template_bench(runs: usize, cold: usize, idle: usize, mem: u64) -> Result<()> {
    use rtv_runtime::{Origin, Sandbox, SandboxConfig};
    let work = std::env::temp_dir().join(format!("rtv-bench-tmpl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (kernel, initrd, vmm) = (kernel()?, initramfs()?, rtv_tests::vmm_binary()?);
    let next = std::sync::atomic::AtomicU32::new(0);
    let config = |tag: &str, use_template: bool| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut c = SandboxConfig::new(
            &kernel,
            &initrd,
            &vmm,
            work.join(format!("{tag}-{i}")),
            format!("{tag}-{i}"),
            10 + i,
        );
        c.mem_mib = mem;
        c.use_template = use_template;
        c.template_dir = Some(work.join("templates"));
        c.boot_timeout = BOOT_TIMEOUT;
        c
    };
    let result = async {
        // The template, made once (a cold boot and a snapshot).
        let cfg = config("make", true);
        let (cache, spec) = (cfg.template_cache()?, cfg.template_spec());
        let made = tokio::task::spawn_blocking(move || cache.get_or_make(&spec)).await??;
        let make_s = made.made_in.unwrap_or_default().as_secs_f64();
        let disk_mib = std::fs::read_dir(made.template.snapshot_dir())?
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum::<u64>() as f64
            / (1u64 << 20) as f64;
        eprintln!("template made in {make_s:.2}s, {disk_mib:.1} MiB on disk");
        // Template starts, one after another.
        let mut warm = Vec::new();
        for run in 0..runs {
            let sb = Sandbox::start(config("tmpl", true)).await?;
            anyhow::ensure!(
                matches!(sb.origin(), Origin::Template { made_in: None, .. }),
                "run {}: not restored from the template: {:?}",
                run + 1,
                sb.origin()
            );
            eprintln!("  template start {}: {:.2}s", run + 1, sb.ready_after().as_secs_f64());
            warm.push(sb.ready_after());
            stop_all(vec![sb]).await;
        }
        // `idle` sandboxes restored at once, left idle and measured.
        let t = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..idle {
            starts.push(tokio::spawn(Sandbox::start(config("idle", true))));
        }
        let mut restored = Vec::new();
        let mut failed = None;
        for s in starts {
            match s.await? {
                Ok(sb) => restored.push(sb),
                Err(e) => failed = Some(e),
            }
        }
        let together = t.elapsed().as_secs_f64();
        let at_once: Vec<Duration> = restored.iter().map(|s| s.ready_after()).collect();
        let restored_mem = match failed {
            None => {
                eprintln!("  {idle} restored at once in {together:.2}s; idling 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
                memory_of(&restored)
            }
            Some(e) => Err(e.into()),
        };
        stop_all(restored).await;
        let restored_mem = restored_mem?;
        // `cold` cold boots, one after another, kept running, then measured.
        let mut booted = Vec::new();
        let mut cold_times = Vec::new();
        let mut failed = None;
        for run in 0..cold {
            match Sandbox::start(config("cold", false)).await {
                Ok(sb) => {
                    eprintln!("  cold boot {}: {:.2}s", run + 1, sb.ready_after().as_secs_f64());
                    cold_times.push(sb.ready_after());
                    booted.push(sb);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let cold_mem = match failed {
            None => {
                eprintln!("  {cold} cold-booted; idling 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
                memory_of(&booted)
            }
            Some(e) => Err(e.into()),
        };
        stop_all(booted).await;
        let cold_mem = cold_mem?;
        println!(
            "Sandbox start to agent ready, identity set ({mem} MiB guest, 1 vCPU), host: {}",
            host_type()
        );
        println!();
        println!(
            "Template made once in {make_s:.2} s (cold boot and snapshot), {disk_mib:.1} MiB on disk."
        );
        if cold != idle {
            println!(
                "Only {cold} cold-booted sandboxes (--cold {cold}) against {idle} restored ones."
            );
        }
        println!();
        println!("| start | runs | median | min | max |");
        println!("|---|---|---|---|---|");
        let row = |name: &str, t: &[Duration]| {
            if t.is_empty() {
                return;
            }
            let (median, min, max) = seconds(t);
            println!(
                "| {name} | {} | {median:.2} s | {min:.2} s | {max:.2} s |",
                t.len()
            );
        };
        row("cold boot", &cold_times);
        row("from the template", &warm);
        row(&format!("from the template, {idle} at once"), &at_once);
        println!();
        println!("| idle sandboxes | count | RSS sum | PSS sum | PSS per sandbox |");
        println!("|---|---|---|---|---|");
        let mib = |kib: u64| kib as f64 / 1024.0;
        for (name, n, (rss, pss)) in [
            ("cold-booted", cold, cold_mem),
            ("restored from one template", idle, restored_mem),
        ] {
            if n == 0 {
                continue;
            }
            println!(
                "| {name} | {n} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
                mib(rss),
                mib(pss),
                mib(pss) / n as f64
            );
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn main() -> Result<()> {
    match Args::parse().what {
        What::Boot { runs, mem, no_qemu } => boot(runs.max(1), mem, no_qemu),
        What::Agent { runs } => agent(runs.max(1)),
        What::Template {
            runs,
            cold,
            idle,
            mem,
        } => tokio::runtime::Runtime::new()?.block_on(template_bench(runs, cold, idle, mem)),
    }
}
