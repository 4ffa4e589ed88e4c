//! vCPU threads: run KVM_RUN, route port and MMIO accesses to the buses,
//! and turn every other exit into a clear stop reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::Bus;
use crate::exit::{ExitNotifier, VmExit};
use crate::profile::VcpuSampler;
use crate::seccomp;
use crate::snapshot;
use crate::snapshot::cpu::{SaveParams, VcpuState};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// The signal that kicks a vCPU thread out of KVM_RUN (pauses, stops, the
/// profiler's samples).
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// One vCPU and what it needs to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    memory: GuestMemoryMmap,
    exit: Arc<ExitNotifier>,
    /// The profiler's sampler (`--profile`); `None`, and no cost, otherwise.
    sampler: Option<VcpuSampler>,
}

/// What to do after handling an exit.
enum Next {
    Continue,
    Stop(VmExit),
}

/// An exit copied out of the KVM run structure, so the vCPU can be queried
/// while handling it.
enum Unexpected {
    InternalError,
    FailEntry(u64),
    Other(String),
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Bus,
        mmio: Bus,
        memory: GuestMemoryMmap,
        exit: Arc<ExitNotifier>,
    ) -> Self {
        Self {
            index,
            fd,
            pio,
            mmio,
            memory,
            exit,
            sampler: None,
        }
    }

    /// Takes the profiler's samples on this vCPU when it is due.
    pub fn with_sampler(mut self, sampler: VcpuSampler) -> Self {
        self.sampler = Some(sampler);
        self
    }

    /// Starts the vCPU on its own thread; the handle pauses, queries,
    /// resumes and stops it.
    pub fn spawn(self) -> std::io::Result<VcpuHandle> {
        install_kick_handler();
        let (req_tx, req_rx) = mpsc::channel();
        let (resp_tx, resp_rx) = mpsc::channel();
        let pending = Arc::new(AtomicBool::new(false));
        let index = self.index;
        let control = Control {
            requests: req_rx,
            responses: resp_tx,
            pending: pending.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run(control))?;
        Ok(VcpuHandle {
            index,
            thread,
            requests: req_tx,
            responses: resp_rx,
            pending,
        })
    }

    fn run(mut self, control: Control) {
        // Before the guest runs on this thread.
        if let Err(e) = seccomp::enter(seccomp::Thread::Vcpu) {
            self.exit.notify(VmExit::Error(e.to_string()));
            return;
        }
        while !self.exit.stopping() {
            if control.pending.swap(false, Ordering::SeqCst) && !self.serve(&control) {
                break;
            }
            let step = self.step();
            if let Some(Next::Stop(reason)) = step {
                tracing::debug!(vcpu = self.index, %reason, "vCPU stopping");
                self.exit.notify(reason);
                break;
            }
            if self.sampler.as_ref().is_some_and(VcpuSampler::due) {
                // After an I/O or MMIO exit the registers are consistent
                // only once KVM_RUN completes the access (see `settle`).
                if step.is_some() {
                    if let Err(reason) = self.settle() {
                        self.exit.notify(reason);
                        break;
                    }
                }
                if let Some(sampler) = &self.sampler {
                    sampler.sample(&self.fd, &self.memory);
                }
            }
        }
    }

    /// Completes an exit in progress without running the guest further: an
    /// I/O or MMIO exit is complete (and the registers consistent) only once
    /// KVM_RUN has been entered again, so enter it with immediate_exit set,
    /// which finishes the access and returns at once.
    fn settle(&mut self) -> Result<(), VmExit> {
        loop {
            self.fd.set_kvm_immediate_exit(1);
            let step = self.step();
            self.fd.set_kvm_immediate_exit(0);
            match step {
                None => return Ok(()),
                Some(Next::Continue) => continue,
                Some(Next::Stop(reason)) => return Err(reason),
            }
        }
    }

    /// Answers the requests waiting for this vCPU; `false` when the thread
    /// is to end.
    fn serve(&mut self, control: &Control) -> bool {
        while let Ok(request) = control.requests.try_recv() {
            match request {
                VcpuRequest::Pause => {
                    if !self.paused(control) {
                        return false;
                    }
                }
                VcpuRequest::Stop => return false,
                VcpuRequest::Resume => {}
                VcpuRequest::Save(_) => {
                    let _ = control
                        .responses
                        .send(VcpuResponse::State(Err("the vCPU is not paused".into())));
                }
            }
        }
        true
    }

    /// Parked out of KVM_RUN: answers state requests until resumed (`true`)
    /// or stopped (`false`).
    fn paused(&mut self, control: &Control) -> bool {
        if let Err(reason) = self.settle() {
            self.exit.notify(reason);
            return false;
        }
        tracing::debug!(vcpu = self.index, "vCPU paused");
        if control.responses.send(VcpuResponse::Paused).is_err() {
            return false;
        }
        loop {
            match control.requests.recv() {
                Ok(VcpuRequest::Save(params)) => {
                    let state = snapshot::cpu::save(&self.fd, self.index, &params)
                        .map(Box::new)
                        .map_err(|e| e.to_string());
                    let _ = control.responses.send(VcpuResponse::State(state));
                }
                Ok(VcpuRequest::Pause) => {
                    let _ = control.responses.send(VcpuResponse::Paused);
                }
                Ok(VcpuRequest::Resume) => {
                    tracing::debug!(vcpu = self.index, "vCPU resumed");
                    return true;
                }
                Ok(VcpuRequest::Stop) | Err(_) => return false,
            }
        }
    }

    /// One KVM_RUN and the handling of its exit; `None` when KVM_RUN was
    /// interrupted (a kick, or immediate_exit).
    fn step(&mut self) -> Option<Next> {
        let next = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(u64::from(port), data) {
                        tracing::trace!(port, "read of an unclaimed port");
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    if !self.pio.write(u64::from(port), data) {
                        tracing::trace!(port, ?data, "write to an unclaimed port");
                    }
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        tracing::debug!(addr, "read of unclaimed MMIO");
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio.write(addr, data) {
                        tracing::debug!(addr, "write to unclaimed MMIO");
                    }
                    Next::Continue
                }
                VcpuExit::Hlt => Next::Stop(VmExit::Halted),
                VcpuExit::Shutdown => Next::Stop(VmExit::Shutdown),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VmExit::Shutdown),
                    KVM_SYSTEM_EVENT_RESET => Next::Stop(VmExit::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Next::Stop(VmExit::Panicked),
                    other => self.unexpected(Unexpected::Other(format!(
                        "system event of unknown type {other}"
                    ))),
                },
                VcpuExit::InternalError => self.unexpected(Unexpected::InternalError),
                VcpuExit::FailEntry(reason, _) => self.unexpected(Unexpected::FailEntry(reason)),
                other => {
                    let what = format!("{other:?}");
                    self.unexpected(Unexpected::Other(what))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return None,
            Err(e) => Next::Stop(VmExit::Error(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                self.index
            ))),
        };
        Some(next)
    }

    fn unexpected(&mut self, what: Unexpected) -> Next {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let detail = match what {
            Unexpected::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM
                // filled the `internal` member of the exit union.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let ndata = (internal.ndata as usize).min(internal.data.len());
                let data: Vec<String> = internal.data[..ndata]
                    .iter()
                    .map(|d| format!("{d:#x}"))
                    .collect();
                let kind = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
                    "KVM could not emulate an instruction".to_string()
                } else {
                    format!("KVM internal error (suberror {})", internal.suberror)
                };
                format!(
                    "{kind} at rip {rip:#x} (instruction bytes: {}; data: [{}])",
                    self.instruction_bytes(rip),
                    data.join(", ")
                )
            }
            Unexpected::FailEntry(reason) => {
                format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}) at rip {rip:#x}"
                )
            }
            Unexpected::Other(what) => format!("unexpected KVM exit {what} at rip {rip:#x}"),
        };
        Next::Stop(VmExit::Error(format!("vCPU {}: {detail}", self.index)))
    }

    /// The bytes at guest virtual address `rip`, for error messages.
    fn instruction_bytes(&self, rip: u64) -> String {
        let Ok(tr) = self.fd.translate_gva(rip) else {
            return "unavailable".into();
        };
        if tr.valid == 0 {
            return "unmapped".into();
        }
        let mut bytes = [0u8; 16];
        let addr = GuestAddress(tr.physical_address);
        if !self.memory.address_in_range(addr) || self.memory.read_slice(&mut bytes, addr).is_err()
        {
            return format!("outside guest RAM at {:#x}", tr.physical_address);
        }
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a vCPU thread is asked to do.
pub enum VcpuRequest {
    /// Leave KVM_RUN and park (answered with [`VcpuResponse::Paused`]).
    Pause,
    /// Save the vCPU's state (paused only; answered with
    /// [`VcpuResponse::State`]).
    Save(SaveParams),
    /// Go on running the guest.
    Resume,
    /// End the thread.
    Stop,
}

/// A vCPU thread's answers.
pub enum VcpuResponse {
    /// The vCPU is out of KVM_RUN and waits for requests.
    Paused,
    /// The saved state, or why it could not be saved.
    State(Result<Box<VcpuState>, String>),
}

struct Control {
    requests: Receiver<VcpuRequest>,
    responses: Sender<VcpuResponse>,
    pending: Arc<AtomicBool>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
    pending: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The thread's pthread id, for the profiler's kicks: valid until the
    /// handle is joined ([`stop_all`]).
    pub(crate) fn pthread(&self) -> libc::pthread_t {
        use std::os::unix::thread::JoinHandleExt;
        self.thread.as_pthread_t()
    }

    fn send(&self, request: VcpuRequest) -> bool {
        let sent = self.requests.send(request).is_ok();
        self.pending.store(true, Ordering::SeqCst);
        sent
    }

    fn kick(&self) {
        if !self.thread.is_finished() {
            let _ = self.thread.kill(kick_signal());
        }
    }

    /// Stops the vCPU out of KVM_RUN and parks it; kicks it until it
    /// answers (a kick that lands just before KVM_RUN is missed; the next
    /// one is not).
    pub fn pause(&self, timeout: Duration) -> Result<(), String> {
        let gone = || format!("vCPU {} is no longer running", self.index);
        if !self.send(VcpuRequest::Pause) {
            return Err(gone());
        }
        let start = Instant::now();
        loop {
            self.kick();
            match self.responses.recv_timeout(Duration::from_millis(2)) {
                Ok(VcpuResponse::Paused) => return Ok(()),
                Ok(VcpuResponse::State(_)) => {}
                Err(RecvTimeoutError::Timeout) if start.elapsed() < timeout => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "vCPU {} did not pause within {timeout:?}",
                        self.index
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }

    /// The state of a paused vCPU.
    pub fn save(&self, params: SaveParams) -> Result<VcpuState, String> {
        if !self.send(VcpuRequest::Save(params)) {
            return Err(format!("vCPU {} is no longer running", self.index));
        }
        loop {
            match self.responses.recv_timeout(Duration::from_secs(10)) {
                Ok(VcpuResponse::State(state)) => {
                    return state
                        .map(|s| *s)
                        .map_err(|e| format!("vCPU {}: {e}", self.index))
                }
                Ok(VcpuResponse::Paused) => {}
                Err(e) => return Err(format!("vCPU {} did not answer: {e}", self.index)),
            }
        }
    }

    /// Lets a paused vCPU run the guest again.
    pub fn resume(&self) {
        self.send(VcpuRequest::Resume);
    }
}

/// Stops every vCPU thread, paused or running: asks each to end and kicks
/// it out of KVM_RUN until it has.
pub fn stop_all(handles: Vec<VcpuHandle>) {
    for h in &handles {
        h.send(VcpuRequest::Stop);
    }
    let mut pending = handles;
    loop {
        let (done, running): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|h| h.thread.is_finished());
        for h in done {
            if h.thread.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        if running.is_empty() {
            return;
        }
        for h in &running {
            // A thread between its stop check and KVM_RUN misses one kick;
            // it gets the next.
            h.kick();
        }
        std::thread::sleep(Duration::from_millis(1));
        pending = running;
    }
}
