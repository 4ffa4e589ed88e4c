//! Sandboxes started from VM templates, on the real /dev/kvm with the real
//! guest kernel and the test initramfs: five sandboxes restored from one
//! template at once, each with its own hostname, RNG output and clock; a
//! corrupted (and a truncated) template detected and replaced; a template
//! that claims another VMM build not used; sandboxes with a shared directory
//! restored from a template with a virtio-fs device, each reading its own. The template cache is a
//! temporary directory of this test process (with copies of the kernel,
//! initramfs and VMM), removed by the last test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use rtv_protocol::{ErrorKind, ExecRequest, Identity, RequestBody, StreamKind};
use rtv_runtime::template::{Template, MANIFEST_FILE, SHARE_DIR, SNAPSHOT_DIR, SNAPSHOT_MANIFEST};
use rtv_runtime::{
    AgentClient, ClientError, Endpoint, Origin, Sandbox, SandboxConfig, TemplateCache,
    TemplateError,
};
use rtv_tests::{kernel, test_initramfs, vmm_binary, BOOT_TIMEOUT};
use tokio::io::AsyncReadExt;

/// Tests in this file that use the shared cache; the last one to finish
/// removes it.
const CACHE_USERS: usize = 4;
static FINISHED: AtomicUsize = AtomicUsize::new(0);
/// The cache is shared, and two of the tests damage it: one at a time.
static CACHE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PREFIX: &str = "rtv-templates-test-";

/// This process's template cache, after removing those of test processes
/// that are gone.
fn cache_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix(PREFIX) {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        tmp.join(format!("{PREFIX}{}", std::process::id()))
    })
}

/// Counts a cache user out; the last removes the cache.
struct CacheUser;

impl Drop for CacheUser {
    fn drop(&mut self) {
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == CACHE_USERS {
            let _ = std::fs::remove_dir_all(cache_root());
        }
    }
}

/// The kernel, initramfs and VMM, copied once into this process's cache
/// directory: other work in the tree may rebuild them meanwhile, which
/// would change the template's key under a running test.
fn inputs() -> &'static (PathBuf, PathBuf, PathBuf) {
    static INPUTS: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = cache_root().join("inputs");
        std::fs::create_dir_all(&dir).unwrap();
        let copy = |from: PathBuf, name: &str| {
            let to = dir.join(name);
            std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
            to
        };
        (
            copy(kernel().unwrap(), "vmlinux"),
            copy(test_initramfs().unwrap(), "initramfs.cpio"),
            copy(vmm_binary().unwrap(), "rtv-vmm"),
        )
    })
}

fn config(tag: &str, index: u32) -> SandboxConfig {
    let state = std::env::temp_dir().join(format!("rtv-sb-{}-{tag}-{index}", std::process::id()));
    let (kernel, initramfs, vmm) = inputs();
    let mut cfg = SandboxConfig::new(
        kernel,
        initramfs,
        vmm,
        state,
        format!("{tag}-{index}"),
        10 + index,
    );
    cfg.template_dir = Some(cache_root().clone());
    cfg.boot_timeout = BOOT_TIMEOUT;
    cfg
}

fn cache() -> TemplateCache {
    TemplateCache::new(cache_root()).with_make_timeout(BOOT_TIMEOUT)
}

/// The template for `config`'s spec, made if needed.
async fn template_for(cfg: &SandboxConfig) -> Template {
    let spec = cfg.template_spec();
    tokio::task::spawn_blocking(move || cache().get_or_make(&spec))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("making the template: {e}"))
        .template
}

/// Runs `argv` in the guest; returns its exit code and raw stdout.
async fn run(c: &AgentClient, argv: &[&str]) -> (i32, Vec<u8>) {
    let (id, _) = c
        .exec(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    let mut out = Vec::new();
    c.attach(id, StreamKind::Stdout)
        .await
        .unwrap()
        .read_to_end(&mut out)
        .await
        .unwrap();
    let status = c.wait(id).await.unwrap();
    (status.code(), out)
}

async fn stop(sandbox: Sandbox) {
    let dir = sandbox.state_dir().to_path_buf();
    let status = sandbox.stop(Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.code(), Some(0), "VMM exit");
    assert!(!dir.exists(), "state dir {} left behind", dir.display());
}

fn origin_key(sandbox: &Sandbox) -> (&str, Option<Duration>, &[String]) {
    match sandbox.origin() {
        Origin::Template {
            key,
            made_in,
            replaced,
        } => (key, *made_in, replaced),
        other => panic!(
            "{} was not restored from a template: {other:?}",
            sandbox.hostname()
        ),
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_sandboxes_from_one_template_have_their_own_identity() {
    let _user = CacheUser;
    let _lock = CACHE_LOCK.lock().await;
    let template = template_for(&config("five", 0)).await;
    // A restored guest's clock goes on from the snapshot's: with a template
    // at least 20 s old, a clock left unset is at least 20 s behind. One set
    // from the host's lags by the request's delivery (seconds on a loaded
    // host, where the guests' kernel code is emulated).
    let age_ms = (now_ns() / 1_000_000).saturating_sub(template.manifest.created_unix_ms);
    if age_ms < 20_000 {
        tokio::time::sleep(Duration::from_millis(20_000 - age_ms)).await;
    }
    let mut starts = Vec::new();
    for i in 0..5 {
        starts.push(tokio::spawn(Sandbox::start(config("five", i))));
    }
    let mut sandboxes = Vec::new();
    for s in starts {
        sandboxes.push(s.await.unwrap().unwrap_or_else(|e| panic!("{e}")));
    }
    let mut pids: Vec<u32> = sandboxes.iter().map(Sandbox::pid).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 5, "one VMM each");
    for sb in &sandboxes {
        let (key, made_in, replaced) = origin_key(sb);
        assert_eq!(key, template.key());
        assert_eq!(
            made_in,
            None,
            "{}: the template was made again",
            sb.hostname()
        );
        assert!(replaced.is_empty(), "{replaced:?}");
        eprintln!("{}: ready after {:?}", sb.hostname(), sb.ready_after());
    }
    // Two processes in each guest.
    let checks = sandboxes.iter().map(|sb| async move {
        let c = sb.client();
        let (code, host) = run(c, &["hostname"]).await;
        assert_eq!(code, 0);
        let (code, random) = run(c, &["head", "-c", "16", "/dev/urandom"]).await;
        assert_eq!(code, 0);
        let info = c.guest_info().await.unwrap();
        let host_now = now_ns();
        (
            String::from_utf8_lossy(&host).trim().to_owned(),
            random,
            info,
            host_now,
        )
    });
    let mut results = Vec::new();
    for check in checks {
        results.push(check.await);
    }
    let mut randoms = Vec::new();
    for (sb, (hostname, random, info, host_now)) in sandboxes.iter().zip(&results) {
        assert_eq!(hostname, sb.hostname(), "the guest's hostname");
        assert_eq!(random.len(), 16, "{}: {random:?}", sb.hostname());
        randoms.push(random.clone());
        // The clock was set from the host's, not left at the template's.
        let skew = host_now.abs_diff(info.unix_time_ns);
        eprintln!(
            "{}: guest clock {:+.2} s from the host's",
            sb.hostname(),
            (info.unix_time_ns as f64 - *host_now as f64) / 1e9
        );
        assert!(
            skew < 8_000_000_000,
            "{}: guest clock {} vs host {host_now}: {:.1} s apart",
            sb.hostname(),
            info.unix_time_ns,
            skew as f64 / 1e9
        );
    }
    // Without the identity's entropy and reseed, clones of one snapshot
    // read the very same bytes from /dev/urandom (seen here).
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 5, "the guests' RNGs gave the same bytes");
    for sb in sandboxes {
        stop(sb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_corrupted_template_is_detected_and_replaced() {
    let _user = CacheUser;
    let _lock = CACHE_LOCK.lock().await;
    let cfg = config("corrupt", 0);
    let spec = cfg.template_spec();
    let old = template_for(&cfg).await;
    let memory = old.snapshot_dir().join("memory.bin");
    let len = std::fs::metadata(&memory).unwrap().len();
    // Truncated: our own check names the file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    f.set_len(len - 4096).unwrap();
    match cache().check(&spec) {
        Err(TemplateError::Invalid { problem, .. }) => {
            assert!(
                problem.contains("memory.bin") && problem.contains("truncated"),
                "{problem}"
            )
        }
        other => panic!("a truncated template passed: {other:?}"),
    }
    // The right length again, but one byte flipped: only the VMM's sha256
    // check sees it. The sandbox must detect it and replace the template.
    f.set_len(len).unwrap();
    let mut byte = [0u8; 1];
    {
        use std::os::unix::fs::FileExt;
        let r = std::fs::File::open(&memory).unwrap();
        r.read_exact_at(&mut byte, 1 << 20).unwrap();
        f.write_all_at(&[!byte[0]], 1 << 20).unwrap();
    }
    drop(f);
    assert!(cache().check(&spec).is_ok(), "sizes are right again");
    let sb = Sandbox::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
    let (key, made_in, replaced) = origin_key(&sb);
    assert_eq!(key, old.key(), "same inputs, same key");
    assert!(made_in.is_some(), "the template was not made again");
    assert!(
        replaced.len() == 1
            && replaced[0].contains("memory.bin")
            && replaced[0].contains("corrupted"),
        "the VMM's refusal, naming the file: {replaced:?}"
    );
    let new = cache().check(&spec).unwrap();
    assert_ne!(new.manifest.instance, old.manifest.instance);
    let (code, out) = run(sb.client(), &["hostname"]).await;
    assert_eq!(
        (code, String::from_utf8_lossy(&out).trim()),
        (0, "corrupt-0")
    );
    stop(sb).await;

    // Damaged again, now while three sandboxes start from it at once:
    // each VMM refuses it, each sandbox discards that very template (never
    // the one another made meanwhile), exactly one makes the new one, the
    // others wait for it and restore it, and all three run.
    flip_byte(&new.snapshot_dir().join("memory.bin"), 2 << 20);
    let starts: Vec<_> = (1..=3)
        .map(|i| tokio::spawn(Sandbox::start(config("corrupt", i))))
        .collect();
    let mut sandboxes = Vec::new();
    for s in starts {
        sandboxes.push(s.await.unwrap().unwrap_or_else(|e| panic!("{e}")));
    }
    let made = sandboxes
        .iter()
        .filter(|sb| origin_key(sb).1.is_some())
        .count();
    assert_eq!(made, 1, "templates made by three sandboxes at once");
    for sb in &sandboxes {
        let (key, _, replaced) = origin_key(sb);
        assert_eq!(key, old.key());
        assert!(
            replaced.len() <= 1 && replaced.iter().all(|r| r.contains("memory.bin")),
            "{}: {replaced:?}",
            sb.hostname()
        );
    }
    let newest = cache().check(&spec).unwrap();
    assert_ne!(newest.manifest.instance, new.manifest.instance);
    for (i, sb) in sandboxes.into_iter().enumerate() {
        let (code, out) = run(sb.client(), &["hostname"]).await;
        assert_eq!(
            (code, String::from_utf8_lossy(&out).trim().to_owned()),
            (0, format!("corrupt-{}", i + 1))
        );
        stop(sb).await;
    }
}

/// Flips the byte at `offset` of `path` in place (same length).
fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, offset).unwrap();
    f.write_all_at(&[!byte[0]], offset).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_claiming_another_vmm_build_is_not_used() {
    let _user = CacheUser;
    let _lock = CACHE_LOCK.lock().await;
    let cfg = config("build", 0);
    let spec = cfg.template_spec();
    let old = template_for(&cfg).await;
    // The VMM's own manifest claims another build: refused by our check
    // (and by the VMM).
    let state = old.snapshot_dir().join(SNAPSHOT_MANIFEST);
    let original = std::fs::read_to_string(&state).unwrap();
    let build = &old.manifest.snapshot_build_id;
    assert!(original.contains(build.as_str()));
    std::fs::write(&state, original.replace(build.as_str(), "0123456789abcdef")).unwrap();
    match cache().check(&spec) {
        Err(TemplateError::Invalid { problem, .. }) => assert!(
            problem.contains("state.json") && problem.contains("0123456789abcdef"),
            "{problem}"
        ),
        other => panic!("a snapshot of another build passed: {other:?}"),
    }
    std::fs::write(&state, &original).unwrap();
    assert!(cache().check(&spec).is_ok());
    // Our manifest claims another VMM build: another key's inputs.
    let manifest_path = old.dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let ours = &old.manifest.inputs.vmm_build_id;
    assert!(text.contains(ours.as_str()));
    std::fs::write(
        &manifest_path,
        text.replace(ours.as_str(), "sha256:another-build"),
    )
    .unwrap();
    match cache().check(&spec) {
        Err(TemplateError::Invalid { problem, .. }) => assert!(
            problem.contains(MANIFEST_FILE) && problem.contains("another-build"),
            "{problem}"
        ),
        other => panic!("a template of another build passed: {other:?}"),
    }
    let sb = Sandbox::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
    let (key, made_in, replaced) = origin_key(&sb);
    assert_eq!(key, old.key());
    assert!(made_in.is_some(), "the template was used, not made again");
    assert!(
        replaced.len() == 1 && replaced[0].contains("another-build"),
        "{replaced:?}"
    );
    let new = cache().check(&spec).unwrap();
    assert_ne!(new.manifest.instance, old.manifest.instance);
    assert!(new.dir.join(SNAPSHOT_DIR).join("memory.bin").exists());
    let (code, _) = run(sb.client(), &["true"]).await;
    assert_eq!(code, 0);
    stop(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_with_a_share_read_their_own_host_directory_through_virtio_fs() {
    let _user = CacheUser;
    let _lock = CACHE_LOCK.lock().await;
    let plain_key = config("share", 0).template_spec().inputs().unwrap().key();
    let shares: Vec<PathBuf> = (0..2)
        .map(|i| {
            let dir = cache_root().join(format!("share-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("file"),
                format!("placed on the host for sandbox {i}\n"),
            )
            .unwrap();
            dir
        })
        .collect();
    let mut template_key = None;
    // One after the other: the first makes the template (with a virtio-fs
    // device), the second restores it with its own share.
    for (i, share) in shares.iter().enumerate() {
        let mut cfg = config("share", i as u32);
        cfg.shared_dir = Some(share.clone());
        let want_key = cfg.template_spec().inputs().unwrap().key();
        assert_ne!(want_key, plain_key, "with and without a share: two keys");
        let sb = Sandbox::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
        let (key, made_in, _) = origin_key(&sb);
        assert_eq!(key, want_key);
        if i > 0 {
            assert_eq!(made_in, None, "the template was made again");
        }
        template_key = Some(key.to_owned());
        let c = sb.client();
        let (code, out) = run(
            c,
            &[
                "sh",
                "-c",
                "mkdir -p /mnt && mount -t virtiofs rtvfs /mnt 2>&1 && echo from-guest > /mnt/out",
            ],
        )
        .await;
        assert_eq!(code, 0, "mount: {}", String::from_utf8_lossy(&out));
        let (code, out) = run(c, &["cat", "/mnt/file"]).await;
        assert_eq!(code, 0);
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("placed on the host for sandbox {i}\n")
        );
        assert_eq!(
            std::fs::read_to_string(share.join("out")).unwrap(),
            "from-guest\n"
        );
        stop(sb).await;
    }
    // The template's placeholder share was never written to.
    let key = template_key.unwrap();
    let placeholder = cache().root().join(&key).join(SHARE_DIR);
    assert_eq!(
        std::fs::read_dir(&placeholder)
            .unwrap_or_else(|e| panic!("{}: {e}", placeholder.display()))
            .count(),
        0
    );
    for share in shares {
        let _ = std::fs::remove_dir_all(share);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_identity_is_refused_by_an_agent_on_the_host() {
    let dir = std::env::temp_dir().join(format!("rtv-identity-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let mut agent = Command::new(rtv_tests::agent_binary().unwrap())
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    let client = AgentClient::connect(Endpoint::Unix(sock), Duration::from_secs(30)).await;
    let result = match &client {
        Ok(c) => Some(
            c.call(RequestBody::SetIdentity(Identity {
                hostname: "must-not-change".into(),
                entropy: vec![1; 32],
                unix_time_ns: 1,
            }))
            .await,
        ),
        Err(_) => None,
    };
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
    client.unwrap();
    match result {
        Some(Err(ClientError::Agent { kind, message })) => {
            assert_eq!(kind, ErrorKind::InvalidRequest);
            assert!(message.contains("not PID 1"), "{message}");
        }
        other => panic!("an agent on the host accepted SetIdentity: {other:?}"),
    }
}
