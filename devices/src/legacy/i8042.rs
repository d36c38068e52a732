//! Just enough of the i8042 keyboard controller for a guest to reset the machine.
//!
//! Linux with `reboot=k` writes the "pulse reset line" command (0xfe) to the command port;
//! as in Firecracker, that ends the VM. Keyboard and mouse are not emulated. The controller is
//! `vm_superio`'s `I8042Device`; this file puts it on the bus and gives it the reset eventfd.

use std::io;

use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base port of the controller's range (data port 0x60 .. command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Length of the controller's port range.
pub const I8042_LEN: u64 = 5;

/// Signals the VMM's reset eventfd when the controller asks for a CPU reset.
struct ResetTrigger(EventFd);

impl Trigger for ResetTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        // Linux repeats the command until the machine resets.
        tracing::debug!("guest requested reset through the i8042");
        self.0.write(1)
    }
}

/// The i8042 on the port bus. Reads (status included) are always 0: output and input buffers
/// empty, so the guest never waits on us.
pub struct I8042Reset {
    i8042: I8042Device<ResetTrigger>,
}

impl I8042Reset {
    /// `reset` is signalled when the guest asks for a CPU reset.
    pub fn new(reset: EventFd) -> Self {
        Self {
            i8042: I8042Device::new(ResetTrigger(reset)),
        }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |offset| self.i8042.read(offset));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The controller's registers are bytes; wider accesses are not commands.
        if let (Ok(offset), &[value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.i8042.write(offset, value) {
                tracing::error!("signalling guest reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMAND_OFFSET: u64 = 4;
    const CMD_RESET_CPU: u8 = 0xfe;

    #[test]
    fn reset_command_signals_and_other_writes_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042Reset::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET_CPU]); // data port, not the command port
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]); // not a byte write
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        for offset in 0..I8042_LEN {
            let mut status = [0xffu8];
            dev.read(offset, &mut status);
            assert_eq!(status, [0], "port {:#x}", I8042_BASE + offset);
        }
    }
}
