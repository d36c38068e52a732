//! Per-shard caches of small free blocks: the fast path for small requests, the way
//! Linux answers the same cost with per-CPU page lists (`pcp` lists).
//!
//! A request of 1, 2, 4, 8 or 16 frames (alignment at most its size) is served from
//! the calling thread's shard without the map lock and without a tree update: one
//! `try_lock` of a shard mutex that no other thread normally touches, and a `pop`.
//! A release of such an allocation pushes it back the same way. The blocks in a
//! cache are marked allocated in the free-run tree ("pre-claimed"), so the tree
//! never hands them to anyone else; they were claimed in batches under one hold of
//! the map lock (refill) and go back to the tree in batches (drain).
//!
//! Invariants, and where they are kept:
//! - **No double hand-out.** A block is in at most one list, and a list is only
//!   touched under its shard's mutex. The tree keeps a cached block allocated.
//! - **Pinned frames are never handed out.** A frame freed while pinned may enter a
//!   cache; every pop checks the block's frames through the pageblock pin hint
//!   (`first_pinned`) and returns a pinned block to the tree instead. A pin cannot be
//!   taken on a cached block: `pin` on a non-occupied frame holds the map lock and
//!   refuses frames it finds in a cache (`Shared::cached`), exactly as it refuses
//!   free frames.
//! - **Release never blocks and never allocates.** A release only `try_lock`s the
//!   shard and pushes into a list whose capacity was reserved up front; when the
//!   shard is busy or the list is full it takes the ordinary release path.
//! - **Cached frames are reusable.** Any request that fails its sweep drains every
//!   cache back into the tree and sweeps again before its policy acts, so frames
//!   cached by one thread never make another thread's request fail. Occupant
//!   placement does the same before reporting a full region, `place_occupant_at`
//!   takes a block back from a cache, and `usage` drains the caches so that it
//!   reports free frames as free.
//!
//! Lock order: map before shard. The fast paths take only a shard (with
//! `try_lock`); refill, drain and lookups take the map lock first.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{AllocRequest, FrameExtent, MapState, Shared};
use crate::freetree::Class;
use crate::release::ReleaseNode;

/// Cached sizes: 2^0 ..= 2^(ORDERS-1) frames.
pub(crate) const ORDERS: usize = 5;

/// One shard's lists, one per order, and its fast-path counters (plain integers:
/// they are only touched under the shard mutex, so they cost no shared cache line).
pub(crate) struct Shard {
    // Boxed on purpose: a node moves between a list and an `Allocation` (whose
    // release may need it for the deferred-release stack) without being reallocated.
    #[allow(clippy::vec_box)]
    pub(crate) lists: [Vec<Box<ReleaseNode>>; ORDERS],
    pub(crate) hits: u64,
    pub(crate) frees: u64,
}

/// A shard on its own cache lines, so that two threads' shards never share one.
#[repr(align(128))]
pub(crate) struct Padded(pub(crate) parking_lot::Mutex<Shard>);

pub(crate) struct Caches {
    pub(crate) shards: Box<[Padded]>,
    /// Blocks claimed per refill, per order; 0 disables that order.
    pub(crate) batch: [usize; ORDERS],
    mask: usize,
}

thread_local! {
    /// This thread's shard number (taken round-robin at first use).
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

fn thread_shard() -> usize {
    SHARD.with(|c| {
        let v = c.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
        c.set(v);
        v
    })
}

impl Caches {
    /// `batch` blocks per refill (0: no caches). Each shard's list holds at most
    /// `2 * batch` blocks, and the batch shrinks for small regions so that all
    /// caches together hold at most about a tenth of the region.
    pub(crate) fn new(frames: usize, batch: usize) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let nshards = cpus.clamp(2, 16).next_power_of_two();
        let mut b = [0; ORDERS];
        for (k, bk) in b.iter_mut().enumerate() {
            // 2 * batch * 2^k frames per shard and order, ORDERS orders, nshards
            // shards: at most frames / 10 or so in total.
            let fit = frames / ((nshards * ORDERS * 20) << k);
            *bk = batch.min(fit);
        }
        let shards = (0..nshards)
            .map(|_| {
                Padded(parking_lot::Mutex::new(Shard {
                    lists: std::array::from_fn(|k| Vec::with_capacity(2 * b[k])),
                    hits: 0,
                    frees: 0,
                }))
            })
            .collect();
        Caches {
            shards,
            batch: b,
            mask: nshards - 1,
        }
    }

    /// The calling thread's shard.
    pub(crate) fn mine(&self) -> &parking_lot::Mutex<Shard> {
        &self.shards[thread_shard() & self.mask].0
    }

    /// The cache order serving `n` frames aligned to `align` frames, if any.
    #[inline]
    pub(crate) fn order(&self, n: usize, align: usize) -> Option<usize> {
        if n.is_power_of_two() && n <= 1 << (ORDERS - 1) && align <= n {
            let k = n.trailing_zeros() as usize;
            (self.batch[k] > 0).then_some(k)
        } else {
            None
        }
    }
}

impl Shared {
    /// The cache order that can serve `req` (a well-formed request of 1..=16 frames,
    /// a power of two, aligned to at most its size), if caches are enabled for it.
    #[inline]
    pub(crate) fn cache_order(&self, req: &AllocRequest) -> Option<usize> {
        let g = self.config.granule;
        if req.len == 0 || !req.align.is_power_of_two() || req.len > g << (ORDERS - 1) {
            return None;
        }
        self.caches
            .order(req.len.div_ceil(g), (req.align / g).max(1))
    }

    /// Under the map lock, after a clean fit of order `k` was claimed for the
    /// request itself: claim up to a batch more clean blocks of that order (aligned
    /// to their size, first fit from `from`) into the calling thread's cache, using
    /// the nodes in `spare` (allocated before the lock was taken).
    #[allow(clippy::vec_box)] // see `Shard::lists`
    pub(crate) fn refill(
        &self,
        m: &mut MapState,
        k: usize,
        from: usize,
        spare: &mut Vec<Box<ReleaseNode>>,
    ) {
        let n = 1usize << k;
        let mut sh = self.caches.mine().lock();
        let room = sh.lists[k].capacity() - sh.lists[k].len();
        if room == 0 || spare.is_empty() {
            return;
        }
        let mut pos = from;
        let mut got = 0;
        while got < room {
            let Some(mut node) = spare.pop() else { break };
            let Some((a, x)) = self.find_fit(m, Class::Clean, pos, n, n) else {
                break;
            };
            match self.claim_clean(m, a, n) {
                Ok(()) => {
                    node.start = a;
                    node.frames = n;
                    node.extent = x;
                    sh.lists[k].push(node);
                    got += 1;
                    pos = a + n;
                }
                Err(f) => {
                    spare.push(node);
                    pos = f + 1;
                }
            }
        }
        // Hand out the lowest block first (first fit, as the slow path would).
        sh.lists[k].sort_unstable_by_key(|n| std::cmp::Reverse(n.start));
        if got > 0 {
            crate::stats::Stats::bump(&self.stats.c.cache_refills, 1);
        }
    }

    /// Give every cached block back to the tree. Returns the frames returned.
    pub(crate) fn drain_caches(&self, m: &mut MapState) -> usize {
        let mut frames = 0;
        for sh in self.caches.shards.iter() {
            let mut sh = sh.0.lock();
            for list in sh.lists.iter_mut() {
                for node in list.drain(..) {
                    m.tree.set_alloc(node.start, node.frames, false);
                    frames += node.frames;
                }
            }
        }
        if frames > 0 {
            crate::stats::Stats::bump(&self.stats.c.cache_drained_frames, frames as u64);
        }
        frames
    }

    /// Is frame `f` inside a cached block? (The map lock is held: `m` proves it.)
    pub(crate) fn cached(&self, _m: &MapState, f: usize) -> bool {
        self.caches.shards.iter().any(|sh| {
            sh.0.lock()
                .lists
                .iter()
                .flatten()
                .any(|n| (n.start..n.start + n.frames).contains(&f))
        })
    }

    /// Take the cached block holding frame `f` (if any) out of its cache and give it
    /// back to the tree. True if there was one.
    pub(crate) fn uncache(&self, m: &mut MapState, f: usize) -> bool {
        for sh in self.caches.shards.iter() {
            let mut sh = sh.0.lock();
            for list in sh.lists.iter_mut() {
                if let Some(i) = list
                    .iter()
                    .position(|n| (n.start..n.start + n.frames).contains(&f))
                {
                    let node = list.swap_remove(i);
                    m.tree.set_alloc(node.start, node.frames, false);
                    return true;
                }
            }
        }
        false
    }

    /// Is `[start, start + n)` aligned to `n` frames (physically, where known), as a
    /// cached block of order log2(n) must be?
    pub(crate) fn block_aligned(&self, extent: usize, start: usize, n: usize) -> bool {
        let e: FrameExtent = self.extents[extent];
        e.align_up(start, n) == start
    }
}
