//! The 16550A UART at COM1 (vm-superio), raising IRQ 4 through an irqfd.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// I/O port base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of UART registers.
pub const COM1_LEN: u64 = 8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// What the kernel prints when it panics; `panic=-1` then makes it reset
/// the VM, which on its own would look like a clean reboot.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Called once when a console line contains its marker.
pub type LineHook = Box<dyn FnMut() + Send>;

/// Console output: passes every byte on, notices kernel panics, and calls
/// hooks on marker lines.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
    watches: Vec<(Vec<u8>, Option<LineHook>)>,
}

impl ConsoleSink {
    /// Wraps `out`; `panicked` is set when a kernel panic line appears.
    pub fn new(out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            line: Vec::with_capacity(160),
            panicked,
            watches: Vec::new(),
        }
    }

    /// Calls `hook` (once) when a line contains `marker` within its first
    /// 160 bytes. The hook runs on a vCPU thread with the UART locked: it
    /// must only hand the news on.
    pub fn watch(&mut self, marker: &[u8], hook: LineHook) {
        self.watches.push((marker.to_vec(), Some(hook)));
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' {
            self.line.clear();
            return;
        }
        // Only the start of a line matters; keep the buffer bounded.
        if self.line.len() < 160 {
            self.line.push(byte);
            if self
                .line
                .windows(PANIC_MARKER.len())
                .any(|w| w == PANIC_MARKER)
            {
                self.panicked.store(true, Ordering::SeqCst);
            }
            for (marker, hook) in &mut self.watches {
                if hook.is_some() && self.line.ends_with(marker) {
                    if let Some(mut hook) = hook.take() {
                        hook();
                    }
                }
            }
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        // A console that cannot be written (closed pipe, full disk) must not
        // stop the guest: drop the output.
        if let Err(e) = self.out.write_all(buf) {
            tracing::debug!("console output dropped: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The UART's registers, as saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The UART as a port-I/O bus device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    /// A UART that writes to `sink` and signals `irq`.
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), sink),
        }
    }

    /// A UART with the registers of `state`.
    pub fn from_state(
        irq: EventFd,
        sink: ConsoleSink,
        state: &SerialSnapshot,
    ) -> Result<Self, String> {
        let serial = Serial::from_state(&state.into(), IrqTrigger(irq), NoEvents, sink)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self { serial })
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        self.serial.state().into()
    }

    /// The console output, to add watches.
    pub fn sink_mut(&mut self) -> &mut ConsoleSink {
        self.serial.writer_mut()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_detects_panics() {
        let out = Shared::default();
        let panicked = Arc::new(AtomicBool::new(false));
        let sink = ConsoleSink::new(Box::new(out.clone()), panicked.clone());
        let mut uart = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), sink);
        for b in b"hello\n" {
            uart.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        assert!(!panicked.load(Ordering::SeqCst));
        for b in b"[    1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            uart.write(0, &[*b]);
        }
        assert!(panicked.load(Ordering::SeqCst));
        // A watched marker fires its hook once.
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        uart.sink_mut().watch(
            b"rtv-agent: ready",
            Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        );
        for b in b"x\n[ 1.0] rtv-agent: ready\nrtv-agent: ready\n" {
            uart.write(0, &[*b]);
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // The registers survive a state round trip.
        uart.write(7, &[0x5a]);
        let state = uart.state();
        let sink = ConsoleSink::new(Box::new(out.clone()), panicked.clone());
        let mut copy =
            SerialDevice::from_state(EventFd::new(libc::EFD_NONBLOCK).unwrap(), sink, &state)
                .unwrap();
        let mut scratch = [0u8];
        copy.read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Wider accesses read as a floating bus.
        let mut wide = [0u8; 2];
        uart.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
