//! What the owner reports: page states, moves, MAP latency, pins, and the allocator's view.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use cma::{StatsSnapshot, Usage};

use super::map::MapPhases;
use super::window::Backing;
use super::{lock, DmaMemory};

/// One successful MAP: latency (ns), bytes moved, and where the time went.
type MapSample = (u64, u64, MapPhases);

/// The last MAPs' samples, for percentiles.
#[derive(Default)]
pub(super) struct MapSamples {
    ring: Mutex<(Vec<MapSample>, usize)>,
}

const MAX_SAMPLES: usize = 1 << 16;

impl MapSamples {
    pub fn record(&self, ns: u64, moved: u64, phases: MapPhases) {
        let mut g = lock(&self.ring);
        let (v, next) = &mut *g;
        if v.len() < MAX_SAMPLES {
            v.push((ns, moved, phases));
        } else {
            v[*next] = (ns, moved, phases);
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
    /// The moving MAPs' phases (see [`MapPhases`]): p50, p99 and max of each, in ns.
    pub moving_claim_ns: [u64; 3],
    pub moving_alloc_ns: [u64; 3],
    pub moving_remap_ns: [u64; 3],
    pub moving_release_ns: [u64; 3],
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

/// The window's pages by state, and what moving them cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct LendingStats {
    pub pages: u64,
    pub page_size: u64,
    pub lent: u64,
    pub mapped: u64,
    pub ram: u64,
    /// Pages held by long-term pins (in any backing).
    pub longterm_pinned: u64,
    /// Of those, pages in ordinary memory (moved out of the region for the pin).
    pub longterm_pinned_in_ram: u64,
    /// Frames whose page moved away while a transient pin held them; freed when unpinned.
    pub orphans: u64,
    pub moves: u64,
    pub moves_out: u64,
    pub bytes_moved: u64,
    /// Time spent copying in moves (µs), for the throughput figure.
    pub copy_us: u64,
}

/// Everything the owner reports.
#[derive(Clone, Debug)]
pub struct DmaMemoryStats {
    pub lending: LendingStats,
    pub maps: MapPercentiles,
    pub allocator: StatsSnapshot,
    pub usage: Usage,
    pub mappings: u64,
    pub longterm_ranges: u64,
    /// MAPs refused (BUSY) because a page of their range was pinned long-term.
    pub longterm_refusals: u64,
}

impl DmaMemory {
    pub fn stats(&self) -> DmaMemoryStats {
        let o = &self.inner;
        let lending = {
            let pages = o.window.lock();
            let count = |pred: &dyn Fn(&super::PageState) -> bool| {
                pages.table.iter().filter(|p| pred(p)).count() as u64
            };
            let moves = o.window.counters.moves.load(Ordering::Relaxed);
            LendingStats {
                pages: pages.table.len() as u64,
                page_size: o.window.page as u64,
                lent: count(&|p| matches!(p.backing, Backing::Lent(_))),
                mapped: count(&|p| matches!(p.backing, Backing::Mapped(_))),
                ram: count(&|p| p.backing == Backing::Ram),
                longterm_pinned: count(&|p| p.pinned()),
                longterm_pinned_in_ram: count(&|p| p.pinned() && p.backing == Backing::Ram),
                orphans: pages.orphans.len() as u64,
                moves,
                moves_out: o.window.counters.moves_out.load(Ordering::Relaxed),
                bytes_moved: moves * o.window.page as u64,
                copy_us: o.window.counters.copy_ns.load(Ordering::Relaxed) / 1000,
            }
        };
        let maps = {
            let g = lock(&o.samples.ring);
            let all = &g.0;
            let moving = || all.iter().filter(|s| s.1 != 0);
            MapPercentiles {
                count: all.len() as u64,
                latency_ns: p50_p99_max(all.iter().map(|s| s.0).collect()),
                moved_bytes: p50_p99_max(all.iter().map(|s| s.1).collect()),
                in_place: all.iter().filter(|s| s.1 == 0).count() as u64,
                moving_count: moving().count() as u64,
                moving_latency_ns: p50_p99_max(moving().map(|s| s.0).collect()),
                moving_bytes: p50_p99_max(moving().map(|s| s.1).collect()),
                moving_claim_ns: p50_p99_max(moving().map(|s| s.2.claim_ns).collect()),
                moving_alloc_ns: p50_p99_max(moving().map(|s| s.2.alloc_ns).collect()),
                moving_remap_ns: p50_p99_max(moving().map(|s| s.2.remap_ns).collect()),
                moving_release_ns: p50_p99_max(moving().map(|s| s.2.release_ns).collect()),
                pin_waits: o.pin_waits.load(Ordering::Relaxed),
            }
        };
        DmaMemoryStats {
            lending,
            maps,
            allocator: o.allocator.stats(),
            usage: o.allocator.usage(),
            mappings: lock(&o.mappings).len() as u64,
            longterm_ranges: o.longterm_ranges.load(Ordering::Relaxed),
            longterm_refusals: o.longterm_refusals.load(Ordering::Relaxed),
        }
    }
}
