//! `rtv-bench`: rtv's benchmarks, printed as tables.
//!
//! `rtv-bench boot` boots the same kernel and initramfs N times with rtv's
//! VMM and with QEMU's microvm machine, and reports the time from process
//! start to the agent's readiness line, and memory. `rtv-bench template`
//! compares sandboxes restored from a VM template with cold-booted ones.
//! `rtv-bench fs` compares reads and metadata walks through virtio-fs in a
//! VM with the same on the host.
//! `rtv-bench oci` runs busybox `true` with rtv, runc and crun, directly
//! and through containerd, and compares the memory of a running container.
//! `rtv-bench cri` starts pods through containerd's CRI plugin on the
//! runc, crun and rtv handlers, and compares their start time and what a
//! pod costs on the host beside its containers. `rtv-bench net` measures
//! TCP throughput and round trips between two pods on a CNI bridge.
//! `rtv-bench jail` measures what the VMM's jail and seccomp filters cost.

mod cri;
mod jail;
mod net;
mod soak;

use std::process::Command;
use std::time::{Duration, Instant};

use rtv_protocol::{ExecRequest, StreamKind};
use rtv_runtime::{AgentClient, Endpoint};
use tokio::io::AsyncReadExt;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rtv_tests::{
    initramfs, kernel, mem_usage, rtv_vmm_command, BootSpec, MemUsage, VmProcess, BOOT_TIMEOUT,
    READY_LINE,
};

/// `KEY=VALUE` of `--sysctl`.
fn parse_sysctl(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

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
    /// What the VMM's hardening costs: sandbox starts from one template with
    /// the jail and seccomp filters on and with both off (alternating), and
    /// idle VMMs' memory in each mode.
    Jail {
        /// Starts per mode.
        #[arg(long, short = 'n', default_value_t = 10)]
        runs: usize,
        /// Idle sandboxes measured per mode.
        #[arg(long, default_value_t = 5)]
        idle: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u64,
    },
    /// virtio-fs in a VM against the host's own file system: sequential
    /// read of a 256 MiB file (`dd bs=1M`) and `find` + `stat` over 5,000
    /// files, with caches dropped (cold) and with the host's page cache
    /// warm; the guest's fixed exec cost is measured and subtracted.
    Fs {
        /// Runs per figure (the median is reported). One VM run takes
        /// minutes under PVM's emulation, hence one by default.
        #[arg(long, short = 'n', default_value_t = 1)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u64,
    },
    /// OCI runtimes side by side: `<runtime> run` and `ctr run --rm` of
    /// busybox `true` with runc, crun and rtv, and the host memory of one
    /// running container.
    Oci {
        /// Runs per figure (median and min are reported).
        #[arg(long, short = 'n', default_value_t = 5)]
        runs: usize,
        /// Leave the `ctr run --rm` row out.
        #[arg(long)]
        no_containerd: bool,
        /// Seconds to wait at most for the 1-minute load average to fall
        /// below 1.5 before measuring.
        #[arg(long, default_value_t = 600)]
        max_wait: u64,
    },
    /// Many lifecycles through rtv and pods through CRI in a row, with a
    /// census of what could leak (processes, mounts, sockets, links,
    /// network namespaces, cgroups, state, descriptors, the template cache,
    /// memory) after the first and every tenth; fails on a leak.
    Soak {
        /// Cycles of each kind.
        #[arg(long, default_value_t = 200)]
        cycles: usize,
        /// A census after every this many cycles.
        #[arg(long, default_value_t = 10)]
        every: usize,
        /// Only the rtv lifecycles.
        #[arg(long, conflicts_with = "cri_only")]
        rtv_only: bool,
        /// Only the CRI pods.
        #[arg(long)]
        cri_only: bool,
    },
    /// Pods through containerd 1.6's CRI plugin on the runc, crun and rtv
    /// handlers: `RunPodSandbox` to the first container running, stop and
    /// remove, and the host memory and idle CPU of a pod beside its
    /// container (the shim, and rtv's VMM or the pause container).
    Cri {
        /// Pods per handler (median and min are reported).
        #[arg(long, short = 'n', default_value_t = 5)]
        runs: usize,
        /// Seconds over which the idle pods' CPU is measured.
        #[arg(long, default_value_t = 30)]
        idle: u64,
        /// Seconds to wait at most for the 1-minute load average to fall
        /// below 1.5 before measuring.
        #[arg(long, default_value_t = 600)]
        max_wait: u64,
    },
    /// TCP between two pods on one CNI bridge, on the runc and rtv
    /// handlers of one containerd: throughput of a stream from one pod to
    /// the other, `ping`'s round trip, and rtv's VMM CPU per MiB moved.
    Net {
        /// Streams per handler (the median is reported).
        #[arg(long, short = 'n', default_value_t = 3)]
        runs: usize,
        /// MiB per stream (the server pod keeps the file in its page
        /// cache: keep it well below the VM's memory).
        #[arg(long, default_value_t = 32)]
        mib: u64,
        /// `ping` packets.
        #[arg(long, default_value_t = 20)]
        pings: u32,
        /// Seconds to wait at most for the 1-minute load average to fall
        /// below 1.5 before measuring.
        #[arg(long, default_value_t = 600)]
        max_wait: u64,
        /// A sysctl of both pods (CRI's `linux.sysctls`), `KEY=VALUE`;
        /// repeatable.
        #[arg(long, value_parser = parse_sysctl)]
        sysctl: Vec<(String, String)>,
    },
    /// One flame graph of several parts of a guest profile (rtv-vmm's
    /// `--profile`: `<n>.folded` files, e.g. the parts of a pod's start
    /// listed in its `parts.txt`), their samples added up.
    Flamegraph {
        /// The SVG to write.
        #[arg(long, short = 'o')]
        out: std::path::PathBuf,
        /// Its title.
        #[arg(long, default_value = "guest profile")]
        title: String,
        /// The folded files.
        #[arg(required = true)]
        folded: Vec<std::path::PathBuf>,
    },
}

/// One flame graph of several parts of a guest profile.
fn flamegraph(out: &std::path::Path, title: &str, files: &[std::path::PathBuf]) -> Result<()> {
    let total = rtv_tests::profile::flamegraph(out, title, files)?;
    eprintln!("{total} samples: {}", out.display());
    Ok(())
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
                    ..Default::default()
                })?,
                "rtv-vmm (64-bit)" => rtv_vmm_command(&BootSpec {
                    mem_mib: mem,
                    protocol: "linux64",
                    append: String::new(),
                    ..Default::default()
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
    let mut host_agent = Command::new(rtv_tests::agent_binary()?)
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

/// Sums of RSS and PSS (KiB) over the sandboxes' VMM processes (each VMM
/// with its keeper).
fn memory_of(sandboxes: &[rtv_runtime::Sandbox]) -> Result<(u64, u64)> {
    let mut sum = (0, 0);
    for sb in sandboxes {
        // The VMM and, with its jail, the keeper outside its pid namespace.
        for pid in rtv_runtime::vmm_process::family(sb.pid() as i32) {
            let (rss, pss) = rss_pss(pid as u32)?;
            sum.0 += rss;
            sum.1 += pss;
        }
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

/// Starts a sandbox per configuration, one after another (each start
/// printed as `what N`), leaves them idle 5 s and measures them together
/// (RSS and PSS sums, [`memory_of`]); stops them all, whatever happened.
/// Returns each one's time to ready and the sums.
async fn start_idle_measure(
    configs: impl Iterator<Item = rtv_runtime::SandboxConfig>,
    what: &str,
) -> Result<(Vec<Duration>, (u64, u64))> {
    let mut started = Vec::new();
    let mut failed = None;
    for (n, cfg) in configs.enumerate() {
        match rtv_runtime::Sandbox::start(cfg).await {
            Ok(sb) => {
                eprintln!("  {what} {}: {:.2}s", n + 1, sb.ready_after().as_secs_f64());
                started.push(sb);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let times = started.iter().map(|s| s.ready_after()).collect();
    let mem = match failed {
        None => {
            eprintln!("  {} started; idling 5 s", started.len());
            tokio::time::sleep(Duration::from_secs(5)).await;
            memory_of(&started)
        }
        Some(e) => Err(e.into()),
    };
    stop_all(started).await;
    Ok((times, mem?))
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
    // One vCPU: the kernel rtv boots for it (the uniprocessor build).
    let kernel = rtv_tests::artifacts()?.kernel_for(1).to_path_buf();
    let (initrd, vmm) = (initramfs()?, rtv_tests::vmm_binary()?);
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
        let (cold_times, cold_mem) =
            start_idle_measure((0..cold).map(|_| config("cold", false)), "cold boot").await?;
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

/// Size of the file read sequentially.
const FS_BIG_MIB: usize = 256;
/// Directories and files per directory of the tree walked.
const FS_TREE: (usize, usize) = (50, 100);

/// The share: `big` (256 MiB of pseudo-random bytes, not sparse) and
/// `tree/dNN/fNN` (5,000 small files).
fn make_share(share: &std::path::Path) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(share)?;
    let mut big = std::io::BufWriter::new(std::fs::File::create(share.join("big"))?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..FS_BIG_MIB {
        for word in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        big.write_all(&chunk)?;
    }
    big.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    for d in 0..FS_TREE.0 {
        let dir = share.join("tree").join(format!("d{d}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..FS_TREE.1 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d} {f}\n"))?;
        }
    }
    Ok(())
}

/// Drops the host's page cache, dentries and inodes; false when not allowed.
fn drop_host_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Runs `argv` on the host (stdout to /dev/null); its wall time.
fn host_time(argv: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new(argv[0])
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {argv:?} on the host"))?;
    let took = t.elapsed();
    anyhow::ensure!(status.success(), "{argv:?} on the host: {status}");
    Ok(took)
}

/// Runs `argv` in the guest (stdout to /dev/null there) and waits for it;
/// the host's wall time from the exec request to the exit.
async fn guest_time(client: &AgentClient, argv: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let (id, _) = client
        .exec(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin:/usr/bin".into()],
            ..Default::default()
        })
        .await?;
    let status = client.wait(id).await?;
    let took = t.elapsed();
    anyhow::ensure!(status.code() == 0, "{argv:?} in the guest: {status:?}");
    Ok(took)
}

/// Runs `script` with `sh -c` in the guest; its stdout (and stderr, in the
/// error).
async fn guest_sh(client: &AgentClient, script: &str) -> Result<String> {
    let (out, err, status) = rtv_tests::scenarios::run(client, &["sh", "-c", script]).await?;
    anyhow::ensure!(
        status.code() == 0,
        "{script:?} in the guest: {status:?}: {err}"
    );
    Ok(out)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// One row of the fs table.
struct FsRow {
    workload: String,
    caches: &'static str,
    vm: f64,
    net: f64,
    host: f64,
}

async fn fs_figures(
    client: &AgentClient,
    share: &std::path::Path,
    runs: usize,
    cold: bool,
) -> Result<(f64, usize, Vec<FsRow>)> {
    guest_sh(client, "mkdir -p /mnt && mount -t virtiofs rtvfs /mnt").await?;
    let count = guest_sh(client, "busybox find /mnt/tree -type f | wc -l").await?;
    let files = FS_TREE.0 * FS_TREE.1;
    anyhow::ensure!(
        count.trim() == files.to_string(),
        "the guest sees {count:?} files"
    );
    // The fixed cost of one exec in the guest, through the agent.
    let mut exec_true = Vec::new();
    for _ in 0..runs {
        exec_true.push(secs(guest_time(client, &["true"]).await?));
    }
    let exec_s = median(exec_true);
    eprintln!("  exec `true` in the guest: {exec_s:.2} s");
    // How many times find runs stat (one exec each), counted on the host,
    // whose paths are longer than the guest's.
    let tree = share.join("tree");
    let tree_s = tree.to_string_lossy().into_owned();
    let batches = Command::new("/bin/busybox")
        .args([
            "find",
            &tree_s,
            "-type",
            "f",
            "-exec",
            "/bin/busybox",
            "echo",
            "{}",
            "+",
        ])
        .output()
        .context("busybox find on the host")?
        .stdout
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    let big = share.join("big").to_string_lossy().into_owned();
    let big_if = format!("if={big}");
    let workloads: Vec<(String, Vec<String>, Vec<String>, usize)> = vec![
        (
            format!("sequential read of {FS_BIG_MIB} MiB (`dd bs=1M`)"),
            ["dd", "if=/mnt/big", "of=/dev/null", "bs=1M"]
                .map(String::from)
                .to_vec(),
            ["/bin/busybox", "dd", &big_if, "of=/dev/null", "bs=1M"]
                .map(String::from)
                .to_vec(),
            1,
        ),
        (
            format!("`find -type f -exec stat -t {{}} +` over {files} files"),
            [
                "busybox",
                "find",
                "/mnt/tree",
                "-type",
                "f",
                "-exec",
                "busybox",
                "stat",
                "-t",
                "{}",
                "+",
            ]
            .map(String::from)
            .to_vec(),
            [
                "/bin/busybox",
                "find",
                &tree_s,
                "-type",
                "f",
                "-exec",
                "/bin/busybox",
                "stat",
                "-t",
                "{}",
                "+",
            ]
            .map(String::from)
            .to_vec(),
            1 + batches,
        ),
    ];
    let mut rows = Vec::new();
    for (name, guest_argv, host_argv, execs) in &workloads {
        let guest_argv: Vec<&str> = guest_argv.iter().map(String::as_str).collect();
        let host_argv: Vec<&str> = host_argv.iter().map(String::as_str).collect();
        let modes: &[(&'static str, bool)] = if cold {
            &[("cold", true), ("host warm", false)]
        } else {
            &[("host warm", false)]
        };
        for &(caches, drop_host) in modes {
            let (mut vm, mut host) = (Vec::new(), Vec::new());
            for run in 0..runs {
                // The guest's caches are dropped before every VM run: each
                // byte and attribute then crosses virtio-fs.
                guest_sh(client, "echo 3 > /proc/sys/vm/drop_caches").await?;
                if drop_host {
                    drop_host_caches();
                }
                let v = secs(guest_time(client, &guest_argv).await?);
                if drop_host {
                    drop_host_caches();
                }
                let h = secs(host_time(&host_argv)?);
                eprintln!(
                    "  {name}, {caches}, run {}: VM {v:.2} s, host {h:.3} s",
                    run + 1
                );
                vm.push(v);
                host.push(h);
            }
            let vm = median(vm);
            rows.push(FsRow {
                workload: name.clone(),
                caches,
                vm,
                net: (vm - *execs as f64 * exec_s).max(0.0),
                host: median(host),
            });
        }
    }
    Ok((exec_s, 1 + batches, rows))
}

fn fs_bench(runs: usize, mem: u64) -> Result<()> {
    let work = std::env::temp_dir().join(format!("rtv-bench-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let share = work.join("share");
    eprintln!("writing the share: {FS_BIG_MIB} MiB file and a 5,000-file tree");
    make_share(&share)?;
    let cold = drop_host_caches();
    if !cold {
        eprintln!("cannot drop the host's page cache (needs root): warm figures only");
    }
    let uds = std::env::temp_dir().join(format!("rtv-bench-fs-{}.vsock", std::process::id()));
    let mut cmd = rtv_tests::rtv_vmm_command_with_initrd(
        &BootSpec {
            mem_mib: mem,
            append: String::new(),
            ..Default::default()
        },
        &rtv_tests::test_initramfs()?,
    )?;
    cmd.args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&share);
    let result = (|| {
        let mut vm = VmProcess::spawn(cmd)?;
        vm.wait_for_line(READY_LINE, BOOT_TIMEOUT)?;
        let rt = tokio::runtime::Runtime::new()?;
        let figures = rt.block_on(async {
            let client = AgentClient::connect(Endpoint::vm(&uds), BOOT_TIMEOUT).await?;
            fs_figures(&client, &share, runs, cold).await
        });
        vm.kill();
        figures
    })();
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_dir_all(&work);
    let (exec_s, find_execs, rows) = result?;
    println!(
        "virtio-fs against the host's file system (median of {runs}; {mem} MiB guest, 1 vCPU, busybox on both sides), host: {}",
        host_type()
    );
    println!();
    println!(
        "Caches: \"cold\" drops the host's page cache (`echo 3 > /proc/sys/vm/drop_caches`) before each run; \
         \"host warm\" leaves the files in the host's page cache. The guest's caches are dropped before every VM run, \
         so every byte and attribute crosses virtio-fs. \"net\" subtracts the guest's fixed exec cost: \
         {exec_s:.2} s per exec (an exec of `true` through the agent, median), 1 exec for dd, {find_execs} for find + stat."
    );
    println!();
    println!("| workload | caches | VM raw | VM net | host | VM/host raw | VM/host net |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} s | {:.2} s | {:.3} s | {:.0}x | {:.0}x |",
            r.workload,
            r.caches,
            r.vm,
            r.net,
            r.host,
            r.vm / r.host,
            r.net / r.host
        );
    }
    for r in rows.iter().filter(|r| r.workload.starts_with("sequential")) {
        println!();
        println!(
            "Read throughput ({}): VM {:.2} MiB/s raw, {:.2} MiB/s net; host {:.0} MiB/s.",
            r.caches,
            FS_BIG_MIB as f64 / r.vm,
            FS_BIG_MIB as f64 / r.net.max(1e-3),
            FS_BIG_MIB as f64 / r.host
        );
    }
    Ok(())
}

/// The 1-minute load average the `oci` bench waits to fall below.
const OCI_QUIET_LOAD: f64 = 1.5;
/// How long one runtime or `ctr` command may take.
const OCI_TIMEOUT: Duration = Duration::from_secs(180);

/// The load averages (1, 5, 15 minutes) as /proc/loadavg has them, and the
/// 1-minute one as a number.
fn oci_loadavg() -> Result<(f64, String)> {
    let text = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    let one = fields
        .first()
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("parsing /proc/loadavg: {text:?}"))?;
    Ok((one, fields.join(" ")))
}

/// Waits, up to `max`, for the 1-minute load to fall below
/// [`OCI_QUIET_LOAD`]; says how that went.
fn oci_wait_for_quiet_host(max: Duration) -> Result<String> {
    let t = Instant::now();
    loop {
        let (one, all) = oci_loadavg()?;
        let waited = t.elapsed().as_secs_f64();
        if one <= OCI_QUIET_LOAD {
            return Ok(if waited < 1.0 {
                format!("load average {all} at the start")
            } else {
                format!("load average {all} at the start, after waiting {waited:.0} s for the 1-minute load to fall below {OCI_QUIET_LOAD}")
            });
        }
        if t.elapsed() >= max {
            return Ok(format!(
                "load average {all} at the start: the 1-minute load stayed above {OCI_QUIET_LOAD} for {waited:.0} s (other work on the machine), measured anyway"
            ));
        }
        eprintln!("load average {all}: waiting for the 1-minute load to fall below {OCI_QUIET_LOAD} ({waited:.0} s so far)");
        std::thread::sleep(Duration::from_secs(20));
    }
}

/// An OCI runtime with runc's command line, and its own `--root`.
struct OciRuntime {
    name: &'static str,
    /// Its column's heading.
    label: &'static str,
    bin: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl OciRuntime {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root").arg(&self.root).args(args);
        cmd
    }
}

/// What a command wrote to its log file, for error messages.
fn oci_log_text(log: &std::path::Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    String::from_utf8_lossy(&text[start..]).trim().to_owned()
}

/// Runs `cmd` (stdin /dev/null, stdout and stderr to `log`) and returns its
/// wall time from spawn to exit, polled every millisecond; fails if it does
/// not exit 0 within [`OCI_TIMEOUT`] (and kills it then).
fn oci_timed(mut cmd: Command, log: &std::path::Path) -> Result<Duration> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let what = format!("{cmd:?}");
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if t.elapsed() >= OCI_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{what} did not finish within {OCI_TIMEOUT:?}: {}",
                oci_log_text(log)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = t.elapsed();
    anyhow::ensure!(status.success(), "{what}: {status}: {}", oci_log_text(log));
    Ok(took)
}

/// A bundle at `dir`: a busybox root file system and rtv's default spec
/// (runc's, without a network namespace) running `args`, no terminal.
fn oci_bundle(dir: &std::path::Path, args: &[&str]) -> Result<()> {
    rtv_tests::containers::busybox_rootfs(&dir.join("rootfs"))?;
    let mut spec: serde_json::Value = serde_json::from_str(rtv_runtime::spec::DEFAULT_SPEC)
        .context("parsing rtv_runtime::spec::DEFAULT_SPEC")?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(args);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// `delete --force` of `id`, whatever state it is in (errors ignored: the
/// container is usually gone already).
fn oci_delete(rt: &OciRuntime, id: &str, log: &std::path::Path) {
    let _ = oci_timed(rt.command(&["delete", "--force", id]), log);
}

/// Runs `f` for every runtime still without an error, `runs` rounds (the
/// runtimes alternate within a round); keeps each runtime's times, or its
/// first error (it is then left out of the later rounds).
fn oci_rounds(
    names: &[&str],
    runs: usize,
    what: &str,
    mut f: impl FnMut(usize, usize) -> Result<Duration>,
) -> Vec<Result<Vec<Duration>, String>> {
    let mut results: Vec<Result<Vec<Duration>, String>> =
        names.iter().map(|_| Ok(vec![])).collect();
    for run in 0..runs {
        for (i, name) in names.iter().enumerate() {
            let Ok(times) = &mut results[i] else {
                continue;
            };
            match f(i, run) {
                Ok(t) => {
                    eprintln!(
                        "  {what}, {name}, run {}: {:.3} s",
                        run + 1,
                        t.as_secs_f64()
                    );
                    times.push(t);
                }
                Err(e) => {
                    eprintln!("  {what}, {name}, run {}: {e:#}", run + 1);
                    results[i] = Err(format!("{e:#}"));
                }
            }
        }
    }
    results
}

/// Host memory of one running container.
struct OciMem {
    /// (process, pid, RSS KiB, PSS KiB) of every process counted.
    procs: Vec<(String, u32, u64, u64)>,
    /// rtv: the VMM's resident memory outside guest RAM (KiB).
    vmm_overhead_kib: Option<u64>,
}

/// Processes (other than `known`) whose command line mentions `root`.
fn oci_processes_mentioning(root: &std::path::Path, known: &[u32]) -> Vec<(String, u32)> {
    let root = root.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if known.contains(&pid) || pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.contains(&root)) {
            let name = args
                .first()
                .and_then(|a| a.rsplit('/').next())
                .unwrap_or("?")
                .to_owned();
            found.push((name, pid));
        }
    }
    found
}

/// The VMM pid and guest memory (MiB) of the pod holding `id`, from its
/// record (`<root>/.sandboxes/*/pod.json`, the pod layer's).
fn oci_rtv_sandbox(root: &std::path::Path, id: &str) -> Result<(u32, u64)> {
    let dir = root.join(".sandboxes");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let Ok(rec) = rtv_runtime::Pod::record(&entry?.path()) else {
            continue;
        };
        if rec.members.iter().any(|m| m == id) {
            let pid = u32::try_from(rec.vmm_pid).context("the pod's vmm_pid")?;
            return Ok((pid, rec.mem_mib));
        }
    }
    anyhow::bail!("no pod under {} holds {id}", dir.display())
}

/// Starts one container running `sleep` (`run -d`), lets it idle for 5 s,
/// and measures the host processes that stand for it; then kills and
/// deletes it.
fn oci_memory(rt: &OciRuntime, bundle: &std::path::Path, log: &std::path::Path) -> Result<OciMem> {
    let id = format!("bench-mem-{}", rt.name);
    let bundle_s = bundle.to_string_lossy().into_owned();
    let result = (|| {
        oci_timed(rt.command(&["run", "-d", "--bundle", &bundle_s, &id]), log)?;
        let state = rt
            .command(&["state", &id])
            .output()
            .with_context(|| format!("{} state {id}", rt.name))?;
        let state: serde_json::Value =
            serde_json::from_slice(&state.stdout).with_context(|| {
                format!(
                    "{} state {id}: {}",
                    rt.name,
                    String::from_utf8_lossy(&state.stderr)
                )
            })?;
        anyhow::ensure!(
            state["status"] == "running",
            "{} state {id}: {state}",
            rt.name
        );
        let pid = state["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .with_context(|| format!("{} state {id}: no pid in {state}", rt.name))?;
        let mut pids = Vec::new();
        let mut vmm = None;
        if rt.name == "rtv" {
            let (vmm_pid, mem_mib) = oci_rtv_sandbox(&rt.root, &id)?;
            pids.push(("rtv-vmm".to_owned(), vmm_pid));
            pids.push(("rtv waiter".to_owned(), pid));
            vmm = Some((vmm_pid, mem_mib));
        } else {
            pids.push(("container init (`sleep`)".to_owned(), pid));
        }
        std::thread::sleep(Duration::from_secs(5));
        let known: Vec<u32> = pids.iter().map(|p| p.1).collect();
        for (name, pid) in oci_processes_mentioning(&rt.root, &known) {
            eprintln!(
                "  {}: also counting {name} ({pid}), which names the root",
                rt.name
            );
            pids.push((name, pid));
        }
        let mut procs = Vec::new();
        for (name, pid) in pids {
            let (rss, pss) = rss_pss(pid).with_context(|| format!("{} {name}", rt.name))?;
            procs.push((name, pid, rss, pss));
        }
        let vmm_overhead_kib = match vmm {
            Some((pid, mem_mib)) => Some(mem_usage(pid, mem_mib * 1024)?.overhead_kib),
            None => None,
        };
        Ok(OciMem {
            procs,
            vmm_overhead_kib,
        })
    })();
    let _ = oci_timed(rt.command(&["kill", &id, "KILL"]), log);
    oci_delete(rt, &id, log);
    result
}

/// `$RTV_BIN_RTV`; under scripts/bench.sh (which built the workspace in
/// release and set `$RTV_VMM`), the `rtv` next to this binary; else the
/// release `rtv`, built if needed (with rtv-vmm and the containerd shim,
/// which sit beside it).
/// The release `rtv` and the shim beside it, with the guest's kernels,
/// initramfs and VMM exported for containerd and the shims it starts.
fn rtv_and_shim() -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let rtv = oci_rtv_binary()?;
    let shim = rtv.with_file_name("containerd-shim-rtv-v2");
    anyhow::ensure!(
        shim.exists(),
        "{} not found (scripts/build.sh builds it)",
        shim.display()
    );
    let vmm = match std::env::var_os("RTV_VMM") {
        Some(p) => std::path::PathBuf::from(p),
        None => rtv.with_file_name("rtv-vmm"),
    };
    rtv_tests::export_kernels()?;
    std::env::set_var("RTV_INITRAMFS", initramfs()?);
    std::env::set_var("RTV_VMM", &vmm);
    Ok((rtv, shim))
}

fn oci_rtv_binary() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("RTV_BIN_RTV") {
        return Ok(p.into());
    }
    let sibling = std::env::current_exe()?.with_file_name("rtv");
    if std::env::var_os("RTV_VMM").is_some() && !cfg!(debug_assertions) && sibling.exists() {
        return Ok(sibling);
    }
    let root = rtv_tests::repo_root();
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "rtv-runtime",
            "-p",
            "rtv-vmm",
            "-p",
            "containerd-shim-rtv-v2",
        ])
        .current_dir(&root)
        .status()
        .context("running cargo")?;
    anyhow::ensure!(status.success(), "building rtv and rtv-vmm: {status}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/rtv"))
}

/// "median s (min s)" of `t`, or why there is none.
fn oci_cell(r: &Result<Vec<Duration>, String>) -> String {
    match r {
        Ok(t) if !t.is_empty() => {
            let (median, min, _) = seconds(t);
            format!("{median:.3} s ({min:.3} s)")
        }
        Ok(_) => "—".into(),
        Err(_) => "failed (below)".into(),
    }
}

/// crun 1.8 refuses hosts with cgroup v1 controllers and a cgroup2 mount
/// that holds any controller ("cgroups in hybrid mode not supported"), as
/// here (hugetlb at /sys/fs/cgroup/unified). This script runs it in a
/// private mount namespace without that mount: crun then sees plain
/// cgroup v1; the host's mounts are untouched.
const OCI_CRUN_WRAPPER: &str = "#!/bin/sh\n\
    exec unshare -m /bin/sh -c 'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec /usr/bin/crun \"$@\"' crun \"$@\"\n";

/// crun if it runs the bundle here: itself, else through
/// [`OCI_CRUN_WRAPPER`] when it refuses the host's hybrid cgroups; `None`
/// (and why) when neither works.
fn oci_crun(
    work: &std::path::Path,
    bundle: &std::path::Path,
) -> Result<(Option<OciRuntime>, String)> {
    let crun = std::path::Path::new("/usr/bin/crun");
    if !crun.exists() {
        return Ok((None, "crun is not installed (apt-get install crun)".into()));
    }
    let log = work.join("crun-probe.log");
    let bundle_s = bundle.to_string_lossy().into_owned();
    let probe = |rt: &OciRuntime| -> Result<()> {
        let id = "bench-probe-crun";
        let ran = oci_timed(rt.command(&["run", "--bundle", &bundle_s, id]), &log);
        oci_delete(rt, id, &log);
        ran.map(|_| ())
    };
    let mut rt = OciRuntime {
        name: "crun",
        label: "crun",
        bin: crun.into(),
        root: work.join("root-crun"),
    };
    let plain = match probe(&rt) {
        Ok(()) => return Ok((Some(rt), String::new())),
        Err(e) => format!("{e:#}"),
    };
    if !plain.contains("hybrid mode") {
        return Ok((None, format!("crun fails here: {plain}")));
    }
    use std::os::unix::fs::PermissionsExt;
    let wrapper = work.join("crun-without-cgroup2");
    std::fs::write(&wrapper, OCI_CRUN_WRAPPER)?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    rt.bin = wrapper;
    rt.label = "crun †";
    match probe(&rt) {
        Ok(()) => Ok((Some(rt), String::new())),
        Err(e) => Ok((
            None,
            format!("crun refuses this host's hybrid cgroups, and fails without the cgroup2 mount too: {e:#}"),
        )),
    }
}

/// A Markdown table's heading: `measure`, a column per runtime
/// (`labels`), and `rtv / runc`.
fn print_runtime_header<'a>(labels: impl Iterator<Item = &'a str>) {
    let mut header = String::from("| measure |");
    let mut rule = String::from("|---|");
    for label in labels {
        header.push_str(&format!(" {label} |"));
        rule.push_str("---|");
    }
    println!("{header} rtv / runc |");
    println!("{rule}---|");
}

/// The median wall time of `runs` runs of `cmd()`.
fn oci_median_time(runs: usize, log: &std::path::Path, cmd: impl Fn() -> Command) -> Result<f64> {
    let mut t = Vec::new();
    for _ in 0..runs {
        t.push(oci_timed(cmd(), log)?);
    }
    Ok(seconds(&t).0)
}

fn oci_bench(runs: usize, no_containerd: bool, max_wait: Duration) -> Result<()> {
    let rtv = oci_rtv_binary()?;
    // rtv, and containerd's shim calling it, find the guest through these.
    let vmm = match std::env::var_os("RTV_VMM") {
        Some(p) => std::path::PathBuf::from(p),
        None => rtv
            .parent()
            .map(|d| d.join("rtv-vmm"))
            .context("rtv's directory")?,
    };
    rtv_tests::export_kernels()?;
    std::env::set_var("RTV_INITRAMFS", initramfs()?);
    std::env::set_var("RTV_VMM", &vmm);
    let work = std::env::temp_dir().join(format!("rtv-bench-oci-{}", std::process::id()));
    if work.exists() {
        rtv_runtime::remove_tree(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let bundle_true = work.join("bundle-true");
    let bundle_sleep = work.join("bundle-sleep");
    let result = oci_bundle(&bundle_true, &["true"])
        .and_then(|()| oci_bundle(&bundle_sleep, &["sleep", "1000"]))
        .and_then(|()| oci_crun(&work, &bundle_true));
    let (crun, crun_note) = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = rtv_runtime::remove_tree(&work);
            return Err(e);
        }
    };
    let mut runtimes = vec![OciRuntime {
        name: "runc",
        label: "runc",
        bin: "/usr/sbin/runc".into(),
        root: work.join("root-runc"),
    }];
    if !crun_note.is_empty() {
        eprintln!("{crun_note}: leaving crun out");
    }
    runtimes.extend(crun);
    runtimes.push(OciRuntime {
        name: "rtv",
        label: "rtv",
        bin: rtv,
        root: work.join("root-rtv"),
    });
    let bundles = (bundle_true.as_path(), bundle_sleep.as_path());
    let result = oci_measure(
        &runtimes,
        &work,
        bundles,
        &crun_note,
        runs,
        no_containerd,
        max_wait,
    );
    for rt in &runtimes {
        if let Err(e) = rtv_runtime::remove_tree(&rt.root) {
            eprintln!("removing {}: {e}", rt.root.display());
        }
    }
    if let Err(e) = rtv_runtime::remove_tree(&work) {
        eprintln!("removing {}: {e}", work.display());
    }
    result
}

fn oci_measure(
    runtimes: &[OciRuntime],
    work: &std::path::Path,
    (bundle_true, bundle_sleep): (&std::path::Path, &std::path::Path),
    crun_note: &str,
    runs: usize,
    no_containerd: bool,
    max_wait: Duration,
) -> Result<()> {
    let names: Vec<&str> = runtimes.iter().map(|r| r.name).collect();
    let log = work.join("command.log");
    let true_s = bundle_true.to_string_lossy().into_owned();
    let rtv = runtimes
        .iter()
        .find(|r| r.name == "rtv")
        .context("no rtv runtime")?;

    // rtv's warm-up: makes its VM template if there is none.
    eprintln!("rtv: one untimed warm-up run");
    let warm_id = "bench-warm-rtv";
    let warm = oci_timed(rtv.command(&["run", "--bundle", &true_s, warm_id]), &log);
    oci_delete(rtv, warm_id, &log);
    let warm = warm.context("rtv's warm-up run")?;
    eprintln!("  rtv warm-up: {:.2} s", warm.as_secs_f64());

    let start = oci_wait_for_quiet_host(max_wait)?;
    eprintln!("{start}");

    // 1. `<runtime> run` of busybox `true`.
    let direct = oci_rounds(&names, runs, "run", |i, run| {
        let rt = &runtimes[i];
        let id = format!("bench-{}-{run}", rt.name);
        let took = oci_timed(rt.command(&["run", "--bundle", &true_s, &id]), &log);
        if took.is_err() {
            oci_delete(rt, &id, &log);
        }
        took
    });

    // 2. `<runtime> exec` of `true` in a running container (one per
    // runtime, started untimed).
    let sleep_s = bundle_sleep.to_string_lossy().into_owned();
    let exec_ids: Vec<String> = runtimes
        .iter()
        .map(|rt| format!("bench-exec-{}", rt.name))
        .collect();
    let started: Vec<Result<Duration>> = runtimes
        .iter()
        .zip(&exec_ids)
        .map(|(rt, id)| oci_timed(rt.command(&["run", "-d", "--bundle", &sleep_s, id]), &log))
        .collect();
    let execs = oci_rounds(&names, runs, "exec", |i, _| {
        if let Err(e) = &started[i] {
            anyhow::bail!("starting the container: {e:#}");
        }
        oci_timed(runtimes[i].command(&["exec", &exec_ids[i], "true"]), &log)
    });
    for (rt, id) in runtimes.iter().zip(&exec_ids) {
        let _ = oci_timed(rt.command(&["kill", id, "KILL"]), &log);
        oci_delete(rt, id, &log);
    }

    // 3. `ctr run --rm` through runc's shim.
    let mut ctr_rows: Vec<Result<Vec<Duration>, String>> = Vec::new();
    let mut ctr_note = String::new();
    let mut ctr_cleanup = Ok(());
    if !no_containerd {
        use rtv_tests::containerd::{Containerd, CTR_TIMEOUT};
        let c = Containerd::start("bench-oci")?;
        let measured = (|| {
            let image = c.import_busybox()?;
            // The shim gives each runtime --root <runc-root>/<namespace>.
            let flags: Vec<Vec<String>> = runtimes
                .iter()
                .map(|rt| {
                    let mut f = c.run_flags(&rt.bin);
                    if let Some(i) = f.iter().position(|a| a == "--runc-root") {
                        if let Some(v) = f.get_mut(i + 1) {
                            *v = c
                                .runtime_root()
                                .join(rt.name)
                                .to_string_lossy()
                                .into_owned();
                        }
                    }
                    f
                })
                .collect();
            let ctr_run = |i: usize, id: &str| -> Result<Duration> {
                let mut args = vec!["run", "--rm"];
                args.extend(flags[i].iter().map(String::as_str));
                args.extend([image.as_str(), id, "true"]);
                oci_timed(c.ctr_command(&args), &log)
            };
            // One untimed run each: unpacks the image's snapshot.
            let mut warmups = Vec::new();
            for (i, rt) in runtimes.iter().enumerate() {
                let id = c.new_id(&format!("warm-{}", rt.name));
                match ctr_run(i, &id) {
                    Ok(t) => warmups.push(format!("{} {:.2} s", rt.name, t.as_secs_f64())),
                    Err(e) => warmups.push(format!("{} failed ({e:#})", rt.name)),
                }
            }
            let rows = oci_rounds(&names, runs, "ctr run --rm", |i, _| {
                let id = c.new_id(&format!("b-{}", runtimes[i].name));
                let took = ctr_run(i, &id);
                if took.is_err() {
                    let _ = c.ctr(&["tasks", "delete", "-f", &id], CTR_TIMEOUT);
                    let _ = c.ctr(&["containers", "delete", &id], CTR_TIMEOUT);
                }
                took
            });
            anyhow::Ok((rows, warmups))
        })();
        ctr_cleanup = c.shutdown();
        let (rows, warmups) = measured?;
        ctr_rows = rows;
        ctr_note = format!(
            "one untimed warm-up `ctr run --rm` per runtime first ({})",
            warmups.join(", ")
        );
    }

    // 4. The memory of one running container.
    let mut mem = Vec::new();
    for rt in runtimes {
        eprintln!("  memory: {}", rt.name);
        mem.push(oci_memory(rt, bundle_sleep, &log).map_err(|e| format!("{e:#}")));
    }
    // What the crun wrapper itself costs per call.
    let mut wrapper_ms = None;
    if let Some(crun) = runtimes.iter().find(|r| r.label != r.name) {
        let n = runs.max(5);
        let wrapped = oci_median_time(n, &log, || {
            let mut c = Command::new(&crun.bin);
            c.arg("--version");
            c
        });
        let plain = oci_median_time(n, &log, || {
            let mut c = Command::new("/usr/bin/crun");
            c.arg("--version");
            c
        });
        if let (Ok(w), Ok(p)) = (wrapped, plain) {
            wrapper_ms = Some(((w - p) * 1e3, n));
        }
    }
    let end = oci_loadavg()?.1;

    println!(
        "OCI runtimes: rtv against runc and crun, busybox `true` ({runs} runs each, median (min), wall time on the host), host: {}; {start}, {end} at the end",
        host_type()
    );
    println!();
    print_runtime_header(runtimes.iter().map(|rt| rt.label));
    let ratio = |rows: &[Result<Vec<Duration>, String>]| -> String {
        let m = |i: usize| match rows.get(i) {
            Some(Ok(t)) if !t.is_empty() => Some(seconds(t).0),
            _ => None,
        };
        match (m(names.len() - 1), m(0)) {
            (Some(rtv), Some(runc)) if runc > 0.0 => format!("{:.0}x", rtv / runc),
            _ => "—".into(),
        }
    };
    let row = |label: &str, rows: &[Result<Vec<Duration>, String>]| {
        let mut line = format!("| {label} |");
        for r in rows {
            line.push_str(&format!(" {} |", oci_cell(r)));
        }
        line.push_str(&format!(" {} |", ratio(rows)));
        println!("{line}");
    };
    row("`<runtime> run` of the bundle", &direct);
    row("`<runtime> exec` of `true` in a running container", &execs);
    if !no_containerd {
        row(
            "`ctr run --rm` (containerd 1.6, runc shim, `--runc-binary <runtime>`)",
            &ctr_rows,
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let pss_sum = |m: &OciMem| m.procs.iter().map(|p| p.3).sum::<u64>();
    let rss_sum = |m: &OciMem| m.procs.iter().map(|p| p.2).sum::<u64>();
    let mut line = String::from("| host memory of one running container (`sleep`), PSS (RSS) |");
    for m in &mem {
        line.push_str(&match m {
            Ok(m) => format!(" {:.1} MiB ({:.1} MiB) |", mib(pss_sum(m)), mib(rss_sum(m))),
            Err(_) => " failed (below) |".into(),
        });
    }
    line.push_str(&match (mem.last(), mem.first()) {
        (Some(Ok(r)), Some(Ok(c))) if pss_sum(c) > 0 => {
            format!(" {:.0}x |", pss_sum(r) as f64 / pss_sum(c) as f64)
        }
        _ => " — |".into(),
    });
    println!("{line}");
    println!();
    println!(
        "Each runtime has its own `--root`; within each round the runtimes alternate. rtv: one untimed warm-up `rtv run` first ({:.2} s), so its VM template exists and every timed run restores its VM from it; each rtv container gets its own VM.",
        warm.as_secs_f64()
    );
    println!(
        "`exec`: one container per runtime runs `sleep 1000` (started untimed with `run -d`); each timed `<runtime> exec <id> true` runs in it, from the command's start to its exit."
    );
    if !crun_note.is_empty() {
        println!("crun is left out: {crun_note}.");
    }
    if let Some((ms, n)) = wrapper_ms {
        println!(
            "† crun 1.8 refuses this host's cgroups (\"cgroups in hybrid mode not supported\": v1 controllers, and hugetlb in the cgroup2 mount at /sys/fs/cgroup/unified), so it runs through a script that execs it under `unshare -m` with that mount unmounted (the host's mounts are untouched). The script costs {ms:.1} ms per crun call (`--version` through it against crun's own, median of {n}), included in crun's figures; containerd's shim calls the runtime several times per container."
        );
    }
    if !no_containerd {
        println!(
            "`ctr run --rm`: a private containerd with the busybox image imported; {ctr_note}; timed from ctr's start to its exit."
        );
    }
    println!(
        "Memory: one container running `sleep 1000` (`run -d`), measured after 5 s idle from /proc/<pid>/smaps_rollup; PSS counts a page shared by n processes as 1/n."
    );
    for (rt, m) in runtimes.iter().zip(&mem) {
        if let Ok(m) = m {
            let procs: Vec<String> = m
                .procs
                .iter()
                .map(|(name, _, rss, pss)| {
                    format!(
                        "{name} (PSS {:.1} MiB, RSS {:.1} MiB)",
                        mib(*pss),
                        mib(*rss)
                    )
                })
                .collect();
            let extra = match m.vmm_overhead_kib {
                Some(k) => format!(
                    "; the VMM's resident memory outside guest RAM: {:.1} MiB. Guest pages restored from the template are private copy-on-write mappings of its memory.bin, so they are shared (and PSS split) with any other VM restored from the same template on the host",
                    mib(k)
                ),
                None => String::new(),
            };
            let daemon = if rt.name == "rtv" {
                ""
            } else {
                " (the runtime leaves no process of its own)"
            };
            println!("- {}: {}{daemon}{extra}.", rt.name, procs.join(" + "));
        }
    }
    for (what, rows) in [("run", &direct), ("ctr run --rm", &ctr_rows)] {
        for (n, r) in names.iter().zip(rows.iter()) {
            if let Err(e) = r {
                println!("- {what} with {n} failed: {e}");
            }
        }
    }
    for (n, m) in names.iter().zip(&mem) {
        if let Err(e) = m {
            println!("- memory of {n} failed: {e}");
        }
    }
    ctr_cleanup.context("shutting containerd down")
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
        What::Jail { runs, idle, mem } => {
            tokio::runtime::Runtime::new()?.block_on(jail::jail_bench(runs.max(1), idle, mem))
        }
        What::Fs { runs, mem } => fs_bench(runs.max(1), mem),
        What::Oci {
            runs,
            no_containerd,
            max_wait,
        } => oci_bench(runs.max(1), no_containerd, Duration::from_secs(max_wait)),
        What::Cri {
            runs,
            idle,
            max_wait,
        } => cri::cri_bench(
            runs.max(1),
            Duration::from_secs(idle.max(1)),
            Duration::from_secs(max_wait),
        ),
        What::Net {
            runs,
            mib,
            pings,
            max_wait,
            sysctl,
        } => net::net_bench(
            runs.max(1),
            mib.max(1),
            pings.max(1),
            Duration::from_secs(max_wait),
            &sysctl,
        ),
        What::Soak {
            cycles,
            every,
            rtv_only,
            cri_only,
        } => soak::soak_bench(cycles, every, rtv_only, cri_only),
        What::Flamegraph { out, title, folded } => flamegraph(&out, &title, &folded),
    }
}
