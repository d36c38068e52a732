//! The host side of virtio-dma over the `cma` allocator: a MAP takes a host-contiguous piece
//! of the region and makes the guest range use it by remapping the window's host mapping onto
//! the region's pages (`mmap(MAP_FIXED)` of the region's fd). KVM follows the host mapping
//! through its MMU notifier, and the VMM's own view of guest memory is the same mapping, so
//! the guest, its devices and the VMM all see the new backing at once.
//!
//! Remapping works in whole backing pages: 4 KiB for a memfd region, 2 MiB for a 2 MiB hugetlb
//! region (the device's granule tells the driver). A 1 GiB hugetlb region cannot be remapped in
//! pieces; see docs/virtio-dma.md §8.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cma::{AllocError, AllocRequest, Allocation, Allocator, OccupyError, Policy, Region};

use super::core::{DmaBackend, MapError, MapOptions, Placement};
use super::lending::{occupant, protect, Lending, PageBacking, PIN_WAIT_SLICE};

/// The DMA window as the VMM maps it: `len` bytes of guest-physical space from `base`, at
/// `host_addr` in the VMM, 2 MiB aligned.
#[derive(Clone, Copy, Debug)]
pub struct WindowMapping {
    pub base: u64,
    pub len: u64,
    pub host_addr: usize,
}

/// Why a region cannot back a window's mappings.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("a region with {0}-byte pages cannot be remapped into the window in pieces; use 2M huge pages or a memfd region")]
    PageTooLarge(usize),
    #[error("the window's host mapping at {0:#x} is not aligned to the region's {1}-byte pages")]
    Unaligned(usize, usize),
}

pub struct CmaBackend {
    allocator: Allocator,
    region: Arc<Region>,
    lending: Arc<Lending>,
    window: WindowMapping,
    page: usize,
    samples: MapSamples,
    /// MAPs that found a pin on their pages' own frames and waited for it.
    pin_waits: std::sync::atomic::AtomicU64,
}

/// The last MAPs' latencies and bytes moved, for the control API's percentiles.
#[derive(Default)]
struct MapSamples {
    ring: Mutex<(Vec<(u64, u64)>, usize)>,
}

const MAX_SAMPLES: usize = 1 << 16;

impl MapSamples {
    fn record(&self, ns: u64, moved: u64) {
        let mut g = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let (v, next) = &mut *g;
        if v.len() < MAX_SAMPLES {
            v.push((ns, moved));
        } else {
            v[*next] = (ns, moved);
        }
        *next = (*next + 1) % MAX_SAMPLES;
    }
}

/// Percentiles of the recent successful MAPs on the host: latency (ns) and bytes moved.
#[derive(Clone, Copy, Debug, Default)]
pub struct MapPercentiles {
    pub count: u64,
    pub latency_ns: [u64; 3],
    pub moved_bytes: [u64; 3],
    /// MAPs that moved nothing (their pages' own frames, claimed in place).
    pub in_place: u64,
    /// The MAPs that did move bytes: how many, their latency and bytes moved.
    pub moving_count: u64,
    pub moving_latency_ns: [u64; 3],
    pub moving_bytes: [u64; 3],
    /// MAPs (all of them, not only the recent ones) that found a pin on their pages' own
    /// frames and waited for it before claiming them in place or moving elsewhere.
    pub pin_waits: u64,
}

fn p50_p99_max(mut v: Vec<u64>) -> [u64; 3] {
    if v.is_empty() {
        return [0; 3];
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.99), v[v.len() - 1]]
}

/// Pages larger than this cannot be remapped piecewise at a useful granule.
const MAX_REMAP_PAGE: usize = 2 << 20;

/// Checks that `region` can back `window` page by page.
pub fn check_window(region: &Region, window: &WindowMapping) -> Result<(), BackendError> {
    let page = region.page_size();
    if page > MAX_REMAP_PAGE {
        return Err(BackendError::PageTooLarge(page));
    }
    if !window.host_addr.is_multiple_of(page) {
        return Err(BackendError::Unaligned(window.host_addr, page));
    }
    Ok(())
}

impl CmaBackend {
    /// `allocator` must use `lending` as its mover and the region's page as its granule.
    pub fn new(
        allocator: Allocator,
        lending: Arc<Lending>,
        window: WindowMapping,
    ) -> Result<Self, BackendError> {
        let region = allocator.region().clone();
        check_window(&region, &window)?;
        let page = region.page_size();
        Ok(Self {
            allocator,
            region,
            lending,
            window,
            page,
            samples: MapSamples::default(),
            pin_waits: Default::default(),
        })
    }

    /// Latency and bytes-moved percentiles of the recent successful MAPs.
    pub fn map_percentiles(&self) -> MapPercentiles {
        let g = self.samples.ring.lock().unwrap_or_else(|e| e.into_inner());
        MapPercentiles {
            count: g.0.len() as u64,
            latency_ns: p50_p99_max(g.0.iter().map(|s| s.0).collect()),
            moved_bytes: p50_p99_max(g.0.iter().map(|s| s.1).collect()),
            in_place: g.0.iter().filter(|s| s.1 == 0).count() as u64,
            moving_count: g.0.iter().filter(|s| s.1 != 0).count() as u64,
            moving_latency_ns: p50_p99_max(g.0.iter().filter(|s| s.1 != 0).map(|s| s.0).collect()),
            moving_bytes: p50_p99_max(g.0.iter().filter(|s| s.1 != 0).map(|s| s.1).collect()),
            pin_waits: self.pin_waits.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The smallest MAP the backend can serve: one backing page.
    pub fn granule(&self) -> usize {
        self.page
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    pub fn lending(&self) -> &Arc<Lending> {
        &self.lending
    }

    pub fn window(&self) -> WindowMapping {
        self.window
    }

    fn host_ptr(&self, gpa: u64) -> *mut libc::c_void {
        (self.window.host_addr + (gpa - self.window.base) as usize) as *mut libc::c_void
    }

    fn page_of(&self, gpa: u64) -> usize {
        ((gpa - self.window.base) / self.page as u64) as usize
    }

    /// Points the window's `[gpa, gpa + len)` at the region's pages under `alloc`.
    fn back_with(&self, gpa: u64, alloc: &Allocation) -> std::io::Result<()> {
        let frames = alloc.frames();
        self.lending
            .map_frames(self.host_ptr(gpa).cast(), frames.start, frames.len())
    }

    /// Never hand the guest a range that is not host-contiguous: the allocation must lie inside
    /// one of the region's extents, at the physical address that extent implies.
    fn check_contiguous(&self, alloc: &Allocation) -> Result<(), MapError> {
        let (start, end) = (alloc.offset(), alloc.offset() + alloc.len());
        let extent = self
            .region
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
            tracing::error!(
                ?alloc,
                "virtio-dma: allocation is not inside one extent; refused"
            );
            return Err(MapError::Io(
                "allocation straddles host-contiguous extents".into(),
            ));
        }
        Ok(())
    }

    /// The address the guest is told for frame `f` (physical where known), for alignment.
    fn frame_addr(&self, f: usize) -> u64 {
        let off = f * self.page;
        self.region
            .extents()
            .iter()
            .find(|e| e.offset <= off && off < e.end())
            .and_then(|e| e.phys.map(|p| p + (off - e.offset) as u64))
            .unwrap_or(off as u64)
    }

    /// The MAP's fast path: the range's pages are lent on a suitably aligned run of frames, so
    /// the frames just change hands. No copy, no remap. `Err(true)`: the run is there but some
    /// frame of it is busy (pinned, or being moved); `Err(false)`: there is no such run.
    fn claim_in_place(&self, first: usize, n: usize, align: usize) -> Result<Allocation, bool> {
        let mut pages = self.lending.lock_pages();
        let f0 = match pages[first] {
            PageBacking::Lent(f) => f,
            _ => return Err(false),
        };
        let run = (0..n).all(|i| pages[first + i] == PageBacking::Lent(f0 + i));
        if !run || !self.frame_addr(f0).is_multiple_of(align as u64) {
            return Err(false);
        }
        let occupants: Vec<_> = (first..first + n).map(occupant).collect();
        let alloc = self.allocator.claim_occupied(f0, &occupants).map_err(|e| {
            matches!(
                e,
                OccupyError::Pinned { .. } | OccupyError::Migrating { .. }
            )
        })?;
        for i in 0..n {
            pages[first + i] = PageBacking::Mapped(f0 + i);
        }
        Ok(alloc)
    }

    /// The in-place claim, waiting out a busy frame for at most `budget` (a transient pin
    /// lasts about one I/O; moving the range elsewhere costs a copy).
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
                Err(true) if Instant::now() < budget => {
                    if !waited {
                        waited = true;
                        self.pin_waits
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(50))
                }
                Err(_) => return None,
            }
        }
    }

    /// Frees the frames the range's pages were lent on. Without DISCARD the contents still
    /// matter, so a pinned frame (someone may be writing it) is waited for, within the
    /// request's policy; with DISCARD it is left to be freed when unpinned.
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
                        self.lending.orphan(f, occupant(p));
                        break;
                    }
                    Err(e) if opts.failfast || Instant::now() >= deadline => {
                        // Give back what was already freed: nobody took it (MAPs hold the
                        // layout lock, and lending places no occupants meanwhile).
                        for &(p, f) in &freed {
                            let _ = self.allocator.place_occupant_at(f, occupant(p));
                        }
                        tracing::debug!("virtio-dma: page {p} of the range: {e}");
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

impl DmaBackend for CmaBackend {
    type Mapping = Allocation;

    fn map(
        &self,
        gpa: u64,
        len: u64,
        opts: MapOptions,
    ) -> Result<(Allocation, Placement), MapError> {
        let t = Instant::now();
        let r = self.map_inner(gpa, len, opts);
        if let Ok((_, p)) = &r {
            self.samples
                .record(t.elapsed().as_nanos() as u64, p.bytes_migrated);
        }
        r
    }

    fn host_phys(&self) -> bool {
        self.region.extents().iter().any(|e| e.phys.is_some())
    }

    fn unmap(&self, gpa: u64, len: u64, mapping: Allocation, _discard: bool) {
        self.unmap_inner(gpa, len, mapping)
    }

    fn guest_access(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        Some(self.lending.gate().access())
    }
}

impl CmaBackend {
    fn map_inner(
        &self,
        gpa: u64,
        len: u64,
        opts: MapOptions,
    ) -> Result<(Allocation, Placement), MapError> {
        if !len.is_multiple_of(self.page as u64) || !gpa.is_multiple_of(self.page as u64) {
            return Err(MapError::Io(format!(
                "MAP of {len:#x} at {gpa:#x} is not in whole {}-byte pages",
                self.page
            )));
        }
        let deadline = Instant::now() + opts.deadline.min(Duration::from_secs(10));
        let policy = if opts.failfast {
            Policy::FailFast
        } else {
            Policy::Retry { deadline }
        };
        let align = natural_align(len).max(self.page);
        let (first, n) = (self.page_of(gpa), (len / self.page as u64) as usize);
        let _layout = self.lending.lock_layout();
        self.lending.reap(&self.allocator);
        // Without FAILFAST, a busy frame of the range's own run is worth waiting for as long as
        // half the copy that going elsewhere would cost (at about 1 GiB/s): the wait then never
        // makes the MAP slower than the move would have.
        let budget = if opts.failfast {
            Instant::now()
        } else {
            (Instant::now() + Duration::from_nanos(len / 2)).min(deadline)
        };
        if let Some(alloc) = self.claim_in_place_within(first, n, align, budget) {
            let placement = self.placement(&alloc, 0);
            return Ok((alloc, placement));
        }
        let request = AllocRequest::new(len as usize).align(align).policy(policy);
        let t_alloc = Instant::now();
        let alloc = self.allocator.alloc(request).map_err(map_error)?;
        let alloc_time = t_alloc.elapsed();
        self.check_contiguous(&alloc)?;
        // The allocation may have moved some of the range's own pages: look now.
        let before: Vec<PageBacking> = self.lending.lock_pages()[first..first + n].to_vec();
        if before.iter().any(|b| matches!(b, PageBacking::Mapped(_))) {
            return Err(MapError::Io("range overlaps a mapping".into()));
        }
        let lent: Vec<(usize, usize)> = before
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                PageBacking::Lent(f) => Some((first + i, *f)),
                _ => None,
            })
            .collect();
        if !opts.discard {
            self.release_lent(&lent, &opts, deadline)?;
        }
        let remapped = {
            // Without DISCARD the guest's bytes move with the range: stop writers first.
            let _moving = (!opts.discard).then(|| self.lending.gate().begin());
            let va = self.host_ptr(gpa).cast::<u8>();
            let protected = if opts.discard {
                Ok(())
            } else {
                protect(va, len as usize, libc::PROT_READ)
            };
            protected.and_then(|()| {
                if !opts.discard {
                    // SAFETY: both ranges are `len` bytes of live mappings: the window's
                    // (read-only now, so stable) and the allocation's, which is ours alone.
                    // They cannot overlap: the region is a separate mapping.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            va.cast_const(),
                            alloc.host_addr().as_ptr(),
                            len as usize,
                        );
                    }
                }
                self.back_with(gpa, &alloc)
            })
        };
        if let Err(e) = remapped {
            let _ = protect(
                self.host_ptr(gpa).cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            );
            return Err(MapError::Io(format!("remapping the window: {e}")));
        }
        if opts.discard {
            self.release_lent(&lent, &opts, deadline)?;
        }
        {
            let mut pages = self.lending.lock_pages();
            let f0 = alloc.frames().start;
            for i in 0..n {
                pages[first + i] = PageBacking::Mapped(f0 + i);
            }
        }
        let copied = if opts.discard { 0 } else { len };
        let placement = self.placement(&alloc, copied);
        tracing::debug!(
            ?alloc_time,
            total = ?t_alloc.elapsed(),
            migrated = alloc.migrated_frames(),
            failfast = opts.failfast,
            "virtio-dma: MAP placed elsewhere"
        );
        Ok((alloc, placement))
    }

    fn unmap_inner(&self, gpa: u64, len: u64, mapping: Allocation) {
        // The pages keep their frames and contents: the mapping's frames are lent to them.
        let (first, n) = (self.page_of(gpa), (len / self.page as u64) as usize);
        let occupants: Vec<_> = (first..first + n).map(occupant).collect();
        let mut pages = self.lending.lock_pages();
        let f0 = mapping.frames().start;
        match self.allocator.into_occupants(mapping, &occupants) {
            Ok(()) => {
                for i in 0..n {
                    pages[first + i] = PageBacking::Lent(f0 + i);
                }
            }
            Err((mapping, e)) => {
                // The range keeps the region's pages; leaking the allocation is the safe
                // choice: the guest may still use them.
                tracing::error!(
                    "virtio-dma: unmapping {len:#x} at {gpa:#x}: {e}; region pages leaked"
                );
                std::mem::forget(mapping);
            }
        }
    }
}

impl CmaBackend {
    fn placement(&self, alloc: &Allocation, copied: u64) -> Placement {
        Placement {
            host_addr: alloc.phys_addr().unwrap_or(alloc.offset() as u64),
            host_phys: alloc.phys_addr().is_some(),
            extent: alloc.extent() as u64,
            bytes_migrated: alloc.migrated_frames() as u64 * self.page as u64 + copied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::dma::lending::MoveGate;
    use cma::{AllocatorConfig, Backing};

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    /// A window of anonymous memory, 2 MiB aligned, standing in for the VMM's.
    fn window(len: usize) -> WindowMapping {
        // SAFETY: a fresh anonymous mapping; leaked for the test's lifetime.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + (2 << 20),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        let host_addr = (raw as usize).next_multiple_of(2 << 20);
        WindowMapping {
            base: 0x4000_0000,
            len: len as u64,
            host_addr,
        }
    }

    /// A memfd region of `region_len` lent to a window of `window_len`, after the window's
    /// pages were each filled with their own pattern.
    fn backend(region_len: usize, window_len: usize) -> CmaBackend {
        let region = Arc::new(Region::reserve(region_len, Backing::Memfd).unwrap());
        let w = window(window_len);
        for p in 0..window_len as u64 / PAGE {
            fill(w.host_addr, p);
        }
        let lending = Arc::new(Lending::new(
            region.clone(),
            w,
            Arc::new(MoveGate::default()),
        ));
        let config = AllocatorConfig {
            granule: region.page_size(),
            small_cache_batch: 0,
            ..AllocatorConfig::default()
        };
        let alloc = Allocator::new(region, config, lending.clone()).unwrap();
        let lent = lending.lend_window(&alloc).unwrap();
        assert_eq!(lent, region_len / PAGE as usize);
        CmaBackend::new(alloc, lending, w).unwrap()
    }

    fn fill(host: usize, page: u64) {
        // SAFETY: page `page` of a test window.
        unsafe { ((host + (page * PAGE) as usize) as *mut u64).write(page * 0x9e37_79b9 + 1) }
    }

    fn intact(b: &CmaBackend, page: u64) -> bool {
        // SAFETY: page `page` of the test window.
        unsafe {
            ((b.window.host_addr + (page * PAGE) as usize) as *const u64).read()
                == page * 0x9e37_79b9 + 1
        }
    }

    fn byte(b: &CmaBackend, gpa: u64) -> *mut u8 {
        b.host_ptr(gpa) as *mut u8
    }

    const OPTS: MapOptions = MapOptions {
        failfast: true,
        discard: false,
        deadline: Duration::ZERO,
    };

    #[test]
    fn lent_pages_map_in_place_and_unmap_keeps_them() {
        let b = backend(8 << 20, 16 << 20);
        assert!((0..4096).all(|p| intact(&b, p)), "lending kept every byte");
        let gpa = b.window.base + 4 * MIB;
        let (alloc, placement) = b.map(gpa, MIB, OPTS).unwrap();
        assert!(
            !placement.host_phys,
            "memfd regions reveal no physical addresses"
        );
        assert_eq!(
            alloc.offset() as u64,
            4 * MIB,
            "the page's own frames, claimed in place"
        );
        assert_eq!(placement.bytes_migrated, 0);
        // SAFETY: inside the test window and the allocation.
        unsafe {
            // The window *is* the region's memory: a write shows through both.
            byte(&b, gpa + 200).write(0x5a);
            assert_eq!(alloc.host_addr().as_ptr().add(200).read(), 0x5a);
        }
        b.unmap(gpa, MIB, alloc, true);
        // SAFETY: inside the test window.
        unsafe { assert_eq!(byte(&b, gpa + 200).read(), 0x5a, "contents kept by UNMAP") };
        assert_eq!(b.allocator().usage().allocated, 0);
        assert_eq!(b.lending().stats().lent, 2048);
        assert_eq!(b.allocator().stats().pages_migrated, 0);
    }

    #[test]
    fn a_map_outside_the_region_moves_lent_pages_out_and_loses_nothing() {
        // Overcommitted: 8 MiB of region for a 16 MiB window.
        let b = backend(8 << 20, 16 << 20);
        let gpa = b.window.base + 12 * MIB;
        let (alloc, placement) = b.map(gpa, MIB, OPTS).unwrap();
        assert_eq!(
            alloc.migrated_frames(),
            256,
            "a full region: 256 lent pages leave it"
        );
        assert_eq!(
            placement.bytes_migrated,
            2 * MIB,
            "moved out + the range's own bytes"
        );
        assert!(
            (0..4096).all(|p| intact(&b, p)),
            "every page kept its bytes"
        );
        let st = b.lending().stats();
        assert_eq!((st.moves, st.moves_out, st.mapped), (256, 256, 256));
        b.unmap(gpa, MIB, alloc, false);
        // The range is lent now, on the frames it had: the next MAP is in place.
        let (alloc, placement) = b.map(gpa, MIB, OPTS).unwrap();
        assert_eq!(placement.bytes_migrated, 0);
        b.unmap(gpa, MIB, alloc, true);
        assert!((0..4096).all(|p| intact(&b, p)));
    }

    #[test]
    fn a_pinned_page_fails_fast_keeps_its_frame_with_discard_and_is_freed_when_unpinned() {
        let b = backend(8 << 20, 16 << 20);
        let gpa = b.window.base + 2 * MIB;
        let pinned_frame = (2 * MIB / PAGE) as usize + 3;
        let pin = b.allocator().pin_occupant(pinned_frame).unwrap();
        assert_eq!(b.map(gpa, MIB, OPTS).unwrap_err(), MapError::Busy);
        assert!(
            (0..4096).all(|p| intact(&b, p)),
            "a failed MAP changes nothing"
        );
        let discard = MapOptions {
            discard: true,
            ..OPTS
        };
        let (alloc, _) = b.map(gpa, MIB, discard).unwrap();
        assert!(
            !alloc.frames().contains(&pinned_frame),
            "never hand out a pinned frame"
        );
        assert_eq!(b.lending().stats().orphans, 1);
        drop(pin);
        let (other, _) = b.map(gpa + 2 * MIB, MIB, OPTS).unwrap();
        assert_eq!(b.lending().stats().orphans, 0, "freed at the next MAP");
        b.unmap(gpa, MIB, alloc, true);
        b.unmap(gpa + 2 * MIB, MIB, other, true);
    }

    #[test]
    fn without_failfast_a_short_pin_on_the_range_is_waited_out_in_place() {
        let b = Arc::new(backend(8 << 20, 16 << 20));
        let gpa = b.window.base;
        let pinned_frame = 100;
        let pin = b.allocator().pin_occupant(pinned_frame).unwrap();
        let opts = MapOptions {
            failfast: false,
            discard: true,
            deadline: Duration::from_secs(5),
        };
        // 8 MiB: worth waiting up to about 4 ms for the pin rather than moving 8 MiB. The
        // pin is dropped as soon as the MAP is seen waiting for it (not after a fixed
        // sleep, which a loaded machine can stretch past the budget).
        let map = {
            let b = b.clone();
            std::thread::spawn(move || b.map(gpa, 8 * MIB, opts))
        };
        let t = Instant::now();
        while b.map_percentiles().pin_waits == 0 && t.elapsed() < Duration::from_secs(5) {
            std::hint::spin_loop();
        }
        assert_eq!(b.map_percentiles().pin_waits, 1, "the MAP never waited");
        drop(pin);
        let (alloc, placement) = map.join().unwrap().unwrap();
        assert_eq!(
            alloc.frames(),
            0..2048,
            "the range's own frames, after the pin went"
        );
        assert_eq!(placement.bytes_migrated, 0);
        b.unmap(gpa, 8 * MIB, alloc, true);
    }

    #[test]
    fn writers_under_the_access_guard_never_meet_a_page_mid_move() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let b = Arc::new(backend(8 << 20, 16 << 20));
        let stop = Arc::new(AtomicBool::new(false));
        // A device thread writing one page of the window as fast as it can. Without the guard
        // it would write a write-protected page mid-move and die of SIGSEGV.
        let at = b.window.host_addr + 5 * PAGE as usize + 8;
        let writer = {
            let (b, stop) = (b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let _access = b.lending().gate().access();
                    // SAFETY: inside page 5 of the test window.
                    unsafe { (at as *mut u64).write_volatile(i) };
                }
                i
            })
        };
        let mut moved = 0;
        for _ in 0..10 {
            // The whole region: every lent page moves out, and back in.
            moved += b.lending().force_migrate(b.allocator(), 2048).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let last = writer.join().unwrap();
        assert_eq!(moved, 10 * 2 * 2048);
        // SAFETY: inside page 5 of the test window; the writer has stopped.
        let now = unsafe { (at as *const u64).read_volatile() };
        assert_eq!(now, last, "no write lost");
        assert!((0..4096).all(|p| intact(&b, p)));
    }

    #[test]
    fn errors_map_to_statuses() {
        let b = backend(2 << 20, 16 << 20);
        let gpa = b.window.base;
        assert_eq!(
            b.map(gpa + 2 * MIB, 4 * MIB, OPTS).unwrap_err(),
            MapError::TooBig
        );
        let (a, _) = b.map(gpa + 4 * MIB, 2 * MIB, OPTS).unwrap();
        assert_eq!(
            b.map(gpa + 8 * MIB, MIB, OPTS).unwrap_err(),
            MapError::NoMem
        );
        b.unmap(gpa + 4 * MIB, 2 * MIB, a, true);
        assert!(matches!(
            b.map(gpa + 1, PAGE, OPTS).unwrap_err(),
            MapError::Io(_)
        ));
    }

    #[test]
    fn natural_alignment_is_capped_at_a_pageblock() {
        assert_eq!(natural_align(4096), 4096);
        assert_eq!(natural_align(3 * 4096), 4096);
        assert_eq!(natural_align(64 << 10), 64 << 10);
        assert_eq!(natural_align(16 << 20), 2 << 20);
    }
}
