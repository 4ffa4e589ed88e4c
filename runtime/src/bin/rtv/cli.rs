//! rtv's command line: runc's global options and commands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;
use crate::waiter::WaiterArgs;

#[derive(Parser, Debug)]
#[command(
    name = "rtv",
    version,
    about = "An OCI runtime whose containers run in micro-VMs (runc's command line)"
)]
pub struct Cli {
    /// Where container state is kept.
    #[arg(long, global = true, default_value = "/run/rtv")]
    pub root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Debug logging.
    #[arg(long, global = true)]
    pub debug: bool,
    /// The configuration file (default: $RTV_CONFIG, else
    /// /etc/rtv/config.toml when it exists).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest's cgroups are rtv's own).
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// The bundle directory (default: the current directory).
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    /// Write the pid of the container's host process here.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master (process.terminal).
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container's id.
    pub id: String,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a container (its process waits for `start`).
    Create(CreateArgs),
    /// Start a created container.
    Start {
        /// The container.
        id: String,
    },
    /// Print a container's state as OCI state JSON.
    State {
        /// The container.
        id: String,
    },
    /// Send a signal to a container (default SIGTERM).
    Kill {
        /// Send it to every process of the container.
        #[arg(long, short = 'a')]
        all: bool,
        /// The container.
        id: String,
        /// Signal name (with or without SIG) or number.
        signal: Option<String>,
    },
    /// Delete a container.
    Delete {
        /// Kill it first if it runs.
        #[arg(long, short = 'f')]
        force: bool,
        /// The container.
        id: String,
    },
    /// Create and start a container, and wait for it.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Return once started.
        #[arg(long, short = 'd')]
        detach: bool,
        /// Keep the container after it exits (runc's --keep).
        #[arg(long)]
        keep: bool,
    },
    /// Run a process in a running container.
    Exec(ExecArgs),
    /// List containers.
    List {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// Ids only.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List a container's processes (pids in the guest).
    Ps {
        /// table or json.
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        /// The container.
        id: String,
        /// Ignored (ps options).
        #[arg(trailing_var_arg = true)]
        ps_args: Vec<String>,
    },
    /// Write a default config.json.
    Spec {
        /// Where (default: the current directory).
        #[arg(long, short = 'b')]
        bundle: Option<PathBuf>,
        /// Accepted for runc compatibility (rootless specs are not made).
        #[arg(long)]
        rootless: bool,
    },
    /// Print a container's events (stats, OOM).
    Events {
        /// Print stats once and exit.
        #[arg(long)]
        stats: bool,
        /// Interval between stats.
        #[arg(long, default_value = "5s")]
        interval: String,
        /// The container.
        id: String,
    },
    /// Freeze a container.
    Pause {
        /// The container.
        id: String,
    },
    /// Thaw a paused container.
    Resume {
        /// The container.
        id: String,
    },
    /// Change a container's resource limits.
    Update(UpdateArgs),
    /// What this runtime supports, as JSON.
    Features,
    /// Check this host (like kata-runtime check).
    Check,
    /// (internal) The host process standing for a container's process.
    #[command(hide = true)]
    Waiter(WaiterArgs),
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// A process.json (the spec's process) instead of arguments.
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Return once started.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Write the pid of the process's host stand-in here.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master.
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variables (KEY=VALUE).
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// uid[:gid].
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional gids.
    #[arg(long = "additional-gids", short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Capabilities to add.
    #[arg(long = "cap", short = 'c')]
    pub caps: Vec<String>,
    /// Set no_new_privs.
    #[arg(long = "no-new-privs")]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container.
    pub id: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// A JSON file (or `-` for stdin) with linux.resources.
    #[arg(long, short = 'r')]
    pub resources: Option<String>,
    /// Memory limit in bytes.
    #[arg(long)]
    pub memory: Option<i64>,
    /// CPU quota (microseconds per period).
    #[arg(long = "cpu-quota")]
    pub cpu_quota: Option<i64>,
    /// CPU period (microseconds).
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    /// CPU shares.
    #[arg(long = "cpu-share")]
    pub cpu_share: Option<u64>,
    /// Maximum number of processes.
    #[arg(long = "pids-limit")]
    pub pids_limit: Option<i64>,
    /// The container.
    pub id: String,
}
