//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2).
//!
//! Each device occupies one 4 KiB page of guest-physical space and one interrupt line. Queue
//! notifications arrive on per-queue eventfds: the VMM registers them as KVM ioeventfds on the
//! QueueNotify register so the vCPU never exits for them; a notify that does reach us (no
//! ioeventfd) is forwarded to the same eventfd.

use std::sync::Arc;

use virtio_bindings::virtio_config;
use virtio_bindings::virtio_mmio as mmio;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::guest_memory::GuestMemoryHandle;
use vm_memory::GuestAddressSpace;

/// Guest-physical bytes each virtio-mmio device occupies.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the VMM places ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

const MAGIC: u32 = 0x7472_6976; // "virt"; virtio-bindings has only the register's offset
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x444d_4156; // "VAMD" little-endian: "DMAV"
const CONFIG_SPACE_OFFSET: u64 = mmio::VIRTIO_MMIO_CONFIG as u64;

// Register offsets (virtio 1.2 §4.2.2), as `u64` for matching on bus offsets.
const REG_MAGIC_VALUE: u64 = mmio::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = mmio::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = mmio::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = mmio::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = mmio::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = mmio::VIRTIO_MMIO_QUEUE_READY as u64;
const REG_QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const REG_INTERRUPT_STATUS: u64 = mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = mmio::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_AVAIL_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_AVAIL_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_USED_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_USED_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = mmio::VIRTIO_MMIO_CONFIG_GENERATION as u64;

const STATUS_ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
const STATUS_DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
const STATUS_FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;

/// A virtio device behind its MMIO register page.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryHandle,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; `interrupt_evt` is the eventfd the VMM wires to this slot's irqfd.
    pub fn new(device: D, mem: GuestMemoryHandle, interrupt_evt: EventFd) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue size {max}: {e:?}"),
                )
            })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds, in queue order, for KVM ioeventfd registration.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd, for KVM irqfd registration.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only while the driver is configuring, before DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            tracing::warn!(
                "virtio-mmio: queue register write outside the configuration phase ignored"
            );
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(QueueT::reset);
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, in the order the spec gives (§3.1.1).
        if new & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: status {new:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = new & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK clear tells the driver its feature set was refused.
            self.status = new & !STATUS_FEATURES_OK;
            return;
        }
        self.status = new;
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            tracing::warn!("virtio-mmio: driver acked features {unknown:#x} that were not offered");
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!(
                "virtio-mmio: legacy drivers are not supported (VIRTIO_F_VERSION_1 not acked)"
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let needed = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        if self.status & needed != needed || self.activated {
            tracing::warn!(
                "virtio-mmio: DRIVER_OK in status {:#x}; not activating",
                self.status
            );
            self.fail();
            return;
        }
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&*self.mem.memory()) {
                tracing::warn!("virtio-mmio: queue {index} invalid at activation");
                self.fail();
                return;
            }
        }
        // The device gets its own copies; the transport keeps the registers' view.
        let queues: Vec<Queue> = self.queues.iter().map(copy_queue).collect();
        let evts = match self.queue_evts.iter().map(EventFd::try_clone).collect() {
            Ok(evts) => evts,
            Err(e) => {
                tracing::error!("virtio-mmio: cloning queue eventfds: {e}");
                self.fail();
                return;
            }
        };
        self.device.set_acked_features(self.driver_features);
        match self
            .device
            .activate(self.mem.clone(), queues, evts, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!(
                    "virtio-mmio: device type {} failed to activate: {e}",
                    self.device.device_type()
                );
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        let _ = self.interrupt.signal_config_change();
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let split = |old: u64, high: bool| {
            if high {
                (old & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(v)
            }
        };
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
                    tracing::warn!("virtio-mmio: feature write after FEATURES_OK ignored");
                } else if self.driver_features_sel < 2 {
                    self.driver_features =
                        split(self.driver_features, self.driver_features_sel == 1);
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => self.update_queue(|q| q.set_size(v as u16)),
            REG_QUEUE_READY => self.update_queue(|q| q.set_ready(v == 1)),
            REG_QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => tracing::warn!("virtio-mmio: notify for queue {v} that does not exist"),
            },
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_AVAIL_LOW => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_AVAIL_HIGH => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_USED_LOW => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_USED_HIGH => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x} = {v:#x}"),
        }
    }
}

fn copy_queue(q: &Queue) -> Queue {
    // `Queue` is not `Clone`; rebuild it from the registers the driver wrote.
    let mut copy = Queue::new(q.max_size()).expect("max size was valid when first built");
    copy.set_size(q.size());
    copy.set_desc_table_address(
        Some(q.desc_table() as u32),
        Some((q.desc_table() >> 32) as u32),
    );
    copy.set_avail_ring_address(
        Some(q.avail_ring() as u32),
        Some((q.avail_ring() >> 32) as u32),
    );
    copy.set_used_ring_address(
        Some(q.used_ring() as u32),
        Some((q.used_ring() >> 32) as u32),
    );
    copy.set_ready(q.ready());
    copy
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            tracing::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} is not a register access",
                data.len()
            );
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (true, Ok(bytes)) = (offset.is_multiple_of(4), <[u8; 4]>::try_from(data)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} is not a register access",
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

    struct Dummy {
        acked: u64,
        activations: usize,
        resets: usize,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn set_acked_features(&mut self, acked: u64) {
            self.acked = acked;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.config[o..o + data.len()]);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.config[o..o + data.len()].copy_from_slice(data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryHandle,
            queues: Vec<Queue>,
            evts: Vec<EventFd>,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues.len(), evts.len());
            self.activations += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn transport() -> MmioTransport<Dummy> {
        let mem = GuestMemoryHandle::new(
            vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let dev = Dummy {
            acked: 0,
            activations: 0,
            resets: 0,
            config: [7; 8],
        };
        MmioTransport::new(dev, mem, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap()
    }

    fn rd(t: &mut MmioTransport<Dummy>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<Dummy>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport<Dummy>, features: u64) {
        wr(t, 0x70, STATUS_ACKNOWLEDGE);
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, 0x24, 0);
        wr(t, 0x20, features as u32);
        wr(t, 0x24, 1);
        wr(t, 0x20, (features >> 32) as u32);
        wr(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport<Dummy>, index: u32, size: u32, base: u32) {
        wr(t, 0x30, index);
        wr(t, 0x38, size);
        wr(t, 0x80, base);
        wr(t, 0x90, base + 0x1000);
        wr(t, 0xa0, base + 0x2000);
        wr(t, 0x44, 1);
    }

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(rd(&mut t, 0x00), MAGIC);
        assert_eq!(rd(&mut t, 0x04), 2);
        assert_eq!(rd(&mut t, 0x08), 42);
        wr(&mut t, 0x30, 1);
        assert_eq!(rd(&mut t, 0x34), 8);
        wr(&mut t, 0x30, 9);
        assert_eq!(
            rd(&mut t, 0x34),
            0,
            "a queue that does not exist has max size 0"
        );
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 is bit 32");
    }

    #[test]
    fn full_negotiation_activates_with_acked_features() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b1);
        assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(t.device().activations, 1);
        assert_eq!(t.device().acked, VIRTIO_F_VERSION_1 | 0b1);
        assert_eq!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn features_not_offered_or_legacy_are_refused() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        wr(&mut t, 0x70, 0);
        negotiate(&mut t, 0b1);
        assert_eq!(
            rd(&mut t, 0x70) & STATUS_FEATURES_OK,
            0,
            "legacy driver refused"
        );
    }

    #[test]
    fn queue_outside_guest_memory_fails_activation() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x4000_0000);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(t.device().activations, 0);
        assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, 0x60) & 2, 2, "config-change interrupt raised");
    }

    #[test]
    fn queue_registers_locked_after_driver_ok_and_reset_clears() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x44, 0);
        assert_eq!(rd(&mut t, 0x44), 1, "ready cannot be cleared while running");
        wr(&mut t, 0x70, 0);
        assert_eq!(t.device().resets, 1);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x44), 0);
    }

    #[test]
    fn notify_and_interrupt_ack() {
        let mut t = transport();
        wr(&mut t, 0x50, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        wr(&mut t, 0x50, 7); // no such queue: ignored, no panic
        t.interrupt.signal_used_queue().unwrap();
        assert_eq!(rd(&mut t, 0x60), 1);
        wr(&mut t, 0x64, 1);
        assert_eq!(rd(&mut t, 0x60), 0);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let mut t = transport();
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [7, 7]);
        t.write(0x100, &[1]);
        t.read(0x100, &mut b);
        assert_eq!(b, [1, 7]);
        assert_eq!(rd(&mut t, 0xfc), 1, "generation bumps on config write");
        let mut one = [0xaau8; 1];
        t.read(0x00, &mut one);
        assert_eq!(one, [0], "sub-word register reads return zero");
    }
}
