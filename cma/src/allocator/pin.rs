//! Pins: RAII guards over frame pin counts, and long-term pins that move occupants
//! out first (FOLL_LONGTERM, seed 003).
//!
//! Taking and dropping a pin is one compare-and-swap on the frame word plus, when
//! the count crosses zero, one add on the pageblock's pinned-frame hint. No lock,
//! except that dropping the last pin of a frame wakes waiters (a leaf mutex, taken
//! only when someone is waiting).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::debug_span;

use super::{Allocator, Shared};
use crate::error::PinError;
use crate::frame::{self, AtomicFrameWord, FrameKind, PinKind, PinRefused};
use crate::migrate::{Destination, FrameMove, MigrationPlan, Occupant};
use crate::stats::Stats;

/// What the frame was when the pin was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedAs {
    /// Part of a DMA allocation.
    Allocated,
    /// A movable occupant: while this pin is held the occupant cannot be migrated,
    /// vacated, or have its frame allocated.
    Occupied,
}

/// A held pin; dropping it unpins.
pub struct PinGuard {
    shared: Arc<Shared>,
    frame: usize,
    kind: PinKind,
    pinned_as: PinnedAs,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard")
            .field("frame", &self.frame)
            .field("kind", &self.kind)
            .field("pinned_as", &self.pinned_as)
            .finish()
    }
}

impl PinGuard {
    pub fn frame(&self) -> usize {
        self.frame
    }

    pub fn kind(&self) -> PinKind {
        self.kind
    }

    pub fn pinned_as(&self) -> PinnedAs {
        self.pinned_as
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let s = &self.shared;
        let after = frame::unpin(&s.words[self.frame], self.kind);
        if frame::pins_of(after) == 0 {
            s.words.block_pins[s.words.block_of(self.frame)].fetch_sub(1, Ordering::AcqRel);
            s.wakeups.notify();
        }
    }
}

/// Result of a long-term pin request.
#[derive(Debug)]
pub enum LongTermPin {
    /// The frame belongs to a DMA allocation and is now pinned in place.
    Held(PinGuard),
    /// The frame held a movable occupant, which was moved out of the region (the
    /// mover put it in ordinary memory); pin it there. The frame is free again.
    MovedOut(Occupant),
}

/// Which frames a pin request accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pinnable {
    /// Occupants only, lock-free (`pin_occupant`).
    OccupantsOnly,
    /// Occupants lock-free, and allocated frames under the map lock.
    OccupiedOrAllocated,
}

impl Shared {
    fn take_pin(
        self: &Arc<Self>,
        f: usize,
        kind: PinKind,
        pinnable: Pinnable,
    ) -> Result<PinGuard, PinError> {
        if f >= self.frames {
            return Err(PinError::OutOfRange {
                frame: f,
                frames: self.frames,
            });
        }
        let refused = |r: PinRefused| match r {
            PinRefused::NotOccupied => PinError::NotOccupied { frame: f },
            PinRefused::Frozen => PinError::Migrating { frame: f },
            PinRefused::Overflow => PinError::TooManyPins { frame: f },
        };
        // Occupants: lock-free. Anything else: under the map lock, where the tree
        // says whether the frame is allocated (pinnable) or free (not).
        let r = match frame::try_pin(&self.words[f], kind) {
            Ok(before) => Ok((before, PinnedAs::Occupied)),
            Err(PinRefused::NotOccupied) if pinnable == Pinnable::OccupiedOrAllocated => {
                let m = self.layout.lock_frame(f);
                // A block in a small-block cache is free, though the tree holds it.
                if !m.tree.is_alloc(f) || self.cached(&m, f) {
                    Err(PinError::FrameFree { frame: f })
                } else {
                    let r = frame::pin_locked(&self.words[f], kind);
                    // The hint must be raised before the lock is dropped: once the
                    // allocation is freed, `claim_clean` relies on it to see this pin.
                    if matches!(r, Ok(before) if frame::pins_of(before) == 0) {
                        self.words.block_pins[self.words.block_of(f)]
                            .fetch_add(1, Ordering::AcqRel);
                    }
                    drop(m);
                    r.map(|w| (w, PinnedAs::Allocated)).map_err(refused)
                }
            }
            Err(r) => Err(refused(r)),
        };
        match r {
            Ok((before, pinned_as)) => {
                // For occupants the hint may lag the word: the freeze CAS decides.
                if pinned_as == PinnedAs::Occupied && frame::pins_of(before) == 0 {
                    self.words.block_pins[self.words.block_of(f)].fetch_add(1, Ordering::AcqRel);
                }
                Stats::bump(&self.stats.c().pins, 1);
                Ok(PinGuard {
                    shared: self.clone(),
                    frame: f,
                    kind,
                    pinned_as,
                })
            }
            Err(e) => {
                Stats::bump(&self.stats.c().pin_refusals, 1);
                Err(e)
            }
        }
    }
}

impl Allocator {
    /// Take a transient pin (I/O in flight) on an allocated or occupied frame.
    /// Allocations skip ranges with pinned frames, or wait, per their policy.
    pub fn pin(&self, frame: usize) -> Result<PinGuard, PinError> {
        self.shared
            .take_pin(frame, PinKind::Transient, Pinnable::OccupiedOrAllocated)
    }

    /// Take a transient pin on a frame only if it holds a movable occupant: one
    /// compare-and-swap, never a lock. This is the guest-I/O path (the VMM pins the
    /// guest page it is about to do I/O on); pins on DMA allocations use [`pin`].
    ///
    /// [`pin`]: Allocator::pin
    pub fn pin_occupant(&self, frame: usize) -> Result<PinGuard, PinError> {
        self.shared
            .take_pin(frame, PinKind::Transient, Pinnable::OccupantsOnly)
    }

    /// Long-term pin (FOLL_LONGTERM semantics). On a DMA allocation's frame: pinned
    /// in place. On an occupied frame: the occupant is first moved out of the
    /// region, so that a long-term pin never blocks the region; fails, saying why,
    /// if it cannot move (pinned by someone else, or the mover failed).
    pub fn pin_longterm(&self, f: usize) -> Result<LongTermPin, PinError> {
        let s = &self.shared;
        let _span = debug_span!("cma.pin_longterm", frame = f).entered();
        if f >= s.frames {
            return Err(PinError::OutOfRange {
                frame: f,
                frames: s.frames,
            });
        }
        let m = s.layout.lock_frame(f);
        let w = s.words[f].get();
        let occupant = match (frame::kind_of(w), m.occupants[f]) {
            (FrameKind::FreeOrAllocated, _) if m.tree.is_alloc(f) && !s.cached(&m, f) => {
                drop(m);
                return s
                    .take_pin(f, PinKind::LongTerm, Pinnable::OccupiedOrAllocated)
                    .map(LongTermPin::Held);
            }
            (FrameKind::FreeOrAllocated, _) => return Err(PinError::FrameFree { frame: f }),
            (FrameKind::Occupied, None) => return Err(PinError::Migrating { frame: f }),
            (FrameKind::Occupied, Some(o)) => o,
        };
        if let Err(w) = frame::try_freeze(&s.words[f], FrameKind::Occupied) {
            return Err(if frame::is_frozen(w) {
                PinError::Migrating { frame: f }
            } else {
                PinError::OccupantPinned {
                    frame: f,
                    occupant,
                    pins: frame::pins_of(w),
                }
            });
        }
        drop(m);
        let plan = MigrationPlan {
            granule: s.config.granule,
            moves: vec![FrameMove {
                occupant,
                src: f,
                dst: Destination::OutOfRegion,
            }],
        };
        let r = s.mover.move_frames(&plan);
        let mut m = s.layout.lock_frame(f);
        match r {
            Ok(()) => {
                m.occupants[f] = None;
                m.tree.set_occ(f, 1, false);
                frame::thaw(&s.words[f], FrameKind::FreeOrAllocated);
                drop(m);
                Stats::bump(&s.stats.c().longterm_moved_out, 1);
                Stats::bump(&s.stats.c().pages_migrated, 1);
                Stats::bump(&s.stats.c().bytes_migrated, s.config.granule as u64);
                s.wakeups.notify();
                Ok(LongTermPin::MovedOut(occupant))
            }
            Err(source) => {
                frame::thaw(&s.words[f], FrameKind::Occupied);
                Stats::bump(&s.stats.c().move_failures, 1);
                Err(PinError::MoveOutFailed {
                    frame: f,
                    occupant,
                    source,
                })
            }
        }
    }
}
