//! Migration plans and the [`Mover`] that carries them out.
//!
//! The allocator decides *what* moves where (it owns the frame map); the caller
//! decides *how* (the VMM copies guest pages and remaps them in the guest's memory
//! map and any IOMMU). A plan is handed over as a batch so that the VMM can
//! write-protect, copy and flush once per request instead of once per page.

use thiserror::Error;

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
/// `MemcpyMover` (feature `test-util`) is the crate's own implementation for its
/// tests and benchmarks.
///
/// Contract: moves are performed in plan order. On success every occupant is at
/// its destination. On failure, `MoveError::completed` moves took effect and the
/// remaining ones did not (their occupants are untouched at their sources); the
/// allocator then commits the completed part and rolls back the rest. The call
/// may block (it copies), but it is always made without allocator locks held.
pub trait Mover: Send + Sync {
    fn move_frames(&self, plan: &MigrationPlan) -> Result<(), MoveError>;
}

/// A [`Mover`] failure. Moves are carried out in plan order; `completed` says
/// how many took effect before the failure (the rest did not).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("move {completed} of {total} failed (frame {frame}): {reason}")]
pub struct MoveError {
    pub completed: usize,
    pub total: usize,
    pub frame: usize,
    pub reason: String,
}
