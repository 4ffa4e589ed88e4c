//! `rtv-bench net`: TCP between two pods on one CNI bridge (bridge +
//! host-local + portmap, the tests' network, in a containerd of its own
//! network namespace), on the runc and rtv handlers of one containerd.
//! Per handler: throughput of a stream from one pod to the other, the
//! round-trip time of `ping`, and for rtv the VMMs' host CPU per MiB moved.
//!
//! The stream is busybox's: the server pod sends `dd if=/dev/zero` through
//! `nc -l`; the client pod receives it with `nc … | wc -c` (the byte count
//! is checked). Each stream is one `ExecSync`, timed on the host; the same
//! with zero bytes (a second listener) is timed too and subtracted, which
//! leaves out what an exec costs (seconds of fork + exec in a PVM guest).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rtv_tests::containerd::{self, Containerd, CriRuntime};
use rtv_tests::cri::{self, CriClient, Network};

use super::cri::{clock_ticks, cpu_ticks, pod_processes};
use super::{
    host_type, initramfs, oci_loadavg, oci_rtv_binary, oci_wait_for_quiet_host,
    print_runtime_header, seconds,
};

/// The port of the server pod's stream.
const STREAM_PORT: u16 = 5001;
/// The port of its empty stream (the baseline).
const EMPTY_PORT: u16 = 5000;
/// The stream's block size (`dd bs`).
const BLOCK: u64 = 64 * 1024;

/// The handlers measured, runc first (the baseline of the ratio column).
const HANDLERS: [&str; 2] = ["runc", "rtv"];

/// A server pod and a client pod on one handler.
struct Pair {
    handler: &'static str,
    server_pod: String,
    server_ip: String,
    client_pod: String,
    client_ctr: String,
    /// The pods' VMMs (rtv), for their CPU time.
    vmms: Vec<u32>,
}

/// One round's figures on one handler.
#[derive(Default, Clone)]
struct Round {
    /// `ExecSync` of the stream.
    stream: Duration,
    /// `ExecSync` of the empty stream.
    empty: Duration,
    /// The VMMs' CPU time during the stream, less that of the empty one.
    vmm_cpu: Option<Duration>,
}

/// The server's command: an endless sender of `blocks` blocks on
/// [`STREAM_PORT`], and an endless sender of nothing on [`EMPTY_PORT`].
fn server_command(blocks: u64) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "trap 'exit 0' TERM; \
             (while :; do nc -l -p {EMPTY_PORT} </dev/null; done) & \
             (while :; do dd if=/dev/zero bs={BLOCK} count={blocks} 2>/dev/null | nc -l -p {STREAM_PORT}; done) & \
             wait"
        ),
    ]
}

/// The client's command for one stream from `ip`:`port`: it prints the
/// bytes received. Its stdin is a FIFO it holds open for writing too, so
/// busybox `nc` never sees end of input (it quits at once on one) and
/// ends when the server closes.
fn client_command(ip: &str, port: u16) -> String {
    format!("[ -p /tmp/hold ] || mkfifo /tmp/hold; exec 3<>/tmp/hold; nc {ip} {port} <&3 | wc -c")
}

/// Starts a pod named `name` on `handler` with a container running `cmd`;
/// returns the pod's id, its IP and the container's id.
fn start_pod(
    c: &Containerd,
    client: &CriClient,
    handler: &str,
    name: &str,
    cmd: &[&str],
) -> Result<(String, String, String)> {
    let cfg = cri::pod_config_in(c, name, Network::Pod)?;
    let pod = client
        .run_pod(&cfg, handler)
        .with_context(|| format!("RunPodSandbox of {name} on {handler}"))?;
    let ip = client.pod_status(&pod)?["status"]["network"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(!ip.is_empty(), "pod {name} on {handler} has no IP");
    let ccfg = cri::container_config_in("app", cmd, &[], Network::Pod);
    let ctr = client.create_container(&pod, &ccfg, &cfg)?;
    client
        .start(&ctr)
        .with_context(|| format!("StartContainer in {name}"))?;
    Ok((pod, ip, ctr))
}

fn start_pair(
    c: &Containerd,
    client: &CriClient,
    handler: &'static str,
    blocks: u64,
) -> Result<Pair> {
    let server = server_command(blocks);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let (server_pod, server_ip, server_ctr) =
        start_pod(c, client, handler, &format!("srv-{handler}"), &server)?;
    let (client_pod, _, client_ctr) = start_pod(
        c,
        client,
        handler,
        &format!("cli-{handler}"),
        &["sleep", "100000"],
    )?;
    let mut vmms = Vec::new();
    for (pod, ctr) in [(&server_pod, &server_ctr), (&client_pod, &client_ctr)] {
        for (role, pid) in pod_processes(c, pod, ctr)? {
            if role == "VMM" {
                vmms.push(pid);
            }
        }
    }
    ensure!(
        handler != "rtv" || vmms.len() == 2,
        "found {} VMMs for rtv's two pods",
        vmms.len()
    );
    Ok(Pair {
        handler,
        server_pod,
        server_ip,
        client_pod,
        client_ctr,
        vmms,
    })
}

fn vmm_ticks(p: &Pair) -> u64 {
    p.vmms.iter().filter_map(|pid| cpu_ticks(*pid, false)).sum()
}

/// One stream from the server's `port`, timed; retried while the server's
/// listener is not back yet (up to 120 s). Returns the time and the VMMs'
/// CPU ticks it took.
fn stream(client: &CriClient, p: &Pair, port: u16, want: u64) -> Result<(Duration, u64)> {
    let cmd = client_command(&p.server_ip, port);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ticks = vmm_ticks(p);
        let t = Instant::now();
        let r = client.exec_sync(&p.client_ctr, &["sh", "-c", &cmd], 600)?;
        let took = t.elapsed();
        let ticks = vmm_ticks(p).saturating_sub(ticks);
        let got: Option<u64> = r.stdout.trim().parse().ok();
        if r.exit_code == 0 && got == Some(want) {
            return Ok((took, ticks));
        }
        // Before the listener is up, nc is refused and wc counts 0 bytes.
        let refused = r.stderr.contains("refused") || (want > 0 && got == Some(0));
        if !refused || Instant::now() > deadline {
            bail!(
                "{}: a stream of {want} bytes from {}:{port}: {r:?}",
                p.handler,
                p.server_ip
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `ping -c count` from the client pod to the server pod: the round-trip
/// times (min, avg) in ms.
fn ping(client: &CriClient, p: &Pair, count: u32) -> Result<(f64, f64)> {
    let r = client.exec_sync(
        &p.client_ctr,
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "5",
            &p.server_ip,
        ],
        120,
    )?;
    parse_ping(&r.stdout).with_context(|| format!("{}: ping {}: {r:?}", p.handler, p.server_ip))
}

/// `round-trip min/avg/max = 0.063/0.132/0.271 ms` → (min, avg).
fn parse_ping(out: &str) -> Option<(f64, f64)> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.split_whitespace().next()?;
    let mut it = nums.split('/').map(|v| v.parse::<f64>().ok());
    Some((it.next()??, it.next()??))
}

/// `rtv-bench net`.
pub(crate) fn net_bench(runs: usize, mib: u64, pings: u32, max_wait: Duration) -> Result<()> {
    let rtv = oci_rtv_binary()?;
    let shim = rtv.with_file_name("containerd-shim-rtv-v2");
    ensure!(
        shim.exists(),
        "{} not found (scripts/build.sh builds it)",
        shim.display()
    );
    let vmm = match std::env::var_os("RTV_VMM") {
        Some(p) => PathBuf::from(p),
        None => rtv.with_file_name("rtv-vmm"),
    };
    rtv_tests::export_kernels()?;
    std::env::set_var("RTV_INITRAMFS", initramfs()?);
    std::env::set_var("RTV_VMM", &vmm);
    let runc = containerd::find_binary("runc").context("runc (apt-get install runc)")?;
    let runtimes = vec![
        CriRuntime {
            name: "runc".into(),
            runtime_type: containerd::RUNC_SHIM.into(),
            binary_name: Some(runc),
            root: None,
        },
        CriRuntime {
            name: "rtv".into(),
            runtime_type: "io.containerd.rtv.v2".into(),
            binary_name: None,
            root: None,
        },
    ];
    let shim_dir = shim.parent().context("the shim's directory")?.to_path_buf();
    let opts = cri::cri_net_options(runtimes, Some(shim_dir));
    let c = Containerd::start_with("bench-net", &opts)?;
    let measured = net_measure(&c, runs, mib, pings, max_wait);
    let shutdown = c.shutdown();
    measured?;
    shutdown.context("shutting containerd down")
}

/// The figures of one handler, or why it failed.
type Figures = Result<(Vec<Round>, (f64, f64)), String>;

fn net_measure(
    c: &Containerd,
    runs: usize,
    mib: u64,
    pings: u32,
    max_wait: Duration,
) -> Result<()> {
    let client = CriClient::connect(c)?;
    cri::wait_cri_ready(&client, Duration::from_secs(30))?;
    cri::import_cri_images(c, &client)?;
    let blocks = mib * 1024 * 1024 / BLOCK;
    let want = blocks * BLOCK;
    let mut pairs = Vec::new();
    for h in HANDLERS {
        eprintln!("  two pods on {h}");
        pairs.push(start_pair(c, &client, h, blocks).map_err(|e| format!("{e:#}")));
    }
    // One untimed stream each: the listeners are up, the ARP entries made.
    for p in pairs.iter().flatten() {
        eprintln!("  warm-up stream on {}", p.handler);
        if let Err(e) = stream(&client, p, STREAM_PORT, want) {
            eprintln!("  warm-up on {}: {e:#}", p.handler);
        }
    }
    let start = oci_wait_for_quiet_host(max_wait)?;
    eprintln!("{start}");
    let mut figures: Vec<Figures> = pairs
        .iter()
        .map(|p| {
            p.as_ref()
                .map(|_| (Vec::new(), (0.0, 0.0)))
                .map_err(Clone::clone)
        })
        .collect();
    for run in 0..runs {
        for (p, f) in pairs.iter().zip(figures.iter_mut()) {
            let (Ok(p), Ok((rounds, _))) = (p, f.as_mut()) else {
                continue;
            };
            let r = (|| {
                let (empty, empty_ticks) = stream(&client, p, EMPTY_PORT, 0)?;
                let (full, full_ticks) = stream(&client, p, STREAM_PORT, want)?;
                anyhow::Ok(Round {
                    stream: full,
                    empty,
                    vmm_cpu: (!p.vmms.is_empty()).then(|| {
                        Duration::from_secs_f64(
                            full_ticks.saturating_sub(empty_ticks) as f64 / clock_ticks(),
                        )
                    }),
                })
            })();
            match r {
                Ok(r) => {
                    eprintln!(
                        "  {} run {}: {mib} MiB in {:.3} s, empty stream {:.3} s",
                        p.handler,
                        run + 1,
                        r.stream.as_secs_f64(),
                        r.empty.as_secs_f64()
                    );
                    rounds.push(r);
                }
                Err(e) => *f = Err(format!("{e:#}")),
            }
        }
    }
    for (p, f) in pairs.iter().zip(figures.iter_mut()) {
        let (Ok(p), Ok((_, rtt))) = (p, f.as_mut()) else {
            continue;
        };
        match ping(&client, p, pings) {
            Ok(r) => *rtt = r,
            Err(e) => *f = Err(format!("{e:#}")),
        }
    }
    let end = oci_loadavg()?.1;
    for p in pairs.iter().flatten() {
        for pod in [&p.server_pod, &p.client_pod] {
            if let Err(e) = client.stop_pod(pod).and_then(|()| client.remove_pod(pod)) {
                eprintln!("  removing pod {pod}: {e:#}");
            }
        }
    }
    cri::wait_nothing_left(c, &client, Duration::from_secs(20))
        .context("after the pods were removed")?;
    print_tables(&figures, runs, mib, pings, &start, &end);
    Ok(())
}

fn print_tables(figures: &[Figures], runs: usize, mib: u64, pings: u32, start: &str, end: &str) {
    println!(
        "TCP between two pods on one CNI bridge (containerd 1.6's CRI plugin, bridge + host-local + portmap; {runs} streams of {mib} MiB per handler, median), host: {}; {start}, {end} at the end",
        host_type()
    );
    println!();
    print_runtime_header(HANDLERS.into_iter());
    // Per round: the stream's time less the empty stream's.
    let net = |r: &Round| r.stream.saturating_sub(r.empty);
    let medians: Vec<Option<(f64, f64, f64)>> = figures
        .iter()
        .map(|f| match f {
            Ok((rounds, _)) if !rounds.is_empty() => {
                let t: Vec<Duration> = rounds.iter().map(net).collect();
                Some(seconds(&t))
            }
            _ => None,
        })
        .collect();
    let row = |label: &str, cells: Vec<Option<String>>, ratio: Option<String>| {
        let mut line = format!("| {label} |");
        for (c, f) in cells.iter().zip(figures) {
            line.push_str(&match (c, f) {
                (Some(c), _) => format!(" {c} |"),
                (None, Err(_)) => " failed (below) |".into(),
                (None, Ok(_)) => " — |".into(),
            });
        }
        line.push_str(&format!(" {} |", ratio.unwrap_or_else(|| "—".into())));
        println!("{line}");
    };
    let mib_s: Vec<Option<f64>> = medians
        .iter()
        .map(|m| m.and_then(|(median, _, _)| (median > 0.0).then(|| mib as f64 / median)))
        .collect();
    let ratio = |v: &[Option<f64>]| match (v.get(1).copied().flatten(), v[0]) {
        (Some(r), Some(c)) if c > 0.0 => Some(format!("{:.2}x", r / c)),
        _ => None,
    };
    row(
        "TCP throughput, pod to pod, MiB/s",
        mib_s.iter().map(|v| v.map(|v| format!("{v:.1}"))).collect(),
        ratio(&mib_s),
    );
    let stream_s: Vec<Option<f64>> = medians.iter().map(|m| m.map(|m| m.0)).collect();
    row(
        &format!("time to move {mib} MiB (exec cost subtracted), s"),
        stream_s
            .iter()
            .map(|v| v.map(|v| format!("{v:.3}")))
            .collect(),
        ratio(&stream_s),
    );
    let empty: Vec<Option<f64>> = figures
        .iter()
        .map(|f| match f {
            Ok((rounds, _)) if !rounds.is_empty() => {
                let t: Vec<Duration> = rounds.iter().map(|r| r.empty).collect();
                Some(seconds(&t).0)
            }
            _ => None,
        })
        .collect();
    row(
        "an empty stream (`ExecSync` + connect + close), s",
        empty.iter().map(|v| v.map(|v| format!("{v:.3}"))).collect(),
        ratio(&empty),
    );
    let rtt = |i: usize| -> Vec<Option<f64>> {
        figures
            .iter()
            .map(|f| f.as_ref().ok().map(|(_, r)| if i == 0 { r.0 } else { r.1 }))
            .collect()
    };
    let (min, avg) = (rtt(0), rtt(1));
    row(
        &format!("round trip (`ping`, {pings} packets), average, ms"),
        avg.iter().map(|v| v.map(|v| format!("{v:.3}"))).collect(),
        ratio(&avg),
    );
    row(
        "round trip, minimum, ms",
        min.iter().map(|v| v.map(|v| format!("{v:.3}"))).collect(),
        ratio(&min),
    );
    let cpu: Vec<Option<f64>> = figures
        .iter()
        .map(|f| match f {
            Ok((rounds, _)) => {
                let t: Vec<Duration> = rounds.iter().filter_map(|r| r.vmm_cpu).collect();
                (!t.is_empty()).then(|| seconds(&t).0 * 1e3 / mib as f64)
            }
            _ => None,
        })
        .collect();
    row(
        "the two VMMs' host CPU per MiB moved, ms",
        cpu.iter().map(|v| v.map(|v| format!("{v:.1}"))).collect(),
        None,
    );
    println!();
    println!(
        "Each handler runs two pods (`hostNetwork: false`) on the bridge; the server pod sends {mib} MiB of zeros (`dd bs=64k | nc -l`), the client pod receives them (`nc SERVER PORT | wc -c`, the count checked), in one `ExecSync` timed on the host. The same with an empty stream is timed in each round and subtracted: what is left is the transfer. The handlers alternate within each round; one untimed stream each first. `ping -i 0.2` from the client pod to the server pod gives the round trip. The VMMs' CPU is user + system time of both pods' rtv-vmm processes (/proc/PID/stat) during the stream less that during the empty stream; runc's pods have no such process (the kernel moves their packets)."
    );
    for (h, f) in HANDLERS.iter().zip(figures) {
        if let Err(e) = f {
            println!("- {h} failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary_parses() {
        let out = "3 packets transmitted, 3 packets received, 0% packet loss\n\
                   round-trip min/avg/max = 0.063/0.132/0.271 ms\n";
        assert_eq!(parse_ping(out), Some((0.063, 0.132)));
        assert_eq!(parse_ping("100% packet loss\n"), None);
    }

    #[test]
    fn commands_name_the_ports() {
        let s = server_command(16).join(" ");
        assert!(s.contains("count=16") && s.contains(&format!("-p {STREAM_PORT}")));
        assert!(client_command("10.88.0.2", EMPTY_PORT).contains("nc 10.88.0.2 5000"));
    }
}
