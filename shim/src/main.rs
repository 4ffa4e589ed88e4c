//! `containerd-shim-rtv-v2`: containerd's runtime v2 shim for rtv
//! (`--runtime io.containerd.rtv.v2`), one micro-VM per pod.
//!
//! containerd runs the binary three ways (containerd-shim 0.11 parses the
//! flags):
//! - `start`: starts the shim server for the container's pod — or finds
//!   the one already serving it: containers of a CRI pod (annotation
//!   `io.kubernetes.cri.sandbox-id`) share the socket of their sandbox's
//!   shim, as containerd-shim-runc-v2 groups them — and prints its address;
//! - the server itself, serving the task API on that socket; it owns the
//!   pod's VM (see [`service`]) and logs to the `log` FIFO that containerd
//!   reads in the sandbox's bundle;
//! - `delete`: cleanup after a shim that died (its VM died with it).

mod events;
mod guest;
mod mount;
mod options;
mod service;
mod stdio;
mod tasks;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    spawn, util::write_address, Config, DeleteResponse, ExitSignal, Flags, Shim, StartOpts,
};
use tracing_subscriber::EnvFilter;

use rtv_runtime::pod::{Pod, Role};

/// The runtime's name in containerd.
const RUNTIME_ID: &str = "io.containerd.rtv.v2";

/// The shim.
struct RtvShim {
    namespace: String,
    id: String,
    bundle: String,
    address: String,
    socket: String,
    exit: Arc<ExitSignal>,
}

/// containerd's `log` FIFO, written without blocking. Once containerd's
/// reader is gone, writes fail (EPIPE, and a SIGPIPE that containerd-shim's
/// signal thread logs, at debug level, to this very log): the log then
/// goes nowhere until a reader is back (a restarted containerd reopens the
/// FIFO), which is checked at most once a second.
struct LogFifo {
    path: PathBuf,
    state: std::sync::Mutex<(Option<std::fs::File>, std::time::Instant)>,
}

impl LogFifo {
    fn open(path: &Path) -> std::io::Result<std::fs::File> {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    }
}

impl std::io::Write for &LogFifo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0.is_none() && st.1.elapsed() >= Duration::from_secs(1) {
            st.1 = std::time::Instant::now();
            st.0 = LogFifo::open(&self.path).ok();
        }
        let Some(file) = st.0.as_mut() else {
            return Ok(buf.len());
        };
        match file.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                *st = (None, std::time::Instant::now());
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFifo {
    type Writer = &'a LogFifo;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// The log's filter, while the configuration file may still change it:
/// set when neither `-debug` nor `$RTV_SHIM_LOG` chose the level.
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Logs with `tracing` to `writer`, at `info` (`debug` with containerd's
/// `-debug`), or as `$RTV_SHIM_LOG` says (an `EnvFilter`); the
/// configuration file's `log.level`, read when the pod is created,
/// replaces `info` ([`apply_config_log_level`]).
fn init_logging<W>(writer: W, debug: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let chosen = std::env::var("RTV_SHIM_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok());
    let adjustable = chosen.is_none() && !debug;
    let filter = chosen.unwrap_or_else(|| EnvFilter::new(if debug { "debug" } else { "info" }));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // The containerd-shim crate logs through `log`; tracing-subscriber's
    // default `tracing-log` feature forwards it.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false);
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
        && adjustable
    {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Sets the log's level to the configuration file's `log.level`, unless
/// `-debug` or `$RTV_SHIM_LOG` chose it.
pub(crate) fn apply_config_log_level() {
    let (Some(handle), Some(level)) = (LOG_FILTER.get(), rtv_runtime::config::get().log.level)
    else {
        return;
    };
    if handle.reload(EnvFilter::new(level.as_str())).is_ok() {
        tracing::info!(
            level = level.as_str(),
            "log level from the configuration file"
        );
    }
}

impl Shim for RtvShim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        if args.action.is_empty() {
            // The server: containerd reads the `log` FIFO in the bundle
            // (our working directory). Never block on it.
            let path = std::env::current_dir().unwrap_or_default().join("log");
            match LogFifo::open(&path) {
                Ok(f) => init_logging(
                    LogFifo {
                        path,
                        state: std::sync::Mutex::new((Some(f), std::time::Instant::now())),
                    },
                    args.debug,
                ),
                Err(_) => init_logging(std::io::stderr, args.debug),
            }
        } else if args.action == "delete" {
            // containerd logs what `delete` writes to stderr.
            init_logging(std::io::stderr, args.debug);
        }
        // The configuration file is read when the pod is created: the
        // handler's runtime options may name it (service.rs).
        // `start` logs nothing: containerd reads its combined stdout and
        // stderr as the shim's address.
        RtvShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let bundle = std::env::current_dir().unwrap_or_default();
        let role = Role::of(&guest::bundle_annotations(&bundle));
        let group = role.pod_id(&opts.id).to_owned();
        let id = opts.id.clone();
        let (_pid, address) = spawn(opts, &group, Vec::new())?;
        write_address(&address)?;
        tracing::debug!(id = %id, pod = %group, address = %address, "shim started");
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.bundle)
        };
        cleanup_dead(&self.address, &self.namespace, &self.id, &bundle);
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(events::timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // Let the reply to Shutdown go out, then leave at once: containerd
        // removes the bundle (our working directory) as soon as it has it.
        std::thread::sleep(Duration::from_millis(100));
        std::process::exit(0);
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> service::Service {
        match service::Service::new(
            self.namespace.clone(),
            publisher,
            self.exit.clone(),
            self.socket.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("starting the shim's runtime: {e}");
                eprintln!("{RUNTIME_ID}: starting the shim's runtime: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// `delete`: containerd calls it whenever its connection to a shim closes,
/// after a normal end as well as after a crash. Only when the pod's shim
/// is gone (its socket answers no more) is there anything to clean: the
/// container's root file system mount, and what the pod left
/// ([`Pod::clean_up`]: its VMM if it still runs, its state directory, its
/// host cgroups).
fn cleanup_dead(address: &str, namespace: &str, id: &str, bundle: &Path) {
    let role = Role::of(&guest::bundle_annotations(bundle));
    let pod = role.pod_id(id);
    let socket = containerd_shim::socket_address(address, namespace, pod);
    let path = socket.strip_prefix("unix://").unwrap_or(&socket);
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        tracing::debug!(id = %id, pod = %pod, "the pod's shim is alive: nothing to clean");
        return;
    }
    mount::unmount_all(&bundle.join("rootfs"));
    Pod::clean_up(&guest::state_dir(
        Path::new(guest::STATE_ROOT),
        namespace,
        pod,
    ));
}

fn main() {
    containerd_shim::run::<RtvShim>(
        RUNTIME_ID,
        Some(Config {
            // Logging is ours (tracing, to the same `log` FIFO).
            no_setup_logger: true,
            default_log_level: "info".into(),
            // The shim's children are its VMMs, which std waits for; a
            // reaper of every child would take their statuses first.
            no_reaper: true,
            no_sub_reaper: true,
        }),
    );
}
