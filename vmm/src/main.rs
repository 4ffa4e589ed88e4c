//! `rtv-vmm`: boot a Linux kernel and initramfs in a micro-VM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use rtv_vmm::device_manager::DeviceError;
use rtv_vmm::devices::virtio::net::{self as net, NetError};
use rtv_vmm::devices::virtio::vsock::{ConfigError, MIN_GUEST_CID};
use rtv_vmm::platform::{self, PvmMode};
use rtv_vmm::profile::{self, ProfileConfig, Profiler};
/// `eprintln!` that never panics: with its stderr a file on a full disk,
/// an error must still end the VMM with its own status, not a panic's.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use rtv_vmm::{
    AfterSnapshot, BootProtocol, DeviceConfig, FsConfig, KernelConfig, MachineConfig, NetConfig,
    RestoreConfig, Vm, VmExit, VsockConfig,
};

/// Boot a Linux kernel and initramfs in an rtv micro-VM, or restore one from
/// a snapshot; exits when the guest stops (0), when its kernel panics (2), on
/// an error (1), or on SIGTERM or SIGINT (128 + the signal). With its jail
/// the process started is the VMM's keeper, which ends the same way.
#[derive(Parser, Debug)]
#[command(name = "rtv-vmm", version)]
struct Args {
    /// ELF vmlinux to boot.
    #[arg(long, required_unless_present_any = ["print_cmdline", "restore"])]
    kernel: Option<PathBuf>,
    /// Restore the VM snapshotted in DIR instead of booting a kernel (the
    /// guest's memory size, vCPUs and devices come from the snapshot;
    /// --mem/--vcpus, if given, must match it). A snapshot with a vsock
    /// device needs --vsock-uds; --vsock-cid gives the guest a new CID. A
    /// snapshot with a virtio-fs device needs --shared-dir. A snapshot with
    /// a virtio-net device takes --net-tap-fd (without it the NIC has no
    /// backend and its link is down).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "append", "cmdline", "print_cmdline", "snapshot_on_ready"]
    )]
    restore: Option<PathBuf>,
    /// When the console shows the agent's readiness line ("rtv-agent:
    /// ready"), pause the VM, write a snapshot to DIR, and exit 0 (or go on
    /// running with --after-snapshot resume).
    #[arg(long, value_name = "DIR")]
    snapshot_on_ready: Option<PathBuf>,
    /// What to do after --snapshot-on-ready: exit or resume.
    #[arg(long, default_value = "exit", value_parser = ["exit", "resume"])]
    after_snapshot: String,
    /// Print the kernel command line that would be used, and exit.
    #[arg(long)]
    print_cmdline: bool,
    /// Initramfs (cpio) to hand the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB (default 128).
    #[arg(long)]
    mem: Option<u64>,
    /// Number of vCPUs (default 1).
    #[arg(long)]
    vcpus: Option<u8>,
    /// Arguments appended to rtv's kernel command line.
    #[arg(long, default_value = "")]
    append: String,
    /// Replace rtv's kernel command line entirely.
    #[arg(long, conflicts_with = "append")]
    cmdline: Option<String>,
    /// Boot protocol: auto (PVH when the kernel has it), pvh or linux64.
    #[arg(long, default_value = "auto")]
    boot: BootProtocol,
    /// PVM native-mode accommodations: auto (detect), on or off.
    #[arg(long, default_value = "auto")]
    pvm: PvmMode,
    /// Where the serial console goes: a file, or - for standard output.
    #[arg(long, default_value = "-")]
    console: PathBuf,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Give the guest a virtio-vsock device with this CID (3 or more).
    #[arg(long, requires = "vsock_uds", value_name = "CID")]
    vsock_cid: Option<u64>,
    /// The vsock device's Unix socket (hybrid vsock): host clients connect
    /// here and write `CONNECT <port>\n`; guest connections to host port P
    /// go to PATH_P. Needs --vsock-cid, except with --restore.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// Share this host directory with the guest over virtio-fs (mount tag
    /// `rtvfs`: `mount -t virtiofs rtvfs /mnt`). With --restore: the
    /// directory the snapshot's virtio-fs device shares from now on (a
    /// snapshot is only taken while the guest has not mounted it).
    #[arg(long, value_name = "PATH")]
    shared_dir: Option<PathBuf>,
    /// Give the guest a virtio-net NIC with no backend (link down, frames
    /// it sends are dropped): for template VMs whose restores attach a tap
    /// with --net-tap-fd. Not with --restore (the snapshot has its NIC or
    /// not).
    #[arg(long, conflicts_with_all = ["restore", "net_tap_fd"])]
    net: bool,
    /// An open tap fd inherited from the parent (opened with IFF_TAP,
    /// IFF_NO_PI and IFF_VNET_HDR). On a boot: give the guest a virtio-net
    /// NIC on it. With --restore: attach it to the snapshot's NIC (refused
    /// if the snapshot has none). The VMM works on its own duplicate and
    /// never closes FD itself.
    #[arg(long, value_name = "FD")]
    net_tap_fd: Option<i32>,
    /// The NIC's MAC address (default 02:72:74:76:00:01); needs --net or
    /// --net-tap-fd; not with --restore (the snapshot's MAC is kept).
    #[arg(long, value_name = "MAC", conflicts_with = "restore")]
    net_mac: Option<String>,
    /// The NIC's MTU, told to the guest (68 to 65535, default 1500); needs
    /// --net or --net-tap-fd; not with --restore.
    #[arg(long, value_name = "N", conflicts_with = "restore")]
    net_mtu: Option<u32>,
    /// Profile the guest: sample every vCPU --profile-hz times a second and
    /// write folded stacks and SVG flame graphs to DIR (created if missing;
    /// profile files of an earlier run there are removed): on SIGUSR1 the
    /// samples since the previous dump as DIR/<n>.folded and DIR/<n>.svg
    /// (n = 1, 2, ...; the .svg last), and when the VM ends, whatever ends
    /// it, the last part and DIR/all.folded and DIR/all.svg (written last).
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// Samples a second per vCPU with --profile (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = profile::DEFAULT_HZ, requires = "profile")]
    profile_hz: u32,
    /// The guest kernel's System.map, to name kernel functions and tasks in
    /// the profile (default with --kernel: System.map beside it, when there
    /// is one; with --restore there is no default).
    #[arg(long, value_name = "PATH", requires = "profile")]
    system_map: Option<PathBuf>,
    /// The VMM's hardening before any thread starts: only --net-tap-fd and
    /// stdio survive of the inherited descriptors, the environment is
    /// cleared (rtv-vmm starts itself again without it; RTV_LOG is passed
    /// on as --log-level), core dumps are off; as root, the VMM forks into
    /// IPC, UTS, pid and mount namespaces of its own (the process started
    /// stays outside as its keeper, rtv-vmm-keeper, which relays signals
    /// and ends as the VMM ends), with a procfs of its own processes and,
    /// once the VM is built, a read-only root holding only the directories
    /// it still opens by name; the capabilities are cut to those virtio-fs
    /// needs and no_new_privs is set. `off` is for debugging only and logs
    /// a warning.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    jail: String,
    /// A seccomp filter per thread (the event loop, the vCPUs, the
    /// profiler's timer, the snapshot waiter), each installed before the
    /// thread handles anything from the guest: a system call outside it
    /// ends the VMM with exit status 159 (128 + SIGSYS) and names the call
    /// on standard error. `log` lets such calls through and has the kernel
    /// log them (for development); `off` logs a warning.
    #[arg(long, default_value = "on")]
    seccomp: rtv_vmm::seccomp::Mode,
    /// Log filter (error, warn, info, debug, trace), to standard error.
    #[arg(long, default_value = "warn", env = "RTV_LOG")]
    log_level: String,
}

fn main() -> ExitCode {
    // First of all: the jail's VMM has no environment, not even in the
    // block /proc/<pid>/environ shows.
    if let Err(e) = rtv_vmm::jail::reexec_without_environment() {
        say!("rtv-vmm: error: starting again without the environment: {e}");
        return ExitCode::from(1);
    }
    // Before any other thread exists: SIGTERM/SIGINT then wait for the
    // event loop, which stops the VM and removes what it created.
    if let Err(e) = rtv_vmm::signals::block_stop_signals() {
        say!("rtv-vmm: error: cannot block SIGTERM/SIGINT: {e}");
        return ExitCode::from(1);
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut args = args;
    // The paths used by name after the jail's root is made are made
    // absolute first (the VMM's working directory is then its new root).
    for p in [
        &mut args.vsock_uds,
        &mut args.snapshot_on_ready,
        &mut args.profile,
    ]
    .into_iter()
    .flatten()
    {
        if let Ok(abs) = std::path::absolute(&*p) {
            *p = abs;
        }
    }
    if args.jail == "on" {
        let mut keep: Vec<i32> = args.net_tap_fd.into_iter().collect();
        // The share opened in the host's mount namespace, before the jail
        // gives the VMM its own (a share that cannot be opened is reported
        // by its device, as without the jail).
        if let Some(dir) = &args.shared_dir {
            if let Ok(fd) = rtv_vmm::devices::virtio::fs::hold_share(dir) {
                keep.push(fd);
            }
        }
        if let Err(e) = rtv_vmm::jail::prepare(&keep, args.seccomp) {
            say!("rtv-vmm: error: hardening the VMM: {e}");
            return ExitCode::from(1);
        }
    } else {
        tracing::warn!(
            "--jail off: the VMM keeps every inherited descriptor, its environment and all of its capabilities"
        );
    }
    match args.seccomp {
        rtv_vmm::seccomp::Mode::On => {}
        rtv_vmm::seccomp::Mode::Log => tracing::warn!(
            "--seccomp log: system calls outside the VMM's filters are allowed and only logged by the kernel"
        ),
        rtv_vmm::seccomp::Mode::Off => {
            tracing::warn!("--seccomp off: the VMM's threads run without seccomp filters")
        }
    }
    if let Err(e) = rtv_vmm::seccomp::init(args.seccomp) {
        say!("rtv-vmm: error: {e}");
        return ExitCode::from(1);
    }
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            say!("rtv-vmm: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line, each cause once: the library's
/// error messages already end with their source's text where it says
/// something, so a cause the message so far ends with is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// The jail's last part once the VM is built (`--jail on`): its own root
/// with only the directories of the paths it still uses by name, then the
/// capabilities cut and no_new_privs.
fn lock_down(args: &LockDown) -> anyhow::Result<()> {
    if !args.jail {
        return Ok(());
    }
    let paths: Vec<&Path> = [&args.vsock_uds, &args.snapshot_on_ready, &args.profile]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
    rtv_vmm::jail::lock_down(&paths).context("hardening the VMM")
}

/// What [`lock_down`] needs of the arguments.
struct LockDown {
    jail: bool,
    vsock_uds: Option<PathBuf>,
    snapshot_on_ready: Option<PathBuf>,
    profile: Option<PathBuf>,
}

impl LockDown {
    fn of(args: &Args) -> Self {
        Self {
            jail: args.jail == "on",
            vsock_uds: args.vsock_uds.clone(),
            snapshot_on_ready: args.snapshot_on_ready.clone(),
            profile: args.profile.clone(),
        }
    }
}

fn open_console(path: &Path) -> anyhow::Result<(Box<dyn Write + Send>, Option<PathBuf>)> {
    if path.as_os_str() == "-" {
        return Ok((Box::new(std::io::stdout()), None));
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("console file {}", path.display()))?;
    Ok((Box::new(file), Some(path.to_path_buf())))
}

fn report(exit: VmExit) -> u8 {
    if exit.exit_code() == 0 {
        tracing::info!("{exit}");
    } else {
        say!("rtv-vmm: {exit}");
    }
    exit.exit_code() as u8
}

/// The flags of the profiler.
struct ProfileArgs {
    dir: Option<PathBuf>,
    hz: u32,
    system_map: Option<PathBuf>,
}

impl ProfileArgs {
    fn of(args: &Args) -> Self {
        Self {
            dir: args.profile.clone(),
            hz: args.profile_hz,
            system_map: args.system_map.clone(),
        }
    }
}

/// The profiler `--profile` asks for, checked before the VM is made.
fn profiler(args: ProfileArgs, kernel: Option<&Path>) -> anyhow::Result<Option<Profiler>> {
    let Some(dir) = args.dir else {
        return Ok(None);
    };
    let system_map = args.system_map.or_else(|| {
        let beside = kernel?.with_file_name("System.map");
        beside.is_file().then_some(beside)
    });
    if system_map.is_none() {
        say!("rtv-vmm: warning: --profile without a System.map (--system-map): kernel addresses stay hexadecimal and samples get no task names");
    }
    let config = ProfileConfig {
        dir,
        hz: args.hz,
        system_map,
    };
    Profiler::new(config)
        .map(Some)
        .map_err(|e| anyhow::Error::new(e).context("--profile"))
}

fn restore(args: Args, dir: PathBuf) -> anyhow::Result<u8> {
    let jail = LockDown::of(&args);
    let profiler = profiler(ProfileArgs::of(&args), None)?;
    if let Some(fd) = args.net_tap_fd {
        net::tap::inspect(fd).map_err(|e| anyhow::anyhow!("--net-tap-fd {fd}: {e}"))?;
    }
    if let (Some(cid), Some(uds)) = (args.vsock_cid, &args.vsock_uds) {
        vsock_config(Some(cid), Some(uds.clone()))?;
    }
    if let Some(uds) = &args.vsock_uds {
        vsock_config(Some(MIN_GUEST_CID), Some(uds.clone()))?;
    }
    let config = RestoreConfig {
        kvm_device: args.kvm_device,
        vsock_uds: args.vsock_uds,
        vsock_cid: args.vsock_cid,
        shared_dir: args.shared_dir,
        net_tap_fd: args.net_tap_fd,
        stop_on_signals: true,
        expect_mem_mib: args.mem,
        expect_vcpus: args.vcpus,
    };
    let (console, console_file) = open_console(&args.console)?;
    let start = Instant::now();
    let mut vm = match Vm::restore(&dir, &config, console) {
        Ok(vm) => vm,
        Err(e) => {
            if let Some(path) = console_file {
                let _ = std::fs::remove_file(path);
            }
            return Err(anyhow::Error::new(e).context(format!("--restore {}", dir.display())));
        }
    };
    tracing::info!(
        ms = start.elapsed().as_millis() as u64,
        "VM restored from {}",
        dir.display()
    );
    if let Some(profiler) = profiler {
        vm.set_profiler(profiler);
    }
    lock_down(&jail)?;
    Ok(report(vm.run()?))
}

fn run(args: Args) -> anyhow::Result<u8> {
    if let Some(dir) = args.restore.clone() {
        return restore(args, dir);
    }
    let jail = LockDown::of(&args);
    if args.vsock_uds.is_some() && args.vsock_cid.is_none() {
        anyhow::bail!("--vsock-uds needs --vsock-cid (except with --restore)");
    }
    // Checked (and its directory made) after the VM's inputs, below.
    let profile_args = ProfileArgs::of(&args);
    let pvm = args.pvm.enabled();
    // Slot order: the vsock device, then virtio-fs, then the NIC (last, so
    // the others' slots do not move).
    let vsock = vsock_config(args.vsock_cid, args.vsock_uds)?.map(DeviceConfig::Vsock);
    let fs = args
        .shared_dir
        .map(|dir| DeviceConfig::Fs(FsConfig::new(dir)));
    let nic =
        net_config(args.net, args.net_tap_fd, args.net_mac, args.net_mtu)?.map(DeviceConfig::Net);
    let machine = MachineConfig {
        mem_size_mib: args.mem.unwrap_or(128),
        vcpus: args.vcpus.unwrap_or(1),
        kvm_device: args.kvm_device,
        devices: vsock.into_iter().chain(fs).chain(nic).collect(),
        stop_on_signals: true,
        pvm,
    };
    let cmdline = match args.cmdline {
        Some(full) => full,
        None => platform::guest_cmdline(pvm, &args.append),
    };
    if args.print_cmdline {
        println!("{}", rtv_vmm::full_cmdline(&machine, &cmdline));
        return Ok(0);
    }
    let kernel = KernelConfig {
        kernel: args.kernel.context("--kernel is required")?,
        initrd: args.initrd,
        cmdline,
        protocol: args.boot,
    };
    tracing::info!(pvm, cmdline = %platform::redact_seed(&kernel.cmdline), "booting");
    // Check everything the user gave before creating anything.
    rtv_vmm::validate(&machine, &kernel)?;
    let profiler = profiler(profile_args, Some(&kernel.kernel))?;

    let (console, console_file) = open_console(&args.console)?;
    let result = rtv_vmm::prepare(&machine, &kernel, console).and_then(|mut vm| {
        if let Some(profiler) = profiler {
            vm.set_profiler(profiler);
        }
        // Before any thread exists: the snapshot thread below is the first.
        if let Err(e) = lock_down(&jail) {
            return Ok(Err(e));
        }
        if let Some(dir) = args.snapshot_on_ready {
            let then = if args.after_snapshot == "resume" {
                AfterSnapshot::Resume
            } else {
                AfterSnapshot::Exit
            };
            snapshot_on_ready(&vm, dir, then);
        }
        Ok(Ok(vm.run()?))
    });
    match result {
        Ok(Ok(exit)) => Ok(report(exit)),
        Ok(Err(e)) => {
            // The VM never ran: leave no console file behind.
            if let Some(path) = console_file {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
        Err(e) => {
            // The VM never ran: leave no console file behind.
            if let Some(path) = console_file {
                let _ = std::fs::remove_file(path);
            }
            if matches!(
                e,
                rtv_vmm::Error::Vm(rtv_vmm::vm::Error::Devices(
                    rtv_vmm::device_manager::Error::Device(DeviceError::VsockListen(_))
                ))
            ) {
                return Err(anyhow::Error::new(e).context("--vsock-uds"));
            }
            Err(e.into())
        }
    }
}

/// Snapshots the VM to `dir` when the agent's readiness line appears: the
/// console hook (on a vCPU thread) wakes a thread that asks the VM for the
/// snapshot and reports it.
fn snapshot_on_ready(vm: &Vm, dir: PathBuf, then: AfterSnapshot) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    vm.on_console_line(
        rtv_vmm::READY_MARKER,
        Box::new(move || {
            let _ = tx.send(());
        }),
    );
    let controller = vm.controller();
    let spawned = std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            if let Err(e) = rtv_vmm::seccomp::enter(rtv_vmm::seccomp::Thread::Snapshot) {
                controller.fail(e.to_string());
                return;
            }
            // The VM ending without readiness drops the hook, and the sender.
            if rx.recv().is_err() {
                return;
            }
            match controller.snapshot(&dir, then) {
                Ok(info) => say!(
                    "rtv-vmm: snapshot written to {}: paused {} ms, guest memory {} MiB ({:.1} MiB non-zero), {:.1} MiB on disk",
                    info.dir.display(),
                    info.paused_for.as_millis(),
                    info.memory_size >> 20,
                    info.memory_data as f64 / (1u64 << 20) as f64,
                    info.disk_usage as f64 / (1u64 << 20) as f64,
                ),
                Err(rtv_vmm::snapshot::Error::NotRunning) => {}
                Err(e) => controller.fail(format!("snapshot to {}: {e}", dir.display())),
            }
        });
    if let Err(e) = spawned {
        vm.controller()
            .fail(format!("cannot start the snapshot thread: {e}"));
    }
}

/// The vsock flags, checked with the flag named in every error.
fn vsock_config(cid: Option<u64>, uds: Option<PathBuf>) -> anyhow::Result<Option<VsockConfig>> {
    let (Some(guest_cid), Some(uds_path)) = (cid, uds) else {
        // clap makes the two flags require each other.
        return Ok(None);
    };
    let config = VsockConfig {
        guest_cid,
        uds_path,
    };
    match config.validate() {
        Ok(()) => Ok(Some(config)),
        Err(ConfigError::Cid(cid)) => anyhow::bail!(
            "--vsock-cid {cid}: CIDs 0-2 are reserved and {} is VMADDR_CID_ANY; use {MIN_GUEST_CID} to 4294967294",
            u32::MAX
        ),
        Err(e @ ConfigError::Path { .. }) => anyhow::bail!("--vsock-uds: {e}"),
    }
}

/// The NIC flags, checked with the flag named in every error: `None` when
/// neither --net nor --net-tap-fd asks for a NIC.
fn net_config(
    no_backend: bool,
    tap_fd: Option<i32>,
    mac: Option<String>,
    mtu: Option<u32>,
) -> anyhow::Result<Option<NetConfig>> {
    if !no_backend && tap_fd.is_none() {
        if mac.is_some() {
            anyhow::bail!("--net-mac needs a NIC: give --net or --net-tap-fd");
        }
        if mtu.is_some() {
            anyhow::bail!("--net-mtu needs a NIC: give --net or --net-tap-fd");
        }
        return Ok(None);
    }
    let mut config = NetConfig {
        tap_fd,
        ..NetConfig::default()
    };
    if let Some(text) = mac {
        config.mac = net::parse_mac(&text).map_err(|e| anyhow::anyhow!("--net-mac: {e}"))?;
    }
    if let Some(mtu) = mtu {
        config.mtu = match u16::try_from(mtu) {
            Ok(mtu) if mtu >= net::MIN_MTU => mtu,
            _ => anyhow::bail!("--net-mtu {mtu}: must be between 68 and 65535"),
        };
    }
    match config.validate() {
        Ok(()) => Ok(Some(config)),
        Err(e @ NetError::Mac { .. }) => anyhow::bail!("--net-mac: {e}"),
        Err(e @ NetError::Mtu(_)) => anyhow::bail!("--net-mtu: {e}"),
        Err(e) => match tap_fd {
            Some(fd) => anyhow::bail!("--net-tap-fd {fd}: {e}"),
            None => Err(e.into()),
        },
    }
}
