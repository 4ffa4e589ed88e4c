//! The 16550A UART at COM1 (vm-superio), raising IRQ 4 through an irqfd.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
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

/// Console output: passes every byte on, and notices kernel panics.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl ConsoleSink {
    /// Wraps `out`; `panicked` is set when a kernel panic line appears.
    pub fn new(out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            line: Vec::with_capacity(160),
            panicked,
        }
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
