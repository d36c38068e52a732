//! Pins: RAII guards over frame pin counts, long-term pins that move occupants out
//! first (FOLL_LONGTERM, seed 003), and revocable pins whose holders can be asked
//! to let go (mmu_notifier-style, seed 003's drm/i915 reply).
//!
//! Taking and dropping a pin is one compare-and-swap on the frame word plus, when
//! the count crosses zero, one add on the pageblock's pinned-frame hint. No lock,
//! except that dropping the last pin of a frame wakes waiters (a leaf mutex, taken
//! only when someone is waiting).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::debug_span;

use crate::allocator::{Allocator, Shared};
use crate::error::PinError;
use crate::frame::{self, PinKind, PinRefused, Tag, Word};
use crate::migrate::{Destination, FrameMove, MigrationPlan, Occupant};
use crate::stats::Stats;

/// What the allocator asks of a revocable pin's holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevokeRequest {
    pub frame: usize,
    pub pin_id: u64,
}

/// A revocable pin holder's callback. Called without allocator locks held, from the
/// allocating thread; it should arrange for the pin to be dropped soon (the
/// allocator then waits for the release within its policy's bounds) and must not
/// block on the allocator.
pub trait Revoke: Send + Sync {
    fn revoke(&self, req: RevokeRequest);
}

impl<F: Fn(RevokeRequest) + Send + Sync> Revoke for F {
    fn revoke(&self, req: RevokeRequest) {
        self(req)
    }
}

/// Registered revoke callbacks, by pin id. Its mutex is taken after the map lock
/// when both are needed (never the other way round) and is never held while a
/// callback runs.
type Revokers = HashMap<u64, (usize, Arc<dyn Revoke>)>;

#[derive(Default)]
pub(crate) struct RevokeRegistry {
    entries: Mutex<Revokers>,
    next: AtomicU64,
}

impl RevokeRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Revokers> {
        // Each operation is one insert/remove/scan: a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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
    revoke_id: Option<u64>,
    pinned_as: PinnedAs,
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard")
            .field("frame", &self.frame)
            .field("kind", &self.kind)
            .field("revocable", &self.revoke_id.is_some())
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

    /// Id passed to the revoke callback, for revocable pins.
    pub fn revoke_id(&self) -> Option<u64> {
        self.revoke_id
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let s = &self.shared;
        if let Some(id) = self.revoke_id {
            s.revokers.lock().remove(&id);
        }
        let after = frame::unpin(&s.words[self.frame], self.kind, self.revoke_id.is_some());
        if frame::pins_of(after) == 0 {
            s.block_pins[s.block_of(self.frame)].fetch_sub(1, Ordering::AcqRel);
            s.notify();
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

impl Shared {
    fn take_pin(
        self: &Arc<Self>,
        f: usize,
        kind: PinKind,
        revocable: bool,
    ) -> Result<PinGuard, PinError> {
        self.take_pin_inner(f, kind, revocable, true)
    }

    fn take_pin_inner(
        self: &Arc<Self>,
        f: usize,
        kind: PinKind,
        revocable: bool,
        allow_locked: bool,
    ) -> Result<PinGuard, PinError> {
        if f >= self.frames {
            return Err(PinError::OutOfRange {
                frame: f,
                frames: self.frames,
            });
        }
        // Occupants: lock-free. Anything else: under the map lock, where the tree
        // says whether the frame is allocated (pinnable) or free (not).
        let r = match frame::try_pin(&self.words[f], kind, revocable) {
            Err(PinRefused::Free) if !allow_locked => Err(PinRefused::NotOccupant),
            Err(PinRefused::Free) => {
                let m = self.lock_frame(f);
                // A block in a small-block cache is free, though the tree holds it.
                if !m.tree.is_alloc(f) || self.cached(&m, f) {
                    Err(PinRefused::Free)
                } else {
                    let r = frame::pin_locked(&self.words[f], kind, revocable);
                    // The hint must be raised before the lock is dropped: once the
                    // allocation is freed, `claim_clean` relies on it to see this pin.
                    if matches!(r, Ok(before) if frame::pins_of(before) == 0) {
                        self.block_pins[self.block_of(f)].fetch_add(1, Ordering::AcqRel);
                    }
                    drop(m);
                    r.map(|w| (w, PinnedAs::Allocated))
                }
            }
            r => r.map(|w| (w, PinnedAs::Occupied)),
        };
        match r {
            Ok((before, pinned_as)) => {
                // For occupants the hint may lag the word: the freeze CAS decides.
                if pinned_as == PinnedAs::Occupied && frame::pins_of(before) == 0 {
                    self.block_pins[self.block_of(f)].fetch_add(1, Ordering::AcqRel);
                }
                Stats::bump(&self.stats.c().pins, 1);
                Ok(PinGuard {
                    shared: self.clone(),
                    frame: f,
                    kind,
                    revoke_id: None,
                    pinned_as,
                })
            }
            Err(r) => {
                Stats::bump(&self.stats.c().pin_refusals, 1);
                Err(match r {
                    PinRefused::Free => PinError::FrameFree { frame: f },
                    PinRefused::NotOccupant => PinError::NotOccupied { frame: f },
                    PinRefused::Frozen => PinError::Migrating { frame: f },
                    PinRefused::Overflow => PinError::TooManyPins { frame: f },
                })
            }
        }
    }
}

impl Allocator {
    /// Take a transient pin (I/O in flight) on an allocated or occupied frame.
    /// Allocations skip ranges with pinned frames, or wait, per their policy.
    pub fn pin(&self, frame: usize) -> Result<PinGuard, PinError> {
        self.shared.take_pin(frame, PinKind::Transient, false)
    }

    /// Take a transient pin on a frame only if it holds a movable occupant: one
    /// compare-and-swap, never a lock. This is the guest-I/O path (the VMM pins the
    /// guest page it is about to do I/O on); pins on DMA allocations use [`pin`].
    ///
    /// [`pin`]: Allocator::pin
    pub fn pin_occupant(&self, frame: usize) -> Result<PinGuard, PinError> {
        self.shared
            .take_pin_inner(frame, PinKind::Transient, false, false)
    }

    /// Take a pin whose holder agrees to give it back when `revoke` is called. Such
    /// pins may be long-term on occupants without moving them: the allocator ranks
    /// ranges blocked only by revocable pins after all unpinned ranges, and when it
    /// needs one it calls `revoke` and waits (within the request's policy).
    pub fn pin_revocable(
        &self,
        frame: usize,
        kind: PinKind,
        revoke: Arc<dyn Revoke>,
    ) -> Result<PinGuard, PinError> {
        let s = &self.shared;
        let mut g = s.take_pin(frame, kind, true)?;
        let id = s.revokers.next.fetch_add(1, Ordering::Relaxed);
        s.revokers.lock().insert(id, (frame, revoke));
        g.revoke_id = Some(id);
        Ok(g)
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
        let m = s.lock_frame(f);
        let w = s.words[f].get();
        let occupant = match (frame::tag_of(w), m.occupants[f]) {
            (Tag::Free, _) if m.tree.is_alloc(f) && !s.cached(&m, f) => {
                drop(m);
                return s
                    .take_pin(f, PinKind::LongTerm, false)
                    .map(LongTermPin::Held);
            }
            (Tag::Free, _) => return Err(PinError::FrameFree { frame: f }),
            (Tag::Occupied, None) => return Err(PinError::Migrating { frame: f }),
            (Tag::Occupied, Some(o)) => o,
        };
        if let Err(w) = frame::try_freeze(&s.words[f], Tag::Occupied) {
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
        let mut m = s.lock_frame(f);
        match r {
            Ok(()) => {
                m.occupants[f] = None;
                m.tree.set_occ(f, 1, false);
                frame::thaw(&s.words[f], Tag::Free);
                drop(m);
                Stats::bump(&s.stats.c().longterm_moved_out, 1);
                Stats::bump(&s.stats.c().pages_migrated, 1);
                Stats::bump(&s.stats.c().bytes_migrated, s.config.granule as u64);
                s.notify();
                Ok(LongTermPin::MovedOut(occupant))
            }
            Err(source) => {
                frame::thaw(&s.words[f], Tag::Occupied);
                Stats::bump(&s.stats.c().move_failures, 1);
                Err(PinError::MoveOutFailed {
                    frame: f,
                    occupant,
                    source,
                })
            }
        }
    }

    /// Ask the holders of revocable pins on `[start, start+n)` to let go.
    pub(crate) fn request_revoke(&self, start: usize, n: usize) {
        let s = &self.shared;
        let targets: Vec<(u64, usize, Arc<dyn Revoke>)> = s
            .revokers
            .lock()
            .iter()
            .filter(|(_, (f, _))| (start..start + n).contains(f))
            .map(|(id, (f, cb))| (*id, *f, cb.clone()))
            .collect();
        for (pin_id, frame, cb) in targets {
            Stats::bump(&s.stats.c().revoke_requests, 1);
            cb.revoke(RevokeRequest { frame, pin_id });
        }
    }
}
