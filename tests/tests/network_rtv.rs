//! Pod networking through `rtv` (runc's command line) on real KVM: a
//! container whose spec names a network namespace the test made (a veth
//! pair between it and a second namespace of the test's own, the way CNI
//! leaves a pod's namespace) gets a NIC in its VM with the veth's MAC,
//! address and routes; TCP works both ways between the guest and the peer
//! namespace; nothing of rtv's is left in the namespace after `delete`.
//! Bad namespaces are refused before any VM starts, leaving nothing. All
//! traffic stays in the two namespaces the test makes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rtv_tests::one_vm_at_a_time;

/// A network namespace of the test's own (`ip netns add`), removed on drop.
struct TestNs(String);

impl TestNs {
    fn new(tag: &str) -> TestNs {
        let name = format!("rtv-nr-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        TestNs(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tc(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "tc"])
            .args(args)
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = std::fs::File::open(self.path()).expect("the namespace file");
        std::thread::spawn(move || {
            // SAFETY: setns(2) of this thread only, into a namespace we hold.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Rtv {
    bin: PathBuf,
    root: PathBuf,
    log: PathBuf,
}

impl Rtv {
    /// Runs rtv with its stdout and stderr in files: a detached container
    /// keeps the caller's stdio (as with runc), so pipes would never close.
    fn cmd(&self, args: &[&str]) -> Output {
        let out = self.log.with_extension("stdout");
        let err = self.log.with_extension("stderr");
        let status = Command::new(&self.bin)
            .arg("--log")
            .arg(&self.log)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .status()
            .expect("running rtv");
        Output {
            status,
            stdout: std::fs::read(&out).unwrap_or_default(),
            stderr: std::fs::read(&err).unwrap_or_default(),
        }
    }
}

fn bundle(dir: &Path, name: &str, script: &str, netns: &Path) -> PathBuf {
    let b = dir.join(name);
    rtv_tests::conformance::busybox_bundle(&b, &["sh", "-c", script]).expect("bundle");
    let path = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["linux"]["namespaces"]
        .as_array_mut()
        .expect("namespaces")
        .push(serde_json::json!({"type": "network", "path": netns}));
    spec["root"]["readonly"] = false.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    b
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_container_in_a_namespace_the_test_made() {
    let bin = rtv_tests::rtv_with_artifacts().expect("building rtv and its guest");
    let dir = std::env::temp_dir().join(format!("rtv-net-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rtv = Rtv {
        bin,
        root: dir.join("root"),
        log: dir.join("rtv.log"),
    };
    let pod = TestNs::new("pod");
    let peer = TestNs::new("peer");
    // What CNI's bridge plugin leaves: eth0 in the pod's namespace with an
    // address and a default route, its peer on the other side.
    pod.ip(&[
        "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "p0", "netns",
        &peer.0,
    ]);
    pod.ip(&["link", "set", "eth0", "address", "0a:58:0a:e7:00:02", "up"]);
    pod.ip(&["addr", "add", "10.231.0.2/24", "dev", "eth0"]);
    pod.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:231::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.ip(&["route", "add", "default", "via", "10.231.0.1"]);
    peer.ip(&["link", "set", "lo", "up"]);
    peer.ip(&["link", "set", "p0", "up"]);
    peer.ip(&["addr", "add", "10.231.0.1/24", "dev", "p0"]);
    peer.ip(&["-6", "addr", "add", "fd00:231::1/64", "dev", "p0", "nodad"]);
    let before = pod.ip(&["-o", "link"]);

    // The peer's server: answers each line with "pong <line>".
    let server = peer.run(|| {
        let l = TcpListener::bind("[::]:8080").expect("bind in the peer namespace");
        l.set_nonblocking(true).unwrap();
        let mut served = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        while served.len() < 2 && Instant::now() < deadline {
            let (mut s, from) = match l.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            let line = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
            let _ = s.write_all(format!("pong {line}\n").as_bytes());
            let ip = match from.ip() {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(v6.to_string(), |v4| v4.to_string()),
                v4 => v4.to_string(),
            };
            served.push((ip, line));
        }
        served
    });

    let _one = one_vm_at_a_time();
    // The container reports its network, talks to the peer over IPv4 and
    // IPv6, then serves HTTP for the peer.
    let script =
        "ip -o addr show eth0 > /out; ip route >> /out; cat /sys/class/net/eth0/address >> /out; \
         cat /sys/class/net/eth0/mtu >> /out; \
         echo v4 | nc -w 30 10.231.0.1 8080 >> /out; echo v6 | nc -w 30 fd00:231::1 8080 >> /out; \
         mkdir -p /www; echo from-the-guest > /www/index.html; \
         echo ready >> /out; exec httpd -f -p 9090 -h /www";
    let b = bundle(&dir, "web", script, &pod.path());
    let out = rtv.cmd(&["run", "-d", "--bundle", &b.to_string_lossy(), "net-web"]);
    assert!(out.status.success(), "rtv run: {}", text(&out));
    let report = b.join("rootfs/out");
    let deadline = Instant::now() + Duration::from_secs(120);
    let guest = loop {
        let t = std::fs::read_to_string(&report).unwrap_or_default();
        if t.contains("ready") || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let check = || -> Result<(), String> {
        for want in [
            "10.231.0.2/24",
            "fd00:231::2/64",
            "default via 10.231.0.1 dev eth0",
            "0a:58:0a:e7:00:02",
            "1400",
            "pong v4",
            "pong v6",
            "ready",
        ] {
            if !guest.contains(want) {
                return Err(format!("the guest's report lacks {want:?}:\n{guest}"));
            }
        }
        // The peer reaches the guest's server.
        let got = peer
            .run(|| -> std::io::Result<String> {
                // "ready" is written just before httpd execs and binds.
                let addr = "10.231.0.2:9090".parse().unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut s = loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(30)) {
                        Err(e)
                            if e.kind() == std::io::ErrorKind::ConnectionRefused
                                && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        other => break other?,
                    }
                };
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok(body)
            })
            .join()
            .unwrap()
            .map_err(|e| format!("connecting to the guest's httpd: {e}"))?;
        if !got.contains("200") || !got.contains("from-the-guest") {
            return Err(format!("the guest's httpd answered: {got}"));
        }
        // rtv's wiring: the tap and both redirects.
        let links = pod.ip(&["-o", "link"]);
        if !links.contains("rtv-tap0") {
            return Err(format!("no tap in the pod's namespace: {links}"));
        }
        let f = pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
        if !f.contains("mirred") {
            return Err(format!("no redirect on eth0: {f}"));
        }
        Ok(())
    };
    let checked = check();
    let del = rtv.cmd(&["delete", "-f", "net-web"]);
    let served = server.join().expect("the peer's server");
    checked.unwrap_or_else(|e| {
        panic!(
            "{e}\nrtv log:\n{}",
            std::fs::read_to_string(&rtv.log).unwrap_or_default()
        )
    });
    assert!(del.status.success(), "rtv delete: {}", text(&del));
    assert_eq!(
        served,
        vec![
            ("10.231.0.2".to_owned(), "v4".to_owned()),
            ("fd00:231::2".to_owned(), "v6".to_owned())
        ]
    );
    // Nothing of rtv's is left in the namespace: the links are as before,
    // no qdisc on eth0; the namespace itself is the test's and stays.
    assert_eq!(pod.ip(&["-o", "link"]), before);
    assert!(
        pod.tc(&["qdisc", "show", "dev", "eth0", "ingress"])
            .trim()
            .is_empty(),
        "an ingress qdisc is left on eth0"
    );
    assert!(pod.path().exists());

    // Bad namespaces: refused by name before any VM, nothing left.
    for (path, want) in [
        ("/proc/self/ns/net", "is the host's network namespace"),
        ("/var/run/netns/rtv-no-such-namespace", "No such file"),
        ("/etc/hostname", "not a namespace file"),
        ("/proc/self/ns/uts", "not a network namespace"),
    ] {
        let b = bundle(&dir, "bad", "true", Path::new(path));
        let out = rtv.cmd(&["run", "--bundle", &b.to_string_lossy(), "net-bad"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(path) && err.contains(want),
            "{path}: {}",
            text(&out)
        );
        let list = rtv.cmd(&["list", "-q"]);
        assert!(
            String::from_utf8_lossy(&list.stdout).trim().is_empty(),
            "{path}: left {}",
            text(&list)
        );
        let left: Vec<_> = std::fs::read_dir(&rtv.root)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.iter().all(|n| n.to_string_lossy().starts_with('.')
                || !n.to_string_lossy().contains("net-bad")),
            "{path}: state left in the root: {left:?}"
        );
        let _ = std::fs::remove_dir_all(&b);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
