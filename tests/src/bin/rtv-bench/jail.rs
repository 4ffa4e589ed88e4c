//! `rtv-bench jail`: what the VMM's hardening costs. Sandboxes start from
//! one VM template with the jail and seccomp filters on (rtv's default) and
//! with both off, alternating, and idle sandboxes' VMMs are measured in
//! each mode.

use std::time::{Duration, Instant};

use anyhow::Result;
use rtv_runtime::vmm_process::Hardening;
use rtv_runtime::{Origin, Sandbox, SandboxConfig};

use crate::{host_type, seconds, start_idle_measure, stop_all};

const MODES: [(&str, Hardening); 2] = [
    ("jail and seccomp on (default)", Hardening::FULL),
    ("--jail off --seccomp off", Hardening::NONE),
];

pub async fn jail_bench(runs: usize, idle: usize, mem: u64) -> Result<()> {
    let work = std::env::temp_dir().join(format!("rtv-bench-jail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let kernel = rtv_tests::artifacts()?.kernel_for(1).to_path_buf();
    let (initrd, vmm) = (rtv_tests::initramfs()?, rtv_tests::vmm_binary()?);
    let next = std::sync::atomic::AtomicU32::new(0);
    let config = |tag: &str, hardening: Hardening| {
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
        c.template_dir = Some(work.join("templates"));
        c.boot_timeout = rtv_tests::BOOT_TIMEOUT;
        c.hardening = hardening;
        c
    };
    let result = async {
        let cfg = config("make", Hardening::FULL);
        let (cache, spec) = (cfg.template_cache()?, cfg.template_spec());
        let t = Instant::now();
        tokio::task::spawn_blocking(move || cache.get_or_make(&spec)).await??;
        eprintln!("template ready in {:.1}s", t.elapsed().as_secs_f64());
        // Starts, the modes alternating (and which goes first), so that
        // the host's drift falls on both.
        let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for run in 0..runs {
            for k in 0..2 {
                let m = (run + k) % 2;
                let sb = Sandbox::start(config("start", MODES[m].1)).await?;
                anyhow::ensure!(
                    matches!(sb.origin(), Origin::Template { made_in: None, .. }),
                    "not restored from the template: {:?}",
                    sb.origin()
                );
                eprintln!(
                    "  {}: {:.3}s",
                    MODES[m].0,
                    sb.ready_after().as_secs_f64()
                );
                times[m].push(sb.ready_after());
                stop_all(vec![sb]).await;
            }
        }
        // Idle sandboxes' VMMs, per mode.
        let mut mems = Vec::new();
        for (name, hardening) in MODES {
            let configs = (0..idle).map(|_| config("idle", hardening));
            mems.push(start_idle_measure(configs, &format!("idle, {name}:")).await?.1);
        }
        println!(
            "The VMM's hardening: sandbox start from a template to agent ready ({mem} MiB guest, 1 vCPU), host: {}",
            host_type()
        );
        println!();
        println!("| VMM | starts | median | min | max |");
        println!("|---|---|---|---|---|");
        for (m, (name, _)) in MODES.iter().enumerate() {
            let (median, min, max) = seconds(&times[m]);
            println!(
                "| {name} | {} | {:.3} s | {:.3} s | {:.3} s |",
                times[m].len(),
                median,
                min,
                max
            );
        }
        println!();
        println!("| idle VMMs | count | RSS per VMM | PSS per VMM |");
        println!("|---|---|---|---|");
        for ((name, _), (rss, pss)) in MODES.iter().zip(&mems) {
            let per = |kib: u64| kib as f64 / 1024.0 / idle.max(1) as f64;
            println!(
                "| {name} | {idle} | {:.1} MiB | {:.1} MiB |",
                per(*rss),
                per(*pss)
            );
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}
