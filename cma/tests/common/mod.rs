//! Shared helpers for the integration tests: an allocator over a memfd region with
//! the memcpy mover, and occupant byte patterns to prove no data is lost.
#![allow(dead_code)]

use std::sync::Arc;

use cma::{Allocator, AllocatorConfig, Backing, FrameState, MemcpyMover, Occupant, Region};

pub const K4: usize = 4096;

pub struct Setup {
    pub alloc: Allocator,
    pub mover: Arc<MemcpyMover>,
}

pub fn setup(len: usize, pageblock: usize) -> Setup {
    setup_with(len, pageblock, 0)
}

/// Like `setup`, with `arenas` arenas (0: the default choice).
pub fn setup_with(len: usize, pageblock: usize, arenas: usize) -> Setup {
    let region = Arc::new(Region::reserve(len, Backing::Memfd).expect("memfd region"));
    let mover = Arc::new(MemcpyMover::new(region.clone()));
    let config = AllocatorConfig {
        pageblock,
        arenas,
        ..Default::default()
    };
    let alloc = Allocator::new(region, config, mover.clone()).expect("allocator");
    Setup { alloc, mover }
}

/// The byte at `i` of an occupant's page: distinct per owner, page and position.
pub fn pattern(o: Occupant, i: usize) -> u8 {
    (o.owner.wrapping_mul(131) ^ o.page.wrapping_mul(31) ^ (i as u64).wrapping_mul(7)) as u8
}

fn frame_ptr(a: &Allocator, f: usize) -> *mut u8 {
    assert!(f < a.frames());
    a.region()
        .host_addr()
        .as_ptr()
        .wrapping_add(f * a.config().granule)
}

/// A copy of a frame's bytes.
pub fn read_frame(a: &Allocator, f: usize) -> Vec<u8> {
    let g = a.config().granule;
    // SAFETY: `f` is a frame of the region, mapped while `a` lives. The tests read a
    // frame only when no migration can touch it (quiescent, or pinned).
    unsafe { std::slice::from_raw_parts(frame_ptr(a, f), g).to_vec() }
}

/// Write an occupant's pattern into its frame.
pub fn fill(a: &Allocator, f: usize, o: Occupant) {
    let p = frame_ptr(a, f);
    for i in 0..a.config().granule {
        // SAFETY: in bounds of frame `f` (see `read_frame`); only used single-threaded,
        // right after placing `o` there with `place_occupant_at`.
        unsafe { p.add(i).write_volatile(pattern(o, i)) };
    }
}

pub fn matches(bytes: &[u8], o: Occupant) -> bool {
    bytes.iter().enumerate().all(|(i, b)| *b == pattern(o, i))
}

/// Place an occupant wherever the allocator wants, with its pattern written
/// before anyone can migrate it.
pub fn place(a: &Allocator, o: Occupant) -> Option<usize> {
    a.place_occupant_with(o, |b| {
        b.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = pattern(o, i))
    })
    .ok()
}

/// Every occupant currently in the region, by frame (quiescent callers only).
pub fn occupants_in_region(a: &Allocator) -> Vec<(usize, Occupant)> {
    (0..a.frames())
        .filter_map(|f| match a.frame_info(f).unwrap().state {
            FrameState::Occupied(o) => Some((f, o)),
            _ => None,
        })
        .collect()
}

/// Check every occupant ever placed (and not vacated) is either in the region with
/// its exact bytes or held outside by the mover with its exact bytes, exactly once.
pub fn check_no_occupant_lost(s: &Setup, expected: &[Occupant]) {
    let mut found: Vec<Occupant> = Vec::new();
    for (f, o) in occupants_in_region(&s.alloc) {
        assert!(
            matches(&read_frame(&s.alloc, f), o),
            "occupant {o:?} corrupted at frame {f}"
        );
        found.push(o);
    }
    for o in s.mover.outside_occupants() {
        let bytes = s.mover.outside_copy(o).unwrap();
        assert!(
            matches(&bytes, o),
            "occupant {o:?} corrupted outside the region"
        );
        found.push(o);
    }
    found.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(found.len(), want.len(), "occupant count changed");
    assert_eq!(found, want, "occupants lost or duplicated");
}
