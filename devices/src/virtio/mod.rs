//! Virtio devices and their MMIO transport.

mod device;
pub mod dma;
pub mod mmio;
pub mod rng;

pub use device::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
pub use mmio::{MmioTransport, MMIO_DEVICE_SIZE};
