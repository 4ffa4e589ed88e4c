//! `rtv-vmm`: boot a Linux kernel and initramfs in a micro-VM.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rtv_vmm::devices::virtio::vsock::{ConfigError, MIN_GUEST_CID};
use rtv_vmm::platform::{self, PvmMode};
use rtv_vmm::{BootProtocol, KernelConfig, MachineConfig, VsockConfig};

/// Boot a Linux kernel and initramfs in an rtv micro-VM; exits when the guest
/// stops (0), when its kernel panics (2), on an error (1), or on SIGTERM or
/// SIGINT (128 + the signal).
#[derive(Parser, Debug)]
#[command(name = "rtv-vmm", version)]
struct Args {
    /// ELF vmlinux to boot.
    #[arg(long, required_unless_present = "print_cmdline")]
    kernel: Option<PathBuf>,
    /// Print the kernel command line that would be used, and exit.
    #[arg(long)]
    print_cmdline: bool,
    /// Initramfs (cpio) to hand the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
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
    /// go to PATH_P.
    #[arg(long, requires = "vsock_cid", value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace), to standard error.
    #[arg(long, default_value = "warn", env = "RTV_LOG")]
    log_level: String,
}

fn main() -> ExitCode {
    // Before any other thread exists: SIGTERM/SIGINT then wait for the
    // event loop, which stops the VM and removes what it created.
    if let Err(e) = rtv_vmm::signals::block_stop_signals() {
        eprintln!("rtv-vmm: error: cannot block SIGTERM/SIGINT: {e}");
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
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rtv-vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<u8> {
    let pvm = args.pvm.enabled();
    let vsock = vsock_config(args.vsock_cid, args.vsock_uds)?;
    let machine = MachineConfig {
        mem_size_mib: args.mem,
        vcpus: args.vcpus,
        kvm_device: args.kvm_device,
        vsock,
        stop_on_signals: true,
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
    tracing::info!(pvm, cmdline = %kernel.cmdline, "booting");
    // Check everything the user gave before creating anything.
    rtv_vmm::validate(&machine, &kernel)?;

    let console_file = (args.console.as_os_str() != "-").then(|| args.console.clone());
    let console: Box<dyn Write + Send> = match &console_file {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("console file {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let result = rtv_vmm::boot(&machine, &kernel, console);
    match result {
        Ok(exit) => {
            if exit.is_clean() {
                tracing::info!("{exit}");
            } else {
                eprintln!("rtv-vmm: {exit}");
            }
            Ok(exit.exit_code() as u8)
        }
        Err(e) => {
            // The VM never ran: leave no console file behind.
            if let Some(path) = console_file {
                let _ = std::fs::remove_file(path);
            }
            if matches!(e, rtv_vmm::Error::Vm(rtv_vmm::vm::Error::VsockListen(_))) {
                return Err(anyhow::Error::new(e).context("--vsock-uds"));
            }
            Err(e.into())
        }
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
