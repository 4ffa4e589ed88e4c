//! rtv's configuration file (`/etc/rtv/config.toml`, TOML): where the
//! guest's parts are, the template cache, the size of a VM whose spec says
//! nothing, and the VMM's hardening switch. The file is read once per
//! process ([`init`]); every front end (the `rtv` binary, the shim) then
//! reads [`get`]. Without a file every key has its default, which is rtv's
//! behaviour without one. Environment variables (`$RTV_KERNEL`,
//! `$RTV_CACHE_DIR`, ...) still win over the file: they are how a test or
//! a one-off run points at other parts.
//!
//! ```toml
//! [guest]
//! kernel = "/usr/lib/rtv/vmlinux"          # SMP kernel, any vCPU count
//! kernel_up = "/usr/lib/rtv/vmlinux-up"    # for 1-vCPU VMs (optional)
//! initramfs = "/usr/lib/rtv/initramfs.cpio"
//!
//! [vmm]
//! path = "/usr/lib/rtv/rtv-vmm"
//! jail = true                              # false: `rtv-vmm --jail off`
//! seccomp = "on"                           # "log" or "off": `rtv-vmm --seccomp ...`
//!
//! [vm]
//! default_memory_mib = 2048                # a spec without a memory limit
//! default_vcpus = 2                        # a spec without a CPU quota
//! max_memory_mib = 16384                   # a larger VM is refused (unset: the host's)
//! max_vcpus = 2                            # more vCPUs are capped (unset: the host's CPUs)
//! kernel_args = "quiet"                    # appended to the guest kernel's command line
//! pvm = "auto"                             # "on" or "off": `rtv-vmm --pvm ...`
//!
//! [log]
//! level = "info"                           # rtv's --log file and the shim's log
//!
//! [templates]
//! dir = "/var/cache/rtv/templates"
//! max_size_mib = 1024                      # least recently used removed first
//!
//! [agent]
//! answer_timeout_secs = 120                # a VM whose agent answers nothing longer is stopped
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;

/// Where the file is when neither `--config` nor `$RTV_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/rtv/config.toml";
/// The variable that names the file.
pub const ENV: &str = "RTV_CONFIG";
/// The largest VM memory a default may ask for, MiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The most vCPUs a default may ask for.
pub const MAX_VCPUS: u64 = 254;
/// The longest `vm.kernel_args`: the x86 command line holds 2048 bytes,
/// rtv's own take about 400.
pub const MAX_KERNEL_ARGS: usize = 1024;
/// The largest template cache budget, MiB (1 PiB).
pub const MAX_TEMPLATE_BUDGET_MIB: u64 = 1 << 30;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML or a key of the wrong type or name (toml's message names the
    /// line, the column and the key).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Value {
        path: PathBuf,
        line: usize,
        key: &'static str,
        message: String,
    },
}

/// The configuration: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    pub guest: Guest,
    pub vmm: Vmm,
    pub vm: Vm,
    pub templates: Templates,
    pub log: Log,
    pub agent: Agent,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    pub kernel: Option<PathBuf>,
    pub kernel_up: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vmm {
    pub path: Option<PathBuf>,
    #[serde(default = "yes")]
    pub jail: bool,
    #[serde(default)]
    pub seccomp: Seccomp,
}

impl Default for Vmm {
    fn default() -> Self {
        Vmm {
            path: None,
            jail: true,
            seccomp: Seccomp::On,
        }
    }
}

/// `vmm.seccomp`: the VMM's seccomp filters (`rtv-vmm --seccomp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// A forbidden system call ends the VMM.
    #[default]
    On,
    /// Forbidden calls go through and the kernel logs them (development).
    Log,
    /// No filters.
    Off,
}

impl Seccomp {
    /// The value as `rtv-vmm --seccomp` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Seccomp::On => "on",
            Seccomp::Log => "log",
            Seccomp::Off => "off",
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vm {
    pub default_memory_mib: Option<u64>,
    pub default_vcpus: Option<u8>,
    /// The largest VM a spec or a pod may ask for, MiB: a larger one is
    /// refused (unset: what the host can give, which the VMM checks).
    pub max_memory_mib: Option<u64>,
    /// The most vCPUs a VM gets: more are capped (unset: the host's CPUs).
    pub max_vcpus: Option<u8>,
    /// Appended to the guest kernel's command line (`rtv-vmm --append`)
    /// when a template is made; part of the template's key.
    pub kernel_args: Option<String>,
    /// `rtv-vmm --pvm`: PVM's accommodations; part of the template's key.
    pub pvm: Pvm,
}

/// `vm.pvm`: PVM native-mode accommodations (`rtv-vmm --pvm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pvm {
    /// On when the host's KVM is PVM.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never (a hardware-virtualization host).
    Off,
}

impl Pvm {
    /// The value as `rtv-vmm --pvm` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Pvm::Auto => "auto",
            Pvm::On => "on",
            Pvm::Off => "off",
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// The level of rtv's `--log` file and of the shim's log (`--debug`
    /// still means debug); unset: info.
    pub level: Option<LogLevel>,
}

/// `log.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The level's name, as tracing filters take it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `[agent]`: the guest agent as rtv and the shim talk to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agent {
    /// How long a request may wait for the agent's answer, seconds (waits
    /// for a process excepted); unset: [`DEFAULT_ANSWER_TIMEOUT_SECS`].
    pub answer_timeout_secs: Option<u64>,
}

/// `agent.answer_timeout_secs`'s default: long enough for a loaded host
/// whose guests run their kernel code emulated (PVM), where a container's
/// creation takes tens of seconds.
pub const DEFAULT_ANSWER_TIMEOUT_SECS: u64 = 120;
/// `agent.answer_timeout_secs`'s largest value.
pub const MAX_ANSWER_TIMEOUT_SECS: u64 = 3600;

impl Agent {
    /// How long a request may wait for the agent's answer before its VM
    /// is taken as hung.
    pub fn answer_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.answer_timeout_secs
                .unwrap_or(DEFAULT_ANSWER_TIMEOUT_SECS),
        )
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    answer_timeout_secs: Option<toml::Spanned<i64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Templates {
    pub dir: Option<PathBuf>,
    /// The cache's size budget in MiB (default
    /// [`crate::template::DEFAULT_BUDGET_MIB`]).
    pub max_size_mib: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TemplatesFile {
    dir: Option<PathBuf>,
    max_size_mib: Option<toml::Spanned<i64>>,
}

/// The file as written: numbers with their places, for errors.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    guest: Guest,
    #[serde(default)]
    vmm: Vmm,
    #[serde(default)]
    vm: VmFile,
    #[serde(default)]
    templates: TemplatesFile,
    #[serde(default)]
    agent: AgentFile,
    #[serde(default)]
    log: Log,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VmFile {
    default_memory_mib: Option<toml::Spanned<i64>>,
    default_vcpus: Option<toml::Spanned<i64>>,
    max_memory_mib: Option<toml::Spanned<i64>>,
    max_vcpus: Option<toml::Spanned<i64>>,
    kernel_args: Option<toml::Spanned<String>>,
    #[serde(default)]
    pvm: Pvm,
}

impl Config {
    /// Parses `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: parse_message(&e.to_string()),
        })?;
        let line = |span: std::ops::Range<usize>| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        };
        // A bad value of `key`, at the line where `span` starts.
        let bad =
            |key: &'static str, span: std::ops::Range<usize>, message: String| ConfigError::Value {
                path: path.to_path_buf(),
                line: line(span),
                key,
                message,
            };
        let ranged = |key: &'static str,
                      v: Option<toml::Spanned<i64>>,
                      max: u64|
         -> Result<Option<u64>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let n = *v.get_ref();
            if n < 1 || n as u64 > max {
                return Err(bad(
                    key,
                    v.span(),
                    format!("{n} is not between 1 and {max}"),
                ));
            }
            Ok(Some(n as u64))
        };
        let default_memory_mib = ranged(
            "vm.default_memory_mib",
            file.vm.default_memory_mib.clone(),
            MAX_MEMORY_MIB,
        )?;
        let default_vcpus =
            ranged("vm.default_vcpus", file.vm.default_vcpus, MAX_VCPUS)?.map(|n| n as u8);
        let max_memory_mib = ranged("vm.max_memory_mib", file.vm.max_memory_mib, MAX_MEMORY_MIB)?;
        let max_vcpus = ranged("vm.max_vcpus", file.vm.max_vcpus, MAX_VCPUS)?.map(|n| n as u8);
        // A default over the maximum could never be used.
        if let (Some(v), Some(max)) = (&file.vm.default_memory_mib, max_memory_mib) {
            if *v.get_ref() as u64 > max {
                return Err(bad(
                    "vm.default_memory_mib",
                    v.span(),
                    format!("{} is over vm.max_memory_mib ({max})", v.get_ref()),
                ));
            }
        }
        let kernel_args = match file.vm.kernel_args {
            Some(v) if v.get_ref().contains(['\n', '\0']) => {
                return Err(bad(
                    "vm.kernel_args",
                    v.span(),
                    "a kernel command line is one line".into(),
                ))
            }
            Some(v) if v.get_ref().len() > MAX_KERNEL_ARGS => {
                return Err(bad(
                    "vm.kernel_args",
                    v.span(),
                    format!(
                        "{} bytes; at most {MAX_KERNEL_ARGS} fit beside rtv's own",
                        v.get_ref().len()
                    ),
                ))
            }
            Some(v) => Some(v.into_inner().trim().to_owned()).filter(|a| !a.is_empty()),
            None => None,
        };
        let max_size_mib = ranged(
            "templates.max_size_mib",
            file.templates.max_size_mib,
            MAX_TEMPLATE_BUDGET_MIB,
        )?;
        let relative = |key: &'static str, p: &Option<PathBuf>| match p {
            Some(p) if !p.is_absolute() => Err(ConfigError::Value {
                path: path.to_path_buf(),
                line: text
                    .lines()
                    .position(|l| {
                        l.trim_start()
                            .starts_with(key.rsplit('.').next().unwrap_or(key))
                    })
                    .map_or(0, |i| i + 1),
                key,
                message: format!("{} is not an absolute path", p.display()),
            }),
            _ => Ok(()),
        };
        let answer_timeout_secs = ranged(
            "agent.answer_timeout_secs",
            file.agent.answer_timeout_secs,
            MAX_ANSWER_TIMEOUT_SECS,
        )?;
        relative("guest.kernel", &file.guest.kernel)?;
        relative("guest.kernel_up", &file.guest.kernel_up)?;
        relative("guest.initramfs", &file.guest.initramfs)?;
        relative("vmm.path", &file.vmm.path)?;
        relative("templates.dir", &file.templates.dir)?;
        Ok(Config {
            path: Some(path.to_path_buf()),
            guest: file.guest,
            vmm: file.vmm,
            vm: Vm {
                default_memory_mib,
                default_vcpus,
                max_memory_mib,
                max_vcpus,
                kernel_args,
                pvm: file.vm.pvm,
            },
            templates: Templates {
                dir: file.templates.dir,
                max_size_mib,
            },
            log: file.log,
            agent: Agent {
                answer_timeout_secs,
            },
        })
    }

    /// Reads the file: `explicit` (`--config`), else `$RTV_CONFIG`, else
    /// [`DEFAULT_PATH`] if it exists, else the defaults. A file that was
    /// named and is missing is an error.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let named = explicit.map(Path::to_path_buf).or_else(|| {
            std::env::var_os(ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let path = match named {
            Some(p) => p,
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::parse(&path, &text)
    }
}

/// toml's message on one line, with the file's line it points at: "TOML
/// parse error at line 2, column 1 (`kernal = "/k"`): unknown field
/// `kernal`, expected one of ...".
fn parse_message(m: &str) -> String {
    let lines: Vec<&str> = m.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    // The excerpt's line of the file: "2 | default_vcpus = \"two\"".
    let source = lines.iter().find_map(|l| {
        let (n, text) = l.split_once('|')?;
        (!n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit())).then(|| text.trim())
    });
    match (lines.first(), lines.last(), source) {
        (Some(first), Some(last), Some(src)) if !last.contains('|') => {
            format!("{first} (`{src}`): {last}")
        }
        (Some(first), Some(last), None) if lines.len() > 1 && !last.contains('|') => {
            format!("{first}: {last}")
        }
        _ => lines.join(" "),
    }
}

static CONFIG: OnceLock<Config> = OnceLock::new();
static LOAD_ERROR: OnceLock<String> = OnceLock::new();

/// Makes `config` the process's configuration (the first call wins).
pub fn init(config: Config) {
    let _ = CONFIG.set(config);
}

/// Loads the file as [`Config::load`] does and makes it the process's
/// configuration; when it cannot be used, the defaults stand and the error
/// is kept for [`error`] (a long-lived front end such as the shim fails
/// each pod with it instead of dying at start).
pub fn init_from_file(explicit: Option<&Path>) -> Result<(), ConfigError> {
    match Config::load(explicit) {
        Ok(c) => {
            init(c);
            Ok(())
        }
        Err(e) => {
            let _ = LOAD_ERROR.set(e.to_string());
            Err(e)
        }
    }
}

/// Why the configuration file could not be used, if it could not.
pub fn error() -> Option<&'static str> {
    LOAD_ERROR.get().map(String::as_str)
}

/// The process's configuration: what [`init`] set, else the defaults.
pub fn get() -> &'static Config {
    CONFIG.get_or_init(Config::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/rtv/config.toml"), text)
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            "[guest]\nkernel = \"/k\"\nkernel_up = \"/ku\"\ninitramfs = \"/i\"\n\
             [vmm]\npath = \"/v\"\njail = false\nseccomp = \"log\"\n\
             [vm]\ndefault_memory_mib = 512\ndefault_vcpus = 2\nmax_memory_mib = 4096\n\
             max_vcpus = 2\nkernel_args = \" quiet loglevel=4 \"\npvm = \"off\"\n\
             [templates]\ndir = \"/t\"\nmax_size_mib = 300\n\
             [log]\nlevel = \"debug\"\n\
             [agent]\nanswer_timeout_secs = 7\n",
        )
        .unwrap();
        assert_eq!(c.agent.answer_timeout_secs, Some(7));
        assert_eq!(c.agent.answer_timeout(), std::time::Duration::from_secs(7));
        assert_eq!(c.vm.max_memory_mib, Some(4096));
        assert_eq!(c.vm.max_vcpus, Some(2));
        assert_eq!(c.vm.kernel_args.as_deref(), Some("quiet loglevel=4"));
        assert_eq!(c.vm.pvm, Pvm::Off);
        assert_eq!(c.log.level, Some(LogLevel::Debug));
        assert_eq!(c.guest.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.guest.kernel_up.as_deref(), Some(Path::new("/ku")));
        assert_eq!(c.guest.initramfs.as_deref(), Some(Path::new("/i")));
        assert_eq!(c.vmm.path.as_deref(), Some(Path::new("/v")));
        assert!(!c.vmm.jail);
        assert_eq!(c.vmm.seccomp, Seccomp::Log);
        assert_eq!(c.vm.default_memory_mib, Some(512));
        assert_eq!(c.vm.default_vcpus, Some(2));
        assert_eq!(c.templates.dir.as_deref(), Some(Path::new("/t")));
        assert_eq!(c.templates.max_size_mib, Some(300));
    }

    /// The commented file the repo ships (config/config.toml, installed by
    /// scripts/setup.sh) is the defaults as it stands, and names every key:
    /// with its example lines uncommented, every key is set.
    #[test]
    fn the_shipped_file_is_the_defaults_and_names_every_key() {
        let shipped = include_str!("../../config/config.toml");
        let c = parse(shipped).unwrap();
        assert_eq!(
            Config {
                path: None,
                ..c.clone()
            },
            Config::default()
        );
        let uncommented: String = shipped
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(&uncommented).unwrap();
        assert!(c.guest.kernel.is_some() && c.guest.kernel_up.is_some());
        assert!(c.guest.initramfs.is_some() && c.vmm.path.is_some());
        assert!(c.vm.default_memory_mib.is_some() && c.vm.default_vcpus.is_some());
        assert!(c.templates.dir.is_some() && c.templates.max_size_mib.is_some());
        assert!(c.vm.max_memory_mib.is_some() && c.vm.max_vcpus.is_some());
        // kernel_args's default is empty: no value.
        assert!(c.vm.kernel_args.is_none() && c.log.level.is_some());
        assert!(c.agent.answer_timeout_secs.is_some());
        let keys = uncommented
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
            .count();
        assert_eq!(keys, 16, "every key of the file, once:\n{uncommented}");
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(
            Config {
                path: None,
                ..c.clone()
            },
            Config::default()
        );
        assert!(c.vmm.jail);
        assert_eq!(c.vmm.seccomp, Seccomp::On);
    }

    #[test]
    fn bad_values_name_the_key_and_the_line() {
        let long = format!("[vm]\nkernel_args = \"{}\"\n", "x".repeat(2000));
        // (the file, what its error must all say)
        let cases: Vec<(&str, &[&str])> = vec![
            (
                "[agent]\nanswer_timeout_secs = 0\n",
                &[":2: agent.answer_timeout_secs: 0 is not between 1 and 3600"],
            ),
            (
                "[templates]\nmax_size_mib = -1\n",
                &[":2: templates.max_size_mib: -1 is not between 1 and"],
            ),
            (
                "[vm]\n\ndefault_memory_mib = 0\n",
                &[":3: vm.default_memory_mib: 0 is not between 1 and"],
            ),
            (
                "[vm]\ndefault_vcpus = 999\n",
                &[":2: vm.default_vcpus: 999"],
            ),
            (
                "[vm]\ndefault_vcpus = \"two\"\n",
                &["line 2", "default_vcpus"],
            ),
            ("[vmm]\njail = \"yes\"\n", &["line 2", "jail"]),
            ("[vmm]\nseccomp = true\n", &["line 2", "seccomp"]),
            ("[vmm]\nseccomp = \"strict\"\n", &["line 2", "`on`, `log`"]),
            ("[guest]\nkernal = \"/k\"\n", &["line 2", "kernal"]),
            ("[gust]\n", &["line 1", "gust"]),
            (
                "[guest]\n\nkernel = \"vmlinux\"\n",
                &[":3: guest.kernel: vmlinux is not an absolute path"],
            ),
            (
                "[vm]\nmax_memory_mib = 256\n\ndefault_memory_mib = 512\n",
                &[":4: vm.default_memory_mib: 512 is over vm.max_memory_mib (256)"],
            ),
            (
                "[vm]\nmax_vcpus = 0\n",
                &[":2: vm.max_vcpus: 0 is not between 1 and"],
            ),
            (
                "[vm]\n\nkernel_args = \"a\\nb\"\n",
                &[":3: vm.kernel_args: a kernel command line is one line"],
            ),
            (&long, &[":2: vm.kernel_args: 2000 bytes"]),
            ("[vm]\npvm = \"maybe\"\n", &["line 2", "`auto`, `on`"]),
            ("[log]\nlevel = \"loud\"\n", &["line 2", "`error`, `warn`"]),
            ("[log]\nfile = \"/x\"\n", &["line 2", "file"]),
            ("[vm\n", &["line 1"]),
        ];
        for (text, wants) in cases {
            let e = parse(text).unwrap_err().to_string();
            for want in wants {
                assert!(e.contains(want), "{text:?}: no {want:?} in {e}");
            }
        }
        let e = parse("[vm\n").unwrap_err().to_string();
        assert!(!e.contains('|'), "one line: {e}");
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/rtv.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/rtv.toml: "), "{e}");
    }
}
