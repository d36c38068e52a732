//! Unit tests of the allocator: extents, alignment, validation.

use super::*;
use crate::region::Extent;
use crate::{AllocError, AllocRequest, MemcpyMover};

const K4: usize = 4096;

fn over(region: Region) -> Allocator {
    let region = Arc::new(region);
    let mover = Arc::new(MemcpyMover::new(region.clone()));
    let config = AllocatorConfig {
        pageblock: 64 * K4,
        ..Default::default()
    };
    Allocator::new(region, config, mover).unwrap()
}

/// Three extents: 12 KiB-misaligned physical bases, different sizes.
fn three_extents() -> Allocator {
    over(Region::fake_extents(vec![
        Extent {
            offset: 0,
            len: 40 * K4,
            phys: Some(0x10_0000 + 3 * K4 as u64),
        },
        Extent {
            offset: 40 * K4,
            len: 100 * K4,
            phys: Some(0x80_0000),
        },
        Extent {
            offset: 140 * K4,
            len: 60 * K4,
            phys: Some(0x40_0000 + 5 * K4 as u64),
        },
    ]))
}

#[test]
fn allocations_never_straddle_extents_and_align_physically() {
    let a = three_extents();
    let mut live = Vec::new();
    loop {
        match a.alloc(AllocRequest::new(16 * K4).align(16 * K4)) {
            Ok(x) => live.push(x),
            Err(AllocError::NoRoom { .. }) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    // 40 frames at phys +3: one aligned 16-frame slot (phys frames 272..288 hold
    // offsets 13..29); 100 frames at an aligned base: six; 60 at +5: three.
    assert_eq!(live.len(), 1 + 6 + 3);
    for x in &live {
        let e = a.region().extents()[x.extent()];
        assert!(
            x.offset() >= e.offset && x.offset() + x.len() <= e.end(),
            "{x:?} straddles {e:?}"
        );
        assert_eq!(x.phys_addr().unwrap() % (16 * K4) as u64, 0, "{x:?}");
    }
}

#[test]
fn larger_than_any_extent_has_its_own_reason() {
    let a = three_extents();
    assert_eq!(
        a.alloc(AllocRequest::new(101 * K4)).unwrap_err(),
        AllocError::LargerThanExtent {
            requested: 101 * K4,
            largest_extent: 100 * K4
        }
    );
    // The largest extent itself fits exactly, even though the region is larger.
    let x = a.alloc(AllocRequest::new(100 * K4)).unwrap();
    assert_eq!((x.offset(), x.extent()), (40 * K4, 1));
}

/// Two arenas over the three extents: arena boundaries cut extents like extent
/// boundaries do, and an allocation reports the region extent it lies in.
#[test]
fn arenas_cut_extents_and_allocations_never_span_them() {
    let region = Arc::new(Region::fake_extents(
        three_extents().region().extents().to_vec(),
    ));
    let mover = Arc::new(MemcpyMover::new(region.clone()));
    let config = AllocatorConfig {
        pageblock: 64 * K4,
        arenas: 2,
        ..Default::default()
    };
    let a = Allocator::new(region, config, mover).unwrap();
    // 200 frames in arenas of 128 (rounded up to whole 64-frame pageblocks).
    assert_eq!(a.arenas(), 2);
    // Extent 1 (frames 40..140) is cut at 128: 88 + 12 frames.
    let e = a.alloc(AllocRequest::new(100 * K4)).unwrap_err();
    assert!(
        matches!(e, AllocError::InvalidRequest { reason, .. } if reason.contains("arena")),
        "{e}"
    );
    assert!(e.to_string().contains("arenas"), "{e}");
    let mut live = Vec::new();
    while let Ok(x) = a.alloc(AllocRequest::new(8 * K4).align(8 * K4)) {
        live.push(x);
    }
    assert!(!live.is_empty());
    for x in &live {
        let fr = x.frames();
        assert_eq!(fr.start / 128, (fr.end - 1) / 128, "{x:?} spans two arenas");
        let e = a.region().extents()[x.extent()];
        assert!(
            x.offset() >= e.offset && x.offset() + x.len() <= e.end(),
            "{x:?}"
        );
        assert_eq!(x.phys_addr().unwrap() % (8 * K4) as u64, 0, "{x:?}");
    }
    // Every frame is reachable one by one, across both arenas.
    drop(live);
    let singles: Vec<_> = std::iter::from_fn(|| a.alloc(AllocRequest::new(K4)).ok()).collect();
    assert_eq!(singles.len(), 200);
}

#[test]
fn default_arenas_follow_region_size() {
    let mk = |len: usize| {
        let r = Arc::new(Region::reserve(len, crate::Backing::Memfd).unwrap());
        let m = Arc::new(MemcpyMover::new(r.clone()));
        Allocator::new(r, AllocatorConfig::default(), m).unwrap()
    };
    // Below 2 x 256 MiB: one arena, the whole region.
    assert_eq!(mk(64 << 20).arenas(), 1);
    assert_eq!(mk(511 << 20).arenas(), 1);
    // 1 GiB: one per cache shard (at least 2), at most 4 of 256 MiB.
    let a = mk(1 << 30);
    let shards = a.shared.caches.shards.len();
    assert_eq!(a.arenas(), shards.min(4));
    assert!(a.arenas() >= 2);
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let a = three_extents();
    for (len, align) in [
        (0, 1),
        (K4, 3),
        (K4, usize::MAX),
        (usize::MAX, 1),
        (K4, 1 << 40),
    ] {
        let e = a.alloc(AllocRequest::new(len).align(align)).unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::InvalidRequest { .. } | AllocError::LargerThanExtent { .. }
            ),
            "{len:#x}/{align:#x}: {e}"
        );
    }
    assert_eq!(a.stats().fail_invalid + a.stats().fail_too_large, 5);
}

#[test]
fn config_is_validated() {
    let r = Arc::new(Region::reserve(1 << 20, crate::Backing::Memfd).unwrap());
    let m = Arc::new(MemcpyMover::new(r.clone()));
    let bad = |c| Allocator::new(r.clone(), c, m.clone()).unwrap_err();
    let d = AllocatorConfig::default();
    assert!(matches!(
        bad(AllocatorConfig { granule: 1000, ..d }),
        ConfigError::BadGranule { .. }
    ));
    assert!(matches!(
        bad(AllocatorConfig {
            pageblock: 2048,
            ..d
        }),
        ConfigError::BadPageblock { .. }
    ));
    assert!(matches!(
        bad(AllocatorConfig {
            granule: 1 << 21,
            pageblock: 1 << 21,
            ..d
        }),
        ConfigError::RegionNotGranular { .. }
    ));
}

#[test]
fn migrated_allocations_never_straddle_extents_either() {
    let a = three_extents();
    // Every frame lent to an occupant: each allocation must migrate.
    for p in 0..a.frames() as u64 {
        a.place_occupant(crate::Occupant { owner: 1, page: p })
            .unwrap();
    }
    let mut live = Vec::new();
    while let Ok(x) = a.alloc(AllocRequest::new(24 * K4)) {
        assert!(x.migrated_frames() > 0);
        let e = a.region().extents()[x.extent()];
        assert!(
            x.offset() >= e.offset && x.offset() + x.len() <= e.end(),
            "{x:?} straddles {e:?}"
        );
        live.push(x);
    }
    // 40 / 24 + 100 / 24 + 60 / 24 windows: 1 + 4 + 2.
    assert_eq!(live.len(), 7);
}
