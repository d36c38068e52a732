//! What a virtio device implements, independent of the transport that carries it.

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::{virtio_config, virtio_mmio};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device is a modern (virtio 1.x) device. (virtio-bindings gives the bit
/// number; this is the mask.)
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_USED_RING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG_CHANGE: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The device's line to the guest: the interrupt status register and the irqfd behind it.
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Tells the guest that a queue has new used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(INT_USED_RING)
    }

    /// Tells the guest that the configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(INT_CONFIG_CHANGE)
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd the VMM registers as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device could not start when the driver set DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} is not valid in guest memory (size {size}, desc {desc:#x}, avail {avail:#x}, used {used:#x})")]
    InvalidQueue {
        index: usize,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    },
    #[error("device failed to start: {0}")]
    Device(String),
}

/// A virtio device: its identity, features, configuration space and queue processing.
pub trait VirtioDevice: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers; must include `VIRTIO_F_VERSION_1`.
    fn device_features(&self) -> u64;
    /// Features the driver accepted (a subset of `device_features`).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues. Each queue's `EventFd` becomes readable when the driver
    /// notifies that queue.
    fn activate(
        &mut self,
        mem: crate::guest_memory::GuestMemoryHandle,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops serving the queues and forgets per-driver state.
    fn reset(&mut self);
}
