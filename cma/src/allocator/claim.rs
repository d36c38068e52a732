//! Finding, evaluating and claiming candidate ranges; building and committing
//! migration plans. Everything here except `migrate` runs under the map lock.

use std::time::Instant;

use tracing::{debug, trace};

use super::{MapState, Shared};
use crate::frame::{self, AtomicFrameWord, FrameKind};
use crate::freetree::Class;
use crate::migrate::{Destination, FrameMove, MigrationPlan};
use crate::stats::Stats;

/// A range that passed evaluation.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    pub(super) start: usize,
    pub(super) extent: usize,
    /// Occupied frames that would have to move.
    pub(super) cost: usize,
}

/// A range rejected because of a pin: the pinned frame WaitForPin waits for.
#[derive(Clone, Copy, Debug)]
pub(super) struct PinnedCandidate {
    pub(super) frame: usize,
}

/// Result of evaluating one batch of candidates.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) best: Option<Candidate>,
    pub(super) evaluated: usize,
    pub(super) pinned: usize,
    pub(super) first_pinned: Option<PinnedCandidate>,
    /// Where the next batch starts; the arena's end when its sweep is complete.
    pub(super) next: usize,
}

/// What `commit` made of a prepared range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Committed {
    /// Every move took effect: the range is the caller's allocation.
    Allocation,
    /// A move failed: the completed moves stand, the rest were rolled back, and
    /// the range is free again.
    RolledBack,
}

/// A claimed range whose occupants are frozen and whose plan is ready.
pub(super) struct Prepared {
    pub(super) start: usize,
    pub(super) frames: usize,
    pub(super) plan: MigrationPlan,
}

impl Shared {
    /// Leftmost aligned `a >= from` with `[a, a+n)` free in `class` and inside one
    /// extent. Each step is a tree descent, so this is O(log frames) per free run
    /// considered rather than O(frames).
    pub(super) fn find_fit(
        &self,
        m: &MapState,
        class: Class,
        from: usize,
        n: usize,
        align: usize,
    ) -> Option<(usize, usize)> {
        let mut pos = from;
        loop {
            let p = m.tree.next_fit(class, pos, n)?;
            let x = self.layout.extent_of(p);
            let e = self.layout.extents[x];
            let a = e.align_up(p, align);
            if a + n > e.end {
                pos = e.end;
                continue;
            }
            if a == p || m.tree.next_fit(class, a, n) == Some(a) {
                return Some((a, x));
            }
            pos = a + 1;
        }
    }

    /// Evaluate up to `candidates_per_hold` ranges from `from` on: the cheapest
    /// (fewest occupied frames) unpinned one wins; the search stops early once its
    /// own cost outweighs what a better candidate could save. Candidates step by
    /// `max(align, n/8 rounded down to align)`: windows overlap by up to 7/8, so a
    /// cheaper window a few pageblocks over is not missed, while a full sweep still
    /// costs at most 8 * frames / n candidates.
    /// `m` is the map of the arena that ends at `end`; the batch stays inside it.
    pub(super) fn evaluate(
        &self,
        m: &MapState,
        from: usize,
        end: usize,
        n: usize,
        align: usize,
    ) -> Batch {
        let step = align.max(n / 8 / align * align);
        let mut b = Batch {
            next: end,
            ..Default::default()
        };
        let mut pos = from;
        while b.evaluated < self.config.candidates_per_hold {
            let Some((a, x)) = self.find_fit(m, Class::Avail, pos, n, align) else {
                return b;
            };
            b.evaluated += 1;
            if let Some(f) = self.words.first_pinned(a, n) {
                b.pinned += 1;
                b.first_pinned.get_or_insert(PinnedCandidate { frame: f });
                trace!(start = a, pinned_frame = f, "candidate skipped: pinned");
                // Every window overlapping `f` is blocked too: resume past it, as
                // cma_alloc() moves to the next aligned offset after a busy range.
                pos = f + 1;
                continue;
            }
            let cost = m.tree.occ_count(a, a + n);
            if b.best.is_none_or(|c| cost < c.cost) {
                b.best = Some(Candidate {
                    start: a,
                    extent: x,
                    cost,
                });
            }
            pos = a + step;
            // Without a clean fit every candidate costs at least one frame. Beyond
            // that, evaluating a candidate costs about as much as copying one
            // cache-warm frame, so stop once the search has cost half of what the
            // best candidate so far would copy: more search is unlikely to pay.
            let best = b.best.map_or(usize::MAX, |c| c.cost);
            if best <= 1 || (b.evaluated >= 4 && 2 * b.evaluated >= best) {
                break;
            }
        }
        b.next = pos.min(end);
        b
    }

    /// Claim a clean range. Clean frames carry no lock-free state, so this is a tree
    /// update plus a check, through the pageblock pin hints, for pins left over from
    /// an allocation freed while still pinned: such a frame is never handed out.
    pub(super) fn claim_clean(
        &self,
        m: &mut MapState,
        start: usize,
        n: usize,
    ) -> Result<(), usize> {
        if let Some(f) = self.words.first_pinned(start, n) {
            return Err(f);
        }
        m.tree.set_alloc(start, n, true);
        Ok(())
    }

    /// Reserve a candidate range, freeze its occupants and pick their destinations.
    /// Fails (undoing everything) at the first frame that was pinned after evaluation.
    pub(super) fn prepare(
        &self,
        m: &mut MapState,
        start: usize,
        n: usize,
    ) -> Result<Prepared, usize> {
        m.tree.set_alloc(start, n, true);
        // Occupied frames: freeze each (visiting only the occupied ones, a leaf word
        // at a time, so that the hold does not grow with the range's length).
        let mut moves = std::mem::take(&mut m.scratch.moves);
        let mut frozen = std::mem::take(&mut m.scratch.frozen);
        moves.clear();
        frozen.clear();
        let mut failed = None;
        let (tree, occupants) = (&m.tree, &m.occupants);
        tree.for_each_occ(start, start + n, |f| {
            if frame::try_freeze(&self.words[f], FrameKind::Occupied).is_err() {
                failed = Some(f);
                return false;
            }
            frozen.push(f);
            if let Some(occupant) = occupants[f] {
                moves.push(FrameMove {
                    occupant,
                    src: f,
                    dst: Destination::OutOfRegion,
                });
            }
            true
        });
        // Other frames: pins left over from an allocation freed while pinned (see
        // claim_clean), found through the pageblock hints.
        if failed.is_none() {
            failed = self.leftover_pin(m, start, n);
        }
        if let Some(f) = failed {
            for &g in &frozen {
                frame::thaw(&self.words[g], FrameKind::Occupied);
            }
            m.scratch.moves = moves;
            m.scratch.frozen = frozen;
            m.tree.set_alloc(start, n, false);
            Stats::bump(&self.stats.c().claim_races, 1);
            return Err(f);
        }
        // Destinations: clean frames from the top of this arena down (only its lock
        // is held), taken in one batch; the range itself is excluded because it is
        // now marked allocated. Occupants that find no clean frame leave the region.
        m.scratch.frozen = frozen;
        let mut dsts = std::mem::take(&mut m.scratch.dsts);
        dsts.clear();
        m.tree.take_top_clean(moves.len(), &mut dsts);
        for (mv, &d) in moves.iter_mut().zip(&dsts) {
            if frame::pins_of(self.words[d].get()) != 0 {
                // Still pinned from a previous allocation: not usable.
                m.tree.set_occ(d, 1, false);
                continue;
            }
            m.occupants[d] = Some(mv.occupant);
            frame::freeze_as(&self.words[d], FrameKind::Occupied);
            mv.dst = Destination::Frame(d);
        }
        m.scratch.dsts = dsts;
        let plan = MigrationPlan {
            granule: self.config.granule,
            moves,
        };
        Ok(Prepared {
            start,
            frames: n,
            plan,
        })
    }

    /// First non-occupied frame of `[start, start+n)` that still carries a pin,
    /// looking only inside pageblocks whose hint says they have pinned frames.
    fn leftover_pin(&self, m: &MapState, start: usize, n: usize) -> Option<usize> {
        let end = start + n;
        let mut f = start;
        while f < end {
            let b = self.words.block_of(f);
            let block_end = ((b + 1) * self.words.block_frames).min(end);
            if self.words.block_pins[b].load(std::sync::atomic::Ordering::Acquire) != 0 {
                for g in f..block_end {
                    if !m.tree.is_occ(g) && frame::pins_of(self.words[g].get()) != 0 {
                        return Some(g);
                    }
                }
            }
            f = block_end;
        }
        None
    }

    /// Run the plan through the mover (no lock held) and return how many moves took
    /// effect.
    pub(super) fn migrate(&self, p: &Prepared) -> usize {
        if p.plan.is_empty() {
            return 0;
        }
        let t = Instant::now();
        let r = self.mover.move_frames(&p.plan);
        self.stats.local().migrate_latency.record(t.elapsed());
        Stats::bump(&self.stats.c().migrations, 1);
        match r {
            Ok(()) => p.plan.len(),
            Err(e) => {
                debug!(error = %e, "mover failed");
                Stats::bump(&self.stats.c().move_failures, 1);
                e.completed.min(p.plan.len())
            }
        }
    }

    /// Commit the first `done` moves. If that is all of them the range becomes an
    /// allocation; otherwise the rest is rolled back and the range returned to the
    /// tree. The plan's buffer is kept for the next one.
    pub(super) fn commit(&self, m: &mut MapState, p: Prepared, done: usize) -> Committed {
        let all = done == p.plan.len();
        if all {
            // Every occupied frame of the range was a source: one tree update.
            m.tree.set_occ(p.start, p.frames, false);
        }
        for (i, mv) in p.plan.moves.iter().enumerate() {
            let moved = i < done;
            if moved {
                m.occupants[mv.src] = None;
                if !all {
                    m.tree.set_occ(mv.src, 1, false);
                }
                frame::thaw(&self.words[mv.src], FrameKind::FreeOrAllocated);
            } else {
                frame::thaw(&self.words[mv.src], FrameKind::Occupied);
            }
            if let Destination::Frame(d) = mv.dst {
                if moved {
                    frame::thaw(&self.words[d], FrameKind::Occupied);
                } else {
                    m.occupants[d] = None;
                    m.tree.set_occ(d, 1, false);
                    frame::thaw(&self.words[d], FrameKind::FreeOrAllocated);
                }
            }
        }
        let g = self.config.granule as u64;
        Stats::bump(&self.stats.c().pages_migrated, done as u64);
        Stats::bump(&self.stats.c().bytes_migrated, done as u64 * g);
        m.scratch.moves = p.plan.moves;
        if all {
            return Committed::Allocation;
        }
        m.tree.set_alloc(p.start, p.frames, false);
        Committed::RolledBack
    }
}
