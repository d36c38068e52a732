//! Lending in place: the owner of movable occupants turns the frames it occupies into a
//! DMA allocation without a copy, and back.
//!
//! A VMM lends region frames to guest pages; when the guest asks for a DMA mapping of pages
//! that already sit on a suitable run of frames, nothing needs to move: the frames change
//! from "occupied by page p" to "allocated", under one map-lock hold. On unmap they change
//! back. Both directions are all-or-nothing.

use crate::error::OccupyError;
use crate::frame::{self, FrameKind};
use crate::migrate::Occupant;
use crate::stats::Stats;

use super::{Allocation, Allocator};

impl Allocator {
    /// Turn `occupants.len()` frames from `start`, occupied in that order by `occupants`,
    /// into an allocation. Fails, changing nothing, if a frame holds anything else, is
    /// pinned or being migrated, or if the run crosses an extent boundary. The caller owns
    /// the occupants and takes the frames' contents as they are.
    pub fn claim_occupied(
        &self,
        start: usize,
        occupants: &[Occupant],
    ) -> Result<Allocation, OccupyError> {
        let s = &self.shared;
        let n = occupants.len();
        let end = start.checked_add(n).filter(|&e| n > 0 && e <= s.frames);
        let Some(end) = end else {
            return Err(OccupyError::OutOfRange {
                frame: start.saturating_add(n),
                frames: s.frames,
            });
        };
        let extent = s.layout.extent_of(start);
        if s.layout.extents.get(extent).is_none_or(|e| end > e.end) {
            return Err(OccupyError::Straddles { start, end });
        }
        let mut m = s.layout.lock_frame(start);
        for (i, (f, &occ)) in (start..end).zip(occupants).enumerate() {
            let failure = if m.tree.is_alloc(f) || m.occupants[f] != Some(occ) {
                Some(OccupyError::WrongOccupant {
                    frame: f,
                    expected: occ,
                    found: if m.tree.is_alloc(f) {
                        None
                    } else {
                        m.occupants[f]
                    },
                })
            } else {
                frame::try_freeze(&s.words[f], FrameKind::Occupied)
                    .err()
                    .map(|w| {
                        if frame::is_frozen(w) {
                            OccupyError::Migrating { frame: f }
                        } else {
                            OccupyError::Pinned {
                                frame: f,
                                pins: frame::pins_of(w),
                            }
                        }
                    })
            };
            if let Some(e) = failure {
                for g in start..start + i {
                    frame::thaw(&s.words[g], FrameKind::Occupied);
                }
                return Err(e);
            }
        }
        for f in start..end {
            m.occupants[f] = None;
            frame::thaw(&s.words[f], FrameKind::FreeOrAllocated);
        }
        m.tree.set_occ(start, n, false);
        m.tree.set_alloc(start, n, true);
        let node = m.node(start, n);
        drop(m);
        Stats::bump(&s.stats.c().claimed_in_place, 1);
        Ok(self.handle(start, n, extent, 0, node))
    }

    /// Hand an allocation back as occupants, in place: frame `start + i` becomes occupied by
    /// `occupants[i]`, keeping its contents and any pins on it (a pinned occupant is neither
    /// migrated nor handed out until unpinned). Fails, giving the allocation back, if the
    /// lengths differ.
    pub fn into_occupants(
        &self,
        mut alloc: Allocation,
        occupants: &[Occupant],
    ) -> Result<(), (Allocation, OccupyError)> {
        let s = &self.shared;
        let (start, n) = (alloc.start, alloc.frames);
        if occupants.len() != n {
            return Err((
                alloc,
                OccupyError::Straddles {
                    start,
                    end: start + occupants.len(),
                },
            ));
        }
        let mut m = s.layout.lock_frame(start);
        m.tree.set_alloc(start, n, false);
        m.tree.set_occ(start, n, true);
        for (f, &occ) in (start..start + n).zip(occupants) {
            m.occupants[f] = Some(occ);
            frame::set_kind(&s.words[f], FrameKind::Occupied);
        }
        drop(m);
        // The frames are accounted for: the allocation's drop must not free them.
        alloc.frames = 0;
        Stats::bump(&s.stats.c().returned_as_occupants, 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{
        AllocRequest, Allocator, AllocatorConfig, Backing, FrameState, MemcpyMover, Occupant,
        OccupyError, Policy, Region,
    };

    fn allocator() -> Allocator {
        let region = Arc::new(Region::reserve(64 << 12, Backing::Memfd).unwrap());
        let mover = Arc::new(MemcpyMover::new(region.clone()));
        let config = AllocatorConfig {
            small_cache_batch: 0,
            ..AllocatorConfig::default()
        };
        Allocator::new(region, config, mover).unwrap()
    }

    fn occ(page: u64) -> Occupant {
        Occupant { owner: 7, page }
    }

    #[test]
    fn occupied_frames_become_an_allocation_and_back_without_moving() {
        let a = allocator();
        let occs: Vec<_> = (0..8).map(occ).collect();
        for (i, o) in occs.iter().enumerate() {
            a.place_occupant_at(8 + i, *o).unwrap();
        }
        let alloc = a.claim_occupied(8, &occs).unwrap();
        assert_eq!(alloc.frames(), 8..16);
        assert_eq!(a.frame_info(9).unwrap().state, FrameState::Allocated);
        assert_eq!(a.usage().occupied, 0);
        // Nobody else can get those frames now.
        let other = a
            .alloc(AllocRequest::new(56 << 12).policy(Policy::FailFast))
            .unwrap_err();
        assert!(other.to_string().contains("room"), "{other}");
        a.into_occupants(alloc, &occs).unwrap();
        assert_eq!(
            a.frame_info(15).unwrap().state,
            FrameState::Occupied(occ(7))
        );
        assert_eq!(a.usage().allocated, 0);
        assert_eq!(a.usage().occupied, 8);
        assert_eq!(a.stats().pages_migrated, 0);
    }

    #[test]
    fn a_pinned_or_foreign_frame_fails_the_claim_and_changes_nothing() {
        let a = allocator();
        let occs: Vec<_> = (0..4).map(occ).collect();
        for (i, o) in occs.iter().enumerate() {
            a.place_occupant_at(i, *o).unwrap();
        }
        let pin = a.pin_occupant(2).unwrap();
        assert_eq!(
            a.claim_occupied(0, &occs).unwrap_err(),
            OccupyError::Pinned { frame: 2, pins: 1 }
        );
        // Frames 0 and 1 were thawed again: they can still be pinned lock-free.
        drop(a.pin_occupant(0).unwrap());
        drop(pin);
        let wrong = [occ(0), occ(1), occ(3), occ(2)];
        assert!(matches!(
            a.claim_occupied(0, &wrong).unwrap_err(),
            OccupyError::WrongOccupant { frame: 2, .. }
        ));
        assert!(a.claim_occupied(0, &occs).is_ok());
        assert!(matches!(
            a.claim_occupied(62, &occs).unwrap_err(),
            OccupyError::OutOfRange { .. }
        ));
    }

    #[test]
    fn pins_survive_the_return_to_occupants() {
        let a = allocator();
        let alloc = a
            .alloc(AllocRequest::new(2 << 12).policy(Policy::FailFast))
            .unwrap();
        let f = alloc.frames().start;
        let pin = a.pin(f).unwrap();
        a.into_occupants(alloc, &[occ(0), occ(1)]).unwrap();
        let info = a.frame_info(f).unwrap();
        assert_eq!((info.state, info.pins), (FrameState::Occupied(occ(0)), 1));
        assert!(a.vacate(f, occ(0)).is_err(), "pinned occupants stay");
        drop(pin);
        a.vacate(f, occ(0)).unwrap();
    }
}
