//! The one owner of the host side of guest DMA memory.
//!
//! [`DmaMemory`] owns, for one VM: the host contiguous region, the allocator over it, the DMA
//! window's page table (what backs each window page, [`PageState`]), the move gate's writer
//! side, the DMA mappings, and every pin holder: transient pins ([`TransientPin`]: I/O in
//! flight on a frame), long-term pins ([`LongTermPin`]: io_uring fixed buffers today, the IOMMU
//! mappings of VFIO next, [`PinHolder`]). Devices use it through the [`DmaMapper`] trait; the
//! control API holds a clone of the handle. Its locks are private; nothing outside takes them.
//!
//! Data flows one way: device → [`DmaMapper::map`] → allocator (`cma`) → the window as the
//! allocator's mover (copy + remap) → placement back to the device.
//!
//! Lock order (every lock is private to this module):
//! 1. `layout` (here): serializes what re-backs window pages: MAP, long-term pins, forced
//!    migration, lending RAM pages back. Held across allocator calls, so the mover never takes
//!    it. UNMAP does not take it: an UNMAP never waits for a MAP.
//! 2. the window's `pages` (window.rs): the page table and orphans; short updates, and across
//!    the allocator's in-place conversions.
//! 3. the allocator's own map locks (inside `cma`), which it never holds while calling the mover.
//!
//! `shared` (window pages shared by MAPs shorter than a page) comes before `layout`: a MAP into
//! a page not mapped yet places the page while holding it. `mappings` (the allocations by guest
//! address) is a leaf: taken alone, for a lookup or an insert.
//!
//! A later host-wide manager that serves several VMs from one region can sit behind the same
//! interface: each VM keeps a `DmaMemory`-shaped handle (window, page table, pins) and the
//! region and allocator move to the shared part; the allocator already tells occupants apart by
//! owner id ([`window::WINDOW_OWNER`] is this VM's).

mod iommu;
mod map;
mod pins;
mod stats;
mod window;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cma::{AllocError, AllocRequest, Allocation, Allocator, AllocatorConfig, Region};

use crate::guest_memory::GuestMemoryHandle;

pub use iommu::{Iommu, IommuAttachment, IommuPolicy, IommuStats};
pub use map::{DmaMapper, MapError, MapOptions, MappingInfo, Placement, SUB_PAGE};
pub use pins::{HostBuffer, LongTermPin, PinHolder, TransientPin};
pub use stats::{DmaMemoryStats, LendingStats, MapPercentiles};
pub use window::{Backing, PageState, WINDOW_OWNER};

use stats::MapSamples;
use window::{occupant, Window};

/// Why the owner could not be set up, or refused a request. A refused request changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum DmaMemoryError {
    #[error("a region of {page:#x}-byte pages cannot back this window: {why}")]
    PageTooLarge { page: usize, why: String },
    #[error("the DMA window [{base:#x}, +{len:#x}) is not one region of guest memory")]
    NoWindow { base: u64, len: u64 },
    #[error("the window's host mapping at {0:#x} is not aligned to the region's {1}-byte pages")]
    Unaligned(usize, usize),
    #[error("setting up the allocator: {0}")]
    Allocator(#[from] cma::ConfigError),
    #[error("lending the region to the window: {0}")]
    Lend(std::io::Error),
    #[error("[{gpa:#x}, +{len:#x}) is not inside the DMA window [{base:#x}, +{size:#x})")]
    OutOfWindow {
        gpa: u64,
        len: u64,
        base: u64,
        size: u64,
    },
    #[error("window page {page} is not on a region frame (it is in ordinary memory, or past the window)")]
    NotOnFrame { page: usize },
    #[error("window page {page}: {source}")]
    Pin { page: usize, source: cma::PinError },
    #[error("window page {page} is on a region the kernel cannot pin (a dma-buf: its mapping is VM_PFNMAP, which get_user_pages refuses, as on the kernel's own CMA heap), and the region never moves it out; use a hugetlb or memfd region for I/O that pins guest pages long-term")]
    NotPinnable { page: usize },
    #[error("the window never moves ({0}), so nothing can be migrated")]
    Fixed(&'static str),
    #[error("forced migration of {asked} frames: only {movable} of the region's {frames} frames can move; {mapped} hold DMA mappings ({iommu} of them mapped in the IOMMU for a passed-through device, which may DMA to them at any time), and a mapping's frames never move")]
    HeldByMappings {
        asked: usize,
        movable: usize,
        frames: usize,
        mapped: usize,
        iommu: usize,
    },
    #[error("mapping the whole window in the IOMMU (dma=all): {0}")]
    IommuAll(std::io::Error),
    #[error("forced migration: {0}")]
    Migrate(AllocError),
}

/// Pages larger than this cannot be remapped piecewise at a useful granule.
const MAX_REMAP_PAGE: usize = 2 << 20;

/// How often a waiting MAP polls a pinned page of its own range.
const PIN_WAIT_SLICE: Duration = Duration::from_micros(200);

/// The host side of one VM's guest DMA memory. Cheap to clone: clones share the owner.
#[derive(Clone)]
pub struct DmaMemory {
    inner: Arc<Owner>,
}

struct Owner {
    allocator: Allocator,
    window: Arc<Window>,
    layout: Mutex<()>,
    mappings: Mutex<BTreeMap<u64, Allocation>>,
    /// Window pages mapped for MAPs shorter than a page (a 1 MiB buffer on 2 MiB pages): the
    /// page's allocation is in `mappings` at the page's address, and here are the MAPs inside
    /// it, guest address to length. The page is given back when its last MAP ends.
    shared: Mutex<BTreeMap<usize, BTreeMap<u64, u64>>>,
    samples: MapSamples,
    /// MAPs that found a pin on their pages' own frames and waited for it.
    pin_waits: AtomicU64,
    /// Long-term pinned ranges alive now.
    longterm_ranges: AtomicU64,
    /// MAPs refused because a page of their range was pinned long-term.
    longterm_refusals: AtomicU64,
    /// The IOMMU of passed-through devices, if any, kept in step with the mappings.
    iommu: Option<IommuAttachment>,
    /// With [`IommuPolicy::Mapped`]: the pin of each range the IOMMU maps, by guest address. A
    /// leaf lock.
    /// With the length the IOMMU maps (the pin covers whole window pages).
    iommu_pins: Mutex<BTreeMap<u64, (LongTermPin, u64)>>,
    counters: iommu::IommuCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section in this module leaves its data consistent at each step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DmaMemory {
    /// Takes `region` as the host memory behind the window `[base, base + len)`, which must be
    /// one region of `guest`, and lends the region's frames to the window's pages: page `i`
    /// onto frame `i`, so a guest range lies on a run of frames and maps without a copy.
    pub fn new(
        region: Region,
        guest: &GuestMemoryHandle,
        base: u64,
        len: u64,
    ) -> Result<Self, DmaMemoryError> {
        Self::with_iommu(region, guest, base, len, None)
    }

    /// Like [`DmaMemory::new`], keeping `iommu` in step with the mappings (see [`IommuPolicy`]).
    /// With [`IommuPolicy::All`] the window is lent whole, never moves, and is mapped in the
    /// IOMMU once, here.
    pub fn with_iommu(
        region: Region,
        guest: &GuestMemoryHandle,
        base: u64,
        len: u64,
        iommu: Option<IommuAttachment>,
    ) -> Result<Self, DmaMemoryError> {
        let iommu_all = iommu.as_ref().is_some_and(|a| a.policy == IommuPolicy::All);
        let host_addr = guest
            .whole_region_host_addr(base, len)
            .ok_or(DmaMemoryError::NoWindow { base, len })?;
        // A region that maps only in pieces larger than a window page (1 GiB huge pages, where
        // the host has no way to share them in pieces that KVM accepts) is lent whole, page `i`
        // on frame `i`, and never moves: every MAP is in place. So is a dma-buf (the host CMA
        // heap): one extent, so no MAP ever needs to move for contiguity, and moving its
        // `VM_PFNMAP` pieces under a running guest lost guest writes in a test (3 of 5 runs of
        // forced migrations, docs/virtio-dma.md §8.1), which nothing here explains yet.
        let unit = region.lend_unit();
        let fixed = unit > MAX_REMAP_PAGE || !region.kernel_can_pin() || iommu_all;
        let page = if fixed { MAX_REMAP_PAGE } else { unit };
        if unit > MAX_REMAP_PAGE && !len.is_multiple_of(unit as u64) {
            return Err(DmaMemoryError::PageTooLarge {
                page: unit,
                why: format!("lent whole, it needs a window of whole pages, not {len:#x}"),
            });
        }
        let align = if unit > MAX_REMAP_PAGE { unit } else { page };
        if !host_addr.is_multiple_of(align) {
            return Err(DmaMemoryError::Unaligned(host_addr, align));
        }
        let region = Arc::new(region);
        let window = Arc::new(Window::new(
            region.clone(),
            (base, len),
            page,
            fixed,
            host_addr,
            guest.gate().clone(),
        ));
        // One frame per window page; no small-block caches (lent frames are what small requests
        // would otherwise have cached); one arena: a guest may ask for most of the region in one
        // MAP, and an allocation never spans arenas.
        let config = AllocatorConfig {
            granule: page,
            pageblock: page.max(2 << 20),
            small_cache_batch: 0,
            arenas: 1,
            ..AllocatorConfig::default()
        };
        let allocator = Allocator::new(region, config, window.clone())?;
        let memory = Self {
            inner: Arc::new(Owner {
                allocator,
                window,
                layout: Mutex::new(()),
                mappings: Mutex::new(BTreeMap::new()),
                shared: Mutex::new(BTreeMap::new()),
                samples: MapSamples::default(),
                pin_waits: AtomicU64::new(0),
                longterm_ranges: AtomicU64::new(0),
                longterm_refusals: AtomicU64::new(0),
                iommu,
                iommu_pins: Mutex::new(BTreeMap::new()),
                counters: iommu::IommuCounters::default(),
            }),
        };
        memory.lend_window().map_err(DmaMemoryError::Lend)?;
        if let Some(a) = memory.inner.iommu.as_ref().filter(|_| iommu_all) {
            a.iommu
                .map(base, host_addr, len as usize)
                .map_err(DmaMemoryError::IommuAll)?;
            tracing::info!(
                base,
                len,
                "dma=all: the whole window is mapped in the IOMMU"
            );
        }
        Ok(memory)
    }

    /// The region (read-only facts: backing, extents, contiguity).
    pub fn region(&self) -> &Region {
        self.inner.window.region()
    }

    /// The window's guest-physical base and length.
    pub fn window(&self) -> (u64, u64) {
        (self.inner.window.base, self.inner.window.len)
    }

    /// The unit of every page state: one region page. A MAP is whole pages, or lies inside one
    /// page in whole [`SUB_PAGE`] units (see [`DmaMapper::map`]).
    pub fn granule(&self) -> usize {
        self.inner.window.page
    }

    pub fn page_count(&self) -> usize {
        self.inner.window.page_count()
    }

    /// Window page `page`'s backing and pins.
    pub fn page_state(&self, page: usize) -> Option<PageState> {
        self.inner.window.lock().table.get(page).copied()
    }

    /// The allocator's configuration (for reports).
    pub fn allocator_config(&self) -> AllocatorConfig {
        self.inner.allocator.config()
    }

    /// Lends the region to the window as far as it reaches; returns how many pages were lent.
    fn lend_window(&self) -> std::io::Result<usize> {
        let o = &self.inner;
        let _layout = lock(&o.layout);
        let n = o.window.page_count().min(o.allocator.frames());
        if o.window.fixed {
            // In whole huge pages (or dma-buf pieces), with one mapping per run of the region's
            // file; pages past the region stay in ordinary memory.
            for i in 0..n {
                o.allocator
                    .place_occupant_at(i, occupant(i))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            o.window.lend_whole(n)?;
            let mut pages = o.window.lock();
            for i in 0..n {
                pages.table[i].backing = Backing::Lent(i);
            }
            tracing::info!(
                pages = n,
                page = o.window.page,
                "region lent whole to the window (it never moves)"
            );
            return Ok(n);
        }
        let mut lent = 0;
        for i in 0..n {
            if o.allocator.place_occupant_at(i, occupant(i)).is_err() {
                continue;
            }
            match o.window.lend_page(i, i) {
                Ok(()) => {
                    o.window.lock().table[i].backing = Backing::Lent(i);
                    lent += 1;
                }
                Err(e) => {
                    let _ = o.allocator.vacate(i, occupant(i));
                    return Err(e);
                }
            }
        }
        tracing::info!(
            lent,
            pages = o.window.page_count(),
            page = o.window.page,
            "region lent to the window's pages"
        );
        Ok(lent)
    }

    /// Lends clean frames to the window pages in ordinary memory (moved out earlier, or beyond
    /// an overcommitted region), except pages a long-term pin holds there. Returns how many
    /// moved in.
    pub fn relend(&self) -> usize {
        let _layout = lock(&self.inner.layout);
        self.inner.relend_locked(usize::MAX)
    }

    /// Forces migrations, for tests and benchmarks: takes `frames` frames as allocations
    /// (which moves the pages lent there, out of the region if no clean frame is left),
    /// releases them, and lends the freed frames to pages in RAM again. Returns the pages moved
    /// in both steps. Pins block it for at most 5 s.
    pub fn migrate(&self, frames: usize) -> Result<u64, DmaMemoryError> {
        let o = &self.inner;
        if o.window.fixed {
            return Err(DmaMemoryError::Fixed(o.window_fixed_reason()));
        }
        {
            // A mapping's frames never move; say so rather than fail in the allocator.
            let pages = o.window.lock();
            let mapped = pages
                .table
                .iter()
                .filter(|s| matches!(s.backing, Backing::Mapped(_)))
                .count();
            drop(pages);
            let total = o.allocator.frames();
            if frames > total - mapped.min(total) && mapped > 0 {
                let iommu = (0..o.window.page_count())
                    .filter(|&p| self.iommu_maps_page(p))
                    .count()
                    .min(mapped);
                return Err(DmaMemoryError::HeldByMappings {
                    asked: frames,
                    movable: total - mapped,
                    frames: total,
                    mapped,
                    iommu,
                });
            }
        }
        let before = o.window.counters.moves.load(Ordering::Relaxed);
        let _layout = lock(&o.layout);
        {
            // One allocation cannot straddle extents (huge pages come back in physically
            // contiguous runs, not always one): take the frames extent-sized piece by piece,
            // holding every piece until all are taken.
            let page = o.window.page;
            let most = (o.allocator.region().largest_extent() / page).max(1);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut held = Vec::new();
            let mut left = frames;
            while left > 0 {
                let n = left.min(most);
                let req = AllocRequest::new(n * page)
                    .align(page)
                    // Pins come and go: wait them out for a while rather than fail at once.
                    .policy(cma::Policy::Retry { deadline });
                match o.allocator.alloc(req) {
                    Ok(a) => held.push(a),
                    Err(e) => {
                        // Give back what was taken, and lend the pages it moved out back.
                        drop(held);
                        o.relend_locked(usize::MAX);
                        return Err(DmaMemoryError::Migrate(e));
                    }
                }
                left -= n;
            }
        }
        o.relend_locked(usize::MAX);
        Ok(o.window.counters.moves.load(Ordering::Relaxed) - before)
    }

    /// Checks that `[gpa, gpa + len)` is inside the window; returns its pages.
    fn pages_of(&self, gpa: u64, len: u64) -> Result<(usize, usize), DmaMemoryError> {
        let w = &self.inner.window;
        let page = w.page as u64;
        let out = || DmaMemoryError::OutOfWindow {
            gpa,
            len,
            base: w.base,
            size: w.len,
        };
        let start = gpa & !(page - 1);
        let end = gpa
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(page))
            .ok_or_else(out)?;
        if len == 0 || start < w.base || end > w.base + w.len {
            return Err(out());
        }
        Ok((w.page_of(start), ((end - start) / page) as usize))
    }
}

impl Owner {
    /// Why the window was lent whole, for errors.
    fn window_fixed_reason(&self) -> &'static str {
        if self
            .iommu
            .as_ref()
            .is_some_and(|a| a.policy == IommuPolicy::All)
        {
            "dma=all: a passed-through device may DMA to all of it through the IOMMU, which a move would leave pointing at the old frames"
        } else if self.window.region().kernel_can_pin() {
            "it is lent whole: 1G huge pages cannot be remapped in pieces"
        } else {
            "it is lent whole: a dma-buf from the host's CMA heap is one extent, and moving its VM_PFNMAP pieces lost guest writes"
        }
    }

    fn relend_locked(&self, max: usize) -> usize {
        let ram: Vec<usize> = {
            let pages = self.window.lock();
            (0..pages.table.len())
                .filter(|&p| pages.table[p].backing == Backing::Ram && !pages.table[p].pinned())
                .take(max)
                .collect()
        };
        let mut moved = 0;
        for p in ram {
            let Ok(f) = self.allocator.place_occupant(occupant(p)) else {
                break;
            };
            match self.window.lend_page(p, f) {
                Ok(()) => {
                    self.window.lock().table[p].backing = Backing::Lent(f);
                    self.window.counters.moves.fetch_add(1, Ordering::Relaxed);
                    moved += 1;
                }
                Err(e) => {
                    tracing::warn!("lending frame {f} to page {p}: {e}");
                    let _ = self.allocator.vacate(f, occupant(p));
                    break;
                }
            }
        }
        moved
    }

    /// Frees frames whose page moved away while a transient pin held them, once unpinned.
    fn reap(&self) {
        let mut pages = self.window.lock();
        pages
            .orphans
            .retain(|&(f, occ)| self.allocator.vacate(f, occ).is_err());
    }
}

#[cfg(test)]
mod tests;
