//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A `Bus` is built while the VM is assembled and is immutable afterwards, so vCPU threads
//! share it without a lock; each device has its own lock, held only for one access.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest accesses to a range of addresses.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range [{base:#x}, +{len:#x}) is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range [{base:#x}, +{len:#x}) overlaps the device at [{other_base:#x}, +{other_len:#x})")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping address ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    // Keyed by base address; the value holds the range length and the device.
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let overlaps = |(&other_base, &(other_len, _)): (&u64, &(u64, SharedDevice))| {
            base < other_base + other_len && other_base < base + len
        };
        // Only the nearest ranges on either side can overlap a new one.
        let before = self.devices.range(..=base).next_back();
        let after = self.devices.range(base..).next();
        if let Some((&other_base, &(other_len, _))) =
            before.into_iter().chain(after).find(|e| overlaps(*e))
        {
            return Err(BusError::Overlap {
                base,
                len,
                other_base,
                other_len,
            });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, device))
    }

    /// Dispatches a read; returns false when no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose previous user panicked is still in a consistent state for our devices
/// (each access is self-contained), so a poisoned lock is taken over rather than propagated.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![0x41])]);
    }

    #[test]
    fn misses_outside_and_across_range_end() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0xff, &mut b[..1]));
        assert!(!bus.read(0x110, &mut b[..1]));
        // An access that starts inside but runs past the end is not the device's.
        assert!(!bus.read(0x10e, &mut b));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d(), 0x1000, 0x1000).unwrap();
        assert!(matches!(
            bus.insert(d(), 0x1800, 0x1000),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x800, 0x1000),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x0, 0x1_0000),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(d(), 0x0, 0),
            Err(BusError::InvalidRange { base: 0, len: 0 })
        );
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x2000, 0x1000).unwrap();
        bus.insert(d(), 0x0, 0x1000).unwrap();
    }
}
