//! The allocator: shared state, construction, occupants and frame queries.
//! Allocation lives in `alloc.rs`, claiming and migrating ranges in `claim.rs`,
//! pins in `pin.rs`, lending in place in `lend.rs`, small-block caches in
//! `cache.rs`.

mod alloc;
mod cache;
mod claim;
mod lend;
mod pin;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing::trace;

pub use alloc::{AllocRequest, Allocation, Policy};
pub use pin::{LongTermPin, PinGuard, PinnedAs};

use crate::error::{ConfigError, OccupyError};
use crate::frame::{self, FrameKind, FrameWords};
use crate::freetree::ArenaTree;
use crate::migrate::{Mover, Occupant};
use crate::region::Region;
use crate::release::{ReleaseNode, ReleaseQueue};
use crate::stats::{Stats, StatsSnapshot};

/// Tuning knobs. The defaults are what the docs assume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// Frame size in bytes (power of two, >= 4 KiB). Default 4 KiB.
    pub granule: usize,
    /// Pageblock size in bytes (power-of-two multiple of the granule). Default 2 MiB.
    /// Pin summaries are kept per pageblock, so a candidate range only inspects the
    /// frames of pageblocks that have pins at all.
    pub pageblock: usize,
    /// Candidate ranges evaluated per map-lock hold when migration is needed. Bounds
    /// the critical section; a sweep continues in further holds until it has covered
    /// the whole region.
    pub candidates_per_hold: usize,
    /// Small-block caches (see `docs/cma.md`): blocks of 1, 2, 4, 8 or 16 frames
    /// claimed per refill of a per-shard cache, so that small requests usually take
    /// no map lock and update no tree. 0 disables the caches. Default 16. The
    /// effective batch shrinks on small regions so that the caches never hold more
    /// than about a tenth of the region, and every cache is drained back before a
    /// request fails. The VMM's virtio-dma allocator sets 0; the benchmarks and
    /// most tests run with the default.
    pub small_cache_batch: usize,
    /// Arenas: the region is cut into this many equal slices, each with its own map
    /// lock, tree and occupant table, and each thread searches its home arena first
    /// (see `docs/cma.md`). An allocation never spans two arenas, so a region that
    /// must serve a single request larger than `region / arenas` needs fewer. 0
    /// (the default) picks one arena per small-block cache shard (one per CPU, at
    /// least 2, at most 16), but only as many as keep every arena at least
    /// 256 MiB: smaller regions get one arena, which is the whole region. The
    /// VMM's virtio-dma allocator sets 1; the benchmarks use the default and the
    /// model and stress tests also run on four.
    pub arenas: usize,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            granule: 4096,
            pageblock: 2 << 20,
            candidates_per_hold: 64,
            small_cache_batch: 16,
            arenas: 0,
        }
    }
}

/// A physically contiguous extent in frame units.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameExtent {
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// Physical frame number (in granules) of `start`, when known.
    pub(crate) phys_frame: Option<u64>,
    /// Index of the region extent (`Region::extents`) this piece belongs to: the
    /// allocator's extents are the region's, cut at arena boundaries.
    pub(crate) region_extent: usize,
}

impl FrameExtent {
    /// Lowest `a >= p` whose *physical* address (or region offset, when unknown)
    /// is a multiple of `align` frames.
    pub(crate) fn align_up(&self, p: usize, align: usize) -> usize {
        let base = self.phys_frame.unwrap_or(self.start as u64);
        let addr = base + (p - self.start) as u64;
        // `align` is a power of two (requests are validated): a mask, not a divide.
        debug_assert!(align.is_power_of_two());
        let rem = (addr & (align as u64 - 1)) as usize;
        if rem == 0 {
            p
        } else {
            p + align - rem
        }
    }
}

/// What an arena's map lock protects.
pub(crate) struct MapState {
    pub(crate) tree: ArenaTree,
    /// Occupant of each frame (also set on a migration destination in flight).
    pub(crate) occupants: OccTable,
    /// Release nodes of freed allocations, kept for the next allocations (at most
    /// `NODE_POOL`), and scratch vectors for migration plans: with them warm, an
    /// allocation and its release call no general-purpose allocator, whose own
    /// locks (glibc's arena locks) would otherwise put threads to sleep.
    #[allow(clippy::vec_box)] // nodes move in and out as boxes, see `ReleaseNode`
    pub(crate) spare_nodes: Vec<Box<ReleaseNode>>,
    pub(crate) scratch: Scratch,
}

/// Reusable buffers for `prepare` and `commit` (taken and put back under the lock).
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) moves: Vec<crate::migrate::FrameMove>,
    pub(crate) frozen: Vec<usize>,
    pub(crate) dsts: Vec<usize>,
}

impl MapState {
    /// A release node for a new allocation of `[start, start + frames)`.
    pub(crate) fn node(&mut self, start: usize, frames: usize) -> Box<ReleaseNode> {
        match self.spare_nodes.pop() {
            Some(mut n) => {
                n.reset(start, frames);
                n
            }
            None => ReleaseNode::new(start, frames),
        }
    }

    /// Keep a node of a released allocation for reuse (or free it if the pool is
    /// full).
    pub(crate) fn recycle(&mut self, node: Box<ReleaseNode>) {
        if self.spare_nodes.len() < NODE_POOL {
            self.spare_nodes.push(node);
        }
    }
}

/// Release nodes kept per arena for reuse.
const NODE_POOL: usize = 64;

/// The occupants of one arena's frames, indexed by region frame number.
pub(crate) struct OccTable {
    base: usize,
    v: Vec<Option<Occupant>>,
}

impl std::ops::Index<usize> for OccTable {
    type Output = Option<Occupant>;
    #[inline]
    fn index(&self, f: usize) -> &Option<Occupant> {
        &self.v[f - self.base]
    }
}

impl std::ops::IndexMut<usize> for OccTable {
    #[inline]
    fn index_mut(&mut self, f: usize) -> &mut Option<Occupant> {
        &mut self.v[f - self.base]
    }
}

/// One arena: frames `[start, end)` of the region, with their own map lock and
/// deferred-release stack, on cache lines of their own. Two threads whose home
/// arenas differ share no lock and no tree node, so neither waits for the other's
/// critical sections (nor for the other being preempted inside one).
#[repr(align(128))]
pub(crate) struct Arena {
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The map lock. Protects this arena's free-run tree and occupant table. Held
    /// only for tree queries and updates and for per-frame compare-and-swaps of the
    /// range being claimed: never while the `Mover` copies, never while sleeping.
    /// At most one arena's map lock is held at a time. Lock order: `map` before a
    /// cache shard's lock; the pin event mutex is a leaf and is never held while taking
    /// another lock. A parking_lot mutex: it spins briefly before parking, which
    /// suits critical sections this short (a futex sleep/wake costs more than the
    /// section).
    pub(crate) map: parking_lot::Mutex<MapState>,
    /// Releases of this arena's frames made while its map lock was busy.
    pub(crate) released: ReleaseQueue,
}

impl Arena {
    /// Take the map lock and apply the deferred releases.
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, MapState> {
        let mut g = self.map.lock();
        self.drain_released(&mut g);
        g
    }

    /// The lock if it is free right now.
    pub(crate) fn try_lock(&self) -> Option<parking_lot::MutexGuard<'_, MapState>> {
        let mut m = self.map.try_lock()?;
        self.drain_released(&mut m);
        Some(m)
    }

    /// The lock of the calling thread's home arena. If another thread holds it,
    /// that may be a thread on another CPU sharing our home: re-pick the thread's
    /// shard by CPU before waiting.
    pub(crate) fn lock_home(&self, stats: &Stats) -> parking_lot::MutexGuard<'_, MapState> {
        if let Some(m) = self.try_lock() {
            return m;
        }
        Stats::bump(&stats.c().home_arena_busy, 1);
        crate::shard::rehome();
        self.lock()
    }

    pub(crate) fn drain_released(&self, m: &mut MapState) {
        if !self.released.is_empty() {
            self.released.drain_nodes(|node| {
                trace!(
                    start = node.start,
                    frames = node.frames,
                    "deferred release applied"
                );
                m.tree.set_alloc(node.start, node.frames, false);
                m.recycle(node);
            });
        }
    }
}

/// Where each frame lives: the arenas (each with its map lock, tree and occupant
/// table) and the region's extents in frame units, cut at arena boundaries.
pub(crate) struct Layout {
    /// The arenas, in region order (see `Arena` for the locking).
    pub(crate) arenas: Box<[Arena]>,
    /// Frames per arena (the last one may be shorter).
    pub(crate) arena_frames: usize,
    /// The region's extents, cut at arena boundaries, in region order.
    pub(crate) extents: Vec<FrameExtent>,
    /// Bytes in the largest extent (checked on every request).
    pub(crate) largest_extent: usize,
}

/// How threads that wait for a pin release or a free (Retry / WaitForPin) are
/// woken: a condvar, and a count of waiters so that releases with nobody waiting
/// touch no lock.
pub(crate) struct Wakeups {
    /// A leaf mutex: it protects nothing, it only closes the lost-wake-up window.
    event: Mutex<()>,
    cv: Condvar,
    waiters: AtomicUsize,
}

/// Everything an allocator handle shares, in named parts.
pub(crate) struct Shared {
    pub(crate) region: Arc<Region>,
    pub(crate) config: AllocatorConfig,
    /// Frames in the region.
    pub(crate) frames: usize,
    /// Per-frame state words and per-pageblock pin hints (see `crate::frame`).
    /// Lock-free.
    pub(crate) words: FrameWords,
    /// The arenas and extents.
    pub(crate) layout: Layout,
    /// Wakes threads waiting for a pin release or a free.
    pub(crate) wakeups: Wakeups,
    pub(crate) mover: Arc<dyn Mover>,
    pub(crate) stats: Stats,
    /// Per-shard caches of small pre-claimed blocks (`cache.rs`).
    pub(crate) caches: cache::Caches,
}

/// What a frame holds right now (a snapshot: it may change as soon as it is read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameState {
    Free,
    Allocated,
    Occupied(Occupant),
    /// An occupant is being moved off or onto the frame.
    Migrating,
}

/// A frame's state and pin counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub state: FrameState,
    pub pins: u32,
    pub longterm_pins: u32,
}

/// The contiguous-memory allocator. Cheap to clone (a shared handle); every method
/// takes `&self` and is safe to call from many threads.
#[derive(Clone)]
pub struct Allocator {
    pub(crate) shared: Arc<Shared>,
    /// One owner per shard, handed to the allocations made on that shard.
    pub(crate) owners: Arc<[Arc<cache::ShardRef>]>,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("region", &self.shared.region)
            .field("frames", &self.shared.frames)
            .field("config", &self.shared.config)
            .finish()
    }
}

const MAX_FRAMES: usize = 1 << 31;

/// With `AllocatorConfig::arenas == 0`, arenas are never made smaller than this.
const MIN_AUTO_ARENA: usize = 256 << 20;

impl Allocator {
    /// Build an allocator over `region`; `mover` carries out migrations.
    pub fn new(
        region: Arc<Region>,
        config: AllocatorConfig,
        mover: Arc<dyn Mover>,
    ) -> Result<Self, ConfigError> {
        let g = config.granule;
        if !g.is_power_of_two() || g < 4096 {
            return Err(ConfigError::BadGranule {
                granule: g,
                page: region.page_size(),
            });
        }
        let pb = config.pageblock;
        if !pb.is_power_of_two() || pb < g {
            return Err(ConfigError::BadPageblock {
                pageblock: pb,
                granule: g,
            });
        }
        let len = region.len();
        if len & (g - 1) != 0
            || region
                .extents()
                .iter()
                .any(|e| (e.offset | e.len) & (g - 1) != 0)
        {
            return Err(ConfigError::RegionNotGranular { len, granule: g });
        }
        let frames = len / g;
        if frames > MAX_FRAMES {
            return Err(ConfigError::TooManyFrames {
                frames,
                max: MAX_FRAMES,
            });
        }
        let block_frames = pb / g;
        let caches = cache::Caches::new(frames, config.small_cache_batch);
        let narenas = match config.arenas {
            0 => caches.shards.len().min(len / MIN_AUTO_ARENA).max(1),
            n => n,
        };
        // Arena boundaries fall on pageblock and tree-leaf boundaries.
        let unit = block_frames.max(64);
        let arena_frames = frames.div_ceil(narenas).div_ceil(unit) * unit;
        let arenas: Box<[Arena]> = (0..frames.div_ceil(arena_frames).max(1))
            .map(|i| {
                let start = i * arena_frames;
                let end = (start + arena_frames).min(frames);
                Arena {
                    start,
                    end,
                    map: parking_lot::Mutex::new(MapState {
                        tree: ArenaTree::new(start, end - start),
                        occupants: OccTable {
                            base: start,
                            v: vec![None; end - start],
                        },
                        spare_nodes: Vec::with_capacity(NODE_POOL),
                        scratch: Scratch::default(),
                    }),
                    released: ReleaseQueue::new(),
                }
            })
            .collect();
        // The region's extents, cut at arena boundaries.
        let mut extents: Vec<FrameExtent> = Vec::new();
        for (i, e) in region.extents().iter().enumerate() {
            let (mut start, end) = (e.offset / g, e.end() / g);
            let phys = e.phys.map(|p| p / g as u64);
            while start < end {
                let cut = ((start / arena_frames + 1) * arena_frames).min(end);
                extents.push(FrameExtent {
                    start,
                    end: cut,
                    phys_frame: phys.map(|p| p + (start - e.offset / g) as u64),
                    region_extent: i,
                });
                start = cut;
            }
        }
        let largest_extent = extents
            .iter()
            .map(|e| (e.end - e.start) * g)
            .max()
            .unwrap_or(0);
        let shared = Shared {
            config: AllocatorConfig {
                candidates_per_hold: config.candidates_per_hold.max(1),
                ..config
            },
            frames,
            words: FrameWords::new(frames, block_frames),
            layout: Layout {
                arenas,
                arena_frames,
                extents,
                largest_extent,
            },
            wakeups: Wakeups::new(),
            mover,
            stats: Stats::new(caches.shards.len()),
            caches,
            region,
        };
        let shared = Arc::new(shared);
        let owners = (0..shared.caches.shards.len())
            .map(|_| {
                Arc::new(cache::ShardRef {
                    shared: shared.clone(),
                })
            })
            .collect();
        Ok(Allocator { shared, owners })
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.shared.region
    }

    pub fn config(&self) -> AllocatorConfig {
        self.shared.config
    }

    /// Number of frames in the region.
    pub fn frames(&self) -> usize {
        self.shared.frames
    }

    /// A copy of the counters and histograms.
    pub fn stats(&self) -> StatsSnapshot {
        let mut st = self.shared.stats.snapshot();
        // Fast-path counts live in the shards (no shared cache line on that path).
        for sh in self.shared.caches.shards.iter() {
            let sh = sh.0.lock();
            st.allocs_cached += sh.hits;
            st.frees_cached += sh.frees;
        }
        st.allocs += st.allocs_cached;
        st.allocs_clean += st.allocs_cached;
        st.frees += st.frees_cached;
        st
    }

    /// Free frames that hold nothing, and frames holding occupants. Gives the
    /// small-block caches back to the tree first, so that cached frames count as
    /// free.
    pub fn usage(&self) -> Usage {
        self.shared.drain_caches();
        let mut u = Usage {
            frames: self.shared.frames,
            allocated: 0,
            occupied: 0,
            largest_clean_run: 0,
        };
        for a in self.shared.layout.arenas.iter() {
            let m = a.lock();
            u.allocated += m.tree.allocated_total();
            u.occupied += m.tree.occupied_total();
            u.largest_clean_run = u
                .largest_clean_run
                .max(m.tree.longest(crate::freetree::Class::Clean));
        }
        u
    }

    /// Number of arenas (see [`AllocatorConfig::arenas`]).
    pub fn arenas(&self) -> usize {
        self.shared.layout.arenas.len()
    }

    /// What frame `frame` holds, with its pin counts.
    pub fn frame_info(&self, frame: usize) -> Option<FrameInfo> {
        if frame >= self.shared.frames {
            return None;
        }
        let m = self.shared.layout.lock_frame(frame);
        let w = frame::AtomicFrameWord::get(&self.shared.words[frame]);
        let state = if frame::is_frozen(w) {
            FrameState::Migrating
        } else if frame::kind_of(w) == FrameKind::Occupied {
            m.occupants[frame].map_or(FrameState::Migrating, FrameState::Occupied)
        } else if m.tree.is_alloc(frame) && !self.shared.cached(&m, frame) {
            FrameState::Allocated
        } else {
            FrameState::Free
        };
        Some(FrameInfo {
            state,
            pins: frame::pins_of(w),
            longterm_pins: frame::longterm_of(w),
        })
    }

    /// Lend a clean frame to a movable occupant. Frames are taken from the top of
    /// the region down, while DMA allocations are placed first-fit from the bottom,
    /// so the two meet as late as possible and most requests need no migration.
    pub fn place_occupant(&self, occupant: Occupant) -> Result<usize, OccupyError> {
        self.shared.place_top_down(occupant, PlaceAs::Ready)
    }

    /// Like [`Allocator::place_occupant`], and let `init` write the occupant's bytes
    /// before anyone can pin or migrate it: the frame stays frozen (and the map lock
    /// is not held) while `init` runs. Feature `test-util`: the tests use it to
    /// place occupants with known bytes while other threads migrate.
    #[cfg(any(test, feature = "test-util"))]
    pub fn place_occupant_with(
        &self,
        occupant: Occupant,
        init: impl FnOnce(&mut [u8]),
    ) -> Result<usize, OccupyError> {
        let s = &self.shared;
        let f = s.place_top_down(occupant, PlaceAs::Frozen)?;
        let g = s.config.granule;
        // SAFETY: frame `f` lies inside the region mapping (f < frames), which lives
        // as long as `s`. It is frozen: no pin, migration, vacate or allocation can
        // touch it until the thaw below, so this is the only reference to its bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(s.region.host_addr().as_ptr().add(f * g), g) };
        init(bytes);
        frame::thaw(&s.words[f], FrameKind::Occupied);
        Ok(f)
    }

    fn check_frame(&self, frame: usize) -> Result<(), OccupyError> {
        let frames = self.shared.frames;
        if frame >= frames {
            return Err(OccupyError::OutOfRange { frame, frames });
        }
        Ok(())
    }

    /// Place an occupant on a specific clean frame (tests, benchmarks, and a VMM
    /// restoring a layout).
    pub fn place_occupant_at(&self, frame: usize, occupant: Occupant) -> Result<(), OccupyError> {
        let s = &self.shared;
        self.check_frame(frame)?;
        let mut m = s.layout.lock_frame(frame);
        if m.tree.is_alloc(frame) {
            // A block in a small-block cache is free: take it back from the cache.
            s.uncache(&mut m, frame);
        }
        let w = frame::AtomicFrameWord::get(&s.words[frame]);
        let found = if m.tree.is_alloc(frame) {
            "allocated"
        } else if m.tree.is_occ(frame) {
            "occupied"
        } else if frame::pins_of(w) != 0 {
            "still pinned after a free"
        } else {
            s.occupy(&mut m, frame, occupant);
            return Ok(());
        };
        Err(OccupyError::NotFree { frame, found })
    }

    /// Remove an occupant (its owner freed the page). Fails while it is pinned or
    /// being migrated: the caller retries, as the occupant may have moved.
    pub fn vacate(&self, frame: usize, occupant: Occupant) -> Result<(), OccupyError> {
        let s = &self.shared;
        self.check_frame(frame)?;
        let mut m = s.layout.lock_frame(frame);
        if m.occupants[frame] != Some(occupant) || m.tree.is_alloc(frame) {
            let found = if m.tree.is_alloc(frame) {
                None
            } else {
                m.occupants[frame]
            };
            return Err(OccupyError::WrongOccupant {
                frame,
                expected: occupant,
                found,
            });
        }
        if let Err(w) = frame::try_freeze(&s.words[frame], FrameKind::Occupied) {
            return Err(if frame::is_frozen(w) {
                OccupyError::Migrating { frame }
            } else {
                OccupyError::Pinned {
                    frame,
                    pins: frame::pins_of(w),
                }
            });
        }
        m.occupants[frame] = None;
        m.tree.set_occ(frame, 1, false);
        frame::thaw(&s.words[frame], FrameKind::FreeOrAllocated);
        Stats::bump(&s.stats.c().occupants_vacated, 1);
        drop(m);
        s.wakeups.notify();
        Ok(())
    }
}

/// How `place_top_down` leaves the frame it placed an occupant on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PlaceAs {
    /// Pinnable and migratable at once.
    Ready,
    /// Frozen, for the caller to write the occupant's bytes and then thaw.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    Frozen,
}

/// Region usage in frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub frames: usize,
    pub allocated: usize,
    pub occupied: usize,
    pub largest_clean_run: usize,
}

impl Layout {
    /// The arena holding frame `f`.
    #[inline]
    pub(crate) fn arena_of(&self, f: usize) -> &Arena {
        &self.arenas[(f / self.arena_frames).min(self.arenas.len() - 1)]
    }

    /// Lock the arena holding frame `f`.
    pub(crate) fn lock_frame(&self, f: usize) -> parking_lot::MutexGuard<'_, MapState> {
        self.arena_of(f).lock()
    }

    /// The calling thread's home arena: where its requests look first.
    #[inline]
    pub(crate) fn home_arena(&self) -> usize {
        crate::shard::thread_shard() % self.arenas.len()
    }

    /// Allocated frames in the whole region (error reports only).
    pub(crate) fn allocated_total(&self) -> usize {
        self.arenas
            .iter()
            .map(|a| a.lock().tree.allocated_total())
            .sum()
    }

    /// Index of the extent holding frame `f`.
    pub(crate) fn extent_of(&self, f: usize) -> usize {
        self.extents.partition_point(|e| e.end <= f)
    }
}

impl Wakeups {
    fn new() -> Self {
        Wakeups {
            event: Mutex::new(()),
            cv: Condvar::new(),
            waiters: AtomicUsize::new(0),
        }
    }

    /// Wake waiters (pin released, range freed). Takes the event mutex, so that a
    /// waiter between its check and its sleep cannot miss the wake-up.
    pub(crate) fn notify(&self) {
        if self.waiters.load(Ordering::Acquire) == 0 {
            return;
        }
        drop(self.event.lock().unwrap_or_else(|e| e.into_inner()));
        self.cv.notify_all();
    }

    /// Wake waiters without ever blocking (the release path): the event mutex is
    /// only tried, and a waiter that misses the wake-up times out of its bounded
    /// wait slice instead.
    pub(crate) fn try_notify(&self) {
        if self.waiters.load(Ordering::Acquire) == 0 {
            return;
        }
        drop(self.event.try_lock().ok());
        self.cv.notify_all();
    }

    /// Sleep until notified or `timeout`, whichever comes first, while `still_blocked`
    /// holds. Checking the condition under the event mutex closes the lost-wake-up
    /// window for notifiers that take the mutex.
    pub(crate) fn wait(&self, timeout: Duration, still_blocked: impl Fn() -> bool) {
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let g = self.event.lock().unwrap_or_else(|e| e.into_inner());
        if still_blocked() {
            let _ = self.cv.wait_timeout(g, timeout);
        }
        self.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// Put `occupant` on the highest clean, unpinned frame of the region (arenas
    /// from the last down), left frozen if `how` says so. Frames in small-block
    /// caches are taken back once before the region is reported full.
    fn place_top_down(&self, occupant: Occupant, how: PlaceAs) -> Result<usize, OccupyError> {
        let mut drained = false;
        loop {
            for a in self.layout.arenas.iter().rev() {
                let mut m = a.lock();
                let mut before = a.end;
                while let Some(f) = m.tree.last_clean(before) {
                    // A frame freed while still pinned keeps its pins; skip it.
                    if frame::pins_of(frame::AtomicFrameWord::get(&self.words[f])) == 0 {
                        self.occupy(&mut m, f, occupant);
                        if how == PlaceAs::Frozen {
                            frame::freeze_as(&self.words[f], FrameKind::Occupied);
                        }
                        return Ok(f);
                    }
                    before = f;
                }
            }
            if drained || self.drain_caches() == 0 {
                return Err(OccupyError::RegionFull { occupant });
            }
            drained = true;
        }
    }

    fn occupy(&self, m: &mut MapState, f: usize, occupant: Occupant) {
        m.occupants[f] = Some(occupant);
        m.tree.set_occ(f, 1, true);
        frame::set_kind(&self.words[f], FrameKind::Occupied);
        Stats::bump(&self.stats.c().occupants_placed, 1);
    }
}

/// The handles are used from the VMM's and the device's threads.
#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Allocator>();
    is::<Allocation>();
    is::<PinGuard>();
    is::<Region>();
}

#[cfg(test)]
mod tests;
