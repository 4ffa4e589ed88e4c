//! The built-in pause of a CRI pod's sandbox container (the agent's own
//! binary, run as `rtv-pause`): it holds the pod's namespaces, reaps the
//! orphans of the pod's pid namespace (it is its PID 1 when the pod has
//! one), and exits 0 on SIGTERM or SIGINT, as Kubernetes' pause does,
//! without an image's pause binary read through the share and exec'd.

/// Runs the pause. Never returns.
pub fn run() -> ! {
    // SAFETY: sigset_t is plain data filled by sigemptyset/sigaddset;
    // sigprocmask blocks those signals so that sigwaitinfo takes them
    // (a pid namespace's init would otherwise ignore them without a
    // handler).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    loop {
        // SAFETY: waits for one of the blocked signals; no info wanted.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        match sig {
            libc::SIGTERM | libc::SIGINT => std::process::exit(0),
            libc::SIGCHLD => loop {
                // SAFETY: reaps any exited child without blocking.
                let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
            },
            _ => {}
        }
    }
}
