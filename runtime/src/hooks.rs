//! OCI hooks (config.md, "POSIX-platform Hooks"), run on the host with the
//! container's state JSON on stdin.
//!
//! Both the `rtv` binary and the containerd shim run them on the host: the
//! container's namespaces are in the guest, so a hook that expects to be in
//! them (e.g. one that configures the container's network namespace from
//! outside) cannot work either way; a hook that only needs the state, the
//! bundle or host resources does.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks};

/// The OCI runtime spec version rtv implements (the state's `ociVersion`).
pub const OCI_VERSION: &str = "1.0.2";

/// How often a running hook is checked for its end.
const POLL: Duration = Duration::from_millis(5);

/// One of the spec's hook lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `prestart` (deprecated by the spec, still run): at create.
    Prestart,
    /// `createRuntime`: at create, after the environment was created.
    CreateRuntime,
    /// `createContainer`: at create, after `createRuntime`.
    CreateContainer,
    /// `startContainer`: at start, before the user process runs.
    StartContainer,
    /// `poststart`: after the user process started.
    Poststart,
    /// `poststop`: after the container was deleted.
    Poststop,
}

impl Stage {
    /// The lists run at create, in order.
    pub const CREATE: [Stage; 3] = [
        Stage::Prestart,
        Stage::CreateRuntime,
        Stage::CreateContainer,
    ];

    /// Its name in the spec (`hooks.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prestart => "prestart",
            Stage::CreateRuntime => "createRuntime",
            Stage::CreateContainer => "createContainer",
            Stage::StartContainer => "startContainer",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }

    /// Its list in `hooks`, if the spec has one.
    pub fn of(self, hooks: &Hooks) -> Option<&Vec<Hook>> {
        match self {
            Stage::Prestart => hooks.prestart().as_ref(),
            Stage::CreateRuntime => hooks.create_runtime().as_ref(),
            Stage::CreateContainer => hooks.create_container().as_ref(),
            Stage::StartContainer => hooks.start_container().as_ref(),
            Stage::Poststart => hooks.poststart().as_ref(),
            Stage::Poststop => hooks.poststop().as_ref(),
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a hook failed. Each names the hook (`hooks.<stage>[<index>]` and
/// its path); the message is complete (the underlying error is part of it,
/// not a separate source).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("hooks.{stage}[{index}] ({}) failed: starting {}: {error}", path.display(), path.display())]
    Spawn {
        /// Its list.
        stage: Stage,
        /// Its index in the list.
        index: usize,
        /// Its path.
        path: PathBuf,
        /// Why it could not be started.
        error: std::io::Error,
    },
    /// It exited non-zero (or was killed by a signal).
    #[error("hooks.{stage}[{index}] ({}) failed: {status}: {stderr}", path.display())]
    Exit {
        /// Its list.
        stage: Stage,
        /// Its index in the list.
        index: usize,
        /// Its path.
        path: PathBuf,
        /// How it ended.
        status: ExitStatus,
        /// What it wrote to stderr, trimmed.
        stderr: String,
    },
    /// It ran longer than its `timeout` and was killed.
    #[error("hooks.{stage}[{index}] ({}) failed: timed out after {timeout:?}", path.display())]
    Timeout {
        /// Its list.
        stage: Stage,
        /// Its index in the list.
        index: usize,
        /// Its path.
        path: PathBuf,
        /// Its timeout.
        timeout: Duration,
    },
    /// Waiting for it failed.
    #[error("hooks.{stage}[{index}] ({}) failed: waiting for it: {error}", path.display())]
    Wait {
        /// Its list.
        stage: Stage,
        /// Its index in the list.
        index: usize,
        /// Its path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

impl HookError {
    /// The list of the hook that failed.
    pub fn stage(&self) -> Stage {
        match self {
            HookError::Spawn { stage, .. }
            | HookError::Exit { stage, .. }
            | HookError::Timeout { stage, .. }
            | HookError::Wait { stage, .. } => *stage,
        }
    }
}

/// The state of a container as the spec's runtime.md defines it (what
/// hooks get on stdin): `ociVersion`, `id`, `status`, `pid` (0 once
/// stopped), `bundle` and `annotations`. Callers may add fields.
pub fn state(
    id: &str,
    status: &str,
    pid: i32,
    bundle: &Path,
    annotations: &HashMap<String, String>,
) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": OCI_VERSION,
        "id": id,
        "pid": pid,
        "status": status,
        "bundle": bundle,
        "annotations": annotations,
    })
}

/// Runs `stage`'s hooks of `hooks` in order, each with `state_json` on its
/// stdin, its `args` (the first as argv[0]) and only its `env`, killed
/// after its `timeout` (seconds, if positive). The first failure is
/// returned: the caller decides whether it is fatal.
pub fn run(stage: Stage, hooks: Option<&Hooks>, state_json: &[u8]) -> Result<(), HookError> {
    let list = hooks.and_then(|h| stage.of(h));
    for (index, hook) in list.into_iter().flatten().enumerate() {
        run_one(hook, state_json).map_err(|f| f.into_error(stage, index, hook.path()))?;
    }
    Ok(())
}

/// A hook's failure, before it is named.
enum Failure {
    Spawn(std::io::Error),
    Exit(ExitStatus, String),
    Timeout(Duration),
    Wait(std::io::Error),
}

impl Failure {
    fn into_error(self, stage: Stage, index: usize, path: &Path) -> HookError {
        let path = path.to_owned();
        match self {
            Failure::Spawn(error) => HookError::Spawn {
                stage,
                index,
                path,
                error,
            },
            Failure::Exit(status, stderr) => HookError::Exit {
                stage,
                index,
                path,
                status,
                stderr,
            },
            Failure::Timeout(timeout) => HookError::Timeout {
                stage,
                index,
                path,
                timeout,
            },
            Failure::Wait(error) => HookError::Wait {
                stage,
                index,
                path,
                error,
            },
        }
    }
}

fn run_one(hook: &Hook, state_json: &[u8]) -> Result<(), Failure> {
    let mut cmd = Command::new(hook.path());
    if let Some((first, rest)) = hook.args().as_deref().and_then(<[String]>::split_first) {
        cmd.arg0(first).args(rest);
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
    let mut child = cmd.spawn().map_err(Failure::Spawn)?;
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
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(Failure::Exit(status, err.trim().to_owned()));
            }
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::Wait(e));
            }
        }
        if let Some(t) = timeout.filter(|t| started.elapsed() > *t) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Failure::Timeout(t));
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: serde_json::Value) -> Hooks {
        serde_json::from_value(json).expect("a hooks object")
    }

    fn sh(script: &str) -> serde_json::Value {
        serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", script]})
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rtv-hooks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    }

    #[test]
    fn runs_each_hook_with_the_state_its_args_and_only_its_env() {
        let dir = scratch("env");
        let out = dir.join("out");
        let script = format!(
            "printf '%s|%s|%s|' \"$0\" \"$FOO\" \"${{HOME-unset}}\" > {o}; cat >> {o}",
            o = out.display()
        );
        let hooks = hook(serde_json::json!({"poststart": [{
            "path": "/bin/sh",
            "args": ["my-hook", "-c", script],
            "env": ["FOO=bar=baz"],
        }]}));
        // Nothing of this process's environment (HOME, if it is set) is passed.
        run(Stage::Poststart, Some(&hooks), b"{\"id\":\"c\"}").expect("the hook runs");
        let got = std::fs::read_to_string(&out).expect("the hook's output");
        assert_eq!(got, "my-hook|bar=baz|unset|{\"id\":\"c\"}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_first_failure_names_the_list_index_and_path_and_stops_the_rest() {
        let dir = scratch("fail");
        let marker = dir.join("ran");
        let hooks = hook(serde_json::json!({"prestart": [
            sh("exit 0"),
            sh("echo nope >&2; exit 3"),
            sh(&format!("touch {}", marker.display())),
        ]}));
        let e = run(Stage::Prestart, Some(&hooks), b"{}").expect_err("the second hook fails");
        assert!(matches!(e, HookError::Exit { index: 1, .. }), "{e:?}");
        assert_eq!(e.stage(), Stage::Prestart);
        assert_eq!(
            e.to_string(),
            "hooks.prestart[1] (/bin/sh) failed: exit status: 3: nope"
        );
        assert!(!marker.exists(), "a hook after the failure ran");
        // Other lists are not run.
        run(Stage::Poststop, Some(&hooks), b"{}").expect("no poststop hooks");
        run(Stage::Prestart, None, b"{}").expect("no hooks at all");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_binary_and_a_timeout_are_errors() {
        let hooks = hook(serde_json::json!({
            "createRuntime": [{"path": "/nonexistent/hook"}],
            "startContainer": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}],
        }));
        let e = run(Stage::CreateRuntime, Some(&hooks), b"{}").expect_err("no such binary");
        assert!(matches!(e, HookError::Spawn { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(
                "hooks.createRuntime[0] (/nonexistent/hook) failed: starting /nonexistent/hook: "
            ),
            "{e}"
        );
        let t0 = Instant::now();
        let e = run(Stage::StartContainer, Some(&hooks), b"{}").expect_err("a timeout");
        assert!(matches!(e, HookError::Timeout { .. }), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert_eq!(
            e.to_string(),
            "hooks.startContainer[0] (/bin/sleep) failed: timed out after 1s"
        );
    }

    #[test]
    fn state_has_the_runtime_md_fields() {
        let annotations = HashMap::from([("a".to_owned(), "b".to_owned())]);
        let v = state("c1", "created", 42, Path::new("/b"), &annotations);
        assert_eq!(
            v,
            serde_json::json!({"ociVersion": OCI_VERSION, "id": "c1", "status": "created",
                "pid": 42, "bundle": "/b", "annotations": {"a": "b"}})
        );
    }
}
