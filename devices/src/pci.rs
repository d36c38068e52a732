//! A PCI bus the guest finds on its own: configuration mechanism #1 (ports 0xCF8/0xCFC), bus 0,
//! function 0 of each device, and a host bridge at 00:00.0.
//!
//! Linux probes mechanism #1 without ACPI (`arch/x86/pci/direct.c`: the address register reads
//! back what was written, and a host bridge's class code passes its sanity check), then scans
//! bus 0. Devices implement [`PciDevice`]: the bus hands them dword-indexed config accesses and
//! never interprets their registers; BARs, capabilities and interrupts are the device's own.
//! Any PCI device (a passed-through VFIO device, a virtio-pci transport) sits on the same bus.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::BusDevice;

/// The config address and data ports, as one 8-byte port range.
pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;

/// Device numbers on bus 0 (0 is the host bridge).
pub const PCI_MAX_DEVICES: u8 = 32;

/// A function on the bus, as its config space sees it.
pub trait PciDevice: Send {
    /// The config dword at register `reg` (byte offset `reg * 4`).
    fn config_read(&mut self, reg: usize) -> u32;
    /// A write of `data` (1, 2 or 4 bytes) at byte `offset` of register `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
}

type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A device's config state stays consistent between accesses.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI bus 0 is full ({PCI_MAX_DEVICES} devices)")]
    Full,
}

/// Bus 0 and the config address register: the port-I/O device at 0xCF8..0xCFF.
pub struct PciBus {
    devices: BTreeMap<u8, SharedPciDevice>,
    /// The last value written to 0xCF8.
    address: u32,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let mut devices: BTreeMap<u8, SharedPciDevice> = BTreeMap::new();
        devices.insert(0, Arc::new(Mutex::new(HostBridge::new())));
        Self {
            devices,
            address: 0,
        }
    }

    /// Puts `device` at the next free device number; returns it (the guest's `00:NN.0`).
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let slot = (1..PCI_MAX_DEVICES)
            .find(|n| !self.devices.contains_key(n))
            .ok_or(PciError::Full)?;
        self.devices.insert(slot, device);
        Ok(slot)
    }

    /// The device and register the address register selects, if it is enabled and names a
    /// function that exists (bus 0, function 0).
    fn selected(&self) -> Option<(&SharedPciDevice, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let device = ((a >> 11) & 0x1f) as u8;
        let function = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(&device).map(|d| (d, reg))
    }
}

impl BusDevice for PciBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let start = (offset - 4) as usize;
                let value = match self.selected() {
                    Some((device, reg)) => lock(device).config_read(reg),
                    // No device there: all ones, as an unanswered config read.
                    None => u32::MAX,
                };
                let bytes = value.to_le_bytes();
                let end = (start + data.len()).min(4);
                data[..end - start].copy_from_slice(&bytes[start..end]);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]])
            }
            4..=7 => {
                let start = (offset - 4) as usize;
                if start + data.len() > 4 {
                    return;
                }
                if let Some((device, reg)) = self.selected() {
                    lock(device).config_write(reg, start, data);
                }
            }
            // Byte writes to the address register (Linux's type-1 probe pokes 0xCFB) mean
            // nothing for mechanism #1.
            _ => {}
        }
    }
}

/// A host bridge: only IDs and class, so the guest's PCI probe accepts the bus.
struct HostBridge {
    config: [u32; 16],
}

/// Vendor/device of the host bridge: Intel's ID for a virtual PCIe host bridge, as other
/// rust-vmm VMMs show theirs.
const HOST_BRIDGE_VENDOR: u32 = 0x8086;
const HOST_BRIDGE_DEVICE: u32 = 0x0d57;
/// Class 06 (bridge), subclass 00 (host), revision 0.
const CLASS_HOST_BRIDGE: u32 = 0x0600_0000;

impl HostBridge {
    fn new() -> Self {
        let mut config = [0u32; 16];
        config[0] = HOST_BRIDGE_DEVICE << 16 | HOST_BRIDGE_VENDOR;
        config[2] = CLASS_HOST_BRIDGE;
        Self { config }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.get(reg).copied().unwrap_or(0)
    }

    fn config_write(&mut self, _reg: usize, _offset: usize, _data: &[u8]) {}
}

/// Reads `len` bytes at byte `offset` out of a dword value (for devices that keep dwords).
pub fn dword_bytes(value: u32, offset: usize, len: usize) -> u32 {
    let shifted = value >> (offset * 8);
    match len {
        1 => shifted & 0xff,
        2 => shifted & 0xffff,
        _ => shifted,
    }
}

/// `old` with `data` written at byte `offset`.
pub fn merge_dword(old: u32, offset: usize, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        if offset + i < 4 {
            bytes[offset + i] = *b;
        }
    }
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(bus: &mut PciBus, device: u32, reg: u32) {
        let addr = 0x8000_0000 | device << 11 | reg << 2;
        bus.write(0, &addr.to_le_bytes());
    }

    fn read32(bus: &mut PciBus) -> u32 {
        let mut d = [0u8; 4];
        bus.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn linux_type1_probe_sees_its_address_and_a_host_bridge() {
        let mut bus = PciBus::new();
        bus.write(3, &[1]);
        bus.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        bus.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        select(&mut bus, 0, 2);
        // The class word (offset 0x0a, 16 bits) is "host bridge".
        let mut w = [0u8; 2];
        bus.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        select(&mut bus, 0, 0);
        assert_eq!(read32(&mut bus), 0x0d57_8086);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let mut bus = PciBus::new();
        select(&mut bus, 5, 0);
        assert_eq!(read32(&mut bus), u32::MAX);
        // Function 1 of the host bridge, and bus 1.
        bus.write(0, &(0x8000_0000u32 | 1 << 8).to_le_bytes());
        assert_eq!(read32(&mut bus), u32::MAX);
        bus.write(0, &(0x8000_0000u32 | 1 << 16).to_le_bytes());
        assert_eq!(read32(&mut bus), u32::MAX);
        // Disabled address: nothing selected.
        bus.write(0, &0u32.to_le_bytes());
        assert_eq!(read32(&mut bus), u32::MAX);
    }

    struct Recorder(Vec<(usize, usize, Vec<u8>)>);
    impl PciDevice for Recorder {
        fn config_read(&mut self, reg: usize) -> u32 {
            reg as u32 * 0x0101_0101
        }
        fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
            self.0.push((reg, offset, data.to_vec()));
        }
    }

    #[test]
    fn devices_get_dword_registers_and_byte_offsets() {
        let mut bus = PciBus::new();
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        assert_eq!(bus.add(dev.clone()).unwrap(), 1);
        select(&mut bus, 1, 3);
        let mut b = [0u8; 1];
        bus.read(6, &mut b);
        assert_eq!(b[0], 3);
        bus.write(5, &[0xaa, 0xbb]);
        assert_eq!(dev.lock().unwrap().0, vec![(3, 1, vec![0xaa, 0xbb])]);
        assert_eq!(merge_dword(0x1122_3344, 1, &[0xaa, 0xbb]), 0x11bb_aa44);
        assert_eq!(dword_bytes(0x1122_3344, 2, 2), 0x1122);
    }
}
