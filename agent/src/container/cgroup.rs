//! cgroup v2 for containers: every container gets its own cgroup under the
//! guest's cgroup2 mount, with the limits of `linux.resources` mapped the
//! way runc (libcontainer/cgroups/fs2) and crun map them.
//!
//! The guest kernel has the memory, cpu (with CFS bandwidth), pids,
//! cpuset (in its SMP build), hugetlb and io controllers and the cgroup v2
//! core (freezer, `cgroup.kill`); it has no rdma or BPF (so no device
//! controller) and no swap. A field that needs something the guest lacks
//! is a [`SpecError`] naming it, found before anything is created, rather
//! than a silently ignored limit. Fields that runc on cgroup v2 accepts
//! and ignores (kernel memory, net_cls and net_prio, a swap limit where
//! there is no swap) are accepted here too and listed by [`not_applied`].
//!
//! Only cpu, memory and pids are enabled for every container; cpuset,
//! hugetlb and io are enabled on the path to a container that sets them
//! (each enabled controller adds files to every cgroup made below it).
//!
//! `linux.resources.devices` is accepted and NOT enforced: cgroup v2 device
//! control is a BPF program and the guest kernel has no BPF. The boundary is
//! the VM itself, and a container's `/dev` holds only the standard nodes and
//! those listed in `linux.devices`, so the allowlist has nothing to filter.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxResources};
use rtv_protocol::ContainerStats;

use super::SpecError;

/// Where the guest mounts cgroup2.
const DEFAULT_MOUNT: &str = "/sys/fs/cgroup";
/// The cgroup2 mount of a hybrid (v1 + v2) host, for tests.
const HYBRID_MOUNT: &str = "/sys/fs/cgroup/unified";
/// How long `freeze` and `remove` wait for the kernel to reach a state.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Controllers a container cgroup gets whenever they are available, limits
/// or not: `stats` reads their files and `update` may set them later.
const BASE_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// The kernel's default CFS period, in microseconds.
const DEFAULT_CPU_PERIOD: u64 = 100_000;
/// The kernel's bounds of a CFS period and the least quota, in microseconds.
const MIN_CPU_PERIOD: u64 = 1_000;
const MAX_CPU_PERIOD: u64 = 1_000_000;
const MIN_CPU_QUOTA: i64 = 1_000;
/// Interface files the agent manages itself; `linux.resources.unified`
/// may not write them.
const RESERVED_FILES: [&str; 6] = [
    "cgroup.procs",
    "cgroup.threads",
    "cgroup.kill",
    "cgroup.freeze",
    "cgroup.subtree_control",
    "cgroup.type",
];

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The spec asks for something the guest's cgroups cannot do (or asks
    /// it wrongly); nothing was created or written.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A cgroup file or directory could not be read, written, created or
    /// removed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The kernel refused a limit.
    #[error("{field}: cannot write {value:?} to {}: {source}", path.display())]
    Limit {
        /// The spec field the limit comes from.
        field: String,
        /// The cgroup file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// `create` found the container's cgroup already there.
    #[error("{}: the cgroup already exists", path.display())]
    Exists {
        /// The cgroup's directory.
        path: PathBuf,
    },
    /// A process of the cgroup could not be signalled.
    #[error("cannot signal process {pid}: {source}")]
    Signal {
        /// The process.
        pid: i32,
        /// kill(2)'s error.
        source: io::Error,
    },
    /// The cgroup did not reach a state (`frozen 1`, `populated 0`, ...) in
    /// time.
    #[error("{}: {state:?} not reached within {timeout:?}", path.display())]
    Timeout {
        /// The cgroup's directory.
        path: PathBuf,
        /// The awaited line of cgroup.events.
        state: &'static str,
        /// How long it was awaited.
        timeout: Duration,
    },
}

/// A [`CgroupError::Io`] maker for `map_err`.
fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file whose content does not parse.
fn bad_data(path: &Path, what: &str) -> CgroupError {
    CgroupError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, what.to_owned()),
    }
}

/// The cgroup2 mount to use: `/sys/fs/cgroup` if it is cgroup2, else
/// `/sys/fs/cgroup/unified` if that is (a hybrid v1 + v2 host), else `None`.
pub fn find_root() -> Option<PathBuf> {
    [DEFAULT_MOUNT, HYBRID_MOUNT]
        .into_iter()
        .map(Path::new)
        .find(|p| is_cgroup2(p))
        .map(Path::to_path_buf)
}

/// Whether `path` is the root of a cgroup2 mount (statfs f_type).
fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data, for which all zeroes is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and st is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // f_type's width differs between libcs.
    #[allow(clippy::unnecessary_cast)]
    let is = st.f_type as u64 == libc::CGROUP2_SUPER_MAGIC as u64;
    is
}

/// Enables the controllers every container gets ([`BASE_CONTROLLERS`])
/// that `root` has in its cgroup.subtree_control, for PID 1 of the guest
/// right after it mounts cgroup2. Tries them all; returns the first
/// failure.
pub fn enable_controllers(root: &Path) -> Result<(), CgroupError> {
    let available = read_set(&root.join("cgroup.controllers"))?;
    let control = root.join("cgroup.subtree_control");
    let enabled = read_set(&control)?;
    let mut first_error = None;
    let base: BTreeSet<String> = BASE_CONTROLLERS.iter().map(|c| c.to_string()).collect();
    for c in available
        .intersection(&base)
        .filter(|c| !enabled.contains(*c))
    {
        if let Err(e) = write_file(&control, &format!("+{c}")) {
            first_error.get_or_insert(CgroupError::Io {
                path: control.clone(),
                source: e,
            });
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// A container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    /// The cgroup2 root it was made under.
    root: PathBuf,
    /// Its directory below `root`.
    components: Vec<String>,
    /// Its directory.
    path: PathBuf,
    /// `<path>/cgroup.procs`, ready for a forked child.
    procs: CString,
}

impl Cgroup {
    /// Creates the cgroup `root/<rel>` for `resources`.
    ///
    /// `rel` is `linux.cgroupsPath` taken relative to `root` (a leading `/`
    /// does not matter; `..` and an empty path are refused). `resources`
    /// is validated first, and the controllers its limits need are checked
    /// against `root`'s cgroup.controllers, so that a bad spec creates
    /// nothing. Then the missing directories are made, with the needed
    /// controllers (and cpu, memory and pids when available, for `stats`
    /// and `update`) enabled in each ancestor's cgroup.subtree_control, and
    /// the limits are written. The cgroup itself must not exist yet. If a
    /// limit cannot be written (or a `unified` file turns out not to
    /// exist) the directories made are removed again.
    pub fn create(
        root: &Path,
        rel: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        let components = relative_components(rel)?;
        let plan = match resources {
            Some(r) => Plan::new(r)?,
            None => Plan::default(),
        };
        plan.check_controllers(&read_set(&root.join("cgroup.controllers"))?)?;
        let path = components.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        let procs = CString::new(path.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| SpecError::new("linux.cgroupsPath", "contains a NUL byte"))?;

        let needed = plan.controllers();
        let mut created = Vec::new();
        let result = make_path(root, &components, &needed, &mut created).and_then(|()| {
            let cgroup = Cgroup {
                root: root.to_path_buf(),
                components: components.iter().map(|c| c.to_string()).collect(),
                path,
                procs,
            };
            cgroup.apply(&plan)?;
            Ok(cgroup)
        });
        if result.is_err() {
            for dir in created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }

    /// The cgroup's directory.
    // Part of the API (tests, diagnostics); the container module has no
    // use for it yet.
    #[allow(dead_code)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of cgroup.procs, so that a forked child can join the
    /// cgroup by writing `0` to it without allocating.
    pub fn procs_file(&self) -> CString {
        self.procs.clone()
    }

    /// Applies `resources` (for `update`): the same validation and writes
    /// as `create` (a controller the cgroup did not need so far is enabled
    /// on its path first); fields left out are unchanged, and so is the
    /// period of `cpu.max` when only the quota is given (and the reverse).
    /// Honours `memory.checkBeforeUpdate`.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let plan = Plan::new(resources)?;
        plan.check_controllers(&read_set(&self.root.join("cgroup.controllers"))?)?;
        let needed = plan.controllers();
        let mut dir = self.root.clone();
        for c in &self.components {
            enable_in(&dir, &needed)?;
            dir.push(c);
        }
        plan.check_controllers(&read_set(&self.path.join("cgroup.controllers"))?)?;
        self.apply(&plan)
    }

    /// Freezes (or thaws) every process of the cgroup and its descendants
    /// through cgroup.freeze, and waits until cgroup.events reports the
    /// state reached.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let file = self.path.join("cgroup.freeze");
        write_file(&file, if frozen { "1" } else { "0" }).map_err(io_at(&file))?;
        self.wait_for_event(if frozen { "frozen 1" } else { "frozen 0" })
    }

    /// The processes of the cgroup and of its descendants, sorted.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        collect_pids(&self.path, true, &mut pids)?;
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Sends `signal` to every process of the cgroup and its descendants.
    ///
    /// SIGKILL goes through cgroup.kill, which leaves no window for a fork
    /// to escape; without it (kernels before 5.14) the cgroup is frozen
    /// while its processes are killed one by one. Other signals are sent
    /// to each process of [`Cgroup::pids`]; one that exits meanwhile is
    /// skipped.
    pub fn kill_all(&self, signal: i32) -> Result<(), CgroupError> {
        if signal == libc::SIGKILL {
            let file = self.path.join("cgroup.kill");
            match write_file(&file, "1") {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&file)(e)),
            }
            let frozen = self.freeze(true).is_ok();
            let result = self.signal_each(signal);
            if frozen {
                let _ = self.freeze(false);
            }
            return result;
        }
        self.signal_each(signal)
    }

    /// kill(2) for each process of [`Cgroup::pids`].
    fn signal_each(&self, signal: i32) -> Result<(), CgroupError> {
        let mut first_error = None;
        // A pid of 0 or below would signal a process group or everything.
        for pid in self.pids()?.into_iter().filter(|&p| p > 0) {
            // SAFETY: kill(2) with a positive pid has no memory effects.
            if unsafe { libc::kill(pid, signal) } < 0 {
                let source = io::Error::last_os_error();
                if source.raw_os_error() != Some(libc::ESRCH) {
                    first_error.get_or_insert(CgroupError::Signal { pid, source });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The cgroup's usage: memory.current, memory.max, cpu.stat usage_usec,
    /// pids.current and memory.events oom_kill. The file of a controller
    /// that is not enabled counts as 0 (`None` for the memory limit).
    pub fn stats(&self) -> Result<ContainerStats, CgroupError> {
        let max_file = self.path.join("memory.max");
        let memory_limit_bytes = match read_optional(&max_file)? {
            Some(s) if s.trim() != "max" => Some(
                s.trim()
                    .parse()
                    .map_err(|_| bad_data(&max_file, "not a number of bytes"))?,
            ),
            _ => None,
        };
        Ok(ContainerStats {
            memory_bytes: self.read_number("memory.current")?.unwrap_or(0),
            memory_limit_bytes,
            cpu_usage_usec: self.read_keyed("cpu.stat", "usage_usec")?.unwrap_or(0),
            pids: self.read_number("pids.current")?.unwrap_or(0),
            oom_kills: self.read_keyed("memory.events", "oom_kill")?.unwrap_or(0),
        })
    }

    /// How many processes the OOM killer killed in the cgroup (memory.events
    /// oom_kill); 0 if that cannot be read.
    pub fn oom_kills(&self) -> u64 {
        self.read_keyed("memory.events", "oom_kill")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// A watch on the cgroup's OOM kills and on its emptying, for
    /// [`CgroupWatch::arm`].
    pub fn watch(&self) -> CgroupWatch {
        CgroupWatch {
            dir: self.path.clone(),
        }
    }

    /// Removes the cgroup: kills its processes (and those of its
    /// descendants) with SIGKILL if it has any, waits until cgroup.events
    /// reports it empty, then removes its directory, descendants first.
    /// Waits at most about 5 s for the processes to die. Reaping them is
    /// the caller's business.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.has_event("populated 0")? {
            self.kill_all(libc::SIGKILL)?;
            self.wait_for_event("populated 0")?;
        }
        remove_tree(&self.path, Instant::now() + SETTLE_TIMEOUT)
    }

    /// Writes the limits of `plan`, once its controllers are known to be
    /// available.
    fn apply(&self, plan: &Plan) -> Result<(), CgroupError> {
        for (key, _) in &plan.unified {
            if !self.path.join(key).exists() {
                return Err(SpecError::new(
                    format!("linux.resources.unified.{key}"),
                    "no such file in the container's cgroup",
                )
                .into());
            }
        }
        if let (Some(max), true) = (&plan.memory_max, plan.memory_check_before_update) {
            if let (Ok(limit), Some(usage)) =
                (max.parse::<u64>(), self.read_number("memory.current")?)
            {
                if usage > limit {
                    return Err(SpecError::new(
                        "linux.resources.memory.limit",
                        format!("the memory usage ({usage} bytes) exceeds the new limit ({limit} bytes)"),
                    )
                    .into());
                }
            }
        }
        // cpuset first, as in runc: the other controllers do not depend on
        // it, but a process moved in later lands on the right CPUs.
        if let Some(v) = &plan.cpuset_cpus {
            self.write_limit("linux.resources.cpu.cpus", "cpuset.cpus", v)?;
        }
        if let Some(v) = &plan.cpuset_mems {
            self.write_limit("linux.resources.cpu.mems", "cpuset.mems", v)?;
        }
        if let Some(weight) = plan.io_weight {
            // BFQ's own weight takes the blkio range as it is; io.weight
            // (blk-iocost) the cgroup v2 range, converted as runc does.
            if self.path.join("io.bfq.weight").exists() {
                self.write_limit(
                    "linux.resources.blockIO.weight",
                    "io.bfq.weight",
                    &weight.to_string(),
                )?;
            } else {
                self.write_limit(
                    "linux.resources.blockIO.weight",
                    "io.weight",
                    &blkio_to_io_weight(weight).to_string(),
                )?;
            }
        }
        self.apply_hugetlb(plan)?;
        if let Some(v) = &plan.memory_max {
            self.write_limit("linux.resources.memory.limit", "memory.max", v)?;
        }
        if let Some(v) = &plan.memory_low {
            self.write_limit("linux.resources.memory.reservation", "memory.low", v)?;
        }
        if let Some(idle) = plan.cpu_idle {
            self.write_limit("linux.resources.cpu.idle", "cpu.idle", &idle.to_string())?;
        }
        // An idle group has the least weight and refuses another.
        if let (Some(weight), false) = (plan.cpu_weight, plan.cpu_idle == Some(1)) {
            self.write_limit(
                "linux.resources.cpu.shares",
                "cpu.weight",
                &weight.to_string(),
            )?;
        }
        self.apply_cpu_max(plan)?;
        if let Some(v) = &plan.pids_max {
            self.write_limit("linux.resources.pids.limit", "pids.max", v)?;
        }
        // Last, as in runc: unified values override the typed fields.
        for (key, value) in &plan.unified {
            let field = format!("linux.resources.unified.{key}");
            // A multi-line value (io.max, several devices) takes one write
            // per line.
            for line in value.lines().filter(|l| !l.trim().is_empty()) {
                self.write_limit(&field, key, line)?;
            }
        }
        Ok(())
    }

    /// Writes hugetlb.<size>.max (and .rsvd.max where the kernel has it) of
    /// each page size the guest has; a size it does not have is left out
    /// (no process in the guest can use such pages: see [`not_applied`]).
    fn apply_hugetlb(&self, plan: &Plan) -> Result<(), CgroupError> {
        for (i, (size, limit)) in plan.hugetlb.iter().enumerate() {
            let field = format!("linux.resources.hugepageLimits[{i}].limit");
            let max = format!("hugetlb.{size}.max");
            if !self.path.join(&max).exists() {
                continue;
            }
            self.write_limit(&field, &max, &limit.to_string())?;
            let rsvd = format!("hugetlb.{size}.rsvd.max");
            if self.path.join(&rsvd).exists() {
                self.write_limit(&field, &rsvd, &limit.to_string())?;
            }
        }
        Ok(())
    }

    /// Writes cpu.max and cpu.max.burst. The kernel refuses a burst above
    /// the quota, so like runc the burst goes first and, if refused, again
    /// after the new quota.
    fn apply_cpu_max(&self, plan: &Plan) -> Result<(), CgroupError> {
        let burst_field = "linux.resources.cpu.burst";
        let burst = plan.cpu_burst.map(|b| b.to_string());
        let early_burst = burst
            .as_ref()
            .map(|b| self.write_limit(burst_field, "cpu.max.burst", b));
        if let Some(max) = plan.cpu_max {
            let file = self.path.join("cpu.max");
            let current = fs::read_to_string(&file).unwrap_or_default();
            let mut fields = current.split_whitespace();
            let quota = fields.next().unwrap_or("max").to_owned();
            let period = fields
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(DEFAULT_CPU_PERIOD);
            let field = if max.quota.is_some() {
                "linux.resources.cpu.quota"
            } else {
                "linux.resources.cpu.period"
            };
            self.write_limit(field, "cpu.max", &cpu_max_value(max, &quota, period))?;
        }
        match (early_burst, burst) {
            (Some(Err(_)), Some(b)) => self.write_limit(burst_field, "cpu.max.burst", &b),
            _ => Ok(()),
        }
    }

    /// Writes `value` to the cgroup's `file` for the spec's `field`.
    fn write_limit(&self, field: &str, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        write_file(&path, value).map_err(|source| CgroupError::Limit {
            field: field.to_owned(),
            path,
            value: value.to_owned(),
            source,
        })
    }

    /// A file holding one number; `None` if it does not exist.
    fn read_number(&self, file: &str) -> Result<Option<u64>, CgroupError> {
        let path = self.path.join(file);
        read_optional(&path)?
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| bad_data(&path, "not a number"))
            })
            .transpose()
    }

    /// The value of `key` in a flat-keyed file (`key value` lines); `None`
    /// if the file or the key does not exist.
    fn read_keyed(&self, file: &str, key: &str) -> Result<Option<u64>, CgroupError> {
        let path = self.path.join(file);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| {
                v.trim()
                    .parse()
                    .map_err(|_| bad_data(&path, "not a number"))
            })
            .transpose()
    }

    /// Whether cgroup.events has the line `event` (`populated 0`, ...).
    fn has_event(&self, event: &str) -> Result<bool, CgroupError> {
        let path = self.path.join("cgroup.events");
        let text = fs::read_to_string(&path).map_err(io_at(&path))?;
        Ok(text.lines().any(|l| l.trim() == event))
    }

    /// Polls cgroup.events until it has the line `event`, for at most
    /// [`SETTLE_TIMEOUT`].
    fn wait_for_event(&self, event: &'static str) -> Result<(), CgroupError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.has_event(event)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Timeout {
                    path: self.path.clone(),
                    state: event,
                    timeout: SETTLE_TIMEOUT,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// What an [`ArmedWatch`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupEvents {
    /// memory.events `oom_kill` (0 without the memory controller).
    pub oom_kills: u64,
    /// cgroup.events `populated`: the cgroup (or a descendant) has a
    /// process.
    pub populated: bool,
}

/// A cgroup's memory.events and cgroup.events, waited on without polling
/// their contents: the kernel wakes `poll(2)` with `POLLPRI` when either
/// file changes.
#[derive(Debug, Clone)]
pub struct CgroupWatch {
    dir: PathBuf,
}

impl CgroupWatch {
    /// Opens and reads both files: a change after this call wakes
    /// [`ArmedWatch::wait`]. A cgroup without the memory controller is
    /// watched for its emptying only.
    pub fn arm(&self) -> Result<ArmedWatch, CgroupError> {
        let open = |name: &str| -> Result<Option<fs::File>, CgroupError> {
            let path = self.dir.join(name);
            match fs::File::open(&path) {
                Ok(f) => Ok(Some(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && name == "memory.events" => {
                    Ok(None)
                }
                Err(e) => Err(io_at(&path)(e)),
            }
        };
        let mut armed = ArmedWatch {
            dir: self.dir.clone(),
            memory: open("memory.events")?,
            events: open("cgroup.events")?
                .ok_or_else(|| bad_data(&self.dir, "no cgroup.events"))?,
            seen: CgroupEvents {
                oom_kills: 0,
                populated: true,
            },
        };
        armed.read()?;
        Ok(armed)
    }
}

/// A [`CgroupWatch`] whose files are open and read.
#[derive(Debug)]
pub struct ArmedWatch {
    dir: PathBuf,
    memory: Option<fs::File>,
    events: fs::File,
    seen: CgroupEvents,
}

impl ArmedWatch {
    /// What the files held when last read.
    pub fn events(&self) -> CgroupEvents {
        self.seen
    }

    /// Reads both files from the start (which arms the next wake-up).
    fn read(&mut self) -> Result<(), CgroupError> {
        use std::os::unix::fs::FileExt as _;
        let dir = &self.dir;
        let read = |f: &fs::File, name: &str| -> Result<String, CgroupError> {
            let mut buf = [0u8; 512];
            let n = f.read_at(&mut buf, 0).map_err(io_at(&dir.join(name)))?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let keyed = |text: &str, key: &str| -> Option<u64> {
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.trim().parse().ok())
        };
        let oom_kills = match &self.memory {
            Some(f) => keyed(&read(f, "memory.events")?, "oom_kill").unwrap_or(0),
            None => 0,
        };
        let events = read(&self.events, "cgroup.events")?;
        self.seen = CgroupEvents {
            oom_kills,
            populated: keyed(&events, "populated").is_none_or(|p| p != 0),
        };
        Ok(())
    }

    /// Waits until one of the files changes after the last read, `also`
    /// becomes readable (or `timeout` passes), then reads them again. A
    /// cgroup removed meanwhile reads as not populated.
    pub fn wait(
        &mut self,
        timeout: Duration,
        also: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), CgroupError> {
        use std::os::fd::AsRawFd as _;
        let mut fds: Vec<libc::pollfd> = std::iter::once(&self.events)
            .chain(self.memory.as_ref())
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            })
            .chain(also.map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }))
            .collect();
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` holds initialised pollfd structures whose
        // descriptors stay open (owned by `self`) for the whole call; its
        // length is passed with it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_at(&self.dir)(e));
            }
        }
        match self.read() {
            // A removed cgroup's files read ENODEV: it has no process left.
            Err(CgroupError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
                self.seen.populated = false;
                Ok(())
            }
            other => other,
        }
    }
}

/// The components of `linux.cgroupsPath` below the cgroup2 root.
fn relative_components(rel: &str) -> Result<Vec<&str>, SpecError> {
    let field = "linux.cgroupsPath";
    let mut components = Vec::new();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(SpecError::new(field, "must not contain \"..\"")),
            c if c.contains('\0') => return Err(SpecError::new(field, "contains a NUL byte")),
            c => components.push(c),
        }
    }
    if components.is_empty() {
        return Err(SpecError::new(
            field,
            format!("{rel:?} names the root cgroup, not one of the container's own"),
        ));
    }
    Ok(components)
}

/// Makes `root/<components>`, enabling the controllers a container cgroup
/// gets in each ancestor on the way; records each directory it makes in
/// `created`. The last component must not exist yet.
fn make_path(
    root: &Path,
    components: &[&str],
    needed: &BTreeSet<String>,
    created: &mut Vec<PathBuf>,
) -> Result<(), CgroupError> {
    let mut dir = root.to_path_buf();
    for (i, component) in components.iter().enumerate() {
        enable_in(&dir, needed)?;
        dir.push(component);
        match fs::create_dir(&dir) {
            Ok(()) => created.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if i + 1 == components.len() {
                    return Err(CgroupError::Exists { path: dir });
                }
            }
            Err(e) => return Err(io_at(&dir)(e)),
        }
    }
    Ok(())
}

/// Enables, in `dir`'s cgroup.subtree_control, the controllers of
/// `needed` and [`BASE_CONTROLLERS`] that `dir` has. A failure is an error
/// for a needed controller and ignored for the others.
fn enable_in(dir: &Path, needed: &BTreeSet<String>) -> Result<(), CgroupError> {
    let available = read_set(&dir.join("cgroup.controllers"))?;
    let control = dir.join("cgroup.subtree_control");
    let enabled = read_set(&control)?;
    let wanted: BTreeSet<&str> = BASE_CONTROLLERS
        .into_iter()
        .chain(needed.iter().map(String::as_str))
        .collect();
    for c in wanted {
        if available.contains(c) && !enabled.contains(c) {
            if let Err(e) = write_file(&control, &format!("+{c}")) {
                if needed.contains(c) {
                    return Err(io_at(&control)(e));
                }
            }
        }
    }
    Ok(())
}

/// Appends the pids of `dir`'s cgroup.procs and of its descendants'. A
/// descendant that disappears meanwhile is skipped.
fn collect_pids(dir: &Path, top: bool, pids: &mut Vec<i32>) -> Result<(), CgroupError> {
    let gone = |e: &io::Error| !top && e.kind() == io::ErrorKind::NotFound;
    let procs = dir.join("cgroup.procs");
    let text = match fs::read_to_string(&procs) {
        Ok(t) => t,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(io_at(&procs)(e)),
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        pids.push(line.parse().map_err(|_| bad_data(&procs, "not a pid"))?);
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_at(dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), false, pids)?;
        }
    }
    Ok(())
}

/// Removes the cgroup directory `dir`, its descendants first, retrying one
/// that is still busy (its last processes exiting) until `deadline`.
fn remove_tree(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_at(dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path(), deadline)?;
        }
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_at(dir)(e)),
        }
    }
}

/// Writes `value` to a cgroup file in one write(2).
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// A file's content; `None` if it does not exist (a controller that is not
/// enabled).
fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// The space-separated words of a file (cgroup.controllers,
/// cgroup.subtree_control).
fn read_set(path: &Path) -> Result<BTreeSet<String>, CgroupError> {
    let text = fs::read_to_string(path).map_err(io_at(path))?;
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

/// cpu.max's new quota and period; `None` keeps the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuMax {
    /// A quota in microseconds, or -1 for none.
    quota: Option<i64>,
    /// A period in microseconds.
    period: Option<u64>,
}

/// The cpu.max line for `max`, given the current quota (`max` or a
/// number) and period: "<quota|max> <period>".
fn cpu_max_value(max: CpuMax, current_quota: &str, current_period: u64) -> String {
    let quota = match max.quota {
        Some(q) if q > 0 => q.to_string(),
        Some(_) => "max".to_owned(),
        None => current_quota.to_owned(),
    };
    format!("{quota} {}", max.period.unwrap_or(current_period))
}

/// runc's conversion of cgroup v1 cpu.shares ([2, 262144], default 1024)
/// to cgroup v2 cpu.weight ([1, 10000], default 100 — though 1024 shares
/// give 39, as in runc and crun).
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// runc's conversion of a blkio weight ([10, 1000]) to cgroup v2's
/// io.weight ([1, 10000]).
fn blkio_to_io_weight(weight: u16) -> u64 {
    1 + (u64::from(weight.clamp(10, 1000)) - 10) * 9999 / 990
}

/// The fields of `res` that are accepted but not applied in the guest, as
/// runc on cgroup v2 accepts and ignores them, each with the reason.
pub fn not_applied(res: &LinuxResources) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(m) = res.memory() {
        let limit = m.limit().unwrap_or(0);
        if m.swap().is_some_and(|s| limit > 0 && s > limit) {
            notes.push(
                "linux.resources.memory.swap: the guest has no swap; memory.limit bounds the container"
                    .to_owned(),
            );
        }
        if m.kernel().is_some_and(|k| k != 0) {
            notes.push(
                "linux.resources.memory.kernel: kernel memory limits do not exist in cgroup v2 (runc ignores them too)"
                    .to_owned(),
            );
        }
        if m.kernel_tcp().is_some_and(|k| k != 0) {
            notes.push(
                "linux.resources.memory.kernelTCP: kernel TCP memory limits do not exist in cgroup v2 (runc ignores them too)"
                    .to_owned(),
            );
        }
        if m.swappiness().is_some_and(|s| s != 0) {
            notes.push(
                "linux.resources.memory.swappiness: does not exist in cgroup v2, and the guest has no swap"
                    .to_owned(),
            );
        }
        if m.disable_oom_killer() == Some(true) {
            notes.push(
                "linux.resources.memory.disableOOMKiller: the OOM killer cannot be disabled in cgroup v2 (runc ignores it too)"
                    .to_owned(),
            );
        }
    }
    if res.network().as_ref().is_some_and(|n| {
        n.class_id().is_some() || n.priorities().as_ref().is_some_and(|p| !p.is_empty())
    }) {
        notes.push(
            "linux.resources.network: network classes and priorities (net_cls, net_prio) do not exist in cgroup v2 (runc ignores them too)"
                .to_owned(),
        );
    }
    if res
        .block_io()
        .as_ref()
        .is_some_and(|b| b.leaf_weight().is_some_and(|w| w != 0))
    {
        notes.push(
            "linux.resources.blockIO.leafWeight: does not exist in cgroup v2 (runc ignores it too)"
                .to_owned(),
        );
    }
    for (i, h) in res.hugepage_limits().iter().flatten().enumerate() {
        if !hugepage_size_in_guest(h.page_size()) {
            notes.push(format!(
                "linux.resources.hugepageLimits[{i}]: the guest has no {} pages, so no process in it can use them",
                h.page_size()
            ));
        }
    }
    notes
}

/// Whether the running kernel has huge pages of `size` ("2MB", "1GB").
fn hugepage_size_in_guest(size: &str) -> bool {
    page_size_kib(size).is_some_and(|kib| {
        Path::new(&format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB")).exists()
    })
}

/// A hugetlb page size as the cgroup file names write it ("64KB", "2MB",
/// "1GB") in KiB.
fn page_size_kib(size: &str) -> Option<u64> {
    let (number, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    let shift = match unit {
        "KB" => 0,
        "MB" => 10,
        "GB" => 20,
        _ => return None,
    };
    n.checked_shl(shift).filter(|&k| k > 0)
}

/// The files `linux.resources` writes, validated; `None` leaves a file
/// alone.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// cpuset.cpus (from cpu.cpus).
    cpuset_cpus: Option<String>,
    /// cpuset.mems (from cpu.mems).
    cpuset_mems: Option<String>,
    /// The blkio weight (io.bfq.weight, or io.weight converted).
    io_weight: Option<u16>,
    /// hugetlb.<size>.max: (page size, limit in bytes).
    hugetlb: Vec<(String, u64)>,
    /// memory.max (from memory.limit).
    memory_max: Option<String>,
    /// memory.low (from memory.reservation).
    memory_low: Option<String>,
    /// memory.checkBeforeUpdate: refuse a limit below the current usage.
    memory_check_before_update: bool,
    /// cpu.weight (from cpu.shares).
    cpu_weight: Option<u64>,
    /// cpu.max (from cpu.quota and cpu.period).
    cpu_max: Option<CpuMax>,
    /// cpu.max.burst (from cpu.burst).
    cpu_burst: Option<u64>,
    /// cpu.idle.
    cpu_idle: Option<i64>,
    /// pids.max (from pids.limit).
    pids_max: Option<String>,
    /// unified: file name → value, sorted by name.
    unified: Vec<(String, String)>,
}

impl Plan {
    /// Validates `res` and maps it to cgroup v2 files.
    fn new(res: &LinuxResources) -> Result<Plan, SpecError> {
        let mut plan = Plan::default();
        // linux.resources.devices is accepted and not enforced: see the
        // module documentation.
        if let Some(m) = res.memory() {
            plan.memory(m)?;
        }
        if let Some(c) = res.cpu() {
            plan.cpu(c)?;
        }
        if let Some(p) = res.pids() {
            plan.pids_max = Some(if p.limit() <= 0 {
                "max".to_owned()
            } else {
                p.limit().to_string()
            });
        }
        for (i, h) in res.hugepage_limits().iter().flatten().enumerate() {
            if page_size_kib(h.page_size()).is_none() {
                return Err(SpecError::new(
                    format!("linux.resources.hugepageLimits[{i}].pageSize"),
                    format!(
                        "{:?} is not a page size such as \"2MB\" or \"1GB\"",
                        h.page_size()
                    ),
                ));
            }
            plan.hugetlb
                .push((h.page_size().clone(), h.limit().max(0) as u64));
        }
        if let Some(b) = res.block_io() {
            plan.block_io(b)?;
        }
        if res.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
            return Err(SpecError::new(
                "linux.resources.rdma",
                "the guest kernel has no rdma controller",
            ));
        }
        if let Some(unified) = res.unified() {
            let mut entries: Vec<(String, String)> = unified
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            entries.sort();
            for (key, _) in &entries {
                check_unified_key(key)?;
            }
            plan.unified = entries;
        }
        Ok(plan)
    }

    /// linux.resources.memory. As in runc, a limit or reservation of 0 is
    /// unset and -1 is "max". `useHierarchy` is ignored: cgroup v2 is
    /// always hierarchical. Kernel memory, swappiness and disableOOMKiller
    /// are accepted and ignored, as runc on cgroup v2 does ([`not_applied`]
    /// names them).
    fn memory(&mut self, m: &LinuxMemory) -> Result<(), SpecError> {
        let field = |name: &str| format!("linux.resources.memory.{name}");
        let limit = m.limit().unwrap_or(0);
        self.memory_max = limit_value(&field("limit"), limit)?;
        self.memory_low = limit_value(&field("reservation"), m.reservation().unwrap_or(0))?;
        // memory+swap: runc's checks. There is no swap in the guest, so a
        // valid value limits nothing beyond memory.limit.
        match m.swap() {
            None | Some(0) | Some(-1) => {}
            Some(_) if limit == 0 || limit == -1 => {
                return Err(SpecError::new(
                    field("swap"),
                    "a memory+swap limit needs a memory limit",
                ))
            }
            Some(swap) if swap < limit => {
                return Err(SpecError::new(
                    field("swap"),
                    format!("memory+swap ({swap}) must be at least memory.limit ({limit})"),
                ))
            }
            Some(_) => {}
        }
        self.memory_check_before_update = m.check_before_update() == Some(true);
        Ok(())
    }

    /// linux.resources.blockIO. A weight of 0 is unset (Docker writes
    /// `"weight": 0` into every spec); leafWeight does not exist in cgroup
    /// v2. Per-device weights and throttles name the host's block devices,
    /// which the guest does not have: its I/O is the VMM's, on the host,
    /// and rtv's runtime takes them out of the guest's spec for the VMM's
    /// host cgroup.
    fn block_io(&mut self, b: &LinuxBlockIo) -> Result<(), SpecError> {
        let field = |name: &str| format!("linux.resources.blockIO.{name}");
        match b.weight() {
            None | Some(0) => {}
            Some(w) if (10..=1000).contains(&w) => self.io_weight = Some(w),
            Some(w) => {
                return Err(SpecError::new(
                    field("weight"),
                    format!("{w} is not between 10 and 1000"),
                ))
            }
        }
        fn any<T>(devices: &Option<Vec<T>>) -> bool {
            devices.as_ref().is_some_and(|d| !d.is_empty())
        }
        for (name, set) in [
            ("weightDevice", any(b.weight_device())),
            ("throttleReadBpsDevice", any(b.throttle_read_bps_device())),
            ("throttleWriteBpsDevice", any(b.throttle_write_bps_device())),
            ("throttleReadIOPSDevice", any(b.throttle_read_iops_device())),
            (
                "throttleWriteIOPSDevice",
                any(b.throttle_write_iops_device()),
            ),
        ] {
            if set {
                return Err(SpecError::new(
                    field(name),
                    "names host block devices, which the guest does not have (a container's I/O is done by its VMM on the host): the runtime gives them to the VMM's host cgroup, the agent cannot apply them",
                ));
            }
        }
        Ok(())
    }

    /// linux.resources.cpu. As in runc, shares, quota and period of 0 are
    /// unset.
    fn cpu(&mut self, c: &LinuxCpu) -> Result<(), SpecError> {
        let field = |name: &str| format!("linux.resources.cpu.{name}");
        // The guest's own CPU and memory node numbers: the runtime maps a
        // host cpuset onto the VM's vCPUs before the spec gets here.
        for (name, value, out) in [
            ("cpus", c.cpus(), &mut self.cpuset_cpus),
            ("mems", c.mems(), &mut self.cpuset_mems),
        ] {
            let Some(v) = value.as_ref().map(|s| s.trim()).filter(|s| !s.is_empty()) else {
                continue;
            };
            if !v.split(',').all(|r| {
                !r.is_empty()
                    && r.split('-').all(|n| n.parse::<u32>().is_ok())
                    && r.split('-').count() <= 2
            }) {
                return Err(SpecError::new(
                    field(name),
                    format!("{v:?} is not a list such as \"0-2,4\""),
                ));
            }
            *out = Some(v.to_owned());
        }
        let rt = "real-time CPU bandwidth does not exist in cgroup v2";
        if c.realtime_runtime().is_some_and(|r| r != 0) {
            return Err(SpecError::new(field("realtimeRuntime"), rt));
        }
        if c.realtime_period().is_some_and(|p| p != 0) {
            return Err(SpecError::new(field("realtimePeriod"), rt));
        }
        self.cpu_weight = c.shares().filter(|&s| s != 0).map(shares_to_weight);
        let quota = c.quota().filter(|&q| q != 0);
        if quota.is_some_and(|q| q != -1 && q < MIN_CPU_QUOTA) {
            return Err(SpecError::new(
                field("quota"),
                format!("must be -1 (no limit) or at least {MIN_CPU_QUOTA} microseconds"),
            ));
        }
        let period = c.period().filter(|&p| p != 0);
        if period.is_some_and(|p| !(MIN_CPU_PERIOD..=MAX_CPU_PERIOD).contains(&p)) {
            return Err(SpecError::new(
                field("period"),
                format!("must be between {MIN_CPU_PERIOD} and {MAX_CPU_PERIOD} microseconds"),
            ));
        }
        if quota.is_some() || period.is_some() {
            self.cpu_max = Some(CpuMax { quota, period });
        }
        self.cpu_burst = c.burst();
        if let Some(idle) = c.idle() {
            if idle != 0 && idle != 1 {
                return Err(SpecError::new(field("idle"), "must be 0 or 1"));
            }
            self.cpu_idle = Some(idle);
        }
        Ok(())
    }

    /// The controllers the plan writes files of.
    fn controllers(&self) -> BTreeSet<String> {
        self.needs()
            .into_iter()
            .map(|(_, c)| c.to_owned())
            .collect()
    }

    /// (field, controller) for each controller the plan needs.
    fn needs(&self) -> Vec<(String, &str)> {
        let mut needs = Vec::new();
        if self.memory_max.is_some() || self.memory_low.is_some() {
            needs.push(("linux.resources.memory".to_owned(), "memory"));
        }
        if self.cpu_weight.is_some()
            || self.cpu_max.is_some()
            || self.cpu_burst.is_some()
            || self.cpu_idle.is_some()
        {
            needs.push(("linux.resources.cpu".to_owned(), "cpu"));
        }
        if self.pids_max.is_some() {
            needs.push(("linux.resources.pids".to_owned(), "pids"));
        }
        if self.cpuset_cpus.is_some() {
            needs.push(("linux.resources.cpu.cpus".to_owned(), "cpuset"));
        }
        if self.cpuset_mems.is_some() {
            needs.push(("linux.resources.cpu.mems".to_owned(), "cpuset"));
        }
        if self.io_weight.is_some() {
            needs.push(("linux.resources.blockIO.weight".to_owned(), "io"));
        }
        if !self.hugetlb.is_empty() {
            needs.push(("linux.resources.hugepageLimits".to_owned(), "hugetlb"));
        }
        for (key, _) in &self.unified {
            if let Some((controller, _)) = key.split_once('.') {
                if controller != "cgroup" {
                    needs.push((format!("linux.resources.unified.{key}"), controller));
                }
            }
        }
        needs
    }

    /// Fails on the first needed controller that is not in `available`.
    fn check_controllers(&self, available: &BTreeSet<String>) -> Result<(), SpecError> {
        match self
            .needs()
            .into_iter()
            .find(|(_, c)| !available.contains(*c))
        {
            Some((field, c)) => Err(SpecError::new(
                field,
                format!("the {c} controller is not available"),
            )),
            None => Ok(()),
        }
    }
}

/// A memory limit: 0 is unset, -1 is "max", any other negative value is
/// refused.
fn limit_value(field: &str, value: i64) -> Result<Option<String>, SpecError> {
    match value {
        0 => Ok(None),
        -1 => Ok(Some("max".to_owned())),
        v if v > 0 => Ok(Some(v.to_string())),
        _ => Err(SpecError::new(field, "must be -1 (no limit) or positive")),
    }
}

/// A `unified` key must be a file name CONTROLLER.PARAMETER that the agent
/// does not manage itself.
fn check_unified_key(key: &str) -> Result<(), SpecError> {
    let field = format!("linux.resources.unified.{key}");
    if key.contains('/') || key.contains("..") || key.contains('\0') {
        return Err(SpecError::new(field, "must be a file name of the cgroup"));
    }
    if !key
        .split_once('.')
        .is_some_and(|(c, p)| !c.is_empty() && !p.is_empty())
    {
        return Err(SpecError::new(
            field,
            "must be in the form CONTROLLER.PARAMETER",
        ));
    }
    if RESERVED_FILES.contains(&key) {
        return Err(SpecError::new(field, "is managed by the agent"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Resources from their config.json form.
    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    /// The cgroup2 root the tests use: they need root and a cgroup2 mount,
    /// and fail (not skip) without them.
    fn test_root() -> PathBuf {
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(uid, 0, "the cgroup tests run as root");
        find_root().expect("the cgroup tests need a cgroup2 mount")
    }

    /// A cgroup name of this test run's own.
    fn unique(name: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("rtv-test-{}-{n}-{name}", std::process::id())
    }

    fn available(root: &Path, controller: &str) -> bool {
        read_set(&root.join("cgroup.controllers"))
            .unwrap()
            .contains(controller)
    }

    /// Removes a test's cgroup directories when the test ends, failed or
    /// not: kills what is inside, then removes them, deepest first.
    struct Cleanup(Vec<PathBuf>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for dir in &self.0 {
                if dir.exists() {
                    let _ = write_file(&dir.join("cgroup.kill"), "1");
                    let _ = remove_tree(dir, Instant::now() + SETTLE_TIMEOUT);
                }
            }
        }
    }

    /// A forked child that joined a cgroup and sleeps; killed and reaped
    /// when dropped.
    struct Child(i32);

    impl Child {
        /// Forks a child that writes "0" to `procs` and then pauses, and
        /// waits until `cgroup` lists it.
        fn spawn_into(cgroup: &Cgroup, procs: &CString) -> Child {
            // SAFETY: the child makes only async-signal-safe calls (open,
            // write, close, pause, _exit) on memory prepared before the fork.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
            if pid == 0 {
                // SAFETY: as above; procs is a valid C string.
                unsafe {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        libc::_exit(1);
                    }
                    libc::close(fd);
                    loop {
                        libc::pause();
                    }
                }
            }
            let child = Child(pid);
            let deadline = Instant::now() + SETTLE_TIMEOUT;
            while !cgroup.pids().unwrap().contains(&pid) {
                assert!(Instant::now() < deadline, "child {pid} never joined");
                std::thread::sleep(Duration::from_millis(5));
            }
            child
        }

        /// Reaps the child; the signal that ended it.
        fn wait_signal(mut self) -> i32 {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid out-pointer.
            let rc = unsafe { libc::waitpid(self.0, &mut status, 0) };
            assert_eq!(rc, self.0);
            self.0 = 0;
            assert!(libc::WIFSIGNALED(status), "status {status:#x}");
            libc::WTERMSIG(status)
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            if self.0 > 0 {
                // SAFETY: kill and waitpid on our own, unreaped child.
                unsafe {
                    libc::kill(self.0, libc::SIGKILL);
                    libc::waitpid(self.0, std::ptr::null_mut(), 0);
                }
            }
        }
    }

    fn events(cgroup: &Cgroup) -> String {
        fs::read_to_string(cgroup.path().join("cgroup.events")).unwrap()
    }

    fn spec_field(result: Result<Cgroup, CgroupError>) -> String {
        match result {
            Err(CgroupError::Spec(e)) => e.field,
            Err(e) => panic!("not a spec error: {e}"),
            Ok(c) => panic!("created {}", c.path().display()),
        }
    }

    #[test]
    fn cgroup_shares_to_weight_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(512), 20);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // Out of cgroup v1's range: clamped as the kernel clamped shares.
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(1 << 40), 10_000);
    }

    #[test]
    fn cgroup_cpu_max_value() {
        let max = |quota, period| CpuMax { quota, period };
        assert_eq!(
            cpu_max_value(max(Some(50_000), None), "max", 100_000),
            "50000 100000"
        );
        assert_eq!(
            cpu_max_value(max(Some(20_000), Some(50_000)), "max", 100_000),
            "20000 50000"
        );
        assert_eq!(
            cpu_max_value(max(Some(-1), Some(10_000)), "30000", 100_000),
            "max 10000"
        );
        // Left out: the current value stays (update).
        assert_eq!(
            cpu_max_value(max(None, Some(10_000)), "30000", 100_000),
            "30000 10000"
        );
        assert_eq!(
            cpu_max_value(max(Some(5_000), None), "30000", 20_000),
            "5000 20000"
        );
    }

    #[test]
    fn cgroup_plan_maps_the_fields() {
        let plan = Plan::new(&resources(
            r#"{
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": 1073741824, "reservation": 536870912,
                           "swap": 1073741824, "swappiness": 0,
                           "useHierarchy": true, "disableOOMKiller": false},
                "cpu": {"shares": 1024, "quota": 50000, "period": 100000,
                        "burst": 1000, "idle": 0, "cpus": "", "mems": ""},
                "pids": {"limit": 100},
                "blockIO": {},
                "hugepageLimits": [],
                "unified": {"memory.high": "900000000", "cgroup.max.depth": "2"}
            }"#,
        ))
        .unwrap();
        assert_eq!(
            plan,
            Plan {
                memory_max: Some("1073741824".into()),
                memory_low: Some("536870912".into()),
                memory_check_before_update: false,
                cpu_weight: Some(39),
                cpu_max: Some(CpuMax {
                    quota: Some(50_000),
                    period: Some(100_000)
                }),
                cpu_burst: Some(1000),
                cpu_idle: Some(0),
                pids_max: Some("100".into()),
                unified: vec![
                    ("cgroup.max.depth".into(), "2".into()),
                    ("memory.high".into(), "900000000".into()),
                ],
                ..Plan::default()
            }
        );
        assert_eq!(
            plan.controllers().into_iter().collect::<Vec<_>>(),
            ["cpu", "memory", "pids"]
        );

        let plan = Plan::new(&resources(
            r#"{"memory": {"limit": -1, "swap": -1}, "cpu": {"quota": -1}, "pids": {"limit": 0}}"#,
        ))
        .unwrap();
        assert_eq!(plan.memory_max.as_deref(), Some("max"));
        assert_eq!(plan.memory_low, None);
        assert_eq!(
            plan.cpu_max,
            Some(CpuMax {
                quota: Some(-1),
                period: None
            })
        );
        assert_eq!(plan.pids_max.as_deref(), Some("max"));

        // Zeroes are unset, as in runc; so is everything left out.
        let plan = Plan::new(&resources(
            r#"{"memory": {"limit": 0, "swap": 0}, "cpu": {"shares": 0, "quota": 0, "period": 0}}"#,
        ))
        .unwrap();
        assert_eq!(plan, Plan::default());
        assert!(plan.needs().is_empty());
    }

    #[test]
    fn cgroup_fields_runc_ignores_are_accepted_and_named() {
        // What Docker 20.10 writes for `docker run -m 64m` (weight 0 is
        // unset, memory+swap twice the memory), with the fields runc on
        // cgroup v2 ignores.
        let r = resources(
            r#"{
                "memory": {"limit": 67108864, "swap": 134217728, "kernel": 1048576,
                           "kernelTCP": 1048576, "swappiness": 60, "disableOOMKiller": true},
                "blockIO": {"weight": 0, "leafWeight": 10},
                "network": {"classID": 1, "priorities": [{"name": "eth0", "priority": 1}]},
                "hugepageLimits": [{"pageSize": "2MB", "limit": 0}, {"pageSize": "16GB", "limit": 0}]
            }"#,
        );
        let plan = Plan::new(&r).unwrap();
        assert_eq!(plan.memory_max.as_deref(), Some("67108864"));
        assert_eq!(plan.io_weight, None);
        assert_eq!(
            plan.hugetlb,
            [("2MB".to_owned(), 0), ("16GB".to_owned(), 0)]
        );
        let notes = not_applied(&r);
        for field in [
            "memory.swap:",
            "memory.kernel:",
            "memory.kernelTCP:",
            "memory.swappiness:",
            "memory.disableOOMKiller:",
            "blockIO.leafWeight:",
            "linux.resources.network:",
            "hugepageLimits[1]: the guest has no 16GB pages",
        ] {
            assert!(
                notes.iter().any(|n| n.contains(field)),
                "{field} not in {notes:#?}"
            );
        }
        // swap equal to the limit, or unlimited, is no note.
        let r = resources(r#"{"memory": {"limit": 67108864, "swap": 67108864}}"#);
        assert!(not_applied(&r).is_empty());
        let r = resources(r#"{"memory": {"limit": 67108864, "swap": -1}}"#);
        assert!(not_applied(&r).is_empty());
    }

    #[test]
    fn cgroup_blkio_weights_and_page_sizes_convert_as_runc() {
        assert_eq!(blkio_to_io_weight(10), 1);
        assert_eq!(blkio_to_io_weight(500), 4950);
        assert_eq!(blkio_to_io_weight(1000), 10000);
        assert_eq!(page_size_kib("2MB"), Some(2048));
        assert_eq!(page_size_kib("1GB"), Some(1 << 20));
        assert_eq!(page_size_kib("64KB"), Some(64));
        for bad in ["", "MB", "2", "2mb", "0MB", "2 MB"] {
            assert_eq!(page_size_kib(bad), None, "{bad:?}");
        }
        let plan = Plan::new(&resources(
            r#"{"cpu": {"cpus": "0-1,3", "mems": "0"}, "blockIO": {"weight": 300}}"#,
        ))
        .unwrap();
        assert_eq!(plan.cpuset_cpus.as_deref(), Some("0-1,3"));
        assert_eq!(plan.cpuset_mems.as_deref(), Some("0"));
        assert_eq!(plan.io_weight, Some(300));
        assert_eq!(
            plan.controllers().into_iter().collect::<Vec<_>>(),
            ["cpuset", "io"]
        );
    }

    #[test]
    fn cgroup_validation_names_the_field() {
        let cases = [
            (
                r#"{"memory": {"limit": 2000000, "swap": 1000000}}"#,
                "linux.resources.memory.swap",
            ),
            (
                r#"{"memory": {"swap": 2000000}}"#,
                "linux.resources.memory.swap",
            ),
            (
                r#"{"memory": {"limit": -1, "swap": 2000000}}"#,
                "linux.resources.memory.swap",
            ),
            (
                r#"{"memory": {"limit": -2}}"#,
                "linux.resources.memory.limit",
            ),
            (r#"{"cpu": {"cpus": "0-1-2"}}"#, "linux.resources.cpu.cpus"),
            (r#"{"cpu": {"cpus": "0,,1"}}"#, "linux.resources.cpu.cpus"),
            (r#"{"cpu": {"mems": "zero"}}"#, "linux.resources.cpu.mems"),
            (
                r#"{"cpu": {"realtimeRuntime": 950000}}"#,
                "linux.resources.cpu.realtimeRuntime",
            ),
            (
                r#"{"cpu": {"realtimePeriod": 1000000}}"#,
                "linux.resources.cpu.realtimePeriod",
            ),
            (r#"{"cpu": {"quota": 10}}"#, "linux.resources.cpu.quota"),
            (
                r#"{"cpu": {"period": 5000000}}"#,
                "linux.resources.cpu.period",
            ),
            (r#"{"cpu": {"idle": 2}}"#, "linux.resources.cpu.idle"),
            (
                r#"{"blockIO": {"weight": 5}}"#,
                "linux.resources.blockIO.weight",
            ),
            (
                r#"{"blockIO": {"throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1}]}}"#,
                "linux.resources.blockIO.throttleReadBpsDevice",
            ),
            (
                r#"{"blockIO": {"weightDevice": [{"major": 8, "minor": 0, "weight": 100}]}}"#,
                "linux.resources.blockIO.weightDevice",
            ),
            (
                r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 1}, {"pageSize": "huge", "limit": 1}]}"#,
                "linux.resources.hugepageLimits[1].pageSize",
            ),
            (
                r#"{"rdma": {"mlx5_1": {"hcaHandles": 3}}}"#,
                "linux.resources.rdma",
            ),
            (
                r#"{"unified": {"../memory.max": "1"}}"#,
                "linux.resources.unified.../memory.max",
            ),
            (
                r#"{"unified": {"memory..max": "1"}}"#,
                "linux.resources.unified.memory..max",
            ),
            (
                r#"{"unified": {"a/memory.max": "1"}}"#,
                "linux.resources.unified.a/memory.max",
            ),
            (
                r#"{"unified": {"nodot": "1"}}"#,
                "linux.resources.unified.nodot",
            ),
            (
                r#"{"unified": {"cgroup.procs": "1"}}"#,
                "linux.resources.unified.cgroup.procs",
            ),
            (
                r#"{"unified": {"cgroup.kill": "1"}}"#,
                "linux.resources.unified.cgroup.kill",
            ),
        ];
        for (json, field) in cases {
            let err = Plan::new(&resources(json)).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }

    #[test]
    fn cgroup_controllers_are_checked_against_the_available_ones() {
        let plan = Plan::new(&resources(
            r#"{"memory": {"limit": 1000000}, "unified": {"io.max": "8:0 rbps=1"}}"#,
        ))
        .unwrap();
        let set = |s: &[&str]| s.iter().map(|c| c.to_string()).collect::<BTreeSet<_>>();
        let err = plan.check_controllers(&set(&["cpu", "pids"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "linux.resources.memory: the memory controller is not available"
        );
        let err = plan
            .check_controllers(&set(&["cpu", "memory", "pids"]))
            .unwrap_err();
        assert_eq!(err.field, "linux.resources.unified.io.max");
        assert!(plan.check_controllers(&set(&["io", "memory"])).is_ok());
        // cgroup.* files belong to no controller.
        let plan = Plan::new(&resources(r#"{"unified": {"cgroup.max.depth": "3"}}"#)).unwrap();
        assert!(plan.check_controllers(&BTreeSet::new()).is_ok());
    }

    #[test]
    fn cgroup_relative_components() {
        assert_eq!(relative_components("/a/b").unwrap(), ["a", "b"]);
        assert_eq!(relative_components("a//./b/").unwrap(), ["a", "b"]);
        for bad in ["", "/", "/./", "/a/../b", ".."] {
            let err = relative_components(bad).unwrap_err();
            assert_eq!(err.field, "linux.cgroupsPath", "{bad:?}");
        }
    }

    #[test]
    fn cgroup_find_root_is_cgroup2() {
        let root = test_root();
        assert!(is_cgroup2(&root));
        assert!(root.join("cgroup.controllers").exists());
        assert!(!is_cgroup2(Path::new("/proc")));
    }

    #[test]
    fn cgroup_bad_specs_create_nothing() {
        let root = test_root();
        let name = unique("bad");
        let path = root.join(&name);
        let _cleanup = Cleanup(vec![path.clone()]);
        let cases = [
            r#"{"cpu": {"cpus": "0"}}"#,
            r#"{"memory": {"limit": 3000000, "swap": 1000000}}"#,
            r#"{"unified": {"..": "1"}}"#,
            r#"{"blockIO": {"weight": 10}}"#,
        ];
        for json in cases {
            let r = resources(json);
            assert!(
                spec_field(Cgroup::create(&root, &name, Some(&r))).starts_with("linux.resources.")
            );
            assert!(!path.exists(), "{json} created {}", path.display());
        }
        let nested = format!("{name}/inner");
        let r = resources(r#"{"cpu": {"mems": "0"}}"#);
        assert_eq!(
            spec_field(Cgroup::create(&root, &nested, Some(&r))),
            "linux.resources.cpu.mems"
        );
        assert!(!path.exists());
        for rel in ["", "/", &format!("{name}/../x")] {
            assert_eq!(
                spec_field(Cgroup::create(&root, rel, None)),
                "linux.cgroupsPath"
            );
        }
        assert!(!path.exists());
    }

    #[test]
    fn cgroup_missing_controllers_are_spec_errors() {
        let root = test_root();
        let name = unique("ctl");
        let path = root.join(&name);
        let _cleanup = Cleanup(vec![path.clone()]);
        let cases = [
            (
                "memory",
                r#"{"memory": {"limit": 104857600}}"#,
                "memory.max",
                "104857600",
            ),
            (
                "cpu",
                r#"{"cpu": {"quota": 50000, "period": 100000}}"#,
                "cpu.max",
                "50000 100000",
            ),
            ("pids", r#"{"pids": {"limit": 64}}"#, "pids.max", "64"),
            (
                "hugetlb",
                r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}]}"#,
                "hugetlb.2MB.max",
                "4194304",
            ),
            ("cpuset", r#"{"cpu": {"cpus": "0"}}"#, "cpuset.cpus", "0"),
            (
                "io",
                r#"{"blockIO": {"weight": 500}}"#,
                "io.weight",
                "default 4950",
            ),
            (
                "memory",
                r#"{"unified": {"memory.high": "104857600"}}"#,
                "memory.high",
                "104857600",
            ),
        ];
        for (controller, json, file, want) in cases {
            let r = resources(json);
            if available(&root, controller) {
                // A host with the controller: the limit is written.
                let cgroup = Cgroup::create(&root, &name, Some(&r)).unwrap();
                let got = fs::read_to_string(cgroup.path().join(file)).unwrap();
                assert_eq!(got.trim(), want);
                cgroup.remove().unwrap();
            } else {
                let err = match Cgroup::create(&root, &name, Some(&r)) {
                    Err(CgroupError::Spec(e)) => e,
                    other => panic!("{json}: {other:?}"),
                };
                assert!(err.field.starts_with("linux.resources."), "{err}");
                assert_eq!(
                    err.message,
                    format!("the {controller} controller is not available")
                );
            }
            assert!(!path.exists());
        }
    }

    #[test]
    fn cgroup_lifecycle_with_real_processes() {
        let root = test_root();
        let name = unique("life");
        let _cleanup = Cleanup(vec![root.join(&name)]);
        let cgroup = Cgroup::create(&root, &format!("/{name}"), None).unwrap();
        assert_eq!(cgroup.path(), root.join(&name));
        assert!(matches!(
            Cgroup::create(&root, &name, None),
            Err(CgroupError::Exists { .. })
        ));
        assert_eq!(cgroup.pids().unwrap(), Vec::<i32>::new());
        let procs = cgroup.procs_file();
        assert_eq!(
            procs.to_bytes(),
            root.join(&name).join("cgroup.procs").as_os_str().as_bytes()
        );

        let a = Child::spawn_into(&cgroup, &procs);
        let b = Child::spawn_into(&cgroup, &procs);
        let mut want = vec![a.0, b.0];
        want.sort_unstable();
        assert_eq!(cgroup.pids().unwrap(), want);

        cgroup.freeze(true).unwrap();
        assert!(events(&cgroup).contains("frozen 1"));
        cgroup.freeze(false).unwrap();
        assert!(events(&cgroup).contains("frozen 0"));

        let stats = cgroup.stats().unwrap();
        assert_eq!(stats.oom_kills, 0);
        assert_eq!(cgroup.oom_kills(), 0);
        if !available(&root, "memory") {
            assert_eq!((stats.memory_bytes, stats.memory_limit_bytes), (0, None));
        }
        if available(&root, "pids") {
            assert_eq!(stats.pids, 2);
        }

        // A signal other than SIGKILL goes to each process.
        cgroup.kill_all(libc::SIGTERM).unwrap();
        assert_eq!(a.wait_signal(), libc::SIGTERM);
        assert_eq!(b.wait_signal(), libc::SIGTERM);
        assert!(cgroup.pids().unwrap().is_empty());

        // SIGKILL goes through cgroup.kill, frozen or not.
        let c = Child::spawn_into(&cgroup, &procs);
        cgroup.freeze(true).unwrap();
        cgroup.kill_all(libc::SIGKILL).unwrap();
        assert_eq!(c.wait_signal(), libc::SIGKILL);
        cgroup.freeze(false).unwrap();

        // remove kills what is left.
        let d = Child::spawn_into(&cgroup, &procs);
        let path = cgroup.path().to_path_buf();
        cgroup.remove().unwrap();
        assert!(!path.exists());
        assert_eq!(d.wait_signal(), libc::SIGKILL);
    }

    #[test]
    fn cgroup_nested_paths_and_child_cgroups() {
        let root = test_root();
        let name = unique("nest");
        let top = root.join(&name);
        let _cleanup = Cleanup(vec![top.clone()]);
        let cgroup = Cgroup::create(&root, &format!("{name}/pod/ctr"), None).unwrap();
        assert_eq!(cgroup.path(), top.join("pod/ctr"));
        // A second container next to it reuses the ancestors.
        let sibling = Cgroup::create(&root, &format!("{name}/pod/ctr2"), None).unwrap();

        // The container made a cgroup of its own: its processes count and
        // remove takes it first.
        let inner = cgroup.path().join("inner");
        fs::create_dir(&inner).unwrap();
        let inner_procs = CString::new(inner.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        let a = Child::spawn_into(&cgroup, &inner_procs);
        assert_eq!(cgroup.pids().unwrap(), [a.0]);
        assert!(sibling.pids().unwrap().is_empty());
        cgroup.freeze(true).unwrap();
        assert!(fs::read_to_string(inner.join("cgroup.events"))
            .unwrap()
            .contains("frozen 1"));
        cgroup.freeze(false).unwrap();

        cgroup.remove().unwrap();
        assert_eq!(a.wait_signal(), libc::SIGKILL);
        assert!(!top.join("pod/ctr").exists());
        sibling.remove().unwrap();
        // The ancestors are left for other containers.
        assert!(top.join("pod").exists());
    }

    #[test]
    fn cgroup_unified_writes_update_and_rollback() {
        let root = test_root();
        let name = unique("unified");
        let path = root.join(&name);
        let _cleanup = Cleanup(vec![path.clone()]);
        let read = |file: &str| {
            fs::read_to_string(path.join(file))
                .unwrap()
                .trim()
                .to_owned()
        };

        // A file that does not exist: the directory goes again.
        let r = resources(r#"{"unified": {"cgroup.max.depth": "3", "cgroup.nosuch": "1"}}"#);
        assert_eq!(
            spec_field(Cgroup::create(&root, &name, Some(&r))),
            "linux.resources.unified.cgroup.nosuch"
        );
        assert!(!path.exists());
        // The kernel refuses a value: the error names the field, and the
        // directory goes again.
        let r = resources(r#"{"unified": {"cgroup.max.depth": "lots"}}"#);
        match Cgroup::create(&root, &name, Some(&r)) {
            Err(CgroupError::Limit { field, .. }) => {
                assert_eq!(field, "linux.resources.unified.cgroup.max.depth")
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists());

        let r = resources(
            r#"{"devices": [{"allow": false, "access": "rwm"}],
                "unified": {"cgroup.max.depth": "3"}}"#,
        );
        let cgroup = Cgroup::create(&root, &name, Some(&r)).unwrap();
        assert_eq!(read("cgroup.max.depth"), "3");
        assert_eq!(read("cgroup.max.descendants"), "max");

        cgroup
            .update(&resources(
                r#"{"unified": {"cgroup.max.descendants": "10"}}"#,
            ))
            .unwrap();
        assert_eq!(read("cgroup.max.descendants"), "10");
        assert_eq!(read("cgroup.max.depth"), "3");
        // A bad update writes nothing.
        let err = cgroup
            .update(&resources(
                r#"{"unified": {"cgroup.max.depth": "5"}, "cpu": {"cpus": "1"}}"#,
            ))
            .unwrap_err();
        assert!(matches!(err, CgroupError::Spec(ref e) if e.field == "linux.resources.cpu.cpus"));
        assert_eq!(read("cgroup.max.depth"), "3");
        if !available(&root, "pids") {
            let err = cgroup
                .update(&resources(r#"{"pids": {"limit": 10}}"#))
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "linux.resources.pids: the pids controller is not available"
            );
        }
        cgroup.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn cgroup_enable_controllers_enables_the_base_ones_available() {
        let root = test_root();
        let path = root.join(unique("enable"));
        let _cleanup = Cleanup(vec![path.clone()]);
        fs::create_dir(&path).unwrap();
        enable_controllers(&path).unwrap();
        let available = read_set(&path.join("cgroup.controllers")).unwrap();
        let enabled = read_set(&path.join("cgroup.subtree_control")).unwrap();
        let base: BTreeSet<String> = BASE_CONTROLLERS.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            enabled,
            available
                .intersection(&base)
                .cloned()
                .collect::<BTreeSet<_>>()
        );
        // The others are enabled on the way to a container that needs
        // them (hugetlb is what a hybrid host's cgroup2 has).
        if available.contains("hugetlb") {
            let r = resources(r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 0}]}"#);
            let cgroup = Cgroup::create(&path, "c", Some(&r)).unwrap();
            assert!(read_set(&path.join("cgroup.subtree_control"))
                .unwrap()
                .contains("hugetlb"));
            assert_eq!(
                fs::read_to_string(cgroup.path().join("hugetlb.2MB.max"))
                    .unwrap()
                    .trim(),
                "0"
            );
            cgroup.remove().unwrap();
        }
    }
}
