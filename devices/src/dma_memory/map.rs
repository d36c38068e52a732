//! MAP and UNMAP: making a guest range host-contiguous, and giving it back.
//!
//! A MAP takes a host-contiguous piece of the region and makes the guest range use it by
//! remapping the window's host mapping onto the region's pages. KVM follows the host mapping
//! through its MMU notifier, and the VMM's view of guest memory is the same mapping, so the
//! guest, its devices and the VMM all see the new backing at once. The usual case needs no copy:
//! the range's pages are already lent on a suitable run of frames, which just change hands.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cma::{AllocError, AllocRequest, Allocation, OccupyError, Policy};

use super::window::{occupant, Backing};
use super::{lock, DmaMemory, Owner, PIN_WAIT_SLICE};

/// How a MAP may be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// Never wait; skip placements with pinned pages.
    pub failfast: bool,
    /// The guest does not need the range's current contents.
    pub discard: bool,
    /// How long the placement may retry (ignored with `failfast`).
    pub deadline: Duration,
}

/// Where a mapping landed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Host-physical address if `host_phys`, else the offset in the region.
    pub host_addr: u64,
    pub host_phys: bool,
    /// The offset in the region, always (what a device tells a guest that may not learn
    /// host-physical addresses).
    pub region_offset: u64,
    /// Index of the host-contiguous extent that holds the mapping.
    pub extent: u64,
    /// Bytes of other occupants moved to make room.
    pub bytes_migrated: u64,
}

/// Why a MAP could not be placed. A failed MAP changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("no host-contiguous extent is that large")]
    TooBig,
    #[error("no room in the region")]
    NoMem,
    #[error("every placement with room has a pinned page")]
    Busy,
    #[error("the deadline passed")]
    Timeout,
    #[error("the range is not a mapping of that length")]
    NotMapped,
    #[error("host failure: {0}")]
    Io(String),
}

/// What a device needs of guest DMA memory: make guest ranges host-contiguous and give them
/// back. Implemented by [`DmaMemory`]; a host-wide manager serving several VMs would implement
/// it per VM.
pub trait DmaMapper: Send + Sync {
    /// Backs `[gpa, gpa + len)` with host-contiguous, pinned memory. The range is whole
    /// granules, or whole [`SUB_PAGE`]s inside one granule.
    fn map(&self, gpa: u64, len: u64, opts: MapOptions) -> Result<Placement, MapError>;
    /// Ends the mapping at `gpa` of `len` bytes; the range keeps its contents. Never waits for
    /// a MAP.
    fn unmap(&self, gpa: u64, len: u64) -> Result<(), MapError>;
    /// Whether placements carry host-physical addresses.
    fn host_phys(&self) -> bool;
}

/// Where a MAP's time went (ns): waiting for the layout lock and trying its own frames in place
/// (including a wait for a transient pin on them), the allocation elsewhere (which migrates the
/// pages lent there), remapping the window onto the new frames (with the copy of the range's
/// bytes without DISCARD), and freeing the frames the range's pages had.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapPhases {
    pub claim_ns: u64,
    pub alloc_ns: u64,
    pub remap_ns: u64,
    pub release_ns: u64,
}

/// One live DMA mapping, as the owner placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    /// Guest physical address and length the guest MAPped.
    pub gpa: u64,
    pub len: u64,
    /// Where its frames are in the region.
    pub region_offset: u64,
    /// The window's address of `gpa` in the VMM: its pages are the region's frames, so the
    /// VMM's `/proc/PID/pagemap` at this address shows them (unless the region is a dma-buf,
    /// whose `VM_PFNMAP` mapping pagemap does not walk).
    pub host_addr: u64,
    /// Host physical address of the first byte, when the region's frames are known; the
    /// mapping is one physical extent by construction (an allocation never crosses extents).
    pub phys: Option<u64>,
}

impl DmaMemory {
    /// Every live DMA mapping, by guest address.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        let window = &self.inner.window;
        lock(&self.inner.mappings)
            .iter()
            .map(|(&gpa, a)| MappingInfo {
                gpa,
                len: a.len() as u64,
                region_offset: a.offset() as u64,
                host_addr: window.page_addr(window.page_of(gpa)) as u64,
                phys: a.phys_addr(),
            })
            .collect()
    }
}

fn map_error(e: AllocError) -> MapError {
    match e {
        AllocError::LargerThanExtent { .. } => MapError::TooBig,
        AllocError::NoRoom { .. } => MapError::NoMem,
        AllocError::AllCandidatesPinned { .. } => MapError::Busy,
        AllocError::DeadlinePassed { .. } | AllocError::PinWaitTimedOut { .. } => MapError::Timeout,
        other => MapError::Io(other.to_string()),
    }
}

/// The largest power of two that divides `len`, capped: a buffer is aligned to its own size up
/// to a pageblock, as the guest's CMA aligns it.
fn natural_align(len: u64) -> usize {
    let low = 1u64 << len.trailing_zeros().min(63);
    low.min(2 << 20) as usize
}

/// Why the range's own run of frames could not be claimed in place.
enum InPlace {
    /// The pages are not lent on a suitable run: go elsewhere.
    NoRun,
    /// The run is there but a frame of it is pinned or being moved: worth a short wait.
    Busy,
}

/// The unit of a MAP inside one window page: a guest page.
pub const SUB_PAGE: u64 = 4096;

impl DmaMapper for DmaMemory {
    fn map(&self, gpa: u64, len: u64, opts: MapOptions) -> Result<Placement, MapError> {
        let t = Instant::now();
        let (first, n) = self
            .pages_of(gpa, len)
            .map_err(|e| MapError::Io(e.to_string()))?;
        let page = self.granule() as u64;
        if !len.is_multiple_of(page) || !gpa.is_multiple_of(page) {
            if n == 1 && gpa.is_multiple_of(SUB_PAGE) && len.is_multiple_of(SUB_PAGE) {
                return self.map_in_page(first, gpa, len, opts, t);
            }
            return Err(MapError::Io(format!(
                "MAP of {len:#x} at {gpa:#x} is neither whole {page}-byte pages nor whole \
                 {SUB_PAGE}-byte pages inside one"
            )));
        }
        let (alloc, placement, phases) = self.inner.map_pages(first, n, opts)?;
        // A passed-through device may DMA to the range from now on; the guest learns of the
        // mapping only once the IOMMU has it.
        if let Err(e) = self.inner.iommu_map(self, gpa, len) {
            self.inner.unmap_pages(first, alloc);
            return Err(e);
        }
        lock(&self.inner.mappings).insert(gpa, alloc);
        self.inner.samples.record(
            t.elapsed().as_nanos() as u64,
            placement.bytes_migrated,
            phases,
        );
        Ok(placement)
    }

    fn unmap(&self, gpa: u64, len: u64) -> Result<(), MapError> {
        let (first, n) = self.pages_of(gpa, len).map_err(|_| MapError::NotMapped)?;
        let page = self.granule() as u64;
        if !len.is_multiple_of(page) || !gpa.is_multiple_of(page) {
            return if n == 1 {
                self.unmap_in_page(first, gpa, len)
            } else {
                Err(MapError::NotMapped)
            };
        }
        // A page shared by shorter MAPs ends with the last of them, never as a whole.
        if lock(&self.inner.shared).contains_key(&first) {
            return Err(MapError::NotMapped);
        }
        match lock(&self.inner.mappings).get(&gpa) {
            Some(a) if a.len() as u64 == len => {}
            _ => return Err(MapError::NotMapped),
        }
        // Out of the IOMMU first: no DMA reaches the frames once they change hands. If the
        // IOMMU refuses, the mapping stays as it was.
        self.inner.iommu_unmap(gpa, len)?;
        let alloc = lock(&self.inner.mappings)
            .remove(&gpa)
            .ok_or(MapError::NotMapped)?;
        self.inner
            .unmap_pages(self.inner.window.page_of(gpa), alloc);
        Ok(())
    }

    fn host_phys(&self) -> bool {
        self.region().extents().iter().any(|e| e.phys.is_some())
    }
}

impl DmaMemory {
    /// A MAP inside window page `page`, shorter than it (a 1 MiB buffer on 2 MiB pages): the
    /// page is mapped whole by the first such MAP (its frame then holds still, and is the
    /// host-contiguous backing of every MAP inside it) and given back with the last. The page's
    /// other bytes are the guest's too, so they move with it: DISCARD does not apply.
    fn map_in_page(
        &self,
        page: usize,
        gpa: u64,
        len: u64,
        opts: MapOptions,
        t: Instant,
    ) -> Result<Placement, MapError> {
        let o = &self.inner;
        let base = o.window.page_gpa(page);
        let mut shared = lock(&o.shared);
        let (placement, phases) = match shared.get(&page) {
            Some(inside) => {
                let overlaps = inside
                    .range(..gpa + len)
                    .next_back()
                    .is_some_and(|(&start, &l)| start + l > gpa);
                if overlaps {
                    return Err(MapError::Io("range overlaps a mapping".into()));
                }
                let alloc_placement = lock(&o.mappings)
                    .get(&base)
                    .map(|a| o.placement(a, 0))
                    .ok_or_else(|| MapError::Io("a shared page lost its mapping".into()))?;
                o.iommu_map(self, gpa, len)?;
                (alloc_placement, MapPhases::default())
            }
            None => {
                if lock(&o.mappings).contains_key(&base) {
                    return Err(MapError::Io("range overlaps a mapping".into()));
                }
                let keep = MapOptions {
                    discard: false,
                    ..opts
                };
                let (alloc, placement, phases) = o.map_pages(page, 1, keep)?;
                if let Err(e) = o.iommu_map(self, gpa, len) {
                    o.unmap_pages(page, alloc);
                    return Err(e);
                }
                lock(&o.mappings).insert(base, alloc);
                (placement, phases)
            }
        };
        shared.entry(page).or_default().insert(gpa, len);
        drop(shared);
        o.samples.record(
            t.elapsed().as_nanos() as u64,
            placement.bytes_migrated,
            phases,
        );
        let off = gpa - base;
        Ok(Placement {
            host_addr: placement.host_addr + off,
            region_offset: placement.region_offset + off,
            ..placement
        })
    }

    /// Ends a MAP made by [`DmaMemory::map_in_page`]; the page is given back with the last.
    fn unmap_in_page(&self, page: usize, gpa: u64, len: u64) -> Result<(), MapError> {
        let o = &self.inner;
        let mut shared = lock(&o.shared);
        let inside = shared.get_mut(&page).ok_or(MapError::NotMapped)?;
        if inside.get(&gpa) != Some(&len) {
            return Err(MapError::NotMapped);
        }
        o.iommu_unmap(gpa, len)?;
        inside.remove(&gpa);
        if inside.is_empty() {
            shared.remove(&page);
            let base = o.window.page_gpa(page);
            let alloc = lock(&o.mappings)
                .remove(&base)
                .ok_or_else(|| MapError::Io("a shared page lost its mapping".into()))?;
            o.unmap_pages(page, alloc);
        }
        Ok(())
    }
}

impl Owner {
    fn placement(&self, alloc: &Allocation, copied: u64) -> Placement {
        Placement {
            host_addr: alloc.phys_addr().unwrap_or(alloc.offset() as u64),
            host_phys: alloc.phys_addr().is_some(),
            region_offset: alloc.offset() as u64,
            extent: alloc.extent() as u64,
            bytes_migrated: alloc.migrated_frames() as u64 * self.window.page as u64 + copied,
        }
    }

    /// Takes the layout lock if no page of `first..first + n` is pinned long-term. A pinned
    /// page's host page cannot change, so the range cannot be re-backed; a long-term pin is not
    /// worth waiting for (it lasts as long as its holder wants), so the MAP fails at once with
    /// BUSY, FAILFAST or not, as Linux's `alloc_contig_range()` fails on a long-term pinned page
    /// and `cma_alloc()` moves on to another range.
    fn lock_unpinned(
        &self,
        first: usize,
        n: usize,
    ) -> Result<std::sync::MutexGuard<'_, ()>, MapError> {
        let layout = lock(&self.layout);
        let pinned = self.window.lock().table[first..first + n]
            .iter()
            .position(|s| s.pinned());
        if let Some(i) = pinned {
            tracing::debug!(
                page = first + i,
                "MAP: a page of the range is pinned long-term"
            );
            self.longterm_refusals.fetch_add(1, Ordering::Relaxed);
            return Err(MapError::Busy);
        }
        Ok(layout)
    }

    fn map_pages(
        &self,
        first: usize,
        n: usize,
        opts: MapOptions,
    ) -> Result<(Allocation, Placement, MapPhases), MapError> {
        let page = self.window.page;
        let t0 = Instant::now();
        let mut phases = MapPhases::default();
        let len = (n * page) as u64;
        let deadline = Instant::now() + opts.deadline.min(Duration::from_secs(10));
        let policy = if opts.failfast {
            Policy::FailFast
        } else {
            Policy::Retry { deadline }
        };
        let align = natural_align(len).max(page);
        let _layout = self.lock_unpinned(first, n)?;
        self.reap();
        // Without FAILFAST, a busy frame of the range's own run is worth waiting for as long as
        // half the copy that going elsewhere would cost (at about 1 GiB/s): the wait then never
        // makes the MAP slower than the move would have.
        let budget = if opts.failfast {
            Instant::now()
        } else {
            (Instant::now() + Duration::from_nanos(len / 2)).min(deadline)
        };
        let claimed = self.claim_in_place_within(first, n, align, budget);
        phases.claim_ns = t0.elapsed().as_nanos() as u64;
        if let Some(alloc) = claimed {
            let placement = self.placement(&alloc, 0);
            return Ok((alloc, placement, phases));
        }
        if self.window.fixed {
            // Nothing moves in a region lent whole: a range larger than any extent is TOOBIG; one
            // whose own frames are busy, that straddles two huge pages that are not adjacent, or
            // that lies past the region is refused with BUSY, and the guest's CMA tries another.
            return Err(if len as usize > self.window.region().largest_extent() {
                MapError::TooBig
            } else {
                MapError::Busy
            });
        }
        let request = AllocRequest::new(len as usize).align(align).policy(policy);
        let t_alloc = Instant::now();
        let alloc = self.allocator.alloc(request).map_err(map_error)?;
        let alloc_time = t_alloc.elapsed();
        phases.alloc_ns = alloc_time.as_nanos() as u64;
        self.check_contiguous(&alloc)?;
        // The allocation may have moved some of the range's own pages: look now.
        let before: Vec<Backing> = self.window.lock().table[first..first + n]
            .iter()
            .map(|s| s.backing)
            .collect();
        if before.iter().any(|b| matches!(b, Backing::Mapped(_))) {
            return Err(MapError::Io("range overlaps a mapping".into()));
        }
        let lent: Vec<(usize, usize)> = before
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                Backing::Lent(f) => Some((first + i, *f)),
                _ => None,
            })
            .collect();
        let t_release = Instant::now();
        if !opts.discard {
            self.release_lent(&lent, &opts, deadline)?;
        }
        phases.release_ns = t_release.elapsed().as_nanos() as u64;
        let f0 = alloc.frames().start;
        let t_remap = Instant::now();
        let remapped = {
            // Without DISCARD the guest's bytes move with the range: stop writers first.
            let _moving = (!opts.discard).then(|| self.window.gate.begin());
            let kept = if opts.discard {
                Ok(())
            } else {
                self.window
                    .protect(first, n, false)
                    .and_then(|()| self.window.copy_into_frames(first, n, f0))
            };
            kept.and_then(|()| self.window.map_frames(first, f0, n))
        };
        if let Err(e) = remapped {
            let _ = self.window.protect(first, n, true);
            return Err(MapError::Io(format!("remapping the window: {e}")));
        }
        phases.remap_ns = t_remap.elapsed().as_nanos() as u64;
        let t_release = Instant::now();
        if opts.discard {
            self.release_lent(&lent, &opts, deadline)?;
        }
        phases.release_ns += t_release.elapsed().as_nanos() as u64;
        {
            let mut pages = self.window.lock();
            for i in 0..n {
                pages.table[first + i].backing = Backing::Mapped(f0 + i);
            }
        }
        let copied = if opts.discard { 0 } else { len };
        let placement = self.placement(&alloc, copied);
        tracing::debug!(
            ?alloc_time,
            total = ?t_alloc.elapsed(),
            migrated = alloc.migrated_frames(),
            failfast = opts.failfast,
            "MAP placed elsewhere"
        );
        Ok((alloc, placement, phases))
    }

    fn unmap_pages(&self, first: usize, alloc: Allocation) {
        // The pages keep their frames and contents (and any pins on them): the mapping's frames
        // are lent to them.
        let n = alloc.frames().len();
        let occupants: Vec<_> = (first..first + n).map(occupant).collect();
        let mut pages = self.window.lock();
        let f0 = alloc.frames().start;
        match self.allocator.into_occupants(alloc, &occupants) {
            Ok(()) => {
                for i in 0..n {
                    pages.table[first + i].backing = Backing::Lent(f0 + i);
                }
            }
            Err((alloc, e)) => {
                // The range keeps the region's pages; leaking the allocation is the safe
                // choice: the guest may still use them.
                tracing::error!("unmapping pages {first}..+{n}: {e}; region pages leaked");
                std::mem::forget(alloc);
            }
        }
    }

    /// Never hand the guest a range that is not host-contiguous: the allocation must lie inside
    /// one of the region's extents, at the physical address that extent implies.
    fn check_contiguous(&self, alloc: &Allocation) -> Result<(), MapError> {
        let (start, end) = (alloc.offset(), alloc.offset() + alloc.len());
        let region = self.window.region();
        let extent = region
            .extents()
            .get(alloc.extent())
            .filter(|e| e.offset <= start && end <= e.end());
        let phys_ok = match (extent.and_then(|e| e.phys), alloc.phys_addr()) {
            (Some(base), Some(phys)) => {
                phys == base + (start - extent.map_or(0, |e| e.offset)) as u64
            }
            (None, None) => true,
            _ => false,
        };
        if extent.is_none() || !phys_ok {
            tracing::error!(?alloc, "allocation is not inside one extent; refused");
            return Err(MapError::Io(
                "allocation straddles host-contiguous extents".into(),
            ));
        }
        Ok(())
    }

    /// The address the guest is told for frame `f` (physical where known), for alignment.
    fn frame_addr(&self, f: usize) -> u64 {
        let off = f * self.window.page;
        self.window
            .region()
            .extents()
            .iter()
            .find(|e| e.offset <= off && off < e.end())
            .and_then(|e| e.phys.map(|p| p + (off - e.offset) as u64))
            .unwrap_or(off as u64)
    }

    /// The MAP's fast path: the range's pages are lent on a suitably aligned run of frames, so
    /// the frames just change hands. No copy, no remap.
    fn claim_in_place(&self, first: usize, n: usize, align: usize) -> Result<Allocation, InPlace> {
        let mut pages = self.window.lock();
        let Backing::Lent(f0) = pages.table[first].backing else {
            return Err(InPlace::NoRun);
        };
        let run = (0..n).all(|i| pages.table[first + i].backing == Backing::Lent(f0 + i));
        if !run || !self.frame_addr(f0).is_multiple_of(align as u64) {
            return Err(InPlace::NoRun);
        }
        let occupants: Vec<_> = (first..first + n).map(occupant).collect();
        let alloc = self
            .allocator
            .claim_occupied(f0, &occupants)
            .map_err(|e| match e {
                OccupyError::Pinned { .. } | OccupyError::Migrating { .. } => InPlace::Busy,
                _ => InPlace::NoRun,
            })?;
        for i in 0..n {
            pages.table[first + i].backing = Backing::Mapped(f0 + i);
        }
        Ok(alloc)
    }

    /// The in-place claim, waiting out a busy frame for at most `budget` (a transient pin lasts
    /// about one I/O; moving the range elsewhere costs a copy).
    fn claim_in_place_within(
        &self,
        first: usize,
        n: usize,
        align: usize,
        budget: Instant,
    ) -> Option<Allocation> {
        let mut waited = false;
        loop {
            match self.claim_in_place(first, n, align) {
                Ok(alloc) => return Some(alloc),
                Err(InPlace::Busy) if Instant::now() < budget => {
                    if !waited {
                        waited = true;
                        self.pin_waits.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(50))
                }
                Err(_) => return None,
            }
        }
    }

    /// Frees the frames the range's pages were lent on. Without DISCARD the contents still
    /// matter, so a pinned frame (someone may be writing it) is waited for, within the request's
    /// policy; with DISCARD it is left to be freed when unpinned (an orphan).
    fn release_lent(
        &self,
        lent: &[(usize, usize)],
        opts: &MapOptions,
        deadline: Instant,
    ) -> Result<(), MapError> {
        let mut freed = Vec::new();
        for &(p, f) in lent {
            loop {
                match self.allocator.vacate(f, occupant(p)) {
                    Ok(()) => {
                        freed.push((p, f));
                        break;
                    }
                    Err(_) if opts.discard => {
                        self.window.lock().orphans.push((f, occupant(p)));
                        break;
                    }
                    Err(e) if opts.failfast || Instant::now() >= deadline => {
                        // Give back what was already freed: nobody took it (MAPs hold the
                        // layout lock, and nothing places occupants meanwhile).
                        for &(p, f) in &freed {
                            let _ = self.allocator.place_occupant_at(f, occupant(p));
                        }
                        tracing::debug!("MAP: page {p} of the range: {e}");
                        return Err(if opts.failfast {
                            MapError::Busy
                        } else {
                            MapError::Timeout
                        });
                    }
                    Err(_) => std::thread::sleep(PIN_WAIT_SLICE),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[test]
fn natural_alignment_is_capped_at_a_pageblock() {
    assert_eq!(natural_align(4096), 4096);
    assert_eq!(natural_align(3 * 4096), 4096);
    assert_eq!(natural_align(64 << 10), 64 << 10);
    assert_eq!(natural_align(16 << 20), 2 << 20);
}
