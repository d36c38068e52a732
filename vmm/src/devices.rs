//! Attaching devices: one call puts a device on its bus, wires its eventfds to KVM and, for
//! virtio-mmio, announces it on the guest's command line.

use std::sync::{Arc, Mutex};

use devices::virtio::{MmioTransport, VirtioDevice, MMIO_DEVICE_SIZE};
use devices::{Bus, BusDevice, BusError};
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::loader::Cmdline;

use crate::arch::x86_64::layout::{IRQ_MAX, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error("out of interrupt lines for virtio devices (IRQs {VIRTIO_IRQ_BASE}..={IRQ_MAX} used)")]
    OutOfIrqs,
    #[error("KVM_IRQFD for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("KVM_IOEVENTFD at {addr:#x}: {source}")]
    Ioeventfd {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("adding {0:?} to the kernel command line: {1}")]
    Cmdline(String, linux_loader::cmdline::Error),
}

/// The VM's buses and the next free virtio-mmio slot.
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    next_virtio_slot: u32,
    /// IOAPIC pins above this one are taken by PCI INTx lines (handed out from the top).
    top_irq: u32,
}

impl DeviceManager {
    pub fn new() -> Self {
        Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            next_virtio_slot: 0,
            top_irq: IRQ_MAX,
        }
    }

    /// An IOAPIC pin for a PCI device's INTx line, from the top of the pins virtio devices
    /// count up through; None when they meet.
    pub fn take_pci_irq(&mut self) -> Option<u32> {
        let pin = self.top_irq;
        (pin > VIRTIO_IRQ_BASE + self.next_virtio_slot).then(|| {
            self.top_irq -= 1;
            pin
        })
    }

    /// A legacy port-I/O device, with an optional interrupt line wired through `irq_evt`.
    pub fn add_pio(
        &mut self,
        vm: &VmFd,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
        irq: Option<(&vmm_sys_util::eventfd::EventFd, u32)>,
    ) -> Result<(), DeviceError> {
        if let Some((evt, gsi)) = irq {
            vm.register_irqfd(evt, gsi)
                .map_err(|source| DeviceError::Irqfd { gsi, source })?;
        }
        self.pio.insert(device, base, len)?;
        Ok(())
    }

    /// A virtio device on the next virtio-mmio slot: MMIO bus, queue-notify ioeventfds,
    /// interrupt irqfd and `virtio_mmio.device=` on the command line, all in one place.
    pub fn add_virtio_mmio<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        cmdline: &mut Cmdline,
        transport: MmioTransport<D>,
    ) -> Result<(u64, u32), DeviceError> {
        let irq = VIRTIO_IRQ_BASE + self.next_virtio_slot;
        if irq > self.top_irq {
            return Err(DeviceError::OutOfIrqs);
        }
        let base = VIRTIO_MMIO_BASE + u64::from(self.next_virtio_slot) * MMIO_DEVICE_SIZE;
        let notify = base + devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), queue as u32)
                .map_err(|source| DeviceError::Ioeventfd {
                    addr: notify,
                    source,
                })?;
        }
        vm.register_irqfd(transport.interrupt_evt(), irq)
            .map_err(|source| DeviceError::Irqfd { gsi: irq, source })?;
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_DEVICE_SIZE)?;
        let param = format!("virtio_mmio.device=4K@{base:#x}:{irq}");
        cmdline
            .insert_str(&param)
            .map_err(|e| DeviceError::Cmdline(param.clone(), e))?;
        self.next_virtio_slot += 1;
        Ok((base, irq))
    }
}
