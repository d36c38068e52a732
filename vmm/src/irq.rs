//! The VM's interrupt routing table: the one owner of `KVM_SET_GSI_ROUTING`.
//!
//! KVM replaces the whole table on every call, so the legacy routes (the PIC and IOAPIC pins
//! that the serial port and virtio-mmio devices raise through irqfds) and every MSI route live
//! here together. A device gets a GSI once, wires its eventfd to it with an irqfd, and points
//! the GSI at the message its guest driver programmed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// IOAPIC pins (GSIs 0..24); message-signalled GSIs come after them.
const IOAPIC_PINS: u32 = 24;

/// An MSI as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    next: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(RouterState {
                next: IOAPIC_PINS,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// A GSI of its own for a message-signalled interrupt (no route until [`Self::set_msi`]).
    pub fn allocate(&self) -> u32 {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = s.next;
        s.next += 1;
        gsi
    }

    /// Routes `gsi` to `msg` (what the guest wrote into the device's MSI capability).
    pub fn set_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.msi.insert(gsi, msg);
        self.apply(&s)
    }

    /// Removes `gsi`'s route: its irqfd then delivers nothing.
    pub fn clear(&self, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.msi.remove(&gsi).is_some() {
            self.apply(&s)?;
        }
        Ok(())
    }

    fn apply(&self, s: &RouterState) -> Result<(), kvm_ioctls::Error> {
        let entries = routing_entries(&s.msi);
        let mut table = KvmIrqRouting::new(entries.len()).map_err(|_| {
            kvm_ioctls::Error::new(libc::E2BIG) // more routes than KVM_MAX_IRQ_ROUTES
        })?;
        table.as_mut_slice().copy_from_slice(&entries);
        self.vm.set_gsi_routing(&table)
    }
}

/// KVM's default legacy routes (GSI n on IOAPIC pin n, and on the PICs below 16), then `msi`.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            v.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        v.push(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_stay_when_msi_routes_come_and_go() {
        let mut msi = BTreeMap::new();
        let legacy = routing_entries(&msi);
        // 16 PIC pins and 24 IOAPIC pins.
        assert_eq!(legacy.len(), 40);
        msi.insert(
            24,
            MsiMessage {
                address: 0x1_fee0_0000,
                data: 0x4041,
            },
        );
        let all = routing_entries(&msi);
        assert_eq!(all.len(), 41);
        let e = all[40];
        assert_eq!((e.gsi, e.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI entry just above.
        let m = unsafe { e.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_0000, 1, 0x4041)
        );
    }
}
