//! Devices of the dmavisor VMM.
//!
//! Everything here is free of KVM: the VMM hands each device the capabilities it needs
//! (guest memory, an interrupt `EventFd`, a reset `EventFd`) and wires the device's eventfds to
//! KVM itself. Data flows one way: guest access → bus → device → (allocator) → reply.

pub mod bus;
pub mod dma_memory;
pub mod guest_memory;
pub mod legacy;
pub mod pci;
pub mod virtio;
pub mod worker;

pub use bus::{Bus, BusDevice, BusError};
