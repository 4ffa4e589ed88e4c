//! `rtv-bench net`: TCP between two pods on one CNI bridge (bridge +
//! host-local + portmap, the tests' network, in a containerd of its own
//! network namespace), on the runc and rtv handlers of one containerd.
//! Per handler: throughput of a stream from one pod to the other, the
//! round-trip time of `ping`, and for rtv the VMMs' host CPU per MiB moved.
//!
//! The stream is busybox's: the server pod's `httpd` sends a file of zeros
//! (with `sendfile`) from its `/dev` tmpfs; the client pod receives it with
//! `wget -O /dev/null` (which fails on a short stream). Each stream is one `ExecSync`, timed on the
//! host; the same with an empty file is timed too and subtracted, which
//! leaves out what an exec costs (seconds of fork + exec in a PVM guest).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rtv_tests::containerd::{self, Containerd, CriRuntime};
use rtv_tests::cri::{self, CriClient, Network};

use super::cri::{clock_ticks, cpu_ticks, pod_processes};
use super::{
    host_type, oci_loadavg, oci_wait_for_quiet_host, print_runtime_header, rtv_and_shim, seconds,
};

/// The server pod's HTTP port.
const PORT: u16 = 8080;
/// The file of the stream and the empty one (the baseline).
const BLOB: &str = "blob";
const EMPTY: &str = "empty";
/// The server's directory, in the container's `/dev` tmpfs.
const WWW: &str = "/dev/www";
/// The largest blob (`--mib`) that fits the `/dev` tmpfs.
const MAX_MIB: u64 = 48;
/// The blob's block size (`dd bs`).
const BLOCK: u64 = 64 * 1024;

/// How many times runc's client fetches the file in one stream: runc moves
/// a tmpfs-sized file in milliseconds, within the noise of an `ExecSync`.
const RUNC_REPEATS: u64 = 16;

/// How many times `handler`'s client fetches the file in one stream.
fn repeats(handler: &str) -> u64 {
    if handler == "runc" {
        RUNC_REPEATS
    } else {
        1
    }
}

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
    /// Frames the client pod's `eth0` received during the stream.
    frames: u64,
}

/// The server's command: busybox `httpd` serving a blob of `blocks`
/// blocks of zeros and an empty file from `/dev/www`: `/dev` is the
/// container's own tmpfs (64 MiB in containerd's spec), so the blob is read
/// from memory, never from the VM's shared file system. httpd sends a file
/// with `sendfile`, so the stream costs the server almost no system calls
/// (busybox `nc` moves 1 KiB per `read` + `write`, which in a PVM guest
/// measures system calls, not the network).
fn server_command(blocks: u64) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "mkdir -p {WWW} && dd if=/dev/zero of={WWW}/{BLOB}.part bs={BLOCK} count={blocks} 2>/dev/null && \
             mv {WWW}/{BLOB}.part {WWW}/{BLOB} && : > {WWW}/{EMPTY} && exec httpd -f -p {PORT} -h {WWW}"
        ),
    ]
}

/// The word the client prints when `wget` received the whole file.
const COMPLETE: &str = "complete";

/// The client's command for one stream of `file` from `ip`, fetched
/// `times` times in a row: busybox `wget` (64 KiB reads) into /dev/null. It
/// exits 0 only with every byte the server's `Content-Length` announced
/// ("connection closed prematurely" otherwise).
fn client_command(ip: &str, file: &str, times: u64) -> String {
    format!(
        "i=0; while [ $i -lt {times} ]; do wget -q -O /dev/null http://{ip}:{PORT}/{file} || exit 1; \
         i=$((i+1)); done; echo {COMPLETE}"
    )
}

/// Starts a pod named `name` on `handler` with a container running `cmd`;
/// returns the pod's id, its IP and the container's id.
fn start_pod(
    c: &Containerd,
    client: &CriClient,
    handler: &str,
    name: &str,
    cmd: &[&str],
    sysctls: &[(String, String)],
) -> Result<(String, String, String)> {
    let mut cfg = cri::pod_config_in(c, name, Network::Pod)?;
    if !sysctls.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> = sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        cfg["linux"]["sysctls"] = map.into();
    }
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
    sysctls: &[(String, String)],
) -> Result<Pair> {
    let server = server_command(blocks);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let (server_pod, server_ip, server_ctr) = start_pod(
        c,
        client,
        handler,
        &format!("srv-{handler}"),
        &server,
        sysctls,
    )?;
    let (client_pod, _, client_ctr) = start_pod(
        c,
        client,
        handler,
        &format!("cli-{handler}"),
        &["sleep", "100000"],
        sysctls,
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

/// One stream of the server's `file`, timed; retried while the server is
/// not listening yet (it writes the blob first; up to 600 s). Returns the
/// time and the VMMs' CPU ticks it took.
fn stream(client: &CriClient, p: &Pair, file: &str) -> Result<(Duration, u64)> {
    let cmd = client_command(&p.server_ip, file, repeats(p.handler));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ticks = vmm_ticks(p);
        let t = Instant::now();
        let r = client.exec_sync(&p.client_ctr, &["sh", "-c", &cmd], 600)?;
        let took = t.elapsed();
        let ticks = vmm_ticks(p).saturating_sub(ticks);
        if r.exit_code == 0 && r.stdout.trim() == COMPLETE {
            return Ok((took, ticks));
        }
        // Before the server listens, wget is refused.
        let refused = r.stdout.contains("refused") || r.stderr.contains("refused");
        if !refused || Instant::now() > deadline {
            bail!(
                "{}: the stream of http://{}:{PORT}/{file}: {r:?}",
                p.handler,
                p.server_ip
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The frames the client pod's `eth0` has received (`/proc/net/dev`).
fn rx_frames(client: &CriClient, p: &Pair) -> Result<u64> {
    let r = client.exec_sync(&p.client_ctr, &["cat", "/proc/net/dev"], 60)?;
    parse_rx_frames(&r.stdout)
        .with_context(|| format!("{}: no eth0 in /proc/net/dev: {r:?}", p.handler))
}

/// `  eth0: 123 4 …` (bytes, then packets received) → 4.
fn parse_rx_frames(out: &str) -> Option<u64> {
    let line = out.lines().find_map(|l| l.trim().strip_prefix("eth0:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
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
pub(crate) fn net_bench(
    runs: usize,
    mib: u64,
    pings: u32,
    max_wait: Duration,
    sysctls: &[(String, String)],
) -> Result<()> {
    ensure!(
        mib <= MAX_MIB,
        "--mib {mib}: the server keeps the file in its container's /dev tmpfs (64 MiB): at most {MAX_MIB}"
    );
    let (_, shim) = rtv_and_shim()?;
    let runc = containerd::find_binary("runc").context("runc (apt-get install runc)")?;
    let runtimes = vec![
        CriRuntime {
            name: "runc".into(),
            runtime_type: containerd::RUNC_SHIM.into(),
            binary_name: Some(runc),
            root: None,
            config_path: None,
            pod_annotations: Vec::new(),
        },
        CriRuntime::rtv(),
    ];
    let shim_dir = shim.parent().context("the shim's directory")?.to_path_buf();
    let opts = cri::cri_net_options(runtimes, Some(shim_dir));
    let c = Containerd::start_with("bench-net", &opts)?;
    let measured = net_measure(&c, runs, mib, pings, max_wait, sysctls);
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
    sysctls: &[(String, String)],
) -> Result<()> {
    let client = CriClient::connect(c)?;
    cri::wait_cri_ready(&client, Duration::from_secs(30))?;
    cri::import_cri_images(c, &client)?;
    let blocks = mib * 1024 * 1024 / BLOCK;
    let mut pairs = Vec::new();
    for h in HANDLERS {
        eprintln!("  two pods on {h}");
        pairs.push(start_pair(c, &client, h, blocks, sysctls).map_err(|e| format!("{e:#}")));
    }
    // One untimed stream each: the servers are up, the ARP entries made.
    for p in pairs.iter().flatten() {
        eprintln!("  warm-up stream on {}", p.handler);
        if let Err(e) = stream(&client, p, BLOB) {
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
                let (empty, empty_ticks) = stream(&client, p, EMPTY)?;
                let before = rx_frames(&client, p)?;
                let (full, full_ticks) = stream(&client, p, BLOB)?;
                let frames = rx_frames(&client, p)?.saturating_sub(before);
                anyhow::Ok(Round {
                    stream: full,
                    empty,
                    frames,
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
                        "  {} run {}: {} MiB in {:.3} s, empty stream {:.3} s, {} frames received",
                        p.handler,
                        run + 1,
                        mib * repeats(p.handler),
                        r.stream.as_secs_f64(),
                        r.empty.as_secs_f64(),
                        r.frames
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
        "TCP between two pods on one CNI bridge (containerd 1.6's CRI plugin, bridge + host-local + portmap; {runs} streams per handler, median; a stream is a file of {mib} MiB fetched once on rtv, {RUNC_REPEATS} times on runc), host: {}; {start}, {end} at the end",
        host_type()
    );
    println!();
    print_runtime_header(HANDLERS.into_iter());
    // The MiB each handler's stream moves.
    let moved: Vec<f64> = HANDLERS.iter().map(|h| (mib * repeats(h)) as f64).collect();
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
        .zip(&moved)
        .map(|(m, moved)| m.and_then(|(median, _, _)| (median > 0.0).then(|| moved / median)))
        .collect();
    let ratio = |v: &[Option<f64>]| match (v.get(1).copied().flatten(), v[0]) {
        // A ratio far below 1 reads better as a fraction.
        (Some(r), Some(c)) if c > 0.0 && r > 0.0 && r / c < 0.1 => Some(format!("1/{:.0}", c / r)),
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
        "time of a stream (exec cost subtracted), s",
        stream_s
            .iter()
            .map(|v| v.map(|v| format!("{v:.3}")))
            .collect(),
        None,
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
        .zip(&moved)
        .map(|(f, moved)| match f {
            Ok((rounds, _)) => {
                let t: Vec<Duration> = rounds.iter().filter_map(|r| r.vmm_cpu).collect();
                (!t.is_empty()).then(|| seconds(&t).0 * 1e3 / moved)
            }
            _ => None,
        })
        .collect();
    let frames: Vec<Option<f64>> = figures
        .iter()
        .zip(&moved)
        .map(|(f, moved)| match f {
            Ok((rounds, _)) if !rounds.is_empty() => {
                let mut v: Vec<u64> = rounds.iter().map(|r| r.frames).collect();
                v.sort_unstable();
                Some(v[v.len() / 2] as f64 / moved)
            }
            _ => None,
        })
        .collect();
    row(
        "frames the receiving pod's eth0 took per MiB (median)",
        frames
            .iter()
            .map(|v| v.map(|v| format!("{v:.0}")))
            .collect(),
        ratio(&frames),
    );
    row(
        "the two VMMs' host CPU per MiB moved, ms",
        cpu.iter().map(|v| v.map(|v| format!("{v:.1}"))).collect(),
        None,
    );
    println!();
    println!(
        "Each handler runs two pods (`hostNetwork: false`) on the bridge; the server pod's busybox `httpd` sends a file of {mib} MiB of zeros (with `sendfile`, from the container's `/dev` tmpfs), the client pod receives it with `wget -O /dev/null URL` (which fails on a stream shorter than the `Content-Length`), in one `ExecSync` timed on the host; on runc it fetches the file {RUNC_REPEATS} times in a row in that `ExecSync`, as one file there is within the noise of an `ExecSync`. The same with an empty file is timed in each round and subtracted: what is left is the transfer. The handlers alternate within each round; one untimed stream each first. `ping -i 0.2` from the client pod to the server pod gives the round trip. The VMMs' CPU is user + system time of both pods' rtv-vmm processes (/proc/PID/stat) during the stream less that during the empty stream; runc's pods have no such process (the kernel moves their packets)."
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
    fn received_frames_parse() {
        let out = "Inter-|   Receive\n face |bytes    packets errs\n    lo:   0   0 0\n  eth0: 4242 17 0 0\n";
        assert_eq!(parse_rx_frames(out), Some(17));
        assert_eq!(parse_rx_frames("    lo: 0 0\n"), None);
    }

    #[test]
    fn commands_name_the_ports() {
        let s = server_command(16).join(" ");
        assert!(s.contains("count=16") && s.contains(&format!("-p {PORT}")));
        let c = client_command("10.88.0.2", EMPTY, 3);
        assert!(c.contains("http://10.88.0.2:8080/empty") && c.contains("-lt 3"));
        assert!(s.contains("/dev/www"));
    }
}
