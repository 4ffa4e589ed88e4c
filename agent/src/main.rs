//! rtv-agent: PID 1 of an rtv micro-VM.
//!
//! As PID 1 it mounts the kernel file systems, listens on vsock port 1024,
//! reports readiness on the console, serves the host runtime's requests
//! (start processes, relay their stdio, wait, signal, power off) and reaps
//! every orphan. `rtv-agent --listen unix:PATH` runs the same server on a
//! Unix socket on the host, for tests.

mod container;
mod identity;
mod init;
mod log;
mod net;
mod pause;
mod pool;
mod process;
mod server;

use std::process::ExitCode;
use std::sync::Arc;

fn usage() -> ExitCode {
    eprintln!("usage: rtv-agent (as PID 1 of an rtv guest)\n       rtv-agent --listen unix:PATH");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if argv0 == rtv_protocol::PAUSE_ARGV0 {
        pause::run();
    }
    if argv0 == container::stub::INIT_ARGV0 {
        container::stub::run();
    }
    if std::process::id() == 1 {
        return init::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.as_slice() {
        [flag, addr] if flag == "--listen" => match addr.strip_prefix("unix:") {
            Some(p) => p.to_owned(),
            None => return usage(),
        },
        _ => return usage(),
    };
    if let Ok(level) = std::env::var("RTV_AGENT_LOG") {
        log::set_level(&level);
    }
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rtv-agent: cannot listen on {path}: {e}");
            return ExitCode::from(1);
        }
    };
    let procs = Arc::new(process::Processes::default());
    let reaper = procs.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reaper.reap_forever())
    {
        eprintln!("rtv-agent: cannot start the reaper: {e}");
        return ExitCode::from(1);
    }
    let containers =
        container::Containers::new(procs.clone(), container::cgroup::find_root(), false);
    let pool = pool::Pool::new("worker", server::POOL_KEEP);
    let agent = Arc::new(server::Agent {
        procs,
        containers,
        pool,
    });
    eprintln!("{} on unix:{path}", init::READY_LINE);
    server::serve(server::Listener::Unix(listener), agent, || {
        std::process::exit(0)
    })
}
