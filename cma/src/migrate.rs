//! Migration plans and the [`Mover`] that carries them out.
//!
//! The allocator decides *what* moves where (it owns the frame map); the caller
//! decides *how* (the VMM copies guest pages and remaps them in the guest's memory
//! map and any IOMMU). A plan is handed over as a batch so that the VMM can
//! write-protect, copy and flush once per request instead of once per page.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::MoveError;
use crate::region::Region;

/// A movable occupant of a frame: an opaque owner id (e.g. a guest) and the page
/// index inside that owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Occupant {
    pub owner: u64,
    pub page: u64,
}

/// Where an occupant goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Another frame of the region (outside the range being allocated).
    Frame(usize),
    /// Out of the region, into ordinary host memory the mover provides. Used when
    /// the region has no clean frame left, and for long-term pins.
    OutOfRegion,
}

/// One occupant to move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameMove {
    pub occupant: Occupant,
    /// Source frame index.
    pub src: usize,
    pub dst: Destination,
}

/// An ordered list of moves. While a plan is being carried out its source and
/// destination frames are frozen: nobody can pin them, place on them or allocate them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationPlan {
    /// Frame size in bytes: frame `i` is at region offset `i * granule`.
    pub granule: usize,
    pub moves: Vec<FrameMove>,
}

impl MigrationPlan {
    pub fn len(&self) -> usize {
        self.moves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// Bytes the plan copies.
    pub fn bytes(&self) -> usize {
        self.moves.len() * self.granule
    }
}

/// Carries out migration plans. Implemented by the VMM (copy + remap guest pages);
/// [`MemcpyMover`] is the crate's own implementation for tests and benchmarks.
///
/// Contract: moves are performed in plan order. On success every occupant is at
/// its destination. On failure, `MoveError::completed` moves took effect and the
/// remaining ones did not (their occupants are untouched at their sources); the
/// allocator then commits the completed part and rolls back the rest. The call
/// may block (it copies), but it is always made without allocator locks held.
pub trait Mover: Send + Sync {
    fn move_frames(&self, plan: &MigrationPlan) -> Result<(), MoveError>;
}

/// Copies frames with `memcpy` inside the region; occupants sent out of the region
/// are kept in a side store (standing in for ordinary host memory).
pub struct MemcpyMover {
    region: Arc<Region>,
    outside: Mutex<HashMap<Occupant, Box<[u8]>>>,
}

impl MemcpyMover {
    pub fn new(region: Arc<Region>) -> Self {
        MemcpyMover {
            region,
            outside: Mutex::new(HashMap::new()),
        }
    }

    /// The bytes of an occupant that was moved out of the region, if any.
    pub fn outside_copy(&self, occ: Occupant) -> Option<Box<[u8]>> {
        self.lock_outside().get(&occ).cloned()
    }

    /// Occupants currently held outside the region.
    pub fn outside_occupants(&self) -> Vec<Occupant> {
        self.lock_outside().keys().copied().collect()
    }

    /// Forget an occupant held outside (the owner freed its page).
    pub fn drop_outside(&self, occ: Occupant) -> bool {
        self.lock_outside().remove(&occ).is_some()
    }

    fn lock_outside(&self) -> std::sync::MutexGuard<'_, HashMap<Occupant, Box<[u8]>>> {
        // A panic while holding this lock cannot leave the map inconsistent (each
        // operation is a single insert/remove), so a poisoned lock is still usable.
        self.outside.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(
        &self,
        plan: &MigrationPlan,
        m: &FrameMove,
        i: usize,
        what: &str,
    ) -> Result<(), MoveError> {
        let frames = self.region.len() / plan.granule.max(1);
        let dst_bad = matches!(m.dst, Destination::Frame(d) if d >= frames);
        if plan.granule == 0 || m.src >= frames || dst_bad {
            return Err(MoveError {
                completed: i,
                total: plan.len(),
                frame: m.src,
                reason: format!("{what}: frame outside the {frames}-frame region"),
            });
        }
        Ok(())
    }
}

impl Mover for MemcpyMover {
    fn move_frames(&self, plan: &MigrationPlan) -> Result<(), MoveError> {
        let g = plan.granule;
        let base = self.region.host_addr().as_ptr();
        for (i, m) in plan.moves.iter().enumerate() {
            self.check(plan, m, i, "memcpy mover")?;
            // SAFETY: `check` bounds both frames inside the region mapping, which
            // lives as long as `self.region`. The allocator froze both frames for
            // the duration of the plan, so no one else reads or writes them, and a
            // source is never its own destination (destinations are clean frames).
            let src = unsafe { std::slice::from_raw_parts(base.add(m.src * g), g) };
            match m.dst {
                Destination::Frame(d) => {
                    // SAFETY: as above; `d != m.src`, so the ranges do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(d * g), g) }
                }
                Destination::OutOfRegion => {
                    self.lock_outside().insert(m.occupant, src.into());
                }
            }
        }
        Ok(())
    }
}
