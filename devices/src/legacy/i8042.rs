//! Just enough of the i8042 keyboard controller for a guest to reset the machine.
//!
//! Linux with `reboot=k` writes the "pulse reset line" command (0xfe) to the command port;
//! as in Firecracker, that ends the VM. Keyboard and mouse are not emulated.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base port of the controller's range (data port 0x60 .. command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Length of the controller's port range.
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042Reset {
    reset: EventFd,
}

impl I8042Reset {
    /// `reset` is signalled when the guest asks for a CPU reset.
    pub fn new(reset: EventFd) -> Self {
        Self { reset }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the guest never waits on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET_CPU] {
            // Linux repeats the command until the machine resets; say it once per burst.
            tracing::debug!("guest requested reset through the i8042");
            if let Err(e) = self.reset.write(1) {
                tracing::error!("signalling guest reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_other_writes_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042Reset::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET_CPU]); // data port, not the command port
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
