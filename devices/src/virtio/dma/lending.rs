//! Lending: the region's frames back ordinary guest pages of the DMA window while no DMA
//! mapping needs them, as Linux lends a CMA area to movable pages.
//!
//! Every window page (one region page: 4 KiB for a memfd region, 2 MiB for hugetlb) is at any
//! time in one of three states ([`PageBacking`]):
//! - `Lent(f)`: backed by region frame `f`, which the allocator records as occupied by the
//!   page (owner [`WINDOW_OWNER`], page index). The allocator may migrate it.
//! - `Mapped(f)`: part of a DMA mapping; frame `f` belongs to the mapping's allocation.
//! - `Ram`: ordinary anonymous host memory, when the region is smaller than the window
//!   (overcommitted) or when the page was moved out (no clean frame left, or a long-term pin).
//!
//! [`Lending`] is the allocator's [`Mover`]: to move page `p` from frame `src` it
//! write-protects `p` in the VMM's mapping (a vCPU that writes it gets `EFAULT` from `KVM_RUN`
//! and waits on the [`MoveGate`]), copies the frame, and maps the destination over `p` with
//! one `mmap(MAP_FIXED)` (or `mremap` of a filled anonymous page), which KVM follows through
//! its MMU notifier. No write is lost: while the copy runs nobody can write the source.
//!
//! Locks: `layout` serializes the operations that re-back pages of the window (MAP, long-term
//! pins, forced moves); it is held across allocator calls, so the mover never takes it. The
//! `pages` mutex guards the table and is held only for short updates, and across the
//! allocator's in-place conversions (order: `pages` before the allocator's map lock; the
//! allocator never calls the mover with its lock held).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cma::{Allocator, Destination, MigrationPlan, MoveError, Mover, Occupant, Region};

use super::backend::WindowMapping;

/// The owner id of window pages in the allocator's occupant table.
pub const WINDOW_OWNER: u64 = 1;

/// What backs one window page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageBacking {
    Ram,
    Lent(usize),
    Mapped(usize),
}

impl PageBacking {
    /// The region frame behind the page, if any.
    pub fn frame(self) -> Option<usize> {
        match self {
            PageBacking::Ram => None,
            PageBacking::Lent(f) | PageBacking::Mapped(f) => Some(f),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves the data consistent at each step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps writers out of guest pages while the VMM moves them. vCPUs find out by a write fault
/// (`EFAULT` from `KVM_RUN`) and wait here; the VMM's own device threads hold
/// [`MoveGate::access`] while they write guest memory, so a move waits for them and they wait
/// for a move (a write to a write-protected page would otherwise kill the VMM).
#[derive(Default)]
pub struct MoveGate {
    state: Mutex<GateState>,
    cv: Condvar,
    access: RwLock<()>,
}

#[derive(Default)]
struct GateState {
    active: u32,
    epoch: u64,
}

/// A move in progress; dropping it ends the move and wakes waiting vCPUs.
pub struct GateGuard<'a> {
    gate: &'a MoveGate,
    _devices_out: RwLockWriteGuard<'a, ()>,
}

impl MoveGate {
    /// Starts a move: waits until no device thread is writing guest memory and keeps them out
    /// until the guard is dropped. Never call it while holding [`MoveGate::access`].
    pub fn begin(&self) -> GateGuard<'_> {
        let devices_out = self.access.write().unwrap_or_else(|e| e.into_inner());
        let mut s = lock(&self.state);
        s.active += 1;
        s.epoch += 1;
        GateGuard {
            gate: self,
            _devices_out: devices_out,
        }
    }

    /// For a device thread about to write guest memory: no page is mid-move while it is held.
    /// Hold it only around the memory accesses, never across a call that may move pages.
    pub fn access(&self) -> RwLockReadGuard<'_, ()> {
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }

    /// For a vCPU whose `KVM_RUN` failed with `EFAULT`: waits while a move is in progress and
    /// says whether any move ran since `seen` (then the fault was a write to a page being
    /// moved and the vCPU re-enters the guest; otherwise the fault is real).
    pub fn wait_moves(&self, seen: &mut u64) -> bool {
        let mut s = lock(&self.state);
        while s.active > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let moved = s.epoch != *seen;
        *seen = s.epoch;
        moved
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.gate.state);
        s.active -= 1;
        s.epoch += 1;
        self.gate.cv.notify_all();
    }
}

/// Counters of what lending did.
#[derive(Clone, Copy, Debug, Default)]
pub struct LendingStats {
    pub pages: u64,
    pub page_size: u64,
    pub lent: u64,
    pub mapped: u64,
    pub ram: u64,
    /// Frames whose page moved away while a pin held them; freed when unpinned.
    pub orphans: u64,
    pub moves: u64,
    pub moves_out: u64,
    pub bytes_moved: u64,
    /// Time spent copying in moves (µs), for the throughput figure.
    pub copy_us: u64,
}

pub struct Lending {
    region: Arc<Region>,
    window: WindowMapping,
    page: usize,
    pages: Mutex<Vec<PageBacking>>,
    orphans: Mutex<Vec<(usize, Occupant)>>,
    layout: Mutex<()>,
    gate: Arc<MoveGate>,
    moves: AtomicU64,
    moves_out: AtomicU64,
    copy_ns: AtomicU64,
}

pub fn occupant(page: usize) -> Occupant {
    Occupant {
        owner: WINDOW_OWNER,
        page: page as u64,
    }
}

impl Lending {
    /// Every window page starts as anonymous RAM (the guest may already be using it).
    pub fn new(region: Arc<Region>, window: WindowMapping, gate: Arc<MoveGate>) -> Self {
        let page = region.page_size();
        let n = (window.len / page as u64) as usize;
        Lending {
            region,
            window,
            page,
            pages: Mutex::new(vec![PageBacking::Ram; n]),
            orphans: Mutex::new(Vec::new()),
            layout: Mutex::new(()),
            gate,
            moves: AtomicU64::new(0),
            moves_out: AtomicU64::new(0),
            copy_ns: AtomicU64::new(0),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page
    }

    pub fn page_count(&self) -> usize {
        lock(&self.pages).len()
    }

    pub fn gate(&self) -> &Arc<MoveGate> {
        &self.gate
    }

    /// Serializes the operations that re-back window pages.
    pub fn lock_layout(&self) -> MutexGuard<'_, ()> {
        lock(&self.layout)
    }

    pub fn lock_pages(&self) -> MutexGuard<'_, Vec<PageBacking>> {
        lock(&self.pages)
    }

    pub fn backing(&self, page: usize) -> Option<PageBacking> {
        lock(&self.pages).get(page).copied()
    }

    /// The VMM's address of window page `page`.
    pub fn page_ptr(&self, page: usize) -> *mut u8 {
        (self.window.host_addr + page * self.page) as *mut u8
    }

    /// The region mapping's address of frame `f`.
    pub fn frame_ptr(&self, f: usize) -> *mut u8 {
        self.region.host_addr().as_ptr().wrapping_add(f * self.page)
    }

    /// Lends the region to the window: page `i` goes onto frame `i` (so that a guest range
    /// lies on a run of frames and maps without a copy), as far as the region reaches. Pages
    /// the guest already touched are copied under write protection; the rest are just
    /// remapped. Returns how many pages were lent.
    pub fn lend_window(&self, allocator: &Allocator) -> std::io::Result<usize> {
        let _layout = self.lock_layout();
        let n = self.page_count().min(allocator.frames());
        let mut lent = 0;
        for i in 0..n {
            if allocator.place_occupant_at(i, occupant(i)).is_err() {
                continue;
            }
            let result = self.lend_page(i, i);
            match result {
                Ok(()) => {
                    lock(&self.pages)[i] = PageBacking::Lent(i);
                    lent += 1;
                }
                Err(e) => {
                    let _ = allocator.vacate(i, occupant(i));
                    return Err(e);
                }
            }
        }
        Ok(lent)
    }

    /// Moves RAM-backed page `p` onto frame `f` (already recorded as its occupant): under
    /// write protection, copies what the guest has there (if it touched it) and remaps.
    fn lend_page(&self, p: usize, f: usize) -> std::io::Result<()> {
        let va = self.page_ptr(p);
        // Write-protect first: a write between the residency check and the remap would
        // otherwise be lost.
        let _moving = self.gate.begin();
        let result = protect(va, self.page, libc::PROT_READ).and_then(|()| {
            if resident(va, self.page) {
                // SAFETY: `va` is one page of the window mapping and the frame one page of
                // the region mapping; separate mappings, both live. The window page is
                // read-only now, so nobody changes it during the copy.
                unsafe { std::ptr::copy_nonoverlapping(va, self.frame_ptr(f), self.page) };
            }
            self.map_frame(va, f)
        });
        if result.is_err() {
            let _ = protect(va, self.page, libc::PROT_READ | libc::PROT_WRITE);
        }
        result
    }

    /// Lends clean frames to up to `max` pages that live in RAM (moved out earlier, or beyond
    /// an overcommitted region). Returns how many moved in.
    pub fn lend_ram_pages(&self, allocator: &Allocator, max: usize) -> usize {
        let _layout = self.lock_layout();
        let ram: Vec<usize> = {
            let pages = lock(&self.pages);
            (0..pages.len())
                .filter(|&p| pages[p] == PageBacking::Ram)
                .take(max)
                .collect()
        };
        let mut moved = 0;
        for p in ram {
            let Ok(f) = allocator.place_occupant(occupant(p)) else {
                break;
            };
            match self.lend_page(p, f) {
                Ok(()) => {
                    lock(&self.pages)[p] = PageBacking::Lent(f);
                    self.moves.fetch_add(1, Ordering::Relaxed);
                    moved += 1;
                }
                Err(e) => {
                    tracing::warn!("lending frame {f} to page {p}: {e}");
                    let _ = allocator.vacate(f, occupant(p));
                    break;
                }
            }
        }
        moved
    }

    /// Forces migrations, for tests and benchmarks: takes `frames` frames as an allocation
    /// (which moves the pages lent there, out of the region if no clean frame is left),
    /// releases it, and lends the freed frames to pages in RAM again. Returns the pages
    /// moved in both steps.
    pub fn force_migrate(&self, allocator: &Allocator, frames: usize) -> Result<u64, String> {
        let before = self.moves.load(Ordering::Relaxed);
        {
            let _layout = self.lock_layout();
            // One allocation cannot straddle extents (huge pages come back in physically
            // contiguous runs, not always one): take the frames extent-sized piece by piece,
            // holding every piece until all are taken.
            let most = (allocator.region().largest_extent() / self.page).max(1);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut held = Vec::new();
            let mut left = frames;
            while left > 0 {
                let n = left.min(most);
                let req = cma::AllocRequest::new(n * self.page)
                    .align(self.page)
                    // Pins come and go: wait them out for a while rather than fail at once.
                    .policy(cma::Policy::Retry { deadline });
                held.push(allocator.alloc(req).map_err(|e| e.to_string())?);
                left -= n;
            }
        }
        self.lend_ram_pages(allocator, usize::MAX);
        Ok(self.moves.load(Ordering::Relaxed) - before)
    }

    /// Maps region frame `f` at `va` (one page), read-write, shared with the region.
    pub fn map_frame(&self, va: *mut u8, f: usize) -> std::io::Result<()> {
        self.map_frames(va, f, 1)
    }

    /// Maps `n` region frames from `f0` at `va`, read-write, shared with the region: one
    /// `mmap` per run of frames that are consecutive in the region's file (2 MiB pages are
    /// ordered by physical address, so file and region order can differ).
    pub fn map_frames(&self, va: *mut u8, f0: usize, n: usize) -> std::io::Result<()> {
        let file_offset = |f: usize| {
            self.region
                .file_offset(f * self.page)
                .ok_or_else(|| std::io::Error::other(format!("frame {f} outside the region")))
        };
        let mut i = 0;
        while i < n {
            let first = file_offset(f0 + i)?;
            let mut run = 1;
            while i + run < n && file_offset(f0 + i + run)? == first + (run * self.page) as u64 {
                run += 1;
            }
            // SAFETY: `va + i * page` for `run` pages is page-aligned memory of the window
            // mapping, which the VMM created for the guest and re-backs only through this
            // module and the backend; MAP_FIXED replaces exactly those pages. The region fd
            // outlives the mapping (the allocator holds the region).
            let rc = unsafe {
                libc::mmap(
                    va.wrapping_add(i * self.page).cast(),
                    run * self.page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    // The region's pages exist already: fill the page tables now rather than
                    // fault them in one by one when the guest first touches them.
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    self.region.fd(),
                    first as libc::off_t,
                )
            };
            if rc == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            i += run;
        }
        Ok(())
    }

    /// Moves the contents at `src` into fresh anonymous memory that replaces the page at
    /// `va` in one step.
    fn move_to_ram(&self, va: *mut u8, src: *const u8) -> std::io::Result<()> {
        // SAFETY: a fresh private anonymous mapping of one page, ours alone. (Populating it up
        // front measured slower than faulting it in during the copy: 0.70 against 0.93 of
        // memcpy's throughput.)
        let scratch = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if scratch == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `scratch` is a fresh page-sized mapping; `src` is one page of the region
        // mapping, which nobody writes while the allocator has the frame frozen.
        unsafe { std::ptr::copy_nonoverlapping(src, scratch.cast::<u8>(), self.page) };
        // SAFETY: moves our scratch mapping over the window page at `va` (MREMAP_FIXED
        // unmaps what was there); both are page-aligned and `page` long.
        let rc = unsafe {
            libc::mremap(
                scratch,
                self.page,
                self.page,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                va.cast::<libc::c_void>(),
            )
        };
        if rc == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: the scratch mapping is still ours (mremap failed).
            unsafe { libc::munmap(scratch, self.page) };
            return Err(e);
        }
        Ok(())
    }

    /// Frees frames whose page moved away while they were pinned, once unpinned.
    pub fn reap(&self, allocator: &Allocator) {
        lock(&self.orphans).retain(|&(f, occ)| allocator.vacate(f, occ).is_err());
    }

    /// A frame the page no longer uses but a pin still holds: freed by [`Lending::reap`].
    pub fn orphan(&self, f: usize, occ: Occupant) {
        lock(&self.orphans).push((f, occ));
    }

    pub fn stats(&self) -> LendingStats {
        let pages = lock(&self.pages);
        let count =
            |pred: fn(&PageBacking) -> bool| pages.iter().filter(|p| pred(p)).count() as u64;
        let moves = self.moves.load(Ordering::Relaxed);
        LendingStats {
            pages: pages.len() as u64,
            page_size: self.page as u64,
            lent: count(|p| matches!(p, PageBacking::Lent(_))),
            mapped: count(|p| matches!(p, PageBacking::Mapped(_))),
            ram: count(|p| matches!(p, PageBacking::Ram)),
            orphans: lock(&self.orphans).len() as u64,
            moves,
            moves_out: self.moves_out.load(Ordering::Relaxed),
            bytes_moved: moves * self.page as u64,
            copy_us: self.copy_ns.load(Ordering::Relaxed) / 1000,
        }
    }

    /// One move of the plan. `Ok(false)`: the occupant was an orphan (nothing to copy).
    fn move_one(&self, m: &cma::FrameMove) -> Result<bool, String> {
        let p = m.occupant.page as usize;
        if m.occupant.owner != WINDOW_OWNER || p >= self.page_count() {
            return Err(format!("{:?} is not a window page", m.occupant));
        }
        if lock(&self.pages)[p].frame() != Some(m.src) {
            // The page left this frame while a pin held it; only the bookkeeping moves.
            let mut orphans = lock(&self.orphans);
            if let Some(i) = orphans
                .iter()
                .position(|&(f, o)| f == m.src && o == m.occupant)
            {
                match m.dst {
                    Destination::Frame(d) => orphans[i].0 = d,
                    Destination::OutOfRegion => {
                        orphans.swap_remove(i);
                    }
                }
                return Ok(false);
            }
            return Err(format!("page {p} is not on frame {}", m.src));
        }
        let va = self.page_ptr(p);
        let src = self.frame_ptr(m.src).cast_const();
        let _moving = self.gate.begin();
        protect(va, self.page, libc::PROT_READ).map_err(|e| format!("write-protect: {e}"))?;
        let t = Instant::now();
        let result = match m.dst {
            Destination::Frame(d) => {
                // SAFETY: two distinct frames of the region mapping (the allocator never
                // moves a frame onto itself), both frozen by the allocator for the plan.
                unsafe { std::ptr::copy_nonoverlapping(src, self.frame_ptr(d), self.page) };
                self.map_frame(va, d).map(|()| PageBacking::Lent(d))
            }
            Destination::OutOfRegion => self.move_to_ram(va, src).map(|()| PageBacking::Ram),
        };
        self.copy_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        tracing::debug!(page = p, src = m.src, dst = ?m.dst, took = ?t.elapsed(), "moved a lent page");
        match result {
            Ok(b) => {
                lock(&self.pages)[p] = b;
                Ok(true)
            }
            Err(e) => {
                let _ = protect(va, self.page, libc::PROT_READ | libc::PROT_WRITE);
                Err(format!("remapping page {p}: {e}"))
            }
        }
    }
}

impl Mover for Lending {
    fn move_frames(&self, plan: &MigrationPlan) -> Result<(), MoveError> {
        if plan.granule != self.page {
            return Err(MoveError {
                completed: 0,
                total: plan.len(),
                frame: 0,
                reason: format!(
                    "plan granule {} is not the window page {}",
                    plan.granule, self.page
                ),
            });
        }
        for (i, m) in plan.moves.iter().enumerate() {
            match self.move_one(m) {
                Ok(true) => {
                    self.moves.fetch_add(1, Ordering::Relaxed);
                    if m.dst == Destination::OutOfRegion {
                        self.moves_out.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(false) => {}
                Err(reason) => {
                    return Err(MoveError {
                        completed: i,
                        total: plan.len(),
                        frame: m.src,
                        reason,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Changes the protection of `len` bytes of the window at `va`.
pub fn protect(va: *mut u8, len: usize, prot: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `va..va+len` is page-aligned memory of the window mapping; mprotect changes no
    // contents, and the only writers it can stop are the guest (which then waits on the gate)
    // and the VMM's own accesses, which the gate's holders make.
    if unsafe { libc::mprotect(va.cast(), len, prot) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether any 4 KiB page of `va..va+len` is resident (the guest touched it).
fn resident(va: *mut u8, len: usize) -> bool {
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `vec` has one byte per 4 KiB page of the range, as mincore requires.
    let rc = unsafe { libc::mincore(va.cast(), len, vec.as_mut_ptr()) };
    // When in doubt, copy.
    rc != 0 || vec.iter().any(|b| b & 1 != 0)
}

/// How often a MAP polls a pinned page of its own range.
pub const PIN_WAIT_SLICE: Duration = Duration::from_micros(200);
