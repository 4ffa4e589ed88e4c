//! vCPU threads: run KVM_RUN, route port and MMIO accesses to the buses,
//! and turn every other exit into a clear stop reason.

use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::Bus;
use crate::exit::{ExitNotifier, VmExit};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
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
        }
    }

    /// Starts the vCPU on its own thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        install_kick_handler();
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        while !self.exit.stopping() {
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
                    VcpuExit::FailEntry(reason, _) => {
                        self.unexpected(Unexpected::FailEntry(reason))
                    }
                    other => {
                        let what = format!("{other:?}");
                        self.unexpected(Unexpected::Other(what))
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => Next::Stop(VmExit::Error(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                ))),
            };
            if let Next::Stop(reason) = next {
                tracing::debug!(vcpu = self.index, %reason, "vCPU stopping");
                self.exit.notify(reason);
                break;
            }
        }
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

/// Stops every vCPU thread: kicks each out of KVM_RUN until it has ended.
pub fn stop_all(handles: Vec<JoinHandle<()>>) {
    let signal = kick_signal();
    let mut pending = handles;
    loop {
        let (done, running): (Vec<_>, Vec<_>) = pending.into_iter().partition(|h| h.is_finished());
        for h in done {
            if h.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        if running.is_empty() {
            return;
        }
        for h in &running {
            // A thread between its stop check and KVM_RUN misses one kick;
            // it gets the next.
            let _ = h.kill(signal);
        }
        std::thread::sleep(Duration::from_millis(1));
        pending = running;
    }
}
