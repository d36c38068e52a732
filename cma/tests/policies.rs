//! Behaviour of allocation, migration, pins and each policy, one scenario per test.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use cma::{
    AllocError, AllocRequest, FrameState, LongTermPin, Occupant, PinError, PinnedAs, Policy,
};
use common::*;

const MIB: usize = 1 << 20;

fn occ(page: u64) -> Occupant {
    Occupant { owner: 7, page }
}

/// Fill every frame with an occupant; returns them.
fn fill_region(s: &Setup) -> Vec<Occupant> {
    (0..s.alloc.frames() as u64)
        .map(|p| {
            place(&s.alloc, occ(p)).expect("room");
            occ(p)
        })
        .collect()
}

#[test]
fn clean_allocations_are_contiguous_aligned_and_reusable_at_once() {
    let s = setup(4 * MIB, 64 * K4);
    let a = s
        .alloc
        .alloc(AllocRequest::new(3 * K4 + 1).align(64 * K4))
        .unwrap();
    assert_eq!((a.offset() % (64 * K4), a.len()), (0, 4 * K4));
    assert_eq!(a.migrated_frames(), 0);
    assert!(
        a.phys_addr().is_none(),
        "memfd region must not claim physical addresses"
    );
    let whole = s.alloc.alloc(AllocRequest::new(4 * MIB)).unwrap_err();
    assert!(matches!(whole, AllocError::NoRoom { .. }), "{whole}");
    drop(a);
    // Freed range reusable immediately, by the whole-region request.
    let w = s.alloc.alloc(AllocRequest::new(4 * MIB)).unwrap();
    assert_eq!(w.offset(), 0);
    assert_eq!(s.alloc.stats().frees, 1);
}

#[test]
fn migration_moves_occupants_and_keeps_every_byte() {
    let s = setup(2 * MIB, 64 * K4);
    let all = fill_region(&s);
    // Half the occupants leave, in a scattered pattern.
    let mut kept = Vec::new();
    for (f, o) in occupants_in_region(&s.alloc) {
        if f % 3 == 0 {
            s.alloc.vacate(f, o).unwrap();
        } else {
            kept.push(o);
        }
    }
    assert!(kept.len() < all.len());
    let a = s.alloc.alloc(AllocRequest::new(256 * K4)).unwrap();
    assert!(a.migrated_frames() > 0);
    for f in a.frames() {
        assert_eq!(s.alloc.frame_info(f).unwrap().state, FrameState::Allocated);
    }
    let st = s.alloc.stats();
    assert_eq!(st.pages_migrated as usize, a.migrated_frames());
    assert_eq!(st.bytes_migrated as usize, a.migrated_frames() * K4);
    check_no_occupant_lost(&s, &kept);
    // A full region: everything left must go out of the region.
    let rest = s.alloc.alloc(AllocRequest::new(256 * K4)).unwrap();
    check_no_occupant_lost(&s, &kept);
    drop((a, rest));
}

#[test]
fn fail_fast_skips_pinned_candidates_and_says_so() {
    let s = setup(MIB, 16 * K4);
    fill_region(&s);
    // Pin one frame in every 64 KiB window but the third.
    let pins: Vec<_> = (0..16)
        .filter(|w| *w != 2)
        .map(|w| s.alloc.pin(w * 16 + 5).unwrap())
        .collect();
    assert!(pins.iter().all(|p| p.pinned_as() == PinnedAs::Occupied));
    let a = s
        .alloc
        .alloc(AllocRequest::new(16 * K4).align(16 * K4))
        .unwrap();
    assert_eq!(a.offset(), 2 * 16 * K4);
    let e = s
        .alloc
        .alloc(AllocRequest::new(16 * K4).align(16 * K4))
        .unwrap_err();
    match e {
        AllocError::AllCandidatesPinned {
            pinned, candidates, ..
        } => assert_eq!((pinned, candidates), (15, 15)),
        e => panic!("wrong reason {e}"),
    }
    // Pinned occupants did not move.
    for p in &pins {
        assert!(matches!(
            s.alloc.frame_info(p.frame()).unwrap().state,
            FrameState::Occupied(_)
        ));
    }
}

#[test]
fn retry_succeeds_once_a_pin_is_dropped_and_fails_at_the_deadline() {
    let s = setup(MIB, 16 * K4);
    fill_region(&s);
    let pins: Vec<_> = (0..16).map(|w| s.alloc.pin(w * 16).unwrap()).collect();
    let t = Instant::now();
    let e = s.alloc.alloc(
        AllocRequest::new(16 * K4)
            .align(16 * K4)
            .policy(Policy::Retry {
                deadline: Instant::now() + Duration::from_millis(30),
            }),
    );
    assert!(
        matches!(e, Err(AllocError::DeadlinePassed { sweeps, .. }) if sweeps > 1),
        "{e:?}"
    );
    assert!(t.elapsed() >= Duration::from_millis(30));
    let (tx, rx) = mpsc::channel();
    let holder = thread::spawn(move || {
        let mut pins = pins;
        rx.recv().unwrap();
        thread::sleep(Duration::from_millis(20));
        pins.truncate(15); // drops the pin on window 15
        rx.recv().unwrap();
    });
    tx.send(()).unwrap();
    let a = s.alloc.alloc(
        AllocRequest::new(16 * K4)
            .align(16 * K4)
            .policy(Policy::Retry {
                deadline: Instant::now() + Duration::from_secs(5),
            }),
    );
    tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(a.unwrap().offset(), 15 * 16 * K4);
    assert!(s.alloc.stats().retries > 0);
}

#[test]
fn wait_for_pin_waits_for_that_pin_and_times_out_naming_the_frame() {
    let s = setup(64 * K4, 16 * K4);
    fill_region(&s);
    let pin = s.alloc.pin(9).unwrap();
    let policy = Policy::WaitForPin {
        timeout: Duration::from_millis(20),
    };
    let e = s
        .alloc
        .alloc(AllocRequest::new(64 * K4).policy(policy))
        .unwrap_err();
    assert!(
        matches!(e, AllocError::PinWaitTimedOut { frame: 9, .. }),
        "{e}"
    );
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(10));
        drop(pin);
    });
    let policy = Policy::WaitForPin {
        timeout: Duration::from_secs(5),
    };
    let a = s
        .alloc
        .alloc(AllocRequest::new(64 * K4).policy(policy))
        .unwrap();
    releaser.join().unwrap();
    assert_eq!(a.len(), 64 * K4);
    let st = s.alloc.stats();
    assert!(st.pin_waits >= 2 && st.pin_wait_timeouts >= 1);
}

#[test]
fn long_term_pin_moves_occupant_out_first() {
    let s = setup(64 * K4, 16 * K4);
    let f = place(&s.alloc, occ(1)).unwrap();
    match s.alloc.pin_longterm(f).unwrap() {
        LongTermPin::MovedOut(o) => assert_eq!(o, occ(1)),
        LongTermPin::Held(_) => panic!("occupant pinned in place"),
    }
    assert_eq!(s.alloc.frame_info(f).unwrap().state, FrameState::Free);
    assert!(matches(&s.mover.outside_copy(occ(1)).unwrap(), occ(1)));
    // Occupant with a transient pin cannot move: the error says why.
    let g = place(&s.alloc, occ(2)).unwrap();
    let t = s.alloc.pin(g).unwrap();
    assert!(matches!(
        s.alloc.pin_longterm(g),
        Err(PinError::OccupantPinned { pins: 1, .. })
    ));
    drop(t);
    // DMA allocation frames are pinned in place.
    let a = s.alloc.alloc(AllocRequest::new(K4)).unwrap();
    let held = match s.alloc.pin_longterm(a.frames().start).unwrap() {
        LongTermPin::Held(p) => p,
        LongTermPin::MovedOut(o) => panic!("moved {o:?}"),
    };
    assert_eq!(s.alloc.frame_info(held.frame()).unwrap().longterm_pins, 1);
    assert!(matches!(
        s.alloc.pin_longterm(40),
        Err(PinError::FrameFree { frame: 40 })
    ));
}

#[test]
fn pins_refuse_free_and_out_of_range_frames() {
    let s = setup(64 * K4, 16 * K4);
    assert!(matches!(
        s.alloc.pin(0),
        Err(PinError::FrameFree { frame: 0 })
    ));
    assert!(matches!(s.alloc.pin(64), Err(PinError::OutOfRange { .. })));
    let o = place(&s.alloc, occ(1)).unwrap();
    assert_eq!(
        s.alloc.pin_occupant(o).unwrap().pinned_as(),
        PinnedAs::Occupied
    );
    s.alloc.vacate(o, occ(1)).unwrap();
    let a = s.alloc.alloc(AllocRequest::new(K4)).unwrap();
    let f = a.frames().start;
    assert!(matches!(
        s.alloc.pin_occupant(f),
        Err(PinError::NotOccupied { .. })
    ));
    let p = s.alloc.pin(f).unwrap();
    assert_eq!(p.pinned_as(), PinnedAs::Allocated);
    // Freed while pinned: the frame is never handed out until the pin goes.
    drop(a);
    let b = s.alloc.alloc(AllocRequest::new(64 * K4)).unwrap_err();
    assert!(matches!(b, AllocError::AllCandidatesPinned { .. }), "{b}");
    drop(p);
    s.alloc.alloc(AllocRequest::new(64 * K4)).unwrap();
}
