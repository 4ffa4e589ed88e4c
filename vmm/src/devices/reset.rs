//! The part of the i8042 keyboard controller Linux uses to reset the machine
//! (`reboot=k`): a write of 0xFE to port 0x64. rtv treats it as the guest's
//! request to stop, as Firecracker does.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};

/// Port base of the i8042 (data port 0x60 ... command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports covered.
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Minimal i8042: reads as an idle controller, resets on 0xFE.
pub struct ResetDevice {
    exit: Arc<ExitNotifier>,
}

impl ResetDevice {
    /// A device that reports resets to `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self { exit }
    }
}

impl BusDevice for ResetDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET_CPU] {
            self.exit.notify(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = ResetDevice::new(exit.clone());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(!exit.stopping());
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(!exit.stopping());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(exit.stopping());
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
