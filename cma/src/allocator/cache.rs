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
//! Lock order: an arena's map lock before a shard. The fast paths take only a shard
//! (with `try_lock`); refill, drain and lookups take the map lock of the arena
//! holding the blocks first. A cache may hold blocks of any arena; a refill takes
//! blocks from the arena it holds locked.

use parking_lot::Mutex;

use super::{FrameExtent, MapState, Shared};
use crate::freetree::Class;
use crate::release::ReleaseNode;
use crate::shard::thread_shard;

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
/// Its lock is a `parking_lot` mutex: nearly always uncontended and held for a few
/// instructions. No holder ever waits for another lock or sleeps while holding it
/// (see the lock order above); the fast paths only `try_lock` it, and the rare
/// waiter (a drain, a lookup, a refill) spins briefly before it would park.
#[repr(align(128))]
pub(crate) struct Padded(pub(crate) Mutex<Shard>);

pub(crate) struct Caches {
    pub(crate) shards: Box<[Padded]>,
    /// Blocks claimed per refill, per order; 0 disables that order.
    pub(crate) batch: [usize; ORDERS],
    mask: usize,
}

/// What an `Allocation` holds to keep the allocator alive: one per shard, each on
/// its own cache lines. Every handle taking a reference on the same `Arc<Shared>`
/// would make two threads' allocations and frees bounce that one reference count
/// (and the fields next to it) between their cores; with one owner per shard, a
/// thread only touches its shard's count. The allocator handle holds the owners;
/// an owner holds the shared state, so there is no cycle.
#[repr(align(128))]
pub(crate) struct ShardRef {
    pub(crate) shared: std::sync::Arc<Shared>,
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
                Padded(Mutex::new(Shard {
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

    /// The calling thread's shard number.
    #[inline]
    pub(crate) fn index(&self) -> usize {
        thread_shard() & self.mask
    }

    /// The calling thread's shard.
    #[inline]
    pub(crate) fn mine(&self) -> &Mutex<Shard> {
        &self.shards[self.index()].0
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
    /// The cache order that can serve a request of `len` bytes aligned to `align`
    /// (a well-formed request of 1..=16 frames, a power of two, aligned to at most
    /// its size), if caches are enabled for it.
    #[inline]
    pub(crate) fn cache_order(&self, len: usize, align: usize) -> Option<usize> {
        let g = self.config.granule;
        if len == 0 || !align.is_power_of_two() || len > g << (ORDERS - 1) {
            return None;
        }
        self.caches.order(len.div_ceil(g), (align / g).max(1))
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
            crate::stats::Stats::bump(&self.stats.c().cache_refills, 1);
        }
    }

    /// Give every cached block back to its arena's tree, one arena at a time (the
    /// caller holds no map lock). Returns the frames returned.
    pub(crate) fn drain_caches(&self) -> usize {
        let mut frames = 0;
        for a in self.layout.arenas.iter() {
            let mut m = a.lock();
            for sh in self.caches.shards.iter() {
                let mut sh = sh.0.lock();
                for list in sh.lists.iter_mut() {
                    list.retain(|node| {
                        let mine = (a.start..a.end).contains(&node.start);
                        if mine {
                            m.tree.set_alloc(node.start, node.frames, false);
                            frames += node.frames;
                        }
                        !mine
                    });
                }
            }
        }
        if frames > 0 {
            crate::stats::Stats::bump(&self.stats.c().cache_drained_frames, frames as u64);
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
        let e: FrameExtent = self.layout.extents[extent];
        e.align_up(start, n) == start
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{
        AllocError, AllocRequest, Allocator, AllocatorConfig, Backing, FrameState, MemcpyMover,
        Occupant, Policy, Region,
    };

    const K4: usize = 4096;

    const FRAMES: usize = 4096;

    /// 16 MiB: every cache order is enabled with a batch of at least 1.
    fn small() -> Allocator {
        let r = Arc::new(Region::reserve(FRAMES * K4, Backing::Memfd).unwrap());
        let m = Arc::new(MemcpyMover::new(r.clone()));
        let c = AllocatorConfig {
            pageblock: 64 * K4,
            ..Default::default()
        };
        Allocator::new(r, c, m).unwrap()
    }

    /// Blocks sitting in some cache (allocated in the tree, not handed out).
    fn cached_frames(a: &Allocator) -> usize {
        a.shared
            .caches
            .shards
            .iter()
            .map(|s| {
                s.0.lock()
                    .lists
                    .iter()
                    .flatten()
                    .map(|n| n.frames)
                    .sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn small_requests_hit_the_cache_after_one_refill() {
        let a = small();
        assert!(a.shared.caches.batch.iter().all(|b| *b >= 1));
        let first = a.alloc(AllocRequest::new(K4)).unwrap();
        let start = first.frames().start;
        assert_eq!(start, 0, "the refill hands out the first fit itself");
        drop(first);
        for _ in 0..100 {
            let x = a.alloc(AllocRequest::new(K4)).unwrap();
            assert_eq!(
                x.frames().start,
                start,
                "the cache gives back the hot block"
            );
        }
        let st = a.stats();
        assert_eq!(st.cache_refills, 1);
        assert_eq!(st.allocs, 101);
        assert_eq!(st.allocs_cached, 100);
        assert_eq!(st.frees, 101);
        assert_eq!(st.frees_cached, 101);
        // The slow path alone is timed.
        assert_eq!(st.alloc_latency.count(), 1);
        // A 64 KiB block, aligned to 64 KiB, also comes from a cache.
        let x = a.alloc(AllocRequest::new(16 * K4).align(16 * K4)).unwrap();
        assert_eq!(x.frames().start % 16, 0);
        drop(x);
        let y = a.alloc(AllocRequest::new(16 * K4)).unwrap();
        assert_eq!(y.frames().start % 16, 0);
        assert_eq!(a.stats().allocs_cached, 101);
    }

    #[test]
    fn cached_frames_are_free_to_everyone_else() {
        let a = small();
        drop(a.alloc(AllocRequest::new(K4)).unwrap());
        let c = cached_frames(&a);
        assert!(c >= 2, "{c} frames cached");
        // Cached blocks look free: not pinnable, reported free, placeable.
        let f = a
            .shared
            .caches
            .shards
            .iter()
            .find_map(|s| s.0.lock().lists[0].last().map(|n| n.start));
        let f = f.unwrap();
        assert_eq!(a.frame_info(f).unwrap().state, FrameState::Free);
        assert!(a.pin(f).is_err());
        assert!(a.pin_longterm(f).is_err());
        let o = Occupant { owner: 7, page: 1 };
        a.place_occupant_at(f, o).unwrap();
        assert_eq!(a.frame_info(f).unwrap().state, FrameState::Occupied(o));
        a.vacate(f, o).unwrap();
        // usage() gives the caches back, so everything is free again.
        let u = a.usage();
        assert_eq!((u.allocated, u.largest_clean_run), (0, FRAMES));
        assert_eq!(cached_frames(&a), 0);
    }

    /// Frames cached by one thread are the only free frames; another thread's
    /// request must drain the caches rather than fail with NoRoom.
    #[test]
    fn caches_are_drained_before_a_request_fails() {
        let a = small();
        // Fill the region with single frames (through cache refills).
        let mut live = Vec::new();
        while let Ok(x) = a.alloc(AllocRequest::new(K4)) {
            live.push(x);
        }
        assert_eq!(live.len(), FRAMES, "every frame can be had one by one");
        // Free a run of them on another thread: they land in that thread's cache.
        let freed: Vec<_> = live.drain(100..140).collect();
        std::thread::spawn(move || drop(freed)).join().unwrap();
        assert!(cached_frames(&a) > 0);
        // This thread: a 32-frame request needs those cached frames.
        let x = a.alloc(AllocRequest::new(32 * K4)).unwrap();
        assert!(x.frames().start >= 100 && x.frames().end <= 140);
        assert!(a.stats().cache_drained_frames > 0);
        // And a cached single frame is had by a thread whose own cache is empty.
        let freed: Vec<_> = live.drain(0..1).collect();
        std::thread::spawn(move || drop(freed)).join().unwrap();
        let other = a.clone();
        let got = std::thread::spawn(move || {
            // Two fresh threads: whichever shard this one maps to, it must not see
            // NoRoom while a frame sits in any cache.
            other.alloc(AllocRequest::new(K4)).map(|x| x.frames())
        })
        .join()
        .unwrap();
        assert!(got.is_ok(), "{got:?}");
        // Nothing left anywhere: a real NoRoom (with every cache drained). Free
        // now: the 8 frames x left, the one `got` took and freed, and x's 32.
        drop(x);
        let mut hold = Vec::new();
        let e = loop {
            match a.alloc(AllocRequest::new(K4)) {
                Ok(y) => hold.push(y),
                Err(e) => break e,
            }
        };
        assert!(matches!(e, AllocError::NoRoom { .. }), "{e}");
        assert_eq!(hold.len(), 41);
        assert_eq!(cached_frames(&a), 0);
    }

    /// A frame freed while pinned may enter a cache but is not handed out again
    /// until the pin is dropped; it is not lost either.
    #[test]
    fn a_block_freed_while_pinned_is_not_handed_out_from_the_cache() {
        let a = small();
        let x = a.alloc(AllocRequest::new(K4)).unwrap();
        let f = x.frames().start;
        let pin = a.pin(f).unwrap();
        drop(x);
        let mut live = Vec::new();
        while let Ok(y) = a.alloc(AllocRequest::new(K4).policy(Policy::FailFast)) {
            assert!(!y.frames().contains(&f), "pinned frame {f} handed out");
            live.push(y);
        }
        assert_eq!(live.len(), FRAMES - 1);
        drop(pin);
        let y = a.alloc(AllocRequest::new(K4)).unwrap();
        assert_eq!(y.frames().start, f);
    }

    #[test]
    fn occupants_use_cached_frames_before_reporting_a_full_region() {
        let a = small();
        let mut live = Vec::new();
        while let Ok(x) = a.alloc(AllocRequest::new(K4)) {
            live.push(x);
        }
        drop(live); // up to the cache capacity stays cached, the rest goes back
        let mut placed = 0;
        while a
            .place_occupant(Occupant {
                owner: 1,
                page: placed,
            })
            .is_ok()
        {
            placed += 1;
        }
        assert_eq!(placed, FRAMES as u64);
    }

    #[test]
    fn caches_can_be_disabled() {
        let r = Arc::new(Region::reserve(1024 * K4, Backing::Memfd).unwrap());
        let m = Arc::new(MemcpyMover::new(r.clone()));
        let c = AllocatorConfig {
            small_cache_batch: 0,
            ..Default::default()
        };
        let a = Allocator::new(r, c, m).unwrap();
        for _ in 0..10 {
            drop(a.alloc(AllocRequest::new(K4)).unwrap());
        }
        let st = a.stats();
        assert_eq!(
            (st.allocs_cached, st.frees_cached, st.cache_refills),
            (0, 0, 0)
        );
    }
}
