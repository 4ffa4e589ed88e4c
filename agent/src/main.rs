//! rtv-agent: PID 1 of an rtv micro-VM.
//!
//! It mounts the kernel file systems, reports readiness on the console, and
//! then stays as the guest's init: it reaps every orphaned process, and
//! powers the VM off when asked (for now, with `rtv.poweroff` on the kernel
//! command line).

mod init;

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::process::id() != 1 {
        eprintln!("rtv-agent: must run as PID 1 of an rtv guest");
        return ExitCode::from(2);
    }
    init::run()
}
