//! OCI hooks, run on the host with the container's state JSON on stdin.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::Hook;

/// Runs `hooks` in order; the first failure is returned (the caller
/// decides whether it is fatal). `which` names the hook list in errors.
pub fn run(which: &str, hooks: Option<&Vec<Hook>>, state_json: &[u8]) -> Result<()> {
    for (i, hook) in hooks.into_iter().flatten().enumerate() {
        run_one(hook, state_json)
            .with_context(|| format!("hooks.{which}[{i}] ({}) failed", hook.path().display()))?;
    }
    Ok(())
}

fn run_one(hook: &Hook, state_json: &[u8]) -> Result<()> {
    let mut cmd = Command::new(hook.path());
    if let Some(args) = hook.args() {
        if let Some((first, rest)) = args.split_first() {
            use std::os::unix::process::CommandExt;
            cmd.arg0(first).args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", hook.path().display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(state_json);
    }
    let timeout = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64));
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("{status}: {}", err.trim());
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {:?}", timeout.unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
