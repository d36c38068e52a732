//! Counters and latency histograms. All relaxed atomics: stats never order anything,
//! and updating them must not add a lock to any path (least of all release).

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

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
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
            fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* ..Default::default() }
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
    frees_deferred: "Releases queued because the map lock was busy.",
    frees_cached: "Releases pushed into a per-shard small-block cache (also counted in `frees`).",
    cache_refills: "Small-block cache refills (one map-lock hold claiming a batch of blocks).",
    cache_drained_frames: "Frames given back from the small-block caches to the tree (before failing a request, for occupant placement, or for `usage`).",
    pins: "Pins taken.",
    pin_refusals: "Pins refused (free or migrating frame).",
    pin_waits: "Waits for a pin's release.",
    pin_wait_timeouts: "Waits that timed out.",
    revoke_requests: "Revoke callbacks invoked.",
    longterm_moved_out: "Occupants moved out of the region for a long-term pin.",
    occupants_placed: "Occupants placed in the region.",
    occupants_vacated: "Occupants removed from the region.",
    claimed_in_place: "Allocations made from occupied frames whose owner gave them up in place (no copy).",
    returned_as_occupants: "Allocations handed back as occupants in place (no copy).",
}

pub(crate) struct Stats {
    pub(crate) c: Counters,
    pub(crate) alloc_latency: Histogram,
    pub(crate) migrate_latency: Histogram,
    pub(crate) pin_wait_latency: Histogram,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Stats {
            c: Counters::default(),
            alloc_latency: Histogram::new(),
            migrate_latency: Histogram::new(),
            pin_wait_latency: Histogram::new(),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            alloc_latency: self.alloc_latency.snapshot(),
            migrate_latency: self.migrate_latency.snapshot(),
            pin_wait_latency: self.pin_wait_latency.snapshot(),
            ..self.c.snapshot()
        }
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
}
