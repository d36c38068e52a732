//! The legacy PC devices a Linux guest without ACPI or PCI still needs.

mod i8042;
mod serial;

pub use i8042::{I8042Reset, I8042_BASE, I8042_LEN};
pub use serial::{EventFdTrigger, PanicWatch, SerialConsole};
