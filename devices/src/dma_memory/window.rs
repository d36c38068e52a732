//! The DMA window's host side: what backs each window page, and the remapping that changes it.
//!
//! Every window page (one region page: 4 KiB for a memfd region, 2 MiB for hugetlb) is backed
//! by ordinary anonymous memory (`Ram`), by a region frame lent to it (`Lent`), or by a frame of
//! a DMA mapping (`Mapped`); any of them may also carry long-term pins ([`PageState`]). The
//! window is the allocator's [`Mover`]: to move a lent page it write-protects it (a vCPU that
//! writes it gets `EFAULT` from `KVM_RUN` and waits on the [`MoveGate`]; device threads are kept
//! out by the gate), copies the frame and maps the destination over the page with one
//! `mmap(MAP_FIXED)` (or `mremap` of a filled anonymous page), which KVM follows through its MMU
//! notifier.
//!
//! Everything here that touches the window's mapping takes page indices, never pointers: the
//! window's address range is fixed at construction, checked against guest memory.
//!
//! Lock: `pages` guards the table and the orphans. It is held for short updates only, and
//! across the allocator's in-place conversions (order: `pages` before the allocator's map
//! lock). The allocator calls the mover with none of its locks held; the mover takes `pages`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cma::{Destination, FrameMove, MigrationPlan, MoveError, Mover, Occupant, Region};

use crate::guest_memory::MoveGate;

/// The owner id of window pages in the allocator's occupant table.
pub const WINDOW_OWNER: u64 = 1;

/// The allocator's name for window page `page`.
pub(super) fn occupant(page: usize) -> Occupant {
    Occupant {
        owner: WINDOW_OWNER,
        page: page as u64,
    }
}

/// What backs a window page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Ordinary anonymous host memory: the region is smaller than the window (overcommit), or
    /// the page was moved out (no clean frame left, or for a long-term pin).
    Ram,
    /// Region frame `f`, lent: the allocator records the page as its movable occupant.
    Lent(usize),
    /// Region frame `f`, part of a DMA mapping's allocation.
    Mapped(usize),
}

impl Backing {
    /// The region frame behind the page, if any.
    pub fn frame(self) -> Option<usize> {
        match self {
            Backing::Ram => None,
            Backing::Lent(f) | Backing::Mapped(f) => Some(f),
        }
    }
}

/// A window page as the owner sees it: its backing, and how many long-term pins hold the host
/// page that backs it now. A long-term pin (io_uring fixed buffer, an IOMMU mapping) holds the
/// *host page*, so a pinned guest page is never re-backed: not moved, not lent, not MAPped
/// elsewhere, until the last pin goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageState {
    pub backing: Backing,
    pub longterm_pins: u32,
}

impl PageState {
    pub fn pinned(&self) -> bool {
        self.longterm_pins > 0
    }
}

/// The page table and the frames left behind while a transient pin held them.
pub(super) struct Pages {
    pub table: Vec<PageState>,
    /// Frames whose page moved away while a transient pin held them; freed when unpinned.
    pub orphans: Vec<(usize, Occupant)>,
}

/// Counters of what the window did.
#[derive(Default)]
pub(super) struct MoveCounters {
    pub moves: AtomicU64,
    pub moves_out: AtomicU64,
    pub copy_ns: AtomicU64,
}

pub(super) struct Window {
    region: Arc<Region>,
    /// Guest-physical base and length of the window.
    pub base: u64,
    pub len: u64,
    /// Where the window starts in the VMM (checked against guest memory at construction).
    host_addr: usize,
    pub page: usize,
    /// Lent whole and never moved: the region maps only in pieces larger than `page`.
    pub fixed: bool,
    pages: Mutex<Pages>,
    pub gate: Arc<MoveGate>,
    pub counters: MoveCounters,
}

impl Window {
    /// `host_addr`: the start of the VMM's mapping of the window, `len` bytes that guest memory
    /// owns for the process's lifetime (the caller checked it).
    pub fn new(
        region: Arc<Region>,
        (base, len): (u64, u64),
        page: usize,
        fixed: bool,
        host_addr: usize,
        gate: Arc<MoveGate>,
    ) -> Self {
        let n = (len / page as u64) as usize;
        let ram = PageState {
            backing: Backing::Ram,
            longterm_pins: 0,
        };
        Self {
            region,
            base,
            len,
            host_addr,
            page,
            fixed,
            pages: Mutex::new(Pages {
                table: vec![ram; n],
                orphans: Vec::new(),
            }),
            gate,
            counters: MoveCounters::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Pages> {
        // Every critical section leaves the table consistent at each step.
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn page_count(&self) -> usize {
        (self.len / self.page as u64) as usize
    }

    pub fn page_of(&self, gpa: u64) -> usize {
        ((gpa - self.base) / self.page as u64) as usize
    }

    /// The guest-physical address of window page `p`.
    pub fn page_gpa(&self, p: usize) -> u64 {
        self.base + (p * self.page) as u64
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// The VMM's address of window page `p`.
    fn page_ptr(&self, p: usize) -> *mut u8 {
        (self.host_addr + p * self.page) as *mut u8
    }

    /// The region mapping's address of frame `f`.
    pub fn frame_ptr(&self, f: usize) -> *mut u8 {
        self.region.host_addr().as_ptr().wrapping_add(f * self.page)
    }

    /// The VMM's address of window page `p`, for a holder that registers pages with the
    /// kernel (io_uring fixed buffers).
    pub fn page_addr(&self, p: usize) -> usize {
        self.page_ptr(p) as usize
    }

    /// Write-protects (`writable == false`) or unprotects window pages `first..first + n`.
    pub fn protect(&self, first: usize, n: usize, writable: bool) -> std::io::Result<()> {
        self.check(first, n)?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: pages `first..first + n` lie inside the window mapping (checked above), which
        // guest memory keeps for the process's lifetime; mprotect changes no contents. The
        // writers it stops are the guest (which then waits on the gate) and VMM threads, which
        // reach guest memory only through the gate that the caller holds closed.
        if unsafe { libc::mprotect(self.page_ptr(first).cast(), n * self.page, prot) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn check(&self, first: usize, n: usize) -> std::io::Result<()> {
        if first.checked_add(n).is_none_or(|e| e > self.page_count()) {
            return Err(std::io::Error::other(format!(
                "pages {first}..+{n} are outside the window's {} pages",
                self.page_count()
            )));
        }
        Ok(())
    }

    /// Copies window pages `first..first + n` into the region from frame `f0` on (a MAP that
    /// keeps the guest's bytes). The caller has write-protected the pages.
    pub fn copy_into_frames(&self, first: usize, n: usize, f0: usize) -> std::io::Result<()> {
        self.check(first, n)?;
        if f0
            .checked_add(n)
            .is_none_or(|e| e * self.page > self.region.len())
        {
            return Err(std::io::Error::other(format!(
                "frames {f0}..+{n} outside the region"
            )));
        }
        // SAFETY: both ranges are `n` pages of live mappings, checked above: the window's
        // (read-only now, so stable) and the region's, whose frames belong to the caller's
        // allocation. They cannot overlap: the region is a separate mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.page_ptr(first).cast_const(),
                self.frame_ptr(f0),
                n * self.page,
            );
        }
        Ok(())
    }

    /// Maps `n` region frames from `f0` over window pages `first..first + n`, read-write, shared
    /// with the region: one `mmap` per run of frames that are consecutive in the region's file
    /// (2 MiB pages are ordered by physical address, so file and region order can differ).
    pub fn map_frames(&self, first: usize, f0: usize, n: usize) -> std::io::Result<()> {
        self.check(first, n)?;
        let file_offset = |f: usize| {
            self.region
                .file_offset(f * self.page)
                .ok_or_else(|| std::io::Error::other(format!("frame {f} outside the region")))
        };
        let mut i = 0;
        while i < n {
            let start = file_offset(f0 + i)?;
            let mut run = 1;
            while i + run < n && file_offset(f0 + i + run)? == start + (run * self.page) as u64 {
                run += 1;
            }
            // SAFETY: pages `first + i ..` for `run` pages lie inside the window mapping
            // (checked above); MAP_FIXED replaces exactly those pages and keeps the range
            // mapped, so guest memory's view of it stays valid. The region fd outlives the
            // mapping (the owner holds the region).
            let rc = unsafe {
                libc::mmap(
                    self.page_ptr(first + i).cast(),
                    run * self.page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    // The region's pages exist already: fill the page tables now rather than
                    // fault them in one by one when the guest first touches them.
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    self.region.fd(),
                    start as libc::off_t,
                )
            };
            if rc == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            i += run;
        }
        Ok(())
    }

    /// Moves the bytes of frame `src` into fresh anonymous memory that replaces window page `p`
    /// in one step.
    fn move_to_ram(&self, p: usize, src: usize) -> std::io::Result<()> {
        self.check(p, 1)?;
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
        // SAFETY: `scratch` is a fresh page-sized mapping; frame `src` is one page of the region
        // mapping, which nobody writes while the allocator has the frame frozen for the move.
        unsafe { std::ptr::copy_nonoverlapping(self.frame_ptr(src), scratch.cast(), self.page) };
        // SAFETY: moves our scratch mapping over window page `p` (checked above; MREMAP_FIXED
        // replaces what was there, so the window stays mapped); both are page-aligned and one
        // page long.
        let rc = unsafe {
            libc::mremap(
                scratch,
                self.page,
                self.page,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                self.page_ptr(p).cast::<libc::c_void>(),
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

    /// Whether the guest ever touched window page `p` (any 4 KiB of it is resident).
    fn resident(&self, p: usize) -> bool {
        let mut vec = vec![0u8; self.page.div_ceil(4096)];
        // SAFETY: page `p` is inside the window mapping (callers pass table indices); `vec` has
        // one byte per 4 KiB page of it, as mincore requires.
        let rc = unsafe { libc::mincore(self.page_ptr(p).cast(), self.page, vec.as_mut_ptr()) };
        // When in doubt, copy.
        rc != 0 || vec.iter().any(|b| b & 1 != 0)
    }

    /// Lends frames `0..n` to window pages `0..n` at once (a region lent whole): under write
    /// protection, copies what the guest has in every page it touched, then maps the region over
    /// the window. The guest may have used the window before the region was ready (the region
    /// is reserved while it boots): without the copy its pages would turn into the region's.
    pub fn lend_whole(&self, n: usize) -> std::io::Result<()> {
        self.check(0, n)?;
        let _moving = self.gate.begin();
        let result = self.protect(0, n, false).and_then(|()| {
            for p in (0..n).filter(|&p| self.resident(p)) {
                // SAFETY: page `p` of the window and frame `p` of the region: separate live
                // mappings of one page each. The page is read-only now, so stable.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.page_ptr(p).cast_const(),
                        self.frame_ptr(p),
                        self.page,
                    )
                };
            }
            self.map_frames(0, 0, n)
        });
        if result.is_err() {
            let _ = self.protect(0, n, true);
        }
        result
    }

    /// Moves RAM-backed page `p` onto frame `f` (already recorded as its occupant): under write
    /// protection, copies what the guest has there (if it touched it) and remaps. The caller
    /// updates the table.
    pub fn lend_page(&self, p: usize, f: usize) -> std::io::Result<()> {
        self.check(p, 1)?;
        // Write-protect first: a write between the residency check and the remap would
        // otherwise be lost.
        let _moving = self.gate.begin();
        let result = self.protect(p, 1, false).and_then(|()| {
            if self.resident(p) {
                // SAFETY: page `p` of the window and frame `f` of the region: separate live
                // mappings of one page each. The page is read-only now, so stable.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.page_ptr(p).cast_const(),
                        self.frame_ptr(f),
                        self.page,
                    )
                };
            }
            self.map_frames(p, f, 1)
        });
        if result.is_err() {
            let _ = self.protect(p, 1, true);
        }
        result
    }

    /// One move of a plan. `Ok(false)`: the occupant was an orphan (nothing to copy).
    fn move_one(&self, m: &FrameMove) -> Result<bool, String> {
        let p = m.occupant.page as usize;
        if m.occupant.owner != WINDOW_OWNER || p >= self.page_count() {
            return Err(format!("{:?} is not a window page", m.occupant));
        }
        {
            let mut pages = self.lock();
            let state = pages.table[p];
            if state.backing != Backing::Lent(m.src) {
                // The page left this frame while a transient pin held it; only the books move.
                if let Some(i) = pages
                    .orphans
                    .iter()
                    .position(|&(f, o)| f == m.src && o == m.occupant)
                {
                    match m.dst {
                        Destination::Frame(d) => pages.orphans[i].0 = d,
                        Destination::OutOfRegion => {
                            pages.orphans.swap_remove(i);
                        }
                    }
                    return Ok(false);
                }
                return Err(format!("page {p} is not on frame {}", m.src));
            }
            if state.pinned() {
                // The allocator never plans a move of a pinned frame; a long-term pin on the
                // page means its frame is pinned. Refuse rather than tear the pin loose.
                return Err(format!("page {p} is pinned long-term"));
            }
        }
        let _moving = self.gate.begin();
        self.protect(p, 1, false)
            .map_err(|e| format!("write-protect: {e}"))?;
        let t = Instant::now();
        let result = match m.dst {
            Destination::Frame(d) => {
                // SAFETY: two distinct frames of the region mapping (the allocator never moves a
                // frame onto itself), both frozen by the allocator for the plan.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.frame_ptr(m.src),
                        self.frame_ptr(d),
                        self.page,
                    )
                };
                self.map_frames(p, d, 1).map(|()| Backing::Lent(d))
            }
            Destination::OutOfRegion => self.move_to_ram(p, m.src).map(|()| Backing::Ram),
        };
        self.counters
            .copy_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        tracing::debug!(page = p, src = m.src, dst = ?m.dst, took = ?t.elapsed(), "moved a lent page");
        match result {
            Ok(b) => {
                self.lock().table[p].backing = b;
                Ok(true)
            }
            Err(e) => {
                let _ = self.protect(p, 1, true);
                Err(format!("remapping page {p}: {e}"))
            }
        }
    }
}

impl Mover for Window {
    fn move_frames(&self, plan: &MigrationPlan) -> Result<(), MoveError> {
        if self.fixed {
            return Err(MoveError {
                completed: 0,
                total: plan.len(),
                frame: 0,
                reason: "the region is lent whole in 1G pages and never moves".into(),
            });
        }
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
                    self.counters.moves.fetch_add(1, Ordering::Relaxed);
                    if m.dst == Destination::OutOfRegion {
                        self.counters.moves_out.fetch_add(1, Ordering::Relaxed);
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
