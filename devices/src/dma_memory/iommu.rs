//! The host IOMMU as one more pin holder: which guest ranges a passed-through device may DMA
//! to, and keeping those ranges' frames where the IOMMU maps them.
//!
//! With [`IommuPolicy::Mapped`] the IOMMU maps, at IOVA = guest physical address, exactly the
//! ranges the guest MAPped through virtio-dma, the moment they are placed, and unmaps each one
//! before its frames change hands on UNMAP. Each mapping is a long-term pin
//! ([`PinHolder::Iommu`]) on the mapping's pages, so nothing re-backs them while the device can
//! reach them; the rest of the window stays lent and movable, and guest RAM is not DMA-able.
//!
//! With [`IommuPolicy::All`] (what QEMU and Cloud Hypervisor do) the VMM maps all guest RAM
//! itself; here the window is lent whole and never moves (as a 1 GiB-page region is), since a
//! move would leave the IOMMU pointing at the old frames, and the whole window is mapped once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::map::MapError;
use super::pins::PinHolder;
use super::{lock, DmaMemory, Owner};

/// An IOMMU domain that devices DMA through (a VFIO container, an iommufd IOAS).
pub trait Iommu: Send + Sync {
    /// Lets the device reach `[iova, iova + len)` as the host memory at `host_addr`, pinning
    /// it. The owner keeps that memory mapped and its pages in place until [`Iommu::unmap`].
    fn map(&self, iova: u64, host_addr: usize, len: usize) -> std::io::Result<()>;
    /// Removes the mapping made by `map` with the same `iova` and `len`.
    fn unmap(&self, iova: u64, len: usize) -> std::io::Result<()>;
    /// Every byte the domain maps now, whoever mapped it (guest RAM too, with `All`).
    fn mapped_bytes(&self) -> u64;
}

/// Which guest memory a passed-through device may DMA to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuPolicy {
    /// Only the ranges MAPped through virtio-dma, while they are mapped.
    #[default]
    Mapped,
    /// All guest memory, for the VM's life (no lending: the window never moves).
    All,
}

/// The IOMMU a [`DmaMemory`] keeps in step with its mappings.
#[derive(Clone)]
pub struct IommuAttachment {
    pub iommu: Arc<dyn Iommu>,
    pub policy: IommuPolicy,
}

/// What the IOMMU side did, for `dmavisor stat`.
#[derive(Clone, Copy, Debug, Default)]
pub struct IommuStats {
    pub policy: Option<IommuPolicy>,
    /// Ranges mapped now, and their bytes (with `All`: the window, mapped once).
    pub ranges: u64,
    pub mapped_bytes: u64,
    /// Every byte the IOMMU maps now (guest RAM too, with `All`).
    pub total_bytes: u64,
    /// IOMMU map and unmap calls so far, and their total time.
    pub maps: u64,
    pub unmaps: u64,
    pub map_ns: u64,
    pub unmap_ns: u64,
    /// MAPs refused because the IOMMU would not map the range.
    pub map_failures: u64,
}

impl Owner {
    pub(super) fn iommu_mapped(&self) -> Option<&Arc<dyn Iommu>> {
        self.iommu
            .as_ref()
            .filter(|a| a.policy == IommuPolicy::Mapped)
            .map(|a| &a.iommu)
    }

    /// Maps a range the guest just MAPped (its pages are on its frames now) into the IOMMU, as
    /// a long-term pin. On failure nothing stays pinned or mapped.
    pub(super) fn iommu_map(&self, memory: &DmaMemory, gpa: u64, len: u64) -> Result<(), MapError> {
        let Some(iommu) = self.iommu_mapped() else {
            return Ok(());
        };
        let pin = memory
            .pin_longterm(gpa, len, PinHolder::Iommu)
            .map_err(|e| MapError::Io(format!("pinning the range for the IOMMU: {e}")))?;
        let page = self.window.page_of(gpa);
        let page_base = self.window.page_gpa(page);
        let host = self.window.page_addr(page) + (gpa - page_base) as usize;
        let t = Instant::now();
        if let Err(e) = iommu.map(gpa, host, len as usize) {
            self.counters.map_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(gpa, len, "IOMMU map refused: {e}");
            return Err(MapError::Io(format!("IOMMU map: {e}")));
        }
        self.counters
            .map_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.counters.maps.fetch_add(1, Ordering::Relaxed);
        lock(&self.iommu_pins).insert(gpa, (pin, len));
        Ok(())
    }

    /// Takes a range out of the IOMMU before its frames are given back; the pin goes with it.
    /// If the IOMMU refuses, the mapping stays whole (DMA may still reach it).
    pub(super) fn iommu_unmap(&self, gpa: u64, len: u64) -> Result<(), MapError> {
        let Some(iommu) = self.iommu_mapped() else {
            return Ok(());
        };
        let t = Instant::now();
        iommu
            .unmap(gpa, len as usize)
            .map_err(|e| MapError::Io(format!("IOMMU unmap: {e}")))?;
        self.counters
            .unmap_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.counters.unmaps.fetch_add(1, Ordering::Relaxed);
        drop(lock(&self.iommu_pins).remove(&gpa));
        Ok(())
    }
}

/// Counters of the IOMMU side.
#[derive(Default)]
pub(super) struct IommuCounters {
    pub maps: std::sync::atomic::AtomicU64,
    pub unmaps: std::sync::atomic::AtomicU64,
    pub map_ns: std::sync::atomic::AtomicU64,
    pub unmap_ns: std::sync::atomic::AtomicU64,
    pub map_failures: std::sync::atomic::AtomicU64,
}

impl DmaMemory {
    /// The IOMMU side's state.
    pub fn iommu_stats(&self) -> IommuStats {
        let o = &self.inner;
        let c = &o.counters;
        let (ranges, mapped_bytes) = match o.iommu.as_ref().map(|a| a.policy) {
            Some(IommuPolicy::All) => (1, o.window.len),
            Some(IommuPolicy::Mapped) => {
                let pins = lock(&o.iommu_pins);
                (pins.len() as u64, pins.values().map(|(_, len)| len).sum())
            }
            None => (0, 0),
        };
        IommuStats {
            policy: o.iommu.as_ref().map(|a| a.policy),
            ranges,
            mapped_bytes,
            total_bytes: o.iommu.as_ref().map_or(0, |a| a.iommu.mapped_bytes()),
            maps: c.maps.load(Ordering::Relaxed),
            unmaps: c.unmaps.load(Ordering::Relaxed),
            map_ns: c.map_ns.load(Ordering::Relaxed),
            unmap_ns: c.unmap_ns.load(Ordering::Relaxed),
            map_failures: c.map_failures.load(Ordering::Relaxed),
        }
    }

    /// Whether window page `page` is mapped in the IOMMU (a device may DMA to it).
    pub fn iommu_maps_page(&self, page: usize) -> bool {
        let o = &self.inner;
        match o.iommu.as_ref().map(|a| a.policy) {
            Some(IommuPolicy::All) => true,
            Some(IommuPolicy::Mapped) => {
                let addr = o.window.page_gpa(page);
                lock(&o.iommu_pins)
                    .range(..=addr)
                    .next_back()
                    .is_some_and(|(&gpa, (p, _))| addr < gpa + p.len)
            }
            None => false,
        }
    }
}
