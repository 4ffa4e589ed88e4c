//! The `rtv-vmm` command line, built in one place for cold boots, restores
//! and template making, and what the runtime does with the process.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How the VMM's life is tied to the process that starts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// It gets SIGTERM when the thread that started it ends
    /// (`PR_SET_PDEATHSIG`): start it from a long-lived thread.
    DiesWithParent,
    /// A session of its own, so it outlives its starter (`rtv`'s VMs live
    /// across invocations).
    Detached,
}

/// The guest profiler's settings for one VM (see rtv-vmm's `--profile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Where the folded stacks and flame graphs go.
    pub dir: PathBuf,
    /// Samples a second per vCPU.
    pub hz: u32,
    /// The guest kernel's `System.map`.
    pub system_map: Option<PathBuf>,
}

/// The VMM's hardening switches: rtv-vmm's `--jail` and `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardening {
    /// The jail (descriptors, environment, capabilities, namespaces,
    /// rlimits, no_new_privs).
    pub jail: bool,
    /// The seccomp filters.
    pub seccomp: crate::config::Seccomp,
}

impl Hardening {
    /// Everything on: rtv-vmm's defaults.
    pub const FULL: Hardening = Hardening {
        jail: true,
        seccomp: crate::config::Seccomp::On,
    };
    /// Everything off (benchmarks and debugging).
    pub const NONE: Hardening = Hardening {
        jail: false,
        seccomp: crate::config::Seccomp::Off,
    };

    /// What the configuration file asks for (`vmm.jail`, `vmm.seccomp`).
    pub fn from_config() -> Self {
        let vmm = &crate::config::get().vmm;
        Hardening {
            jail: vmm.jail,
            seccomp: vmm.seccomp,
        }
    }

    /// The flags that turn off what is off (none when all is on).
    fn args(self) -> Vec<OsString> {
        let mut a = Vec::new();
        if !self.jail {
            a.extend(["--jail".into(), "off".into()]);
        }
        if self.seccomp != crate::config::Seccomp::On {
            a.extend(["--seccomp".into(), self.seccomp.as_str().into()]);
        }
        a
    }
}

/// What the configuration file adds to the guest: `vm.kernel_args` on a
/// cold boot's command line, `vm.pvm` on every VMM's. Both are part of a
/// template's key ([`crate::template::KeyInputs`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestOptions {
    /// Appended to the kernel's command line (`--append`).
    pub kernel_args: Option<String>,
    /// `--pvm` (left out when auto, rtv-vmm's default).
    pub pvm: crate::config::Pvm,
}

impl GuestOptions {
    /// What the configuration file asks for.
    pub fn from_config() -> Self {
        let vm = &crate::config::get().vm;
        GuestOptions {
            kernel_args: vm.kernel_args.clone(),
            pvm: vm.pvm,
        }
    }

    fn args(&self, restore: bool) -> Vec<OsString> {
        let mut a = Vec::new();
        if let (Some(extra), false) = (&self.kernel_args, restore) {
            a.extend(["--append".into(), extra.into()]);
        }
        if self.pvm != crate::config::Pvm::Auto {
            a.extend(["--pvm".into(), self.pvm.as_str().into()]);
        }
        a
    }
}

/// An `rtv-vmm` command line.
#[derive(Debug, Clone)]
pub struct VmmCommand {
    vmm: PathBuf,
    args: Vec<OsString>,
    lifetime: Lifetime,
    restore: bool,
    /// A descriptor the VMM inherits as [`TAP_FD`].
    tap: Option<RawFd>,
    hardening: Hardening,
    guest: GuestOptions,
}

/// The descriptor number a VMM gets its tap on.
pub const TAP_FD: RawFd = 3;

/// The MTU of the NIC every rtv VM has, as its config space offers it (the
/// most the guest may set): the agent gives the NIC the pod's MTU.
pub const NIC_MAX_MTU: u32 = 65535;

impl VmmCommand {
    /// Boots `kernel` with `initramfs`.
    pub fn cold_boot(vmm: &Path, kernel: &Path, initramfs: &Path) -> Self {
        let mut c = Self::new(vmm);
        c.arg("--kernel").arg(kernel).arg("--initrd").arg(initramfs);
        c
    }

    /// Restores the snapshot in `snapshot`.
    pub fn restore(vmm: &Path, snapshot: &Path) -> Self {
        let mut c = Self::new(vmm);
        c.restore = true;
        c.arg("--restore").arg(snapshot);
        c
    }

    fn new(vmm: &Path) -> Self {
        Self {
            vmm: vmm.to_path_buf(),
            args: Vec::new(),
            lifetime: Lifetime::DiesWithParent,
            restore: false,
            tap: None,
            hardening: Hardening::from_config(),
            guest: GuestOptions::from_config(),
        }
    }

    fn arg(&mut self, a: impl Into<OsString>) -> &mut Self {
        self.args.push(a.into());
        self
    }

    /// Guest memory and vCPUs (a restore checks them against the snapshot).
    pub fn machine(mut self, mem_mib: u64, vcpus: u8) -> Self {
        self.arg("--mem")
            .arg(mem_mib.to_string())
            .arg("--vcpus")
            .arg(vcpus.to_string());
        self
    }

    /// A hybrid vsock device with guest CID `cid`, on the Unix socket `uds`.
    pub fn vsock(mut self, cid: u32, uds: &Path) -> Self {
        self.arg("--vsock-cid")
            .arg(cid.to_string())
            .arg("--vsock-uds")
            .arg(uds);
        self
    }

    /// A virtio-fs device sharing `dir`.
    pub fn shared_dir(mut self, dir: &Path) -> Self {
        self.arg("--shared-dir").arg(dir);
        self
    }

    /// The VM's NIC (every rtv VM has one, from its template), on the tap
    /// `tap` when the pod has a network: a cold boot creates the NIC (with
    /// the placeholder MAC and [`NIC_MAX_MTU`]), a restore attaches the
    /// tap to the snapshot's. `tap` must stay open until [`Self::spawn`].
    pub fn nic(mut self, tap: Option<RawFd>) -> Self {
        self.tap = tap;
        if !self.restore {
            self.arg("--net-mtu").arg(NIC_MAX_MTU.to_string());
            if tap.is_none() {
                self.arg("--net");
            }
        }
        if tap.is_some() {
            self.arg("--net-tap-fd").arg(TAP_FD.to_string());
        }
        self
    }

    /// The guest console into `file`.
    pub fn console(mut self, file: &Path) -> Self {
        self.arg("--console").arg(file);
        self
    }

    /// Snapshot the VM into `dir` when the agent is ready, then exit.
    pub fn snapshot_on_ready(mut self, dir: &Path) -> Self {
        self.arg("--snapshot-on-ready").arg(dir);
        self
    }

    /// Profile the guest into `dir` (rtv-vmm's `--profile`), naming
    /// kernel addresses with `system_map`.
    pub fn profile(mut self, p: &Profile) -> Self {
        self.arg("--profile").arg(&p.dir);
        self.arg("--profile-hz").arg(p.hz.to_string());
        if let Some(map) = &p.system_map {
            self.arg("--system-map").arg(map);
        }
        self
    }

    /// How the process's life is tied to ours (default: it dies with the
    /// starting thread).
    pub fn lifetime(mut self, lifetime: Lifetime) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The jail and seccomp switches (default: the configuration file's).
    pub fn hardening(mut self, hardening: Hardening) -> Self {
        self.hardening = hardening;
        self
    }

    /// The kernel arguments and PVM mode (default: the configuration
    /// file's).
    pub fn guest_options(mut self, guest: GuestOptions) -> Self {
        self.guest = guest;
        self
    }

    /// The arguments, for logs and tests.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = self.args.clone();
        args.extend(self.guest.args(self.restore));
        args.extend(self.hardening.args());
        args
    }

    /// Starts it with stdin and stdout on /dev/null and stderr into `stderr`.
    pub fn spawn(&self, stderr: File) -> std::io::Result<Child> {
        if !self.hardening.jail {
            tracing::warn!("the VMM runs without its jail (vmm.jail = false)");
        }
        if self.hardening.seccomp != crate::config::Seccomp::On {
            tracing::warn!(
                "the VMM's seccomp filters are {} (vmm.seccomp = {:?})",
                if self.hardening.seccomp == crate::config::Seccomp::Log {
                    "only logging"
                } else {
                    "off"
                },
                self.hardening.seccomp.as_str()
            );
        }
        let mut cmd = Command::new(&self.vmm);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        match self.lifetime {
            Lifetime::DiesWithParent => die_with_parent(&mut cmd),
            // SAFETY: setsid is async-signal-safe and touches no parent memory.
            Lifetime::Detached => unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            },
        }
        if let Some(tap) = self.tap {
            // SAFETY: dup2 and fcntl are async-signal-safe; the child gets
            // the tap at TAP_FD without close-on-exec.
            unsafe {
                cmd.pre_exec(move || {
                    if tap == TAP_FD {
                        let flags = libc::fcntl(tap, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(tap, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(tap, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.spawn()
    }
}

/// Has `cmd`'s process get SIGTERM when the thread that spawns it ends.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no parent memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The last `max` bytes of a log file (lossy UTF-8), for error messages.
pub fn file_tail(path: &Path, max: usize) -> String {
    File::open(path)
        .map(|f| open_file_tail(&f, max))
        .unwrap_or_default()
}

/// The last `max` bytes of an open file (read from the start of the file,
/// whatever its offset), as text.
pub fn open_file_tail(f: &File, max: usize) -> String {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(max as u64);
    let mut buf = vec![0u8; (len - from) as usize];
    let n = f.read_at(&mut buf, from).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()
}

/// An anonymous file in memory (`memfd_create`), e.g. a child's stderr
/// that must not depend on a file system with room.
pub fn memory_file(name: &str) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the
    // descriptor it returns is new and owned by the File made from it.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`), or
/// `None` if it does not exist.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    // Fields after the command: state is field 3; starttime is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start`, and not a
/// zombie.
pub fn alive(pid: i32, start: u64) -> bool {
    if start_time(pid) != Some(start) {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("X");
    state != "Z" && state != "X"
}

/// The processes of the VMM started as `pid`: `pid` itself and its
/// children. With its jail, rtv-vmm forks into a pid namespace of its own:
/// the process started stays outside as the keeper (it relays signals and
/// ends as the VMM ends) and its one child is the VMM, which the kernel
/// kills when the keeper dies. Without the jail, `pid` alone.
pub fn family(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return all;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    all
}

/// The children of `pid` (see [`family`]) with their start times, to wait
/// for with [`wait_gone`] once `pid` is gone.
pub fn inner(pid: i32) -> Vec<(i32, u64)> {
    family(pid)
        .into_iter()
        .skip(1)
        .filter_map(|p| Some((p, start_time(p)?)))
        .collect()
}

/// Waits up to `timeout` for `procs` (pids with their start times) to be
/// gone, reaping those that are our children: the VMM outlives its killed
/// keeper by the time its memory takes to free.
pub fn wait_gone(procs: &[(i32, u64)], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    for &(pid, start) in procs {
        loop {
            // SAFETY: waitpid with WNOHANG on one pid: reaps it if it is
            // our child (a subreaper adopts it), does nothing otherwise.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            if !alive(pid, start) || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Waits up to `grace` for process `pid` (started at `start`) to exit,
/// sending it SIGTERM once half of it has passed, then kills it. A child
/// of ours is reaped. Blocks (call it from a blocking thread in async
/// code).
pub fn stop(pid: i32, start: u64, grace: Duration) {
    let started = std::time::Instant::now();
    let inner = if start_time(pid) == Some(start) {
        inner(pid)
    } else {
        Vec::new()
    };
    let mut termed = false;
    while alive(pid, start) {
        // SAFETY: waitpid with WNOHANG on one pid: reaps it if it is our
        // child, does nothing otherwise.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        let waited = started.elapsed();
        if waited >= grace {
            // SAFETY: kill(2) of the process checked by its start time.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        if !termed && waited >= grace / 2 {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            termed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while start_time(pid) == Some(start) && std::time::Instant::now() < deadline {
        // SAFETY: as above.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if !alive(pid, start) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_gone(&inner, Duration::from_secs(5));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let c = VmmCommand::restore(Path::new("/v"), Path::new("/t/snap"))
            .machine(128, 2)
            .shared_dir(Path::new("/s"))
            .vsock(3, Path::new("/d/v.sock"))
            .nic(Some(9))
            .console(Path::new("/d/c.log"));
        let args: Vec<_> = c
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "--restore /t/snap --mem 128 --vcpus 2 --shared-dir /s --vsock-cid 3 \
             --vsock-uds /d/v.sock --net-tap-fd 3 --console /d/c.log"
        );
        let c = VmmCommand::cold_boot(Path::new("/v"), Path::new("/k"), Path::new("/i"))
            .nic(None)
            .snapshot_on_ready(Path::new("/o"));
        let args: Vec<_> = c
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "--kernel /k --initrd /i --net-mtu 65535 --net --snapshot-on-ready /o"
        );
        let args = |h: Hardening| {
            let c = VmmCommand::cold_boot(Path::new("/v"), Path::new("/k"), Path::new("/i"))
                .hardening(h);
            c.args()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(args(Hardening::FULL), "--kernel /k --initrd /i");
        let guest = GuestOptions {
            kernel_args: Some("quiet rtv.x=1".into()),
            pvm: crate::config::Pvm::Off,
        };
        let boot = VmmCommand::cold_boot(Path::new("/v"), Path::new("/k"), Path::new("/i"))
            .guest_options(guest.clone())
            .hardening(Hardening::FULL);
        assert_eq!(
            boot.args(),
            [
                "--kernel",
                "/k",
                "--initrd",
                "/i",
                "--append",
                "quiet rtv.x=1",
                "--pvm",
                "off"
            ]
            .map(OsString::from)
        );
        // A restore keeps the snapshot's command line.
        let restore = VmmCommand::restore(Path::new("/v"), Path::new("/s"))
            .guest_options(guest)
            .hardening(Hardening::FULL);
        assert_eq!(
            restore.args(),
            ["--restore", "/s", "--pvm", "off"].map(OsString::from)
        );
        assert_eq!(
            args(Hardening::NONE),
            "--kernel /k --initrd /i --jail off --seccomp off"
        );
        assert_eq!(
            args(Hardening {
                jail: true,
                seccomp: crate::config::Seccomp::Log
            }),
            "--kernel /k --initrd /i --seccomp log"
        );
    }

    /// A keeper stand-in (a shell waiting for its `sleep`): the family is
    /// both; killing the shell leaves the child, which `wait_gone` waits
    /// for once it is killed too.
    #[test]
    fn a_family_is_the_process_and_its_children() {
        let mut keeper = Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = keeper.id() as i32;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while family(pid).len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let all = family(pid);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0], pid);
        let inner = inner(pid);
        assert_eq!(inner.len(), 1);
        assert!(alive(inner[0].0, inner[0].1));
        keeper.kill().unwrap();
        keeper.wait().unwrap();
        // The sleep lives on (it was not tied to the shell).
        assert!(alive(inner[0].0, inner[0].1));
        // SAFETY: kill(2) of the sleep this test started.
        unsafe { libc::kill(inner[0].0, libc::SIGKILL) };
        wait_gone(&inner, Duration::from_secs(5));
        assert!(!alive(inner[0].0, inner[0].1));
        assert_eq!(family(12_345_678), vec![12_345_678]);
    }
}
