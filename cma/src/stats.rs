//! Counters and latency histograms. All relaxed atomics: stats never order anything,
//! and updating them must not add a lock to any path (least of all release).
//!
//! Every counter and histogram exists once per shard (the same thread-to-shard map
//! as the small-block caches), each shard on its own cache lines, and a snapshot
//! sums them. One shared copy would put a cache-line transfer between cores into
//! every slow-path allocation and release made by two threads at once: the counters
//! are written on every request, so they would bounce even when the requests
//! touch nothing else in common.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const BUCKETS: usize = 48;

/// Log2-bucketed latency histogram in nanoseconds (bucket `i` holds `[2^i, 2^(i+1))`).
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    pub(crate) fn record(&self, d: Duration) {
        let ns = d.as_nanos().max(1) as u64;
        let i = (63 - ns.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Relaxed);
    }

    #[cfg(test)]
    fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::default();
        self.add_to(&mut s);
        s
    }

    fn add_to(&self, s: &mut HistogramSnapshot) {
        s.buckets.resize(BUCKETS, 0);
        for (t, b) in s.buckets.iter_mut().zip(&self.buckets) {
            *t += b.load(Relaxed);
        }
    }
}

/// A copy of a histogram.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `buckets[i]` counts samples in `[2^i, 2^(i+1))` nanoseconds.
    pub buckets: Vec<u64>,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Upper bound of the bucket holding quantile `q` (0.0..=1.0); zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let total = self.count();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos(1u64 << (i + 1).min(63));
            }
        }
        Duration::MAX
    }
}

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[derive(Default)]
        pub(crate) struct Counters { $(pub(crate) $name: AtomicU64,)* }

        /// A point-in-time copy of the allocator's counters.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $(#[doc = $doc] pub $name: u64,)*
            /// Allocation latency, successes and failures, of requests that took the
            /// slow path (map lock and tree). Requests served from a small-block
            /// cache read no clock and are counted in `allocs_cached` only.
            pub alloc_latency: HistogramSnapshot,
            /// Time spent in `Mover::move_frames`.
            pub migrate_latency: HistogramSnapshot,
            /// Time spent waiting for pins to be released.
            pub pin_wait_latency: HistogramSnapshot,
        }

        impl Counters {
            /// Add this shard's counts to `s`.
            fn add_to(&self, s: &mut StatsSnapshot) {
                $(s.$name += self.$name.load(Relaxed);)*
            }
        }
    };
}

counters! {
    allocs: "Successful allocations.",
    allocs_clean: "Successful allocations that needed no migration.",
    allocs_cached: "Successful allocations served from a per-shard small-block cache (no map lock, no tree update; also counted in `allocs` and `allocs_clean`, not in `alloc_latency`).",
    fail_invalid: "Failures: malformed request.",
    fail_too_large: "Failures: larger than the largest extent.",
    fail_no_room: "Failures: no candidate free of other allocations.",
    fail_all_pinned: "Failures: every candidate pinned or failed to migrate (FailFast).",
    fail_deadline: "Failures: Retry deadline passed.",
    fail_pin_wait: "Failures: WaitForPin timed out.",
    sweeps: "Full or partial sweeps over the candidates.",
    retries: "Sweeps after the first one of a request (Retry/WaitForPin).",
    candidates_pinned: "Candidate ranges skipped because a frame was pinned.",
    claim_races: "Candidates lost to a pin that arrived between evaluation and freeze.",
    migrations: "Migration plans carried out (fully or partly).",
    pages_migrated: "Frames whose occupants were moved.",
    bytes_migrated: "Bytes moved.",
    move_failures: "Mover calls that returned an error.",
    frees: "Allocations released.",
    home_arena_busy: "Times a request found its home arena's map lock held by another thread (and re-picked its shard by CPU before waiting).",
    frees_deferred: "Releases queued because the map lock was busy.",
    frees_cached: "Releases pushed into a per-shard small-block cache (also counted in `frees`).",
    cache_refills: "Small-block cache refills (one map-lock hold claiming a batch of blocks).",
    cache_drained_frames: "Frames given back from the small-block caches to the tree (before failing a request, for occupant placement, or for `usage`).",
    pins: "Pins taken.",
    pin_refusals: "Pins refused (free or migrating frame).",
    pin_waits: "Waits for a pin's release.",
    pin_wait_timeouts: "Waits that timed out.",
    longterm_moved_out: "Occupants moved out of the region for a long-term pin.",
    occupants_placed: "Occupants placed in the region.",
    occupants_vacated: "Occupants removed from the region.",
    claimed_in_place: "Allocations made from occupied frames whose owner gave them up in place (no copy).",
    returned_as_occupants: "Allocations handed back as occupants in place (no copy).",
}

/// One shard's counters and histograms, on cache lines of its own.
#[repr(align(128))]
pub(crate) struct StatShard {
    pub(crate) c: Counters,
    pub(crate) alloc_latency: Histogram,
    pub(crate) migrate_latency: Histogram,
    pub(crate) pin_wait_latency: Histogram,
}

pub(crate) struct Stats {
    shards: Box<[StatShard]>,
    mask: usize,
}

impl Stats {
    /// `shards` copies (a power of two).
    pub(crate) fn new(shards: usize) -> Self {
        debug_assert!(shards.is_power_of_two());
        Stats {
            shards: (0..shards)
                .map(|_| StatShard {
                    c: Counters::default(),
                    alloc_latency: Histogram::new(),
                    migrate_latency: Histogram::new(),
                    pin_wait_latency: Histogram::new(),
                })
                .collect(),
            mask: shards - 1,
        }
    }

    /// The calling thread's shard.
    #[inline]
    pub(crate) fn local(&self) -> &StatShard {
        &self.shards[crate::shard::thread_shard() & self.mask]
    }

    /// The calling thread's counters.
    #[inline]
    pub(crate) fn c(&self) -> &Counters {
        &self.local().c
    }

    pub(crate) fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for sh in self.shards.iter() {
            sh.c.add_to(&mut s);
            sh.alloc_latency.add_to(&mut s.alloc_latency);
            sh.migrate_latency.add_to(&mut s.migrate_latency);
            sh.pin_wait_latency.add_to(&mut s.pin_wait_latency);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_right_buckets() {
        let h = Histogram::new();
        for _ in 0..99 {
            h.record(Duration::from_nanos(1000)); // bucket 9: [512, 1024)
        }
        h.record(Duration::from_micros(100)); // bucket 16
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile(0.5), Duration::from_nanos(1024));
        assert_eq!(s.quantile(0.99), Duration::from_nanos(1024));
        assert_eq!(s.quantile(1.0), Duration::from_nanos(1 << 17));
    }

    #[test]
    fn a_snapshot_sums_every_shard() {
        let st = Stats::new(4);
        std::thread::scope(|sc| {
            for _ in 0..6 {
                sc.spawn(|| {
                    Stats::bump(&st.c().allocs, 2);
                    st.local().alloc_latency.record(Duration::from_nanos(1000));
                });
            }
        });
        Stats::bump(&st.c().frees, 1);
        let s = st.snapshot();
        assert_eq!((s.allocs, s.frees), (12, 1));
        assert_eq!(s.alloc_latency.count(), 6);
        assert_eq!(s.alloc_latency.buckets.len(), BUCKETS);
        assert_eq!(s.migrate_latency.count(), 0);
    }
}
