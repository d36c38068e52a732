//! Property test against a reference model: random sequences of alloc, free,
//! occupant placement/removal, pins and long-term pins, checked after every step.
//!
//! The model is deliberately naive (a per-frame scan): it knows which frames hold
//! what and which pins the test holds, and from that decides whether a FailFast
//! request *must* succeed (some aligned window has no allocated and no pinned
//! frame) and why it must fail otherwise.

mod common;

use cma::{
    AllocError, AllocRequest, Allocation, FrameState, LongTermPin, Occupant, PinGuard, PinnedAs,
};
use common::*;
use proptest::prelude::*;

const FRAMES: usize = 256;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        frames: usize,
        align_log: u32,
    },
    Free(usize),
    Place(u8),
    Vacate(usize),
    Pin(usize),
    Unpin(usize),
    LongTerm(usize),
    /// Pin a frame of a live allocation (I/O in flight), kept past its free.
    PinAllocated(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..80, 0u32..6).prop_map(|(frames, align_log)| Op::Alloc { frames, align_log }),
        1 => any::<usize>().prop_map(Op::PinAllocated),
        2 => any::<usize>().prop_map(Op::Free),
        3 => (1u8..60).prop_map(Op::Place),
        1 => any::<usize>().prop_map(Op::Vacate),
        2 => any::<usize>().prop_map(Op::Pin),
        1 => any::<usize>().prop_map(Op::Unpin),
        1 => any::<usize>().prop_map(Op::LongTerm),
    ]
}

struct World {
    s: Setup,
    /// Frames per arena: no allocation spans two.
    arena: usize,
    live: Vec<Allocation>,
    pins: Vec<PinGuard>,
    occupants: Vec<Occupant>,
    next_page: u64,
}

impl World {
    fn states(&self) -> Vec<(FrameState, u32)> {
        (0..FRAMES)
            .map(|f| {
                let i = self.s.alloc.frame_info(f).unwrap();
                (i.state, i.pins)
            })
            .collect()
    }

    /// Some window of `n` frames aligned to `align` has no allocated frame (and, if
    /// `unpinned`, no pinned one).
    fn window_exists(&self, n: usize, align: usize, unpinned: bool) -> bool {
        let st = self.states();
        (0..FRAMES).step_by(align).any(|a| {
            a + n <= FRAMES
                && a / self.arena == (a + n - 1) / self.arena
                && st[a..a + n]
                    .iter()
                    .all(|(s, pins)| *s != FrameState::Allocated && (!unpinned || *pins == 0))
        })
    }

    fn check_invariants(&self) {
        // Live allocations are disjoint and every frame reports Allocated.
        let mut owner = vec![usize::MAX; FRAMES];
        for (i, a) in self.live.iter().enumerate() {
            for f in a.frames() {
                assert_eq!(owner[f], usize::MAX, "frame {f} handed out twice");
                owner[f] = i;
                assert_eq!(
                    self.s.alloc.frame_info(f).unwrap().state,
                    FrameState::Allocated
                );
            }
        }
        // A pin taken on an occupant keeps that occupant in place.
        for p in self
            .pins
            .iter()
            .filter(|p| p.pinned_as() == PinnedAs::Occupied)
        {
            assert_eq!(
                owner[p.frame()],
                usize::MAX,
                "pinned occupant frame {} allocated",
                p.frame()
            );
            assert!(matches!(
                self.s.alloc.frame_info(p.frame()).unwrap().state,
                FrameState::Occupied(_)
            ));
        }
        check_no_occupant_lost(&self.s, &self.occupants);
        let u = self.s.alloc.usage();
        assert_eq!(
            u.allocated,
            self.live.iter().map(|a| a.frames().len()).sum::<usize>()
        );
    }

    fn apply(&mut self, op: Op) {
        let a = &self.s.alloc;
        match op {
            Op::Alloc { frames, align_log } => {
                let align = 1usize << align_log;
                let must = self.window_exists(frames, align, true);
                let any = self.window_exists(frames, align, false);
                // Pins not on a live allocation: on occupants, or left over on frames
                // freed while pinned. None of them may end up inside the new range.
                let live: Vec<std::ops::Range<usize>> =
                    self.live.iter().map(|a| a.frames()).collect();
                let pinned_before: Vec<usize> = self
                    .pins
                    .iter()
                    .map(|p| p.frame())
                    .filter(|f| !live.iter().any(|r| r.contains(f)))
                    .collect();
                match a.alloc(AllocRequest::new(frames * K4).align(align * K4)) {
                    Ok(x) => {
                        assert!(
                            must,
                            "allocated although every window was pinned or allocated"
                        );
                        assert_eq!(x.frames().start % align, 0, "misaligned");
                        assert_eq!(
                            x.frames().start / self.arena,
                            (x.frames().end - 1) / self.arena,
                            "{x:?} spans two arenas"
                        );
                        assert_eq!(x.len(), frames * K4);
                        assert!(
                            pinned_before.iter().all(|f| !x.frames().contains(f)),
                            "pinned frame inside {x:?}"
                        );
                        self.live.push(x);
                    }
                    Err(AllocError::InvalidRequest { reason, .. }) if frames > self.arena => {
                        assert!(reason.contains("arena"), "{reason}")
                    }
                    Err(AllocError::NoRoom { .. }) => {
                        assert!(!any, "NoRoom but a window without allocations exists")
                    }
                    Err(AllocError::AllCandidatesPinned { .. }) => {
                        assert!(
                            any && !must,
                            "AllCandidatesPinned but must={must} any={any}"
                        )
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Free(i) if !self.live.is_empty() => {
                let i = i % self.live.len();
                self.live.swap_remove(i);
            }
            Op::Place(n) => {
                for _ in 0..n {
                    let o = Occupant {
                        owner: 1,
                        page: self.next_page,
                    };
                    if place(a, o).is_none() {
                        break;
                    }
                    self.next_page += 1;
                    self.occupants.push(o);
                }
            }
            Op::Vacate(i) => {
                let occ = occupants_in_region(a);
                if !occ.is_empty() {
                    let (f, o) = occ[i % occ.len()];
                    if a.vacate(f, o).is_ok() {
                        self.occupants.retain(|x| *x != o);
                    } else {
                        assert!(
                            a.frame_info(f).unwrap().pins > 0,
                            "vacate of an unpinned occupant failed"
                        );
                    }
                }
            }
            Op::Pin(f) => {
                if let Ok(p) = a.pin(f % FRAMES) {
                    self.pins.push(p);
                } else {
                    assert_eq!(a.frame_info(f % FRAMES).unwrap().state, FrameState::Free);
                }
            }
            Op::Unpin(i) if !self.pins.is_empty() => {
                let i = i % self.pins.len();
                self.pins.swap_remove(i);
            }
            Op::PinAllocated(i) if !self.live.is_empty() => {
                let r = self.live[i % self.live.len()].frames();
                let p = a.pin(r.start + i % r.len()).unwrap();
                assert_eq!(p.pinned_as(), PinnedAs::Allocated);
                self.pins.push(p);
            }
            Op::LongTerm(f) => {
                let f = f % FRAMES;
                let before = a.frame_info(f).unwrap();
                match a.pin_longterm(f) {
                    Ok(LongTermPin::Held(p)) => {
                        assert_eq!(before.state, FrameState::Allocated);
                        self.pins.push(p);
                    }
                    Ok(LongTermPin::MovedOut(o)) => {
                        assert_eq!(before.state, FrameState::Occupied(o));
                        assert_eq!(a.frame_info(f).unwrap().state, FrameState::Free);
                    }
                    Err(_) => assert!(
                        before.state == FrameState::Free || before.pins > 0,
                        "{before:?}"
                    ),
                }
            }
            _ => {}
        }
    }
}

/// Run `ops` on a region of `FRAMES` frames cut into `arenas` arenas, checking the
/// model after every step, then check that freeing everything restores the region.
fn run(ops: Vec<Op>, arenas: usize) -> Result<(), TestCaseError> {
    let mut w = World {
        s: setup_with(FRAMES * K4, 16 * K4, arenas),
        arena: FRAMES / arenas,
        live: Vec::new(),
        pins: Vec::new(),
        occupants: Vec::new(),
        next_page: 0,
    };
    prop_assert_eq!(w.s.alloc.arenas(), arenas);
    for op in ops {
        w.apply(op);
        w.check_invariants();
    }
    // Free restores: with every handle and pin dropped and occupants vacated,
    // every arena is one clean run again.
    w.live.clear();
    w.pins.clear();
    for (f, o) in occupants_in_region(&w.s.alloc) {
        w.s.alloc.vacate(f, o).unwrap();
    }
    let u = w.s.alloc.usage();
    prop_assert_eq!(
        (u.allocated, u.occupied, u.largest_clean_run),
        (0, 0, w.arena)
    );
    for _ in 0..arenas {
        prop_assert!(w.s.alloc.alloc(AllocRequest::new(w.arena * K4)).is_ok());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn allocator_matches_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 1)?;
    }

    /// The same with four arenas of 64 frames: requests larger than an arena fail
    /// with their own reason, and no allocation spans two arenas.
    #[test]
    fn allocator_with_arenas_matches_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 4)?;
    }
}
