//! Allocation requests, policies and the allocation handle.
//!
//! One attempt ("sweep") is: a clean fit under one short lock hold; failing that, a
//! walk over the whole region in batches of candidates, each batch under its own
//! lock hold, migrating into the cheapest unpinned candidate of the batch. What
//! happens after a failed sweep is the request's [`Policy`].

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, debug_span, trace};

use super::cache::ShardRef;
use super::claim::{Batch, Committed, PinnedCandidate};
use super::Allocator;
use crate::error::AllocError;
use crate::frame::{self, AtomicFrameWord};
use crate::freetree::Class;
use crate::release::ReleaseNode;
use crate::stats::Stats;

/// What to do when no range can be had right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Never wait: try every candidate range once, skipping those with a pinned
    /// frame (`__GFP_NORETRY`-like, seed 004).
    FailFast,
    /// Sweep the whole region; if nothing worked, back off (woken early by pin
    /// releases and frees) and sweep again until `deadline` (seed 000).
    Retry { deadline: Instant },
    /// Sweep once; if the best candidate was blocked by a pin, wait up to `timeout`
    /// in total for that pin to be released, then sweep again.
    WaitForPin { timeout: Duration },
}

/// A request for `len` bytes aligned to `align` bytes (physical alignment where the
/// physical address is known, region-offset alignment otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocRequest {
    pub len: usize,
    /// Power of two; values below the granule mean "granule".
    pub align: usize,
    pub policy: Policy,
}

impl AllocRequest {
    /// `len` bytes, granule-aligned, fail-fast.
    pub fn new(len: usize) -> Self {
        AllocRequest {
            len,
            align: 1,
            policy: Policy::FailFast,
        }
    }

    pub fn align(mut self, align: usize) -> Self {
        self.align = align;
        self
    }

    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
}

/// A contiguous range handed out by [`Allocator::alloc`]. Dropping it (or calling
/// [`Allocation::free`]) releases the range without blocking or allocating.
pub struct Allocation {
    /// Keeps the allocator alive; per shard, see `cache::ShardRef`.
    owner: Arc<ShardRef>,
    pub(super) start: usize,
    /// 0 once the frames were handed back some other way (`into_occupants`).
    pub(super) frames: usize,
    extent: usize,
    migrated: usize,
    node: Option<Box<ReleaseNode>>,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocation")
            .field("offset", &self.offset())
            .field("len", &self.len())
            .field("extent", &self.extent())
            .field("phys", &self.phys_addr())
            .finish()
    }
}

impl Allocation {
    /// Byte offset in the region.
    pub fn offset(&self) -> usize {
        self.start * self.owner.shared.config.granule
    }

    /// Length in bytes (the request rounded up to whole frames).
    pub fn len(&self) -> usize {
        self.frames * self.owner.shared.config.granule
    }

    /// Never true: zero-length requests are rejected.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Frame indices covered.
    pub fn frames(&self) -> Range<usize> {
        self.start..self.start + self.frames
    }

    /// Host virtual address of the first byte.
    pub fn host_addr(&self) -> NonNull<u8> {
        let base = self.owner.shared.region.host_addr().as_ptr();
        NonNull::new(base.wrapping_add(self.offset())).unwrap_or(NonNull::dangling())
    }

    /// Host physical address of the first byte, when the region knows it.
    pub fn phys_addr(&self) -> Option<u64> {
        let e = self.owner.shared.layout.extents[self.extent];
        e.phys_frame.map(|pf| {
            (pf + (self.start - e.start) as u64) * self.owner.shared.config.granule as u64
        })
    }

    /// Index of the extent (see [`crate::Region::extents`]) holding the allocation.
    pub fn extent(&self) -> usize {
        self.owner.shared.layout.extents[self.extent].region_extent
    }

    /// Frames whose occupants were migrated to make room for this allocation.
    pub fn migrated_frames(&self) -> usize {
        self.migrated
    }

    /// Release now (same as dropping).
    pub fn free(self) {}
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.frames == 0 {
            return;
        }
        if self.try_cache() {
            self.owner.shared.wakeups.try_notify();
            return;
        }
        let s = &self.owner.shared;
        // Nothing per frame: allocated frames carry no lock-free state (see
        // `crate::frame`), so a release is one tree update, or one queue push.
        let arena = s.layout.arena_of(self.start);
        match arena.try_lock() {
            Some(mut m) => {
                m.tree.set_alloc(self.start, self.frames, false);
                if let Some(node) = self.node.take() {
                    m.recycle(node);
                }
            }
            None => {
                if let Some(node) = self.node.take() {
                    arena.released.push(node);
                }
                Stats::bump(&s.stats.c().frees_deferred, 1);
            }
        }
        Stats::bump(&s.stats.c().frees, 1);
        s.wakeups.try_notify();
    }
}

impl Allocation {
    /// Push a small block into the calling thread's cache: a `try_lock` of the shard
    /// and a push into reserved capacity, so it neither blocks nor allocates. False
    /// (nothing done) if the block is not cacheable, the shard is busy or its list
    /// is full.
    fn try_cache(&mut self) -> bool {
        let s = &self.owner.shared;
        let n = self.frames;
        let Some(k) = s.caches.order(n, n) else {
            return false;
        };
        if !s.block_aligned(self.extent, self.start, n) {
            return false;
        }
        let Some(mut sh) = s.caches.mine().try_lock() else {
            crate::shard::rehome();
            return false;
        };
        let list = &mut sh.lists[k];
        if list.len() >= list.capacity() {
            return false;
        }
        let Some(mut node) = self.node.take() else {
            return false;
        };
        node.extent = self.extent;
        list.push(node);
        sh.frees += 1;
        true
    }
}

/// Why one sweep found nothing.
#[derive(Default)]
struct SweepFail {
    candidates: usize,
    pinned: usize,
    move_failed: usize,
    first_pinned: Option<PinnedCandidate>,
}

impl Allocator {
    /// Allocate a contiguous range. See [`Policy`] for what happens when the region
    /// is busy. Never panics on bad input; see [`AllocError`] for every reason.
    pub fn alloc(&self, req: AllocRequest) -> Result<Allocation, AllocError> {
        let s = &self.shared;
        if let Some(k) = s.cache_order(req.len, req.align) {
            if let Some(a) = self.cache_pop(k) {
                return Ok(a);
            }
        }
        // The slow path: timed for the latency histogram, traced.
        let t0 = Instant::now();
        let _span =
            debug_span!("cma.alloc", len = req.len, align = req.align, policy = ?req.policy)
                .entered();
        let r = self.alloc_inner(req, t0);
        s.stats.local().alloc_latency.record(t0.elapsed());
        let c = s.stats.c();
        let counter = match &r {
            Ok(a) if a.migrated == 0 => {
                Stats::bump(&c.allocs_clean, 1);
                &c.allocs
            }
            Ok(_) => &c.allocs,
            Err(AllocError::InvalidRequest { .. }) => &c.fail_invalid,
            Err(AllocError::LargerThanExtent { .. }) => &c.fail_too_large,
            Err(AllocError::NoRoom { .. }) => &c.fail_no_room,
            Err(AllocError::AllCandidatesPinned { .. }) => &c.fail_all_pinned,
            Err(AllocError::DeadlinePassed { .. }) => &c.fail_deadline,
            Err(AllocError::PinWaitTimedOut { .. }) => &c.fail_pin_wait,
        };
        Stats::bump(counter, 1);
        match &r {
            Ok(a) => debug!(offset = a.offset(), migrated = a.migrated, "allocated"),
            Err(e) => debug!(error = %e, "allocation failed"),
        }
        r
    }

    fn validate(&self, req: &AllocRequest) -> Result<(usize, usize), AllocError> {
        let g = self.shared.config.granule;
        let invalid = |reason| AllocError::InvalidRequest {
            len: req.len,
            align: req.align,
            reason,
        };
        if req.len == 0 {
            return Err(invalid("zero length"));
        }
        if !req.align.is_power_of_two() {
            return Err(invalid("alignment is not a power of two"));
        }
        let largest = self.shared.layout.largest_extent;
        if req.len > largest && req.len <= self.shared.region.largest_extent() {
            return Err(invalid(
                "larger than one arena: an allocation never spans two arenas; configure fewer (AllocatorConfig::arenas)",
            ));
        }
        if req.len > largest {
            return Err(AllocError::LargerThanExtent {
                requested: req.len,
                largest_extent: largest,
            });
        }
        if req.align > largest {
            return Err(invalid("alignment larger than the largest extent"));
        }
        Ok((req.len.div_ceil(g), (req.align / g).max(1)))
    }

    fn alloc_inner(&self, req: AllocRequest, t0: Instant) -> Result<Allocation, AllocError> {
        let s = &self.shared;
        let (n, align) = self.validate(&req)?;
        let mut backoff = Duration::from_micros(50);
        let mut sweeps = 0u32;
        let mut drained = false;
        loop {
            sweeps += 1;
            Stats::bump(&s.stats.c().sweeps, 1);
            if sweeps > 1 {
                Stats::bump(&s.stats.c().retries, 1);
            }
            let fail = match self.sweep(n, align) {
                Ok(a) => return Ok(a),
                Err(f) => f,
            };
            // Frames held in small-block caches (this thread's or others') are free:
            // give them all back and sweep again before the policy acts, so that
            // cached frames never make a request fail. Once per policy step, so that
            // threads refilling their caches cannot keep a request sweeping.
            if !drained {
                drained = true;
                if s.drain_caches() > 0 {
                    continue;
                }
            }
            drained = false;
            let no_room = fail.candidates == 0;
            let requested = req.len;
            let busy = || {
                if no_room {
                    let allocated = s.layout.allocated_total() * s.config.granule;
                    AllocError::NoRoom {
                        requested,
                        align: req.align,
                        allocated_bytes: allocated,
                        region_bytes: s.region.len(),
                    }
                } else {
                    AllocError::AllCandidatesPinned {
                        requested,
                        candidates: fail.candidates,
                        pinned: fail.pinned,
                        move_failed: fail.move_failed,
                    }
                }
            };
            match req.policy {
                Policy::FailFast => return Err(busy()),
                Policy::Retry { deadline } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(AllocError::DeadlinePassed {
                            requested,
                            sweeps,
                            waited: t0.elapsed(),
                        });
                    }
                    let slice = backoff.min(deadline - now);
                    trace!(?slice, sweeps, "retry: backing off");
                    s.wakeups.wait(slice, || true);
                    backoff = (backoff * 2).min(Duration::from_millis(5));
                }
                Policy::WaitForPin { timeout } => {
                    let Some(pc) = fail.first_pinned else {
                        return Err(busy());
                    };
                    let left = timeout.saturating_sub(t0.elapsed());
                    if left.is_zero() || !self.wait_unpinned(pc.frame, left) {
                        return Err(AllocError::PinWaitTimedOut {
                            requested,
                            frame: pc.frame,
                            timeout,
                        });
                    }
                }
            }
        }
    }

    /// One attempt over the whole region: a clean fit in each arena, the calling
    /// thread's home arena first (other arenas only if their lock is free right
    /// now); failing that, the candidates of each arena, in the same order.
    fn sweep(&self, n: usize, align: usize) -> Result<Allocation, SweepFail> {
        let s = &self.shared;
        let order = s.caches.order(n, align);
        let (home, count) = (s.layout.home_arena(), s.layout.arenas.len());
        let arenas = || (0..count).map(move |i| &s.layout.arenas[(home + i) % count]);
        // For a cacheable size, the nodes of a refill batch are allocated before the
        // lock is taken.
        let mut spare: Vec<Box<ReleaseNode>> = match order {
            Some(k) => (1..s.caches.batch[k])
                .map(|_| ReleaseNode::new(0, n))
                .collect(),
            None => Vec::new(),
        };
        for arena in arenas() {
            let clean = {
                let m = if std::ptr::eq(arena, &s.layout.arenas[home]) {
                    Some(arena.lock_home(&s.stats))
                } else {
                    arena.try_lock()
                };
                let Some(mut m) = m else {
                    // Someone else's home arena, busy: not worth waiting for a
                    // clean fit there. Its ranges are still candidates below (a
                    // clean range is a candidate of cost 0).
                    continue;
                };
                let mut from = arena.start;
                let first = loop {
                    let Some((a, x)) = s.find_fit(&m, Class::Clean, from, n, align) else {
                        break None;
                    };
                    match s.claim_clean(&mut m, a, n) {
                        Ok(()) => break Some((a, x)),
                        Err(f) => from = f + 1,
                    }
                };
                if let (Some(k), Some((a, _))) = (order, first) {
                    s.refill(&mut m, k, a + n, &mut spare);
                }
                first.map(|(a, x)| (a, x, m.node(a, n)))
            };
            if let Some((a, x, node)) = clean {
                drop(spare);
                // The handle is built after the lock is dropped.
                trace!(start = a, "clean fit");
                return Ok(self.handle(a, n, x, 0, node));
            }
        }
        drop(spare);
        let mut fail = SweepFail::default();
        for arena in arenas() {
            let mut pos = arena.start;
            let is_home = std::ptr::eq(arena, &s.layout.arenas[home]);
            while pos < arena.end {
                let mut m = if is_home {
                    arena.lock_home(&s.stats)
                } else {
                    arena.lock()
                };
                let b: Batch = s.evaluate(&m, pos, arena.end, n, align);
                fail.candidates += b.evaluated;
                fail.pinned += b.pinned;
                Stats::bump(&s.stats.c().candidates_pinned, b.pinned as u64);
                fail.first_pinned = fail.first_pinned.or(b.first_pinned);
                pos = b.next.max(pos + 1);
                let Some(c) = b.best else { continue };
                debug!(start = c.start, cost = c.cost, "candidate chosen");
                let prepared = match s.prepare(&mut m, c.start, n) {
                    Ok(p) => p,
                    Err(f) => {
                        // A pin arrived after evaluation. Resume right past it, so the
                        // other candidates of this batch still get their one try.
                        fail.pinned += 1;
                        fail.first_pinned
                            .get_or_insert(PinnedCandidate { frame: f });
                        pos = pos.min(f + 1);
                        continue;
                    }
                };
                drop(m);
                let done = s.migrate(&prepared);
                let mut m = arena.lock();
                if s.commit(&mut m, prepared, done) == Committed::Allocation {
                    let node = m.node(c.start, n);
                    drop(m);
                    return Ok(self.handle(c.start, n, c.extent, done, node));
                }
                fail.move_failed += 1;
            }
        }
        Err(fail)
    }

    pub(super) fn handle(
        &self,
        start: usize,
        frames: usize,
        extent: usize,
        migrated: usize,
        node: Box<ReleaseNode>,
    ) -> Allocation {
        Allocation {
            owner: self.owners[self.shared.caches.index()].clone(),
            start,
            frames,
            extent,
            migrated,
            node: Some(node),
        }
    }

    /// The fast path: pop a block of order `k` from this thread's cache. `None` when
    /// the shard is busy or empty, or the block turned out to hold a pin left over
    /// from a release while pinned (it then goes back to the tree, which keeps it
    /// until the pin is dropped).
    fn cache_pop(&self, k: usize) -> Option<Allocation> {
        let s = &self.shared;
        let node = {
            let Some(mut sh) = s.caches.mine().try_lock() else {
                crate::shard::rehome();
                return None;
            };
            let node = sh.lists[k].pop()?;
            // A pin taken before the pop is seen here (see `cache.rs`); the check
            // reads only the pageblock hint unless the pageblock has pins.
            if s.words.first_pinned(node.start, node.frames).is_some() {
                drop(sh);
                s.layout
                    .lock_frame(node.start)
                    .tree
                    .set_alloc(node.start, node.frames, false);
                return None;
            }
            sh.hits += 1;
            node
        };
        Some(Allocation {
            owner: self.owners[s.caches.index()].clone(),
            start: node.start,
            frames: node.frames,
            extent: node.extent,
            migrated: 0,
            node: Some(node),
        })
    }

    /// Wait until frame `f` has no pins, up to `timeout`. True when released.
    fn wait_unpinned(&self, f: usize, timeout: Duration) -> bool {
        let s = &self.shared;
        let t = Instant::now();
        Stats::bump(&s.stats.c().pin_waits, 1);
        let pinned = || frame::pins_of(s.words[f].get()) > 0;
        while pinned() {
            let left = timeout.saturating_sub(t.elapsed());
            if left.is_zero() {
                Stats::bump(&s.stats.c().pin_wait_timeouts, 1);
                s.stats.local().pin_wait_latency.record(t.elapsed());
                return false;
            }
            s.wakeups.wait(left.min(Duration::from_millis(5)), pinned);
        }
        s.stats.local().pin_wait_latency.record(t.elapsed());
        true
    }
}
