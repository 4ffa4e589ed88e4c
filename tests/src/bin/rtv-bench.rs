//! `rtv-bench`: rtv's benchmarks, printed as tables.
//!
//! `rtv-bench boot` boots the same kernel and initramfs N times with rtv's
//! VMM and with QEMU's microvm machine, and reports the time from process
//! start to the agent's readiness line, and memory.

use std::process::Command;
use std::time::Duration;

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

fn main() -> Result<()> {
    match Args::parse().what {
        What::Boot { runs, mem, no_qemu } => boot(runs.max(1), mem, no_qemu),
    }
}
